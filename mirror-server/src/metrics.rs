//! Metrics in Prometheus' text format, served on `GET /metrics` at
//! `server.toml`'s `[metrics] listen` (off without it; put it on
//! localhost or a management network: it names clients and volumes).
//!
//! Two kinds:
//! - **counters of what arrives** (epochs, blocks, bytes on the wire,
//!   bytes deduplicated on the wire, blocks that failed their hash,
//!   connections), counted by the sessions as it happens
//!   ([`Metrics::traffic`], [`Metrics::connected`]);
//! - **gauges of what is held**, read when scraped: per volume the last
//!   publication's time, its epoch, size and snapshots; the chunk store's
//!   chunks, bytes and damaged chunks (as this server's index knows them);
//!   exports and the initiator connections open on each (its readers);
//!   this process's memory, CPU and files;
//! - **what the schedules did**: snapshots the retention pruned, and the
//!   last verification's time and findings.
//!
//! Names follow Prometheus' conventions: a `mirror_` prefix, units in the
//! names, `_total` for counters; labels `client` and `volume`.

use std::convert::Infallible;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use crate::exports::Exports;
use crate::volumes::Volumes;

type Labels = Vec<(String, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;

fn client_label(client: &str) -> Labels {
    vec![("client".into(), client.into())]
}

fn volume_labels(name: &str) -> Labels {
    let (client, volume) = name.split_once('/').unwrap_or(("", name));
    vec![
        ("client".into(), client.into()),
        ("volume".into(), volume.into()),
    ]
}

/// What one data stream or epoch of a client brought.
#[derive(Debug, Clone, Copy, Default)]
pub struct Traffic {
    /// Blocks staged.
    pub blocks: u64,
    /// Their bytes on the wire.
    pub wire_bytes: u64,
    /// Bytes that came as `Known` (from the store, not the wire).
    pub known_bytes: u64,
    /// Blocks that failed their hash (asked for again).
    pub mismatches: u64,
}

impl Traffic {
    fn add(&mut self, o: Traffic) {
        self.blocks += o.blocks;
        self.wire_bytes += o.wire_bytes;
        self.known_bytes += o.known_bytes;
        self.mismatches += o.mismatches;
    }
}

/// A data stream's [`Traffic`], gathered as it comes and counted into the
/// metrics once: when [`StreamTraffic::flush`]ed, or when dropped (a
/// stream that failed).
#[derive(Debug)]
pub struct StreamTraffic<'a> {
    metrics: &'a Metrics,
    client: &'a str,
    gathered: Traffic,
}

impl<'a> StreamTraffic<'a> {
    /// Nothing gathered yet.
    pub fn new(metrics: &'a Metrics, client: &'a str) -> Self {
        StreamTraffic {
            metrics,
            client,
            gathered: Traffic::default(),
        }
    }

    /// One block's worth more.
    pub fn add(&mut self, t: Traffic) {
        self.gathered.add(t);
    }

    /// Count what was gathered.
    pub fn flush(&mut self) {
        let t = std::mem::take(&mut self.gathered);
        self.metrics.traffic(self.client, t);
    }
}

impl Drop for StreamTraffic<'_> {
    fn drop(&mut self) {
        self.flush();
    }
}

/// The server's metrics (see the module docs).
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    epochs: Family<Labels, Counter>,
    blocks: Family<Labels, Counter>,
    wire: Family<Labels, Counter>,
    known: Family<Labels, Counter>,
    mismatches: Family<Labels, Counter>,
    connections: Gauge,
    connections_total: Counter,
    last_publish: Family<Labels, FloatGauge>,
    published_epoch: Family<Labels, Gauge>,
    size: Family<Labels, Gauge>,
    snapshots: Family<Labels, Gauge>,
    exports: Gauge,
    export_connections: Family<Labels, Gauge>,
    store_chunks: Gauge,
    store_damaged: Gauge,
    pruned: Family<Labels, Counter>,
    verify_runs: Counter,
    verify_last: FloatGauge,
    verify_unrepaired: Gauge,
    verify_repaired: Counter,
    store_stored: Gauge,
    rss: Gauge,
    cpu: Counter<f64, AtomicU64>,
    open_fds: Gauge,
    start_time: FloatGauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Every family registered, all at zero.
    pub fn new() -> Metrics {
        let m = Metrics {
            registry: Mutex::new(Registry::default()),
            epochs: Family::default(),
            blocks: Family::default(),
            wire: Family::default(),
            known: Family::default(),
            mismatches: Family::default(),
            connections: Gauge::default(),
            connections_total: Counter::default(),
            last_publish: Family::default(),
            published_epoch: Family::default(),
            size: Family::default(),
            snapshots: Family::default(),
            exports: Gauge::default(),
            export_connections: Family::default(),
            store_chunks: Gauge::default(),
            store_damaged: Gauge::default(),
            pruned: Family::default(),
            verify_runs: Counter::default(),
            verify_last: FloatGauge::default(),
            verify_unrepaired: Gauge::default(),
            verify_repaired: Counter::default(),
            store_stored: Gauge::default(),
            rss: Gauge::default(),
            cpu: Counter::default(),
            open_fds: Gauge::default(),
            start_time: FloatGauge::default(),
        };
        let mut r = m.lock();
        r.register(
            "mirror_epochs_received",
            "Epochs of a client published",
            m.epochs.clone(),
        );
        r.register(
            "mirror_blocks_received",
            "Blocks of a client staged",
            m.blocks.clone(),
        );
        r.register_with_unit(
            "mirror_received_wire",
            "Bytes of blocks on the wire (after compression)",
            Unit::Bytes,
            m.wire.clone(),
        );
        r.register_with_unit(
            "mirror_deduplicated_wire",
            "Bytes of blocks sent as digests only (the store had them)",
            Unit::Bytes,
            m.known.clone(),
        );
        r.register(
            "mirror_hash_mismatches",
            "Blocks that failed their sha256 (asked for again)",
            m.mismatches.clone(),
        );
        r.register(
            "mirror_connections",
            "Client connections open",
            m.connections.clone(),
        );
        r.register(
            "mirror_connections_accepted",
            "Client connections accepted",
            m.connections_total.clone(),
        );
        r.register_with_unit(
            "mirror_volume_last_publish_timestamp",
            "When the volume's newest epoch was published (Unix time)",
            Unit::Seconds,
            m.last_publish.clone(),
        );
        r.register(
            "mirror_volume_published_epoch",
            "The epoch the volume's image holds",
            m.published_epoch.clone(),
        );
        r.register_with_unit(
            "mirror_volume_size",
            "The volume's size",
            Unit::Bytes,
            m.size.clone(),
        );
        r.register(
            "mirror_volume_snapshots",
            "Snapshots the volume keeps",
            m.snapshots.clone(),
        );
        r.register("mirror_exports", "iSCSI exports served", m.exports.clone());
        r.register(
            "mirror_export_connections",
            "Initiator connections open on an iSCSI export (its readers), by target name",
            m.export_connections.clone(),
        );
        r.register(
            "mirror_store_chunks",
            "Distinct chunks in the chunk store",
            m.store_chunks.clone(),
        );
        r.register(
            "mirror_store_damaged_chunks",
            "Chunk copies verify found damaged and could not repair",
            m.store_damaged.clone(),
        );
        r.register(
            "mirror_snapshots_pruned",
            "Scheduled snapshots removed by the retention policy",
            m.pruned.clone(),
        );
        r.register(
            "mirror_verify_runs",
            "Scheduled verifications of the chunk store that ran to the end",
            m.verify_runs.clone(),
        );
        r.register_with_unit(
            "mirror_verify_last_timestamp",
            "When the last scheduled verification ended (Unix time)",
            Unit::Seconds,
            m.verify_last.clone(),
        );
        r.register(
            "mirror_verify_unrepaired_objects",
            "Chunks, map segments and image blocks the last verification found damaged and could not repair here",
            m.verify_unrepaired.clone(),
        );
        r.register(
            "mirror_verify_repaired_chunks",
            "Damaged chunks verification stored again from this server's images, and damaged image blocks it made their version's again from the store",
            m.verify_repaired.clone(),
        );
        r.register_with_unit(
            "mirror_store_stored",
            "Bytes of chunks as stored in packs",
            Unit::Bytes,
            m.store_stored.clone(),
        );
        r.register_with_unit(
            "process_resident_memory",
            "Resident memory of this process",
            Unit::Bytes,
            m.rss.clone(),
        );
        r.register_with_unit(
            "process_cpu",
            "CPU time of this process (user and system)",
            Unit::Seconds,
            m.cpu.clone(),
        );
        r.register(
            "process_open_fds",
            "Open file descriptors",
            m.open_fds.clone(),
        );
        r.register_with_unit(
            "process_start_time",
            "When this process started (Unix time)",
            Unit::Seconds,
            m.start_time.clone(),
        );
        drop(r);
        m.start_time
            .set(ublk_mirror_common::clock::now_ms() as f64 / 1000.0);
        m
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A client connected; the guard counts it out when dropped.
    pub fn connected(self: &Arc<Self>) -> Connected {
        self.connections.inc();
        self.connections_total.inc();
        Connected(self.clone())
    }

    /// What a data stream of `client` brought.
    pub fn traffic(&self, client: &str, t: Traffic) {
        let l = client_label(client);
        self.blocks.get_or_create(&l).inc_by(t.blocks);
        self.wire.get_or_create(&l).inc_by(t.wire_bytes);
        self.known.get_or_create(&l).inc_by(t.known_bytes);
        self.mismatches.get_or_create(&l).inc_by(t.mismatches);
    }

    /// The retention policy removed `count` scheduled snapshots of volume
    /// `CLIENT/VOLUME`.
    pub fn pruned(&self, volume: &str, count: usize) {
        self.pruned
            .get_or_create(&volume_labels(volume))
            .inc_by(count as u64);
    }

    /// A scheduled verification ended: `repaired` chunks stored again,
    /// `unrepaired` chunks and segments left damaged.
    pub fn verified(&self, repaired: usize, unrepaired: usize) {
        self.verify_runs.inc();
        self.verify_repaired.inc_by(repaired as u64);
        self.verify_unrepaired.set(unrepaired as i64);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.verify_last.set(now);
    }

    /// The last scheduled verification ended at `ms` (Unix ms): one a
    /// restart's process did not run itself.
    pub fn verified_at(&self, ms: u64) {
        self.verify_last.set(ms as f64 / 1000.0);
    }

    /// `client` published an epoch.
    pub fn published(&self, client: &str) {
        self.epochs.get_or_create(&client_label(client)).inc();
    }

    /// The text exposition, the gauges read now.
    pub fn render(&self, volumes: &Volumes, exports: &Exports) -> String {
        for (name, state) in volumes.states() {
            let l = volume_labels(&name);
            self.last_publish
                .get_or_create(&l)
                .set(state.published_ms as f64 / 1000.0);
            self.published_epoch
                .get_or_create(&l)
                .set(state.published_epoch as i64);
            self.size.get_or_create(&l).set(state.size as i64);
            let snaps = crate::snapshots::list(&volumes.volume_dir(&name)).map_or(0, |l| l.len());
            self.snapshots.get_or_create(&l).set(snaps as i64);
        }
        let running = exports.connections();
        self.exports.set(running.len() as i64);
        // Only the exports running now: a stopped one's series ends.
        self.export_connections.clear();
        for (iqn, open) in running {
            let labels = vec![("target".into(), iqn)];
            self.export_connections
                .get_or_create(&labels)
                .set(open as i64);
        }
        if let Some(store) = volumes.chunk_store() {
            let (chunks, stored, damaged) = store.counts();
            self.store_chunks.set(chunks as i64);
            self.store_stored.set(stored as i64);
            self.store_damaged.set(damaged as i64);
        }
        let me = process();
        self.rss.set(me.rss as i64);
        let counted = self.cpu.get();
        if me.cpu_seconds > counted {
            self.cpu.inc_by(me.cpu_seconds - counted);
        }
        self.open_fds.set(me.open_fds as i64);
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.lock());
        // As the content type says: text format 0.0.4.
        ublk_mirror_common::exposition::classic(&out)
    }
}

/// A connection counted in [`Metrics`] while it lives.
#[derive(Debug)]
pub struct Connected(Arc<Metrics>);

impl Drop for Connected {
    fn drop(&mut self) {
        self.0.connections.dec();
    }
}

struct Process {
    rss: u64,
    cpu_seconds: f64,
    open_fds: u64,
}

/// This process, from `/proc/self`.
fn process() -> Process {
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u64;
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let rss = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * page);
    // Fields 14 and 15 (utime, stime) after the parenthesised name.
    let cpu_seconds = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / ticks)
        })
        .unwrap_or(0.0);
    let open_fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
    Process {
        rss,
        cpu_seconds,
        open_fds,
    }
}

/// Serve `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    volumes: Arc<Volumes>,
    exports: Arc<Exports>,
) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::{Request, Response, StatusCode};
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("metrics: accepting a connection: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let (metrics, volumes, exports) = (metrics.clone(), volumes.clone(), exports.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (metrics, volumes, exports) =
                    (metrics.clone(), volumes.clone(), exports.clone());
                async move {
                    let response =
                        if req.method() == hyper::Method::GET && req.uri().path() == "/metrics" {
                            let text =
                                tokio::task::block_in_place(|| metrics.render(&volumes, &exports));
                            Response::builder()
                                .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                                .body(Full::new(Bytes::from(text)))
                        } else {
                            Response::builder()
                                .status(StatusCode::NOT_FOUND)
                                .body(Full::new(Bytes::from_static(b"only GET /metrics here\n")))
                        };
                    Ok::<_, Infallible>(response.unwrap_or_default())
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                tracing::debug!("metrics: a scrape connection ended: {e}");
            }
        });
    }
}
