//! What several tests set up: a new tracked backing file with the
//! device's engine, and a mirror server running in this process (the
//! server's own code, on 127.0.0.1).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ublk_dev::backing::{Backing, BackingOptions};
use ublk_dev::engine::{Engine, Geometry, MAX_IO_BYTES};
use ublk_dev::tracking::{History, Tracker, TrackerOptions, DEFAULT_COW_MEMORY};

use mirror_server::clients::Registry;
use mirror_server::config::ServerConfig;
use ublk_mirror_common::identity::Identity;
use ublk_mirror_common::token::Token;

/// A new backing file of `size` bytes in `dir` (4096-byte blocks), its
/// tracker (journal in `dir/state`) and the device's engine.
pub struct TrackedDevice {
    pub backing: Backing,
    pub engine: Engine,
    pub tracker: Arc<Tracker>,
}

impl TrackedDevice {
    pub fn new(dir: &Path, size: u64, region_size: u64) -> TrackedDevice {
        TrackedDevice::open(dir, size, region_size, History::NewFile)
    }

    /// The same device again, after its daemon stopped (its journal kept).
    pub fn reopen(dir: &Path, size: u64, region_size: u64) -> TrackedDevice {
        TrackedDevice::open(dir, size, region_size, History::Recovering)
    }

    fn open(dir: &Path, size: u64, region_size: u64, history: History) -> TrackedDevice {
        let backing = Backing::open(&BackingOptions {
            path: &dir.join("disk.img"),
            size: Some(size),
            create: history == History::NewFile,
            block_size: 4096,
            direct_io: true,
        })
        .unwrap();
        let (tracker, _) = Tracker::open(&TrackerOptions {
            state_dir: &dir.join("state"),
            identity: (Path::new("/test/disk.img"), 1),
            file: backing.file(),
            device_size: size,
            region_size,
            history,
            cow_memory: DEFAULT_COW_MEMORY,
        })
        .unwrap();
        let engine = Engine::new(Geometry {
            size,
            block_size: 4096,
            max_io: MAX_IO_BYTES,
            discard: true,
        });
        TrackedDevice {
            backing,
            engine,
            tracker: Arc::new(tracker),
        }
    }
}

/// A running server; stops when dropped.
pub struct TestServer {
    pub address: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestServer {
    /// Serve `data` (made on first use) on `listen` (127.0.0.1:0 for any port).
    pub fn start(data: &Path, listen: &str) -> TestServer {
        TestServer::start_with(
            data,
            ServerConfig {
                listen: listen.parse().unwrap(),
                ..ServerConfig::default()
            },
        )
    }

    /// Serve `data` (made on first use) with `config`.
    pub fn start_with(data: &Path, config: ServerConfig) -> TestServer {
        if !data.join("identity").exists() {
            Identity::create(&data.join("identity")).unwrap();
            std::fs::create_dir_all(data.join("volumes")).unwrap();
        }
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let data = data.to_path_buf();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(mirror_server::serve::run(
                &data,
                &config,
                |addr| addr_tx.send(addr.to_string()).unwrap(),
                async {
                    let _ = stopped.await;
                },
            ))
            .unwrap();
        });
        let address = addr_rx.recv_timeout(Duration::from_secs(30)).unwrap();
        TestServer {
            address,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// A token for a new client `name`.
    pub fn token(&self, data: &Path, name: &str) -> Token {
        let secret = Registry::open(data)
            .unwrap()
            .add(name, Duration::from_secs(60), false)
            .unwrap();
        Token {
            name: name.into(),
            secret,
            server: Identity::load(&data.join("identity"))
                .unwrap()
                .fingerprint(),
            address: self.address.clone(),
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A small xorshift generator: the same bytes for the same seed (not 0),
/// and none of them compress.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}
