//! The iSCSI target: TCP connections, login (security and operational
//! negotiation), discovery, and the full feature phase that carries SCSI
//! commands to a [`Lun`](super::scsi::Lun) (RFC 7143). One connection per session, error
//! recovery level 0; commands run in CmdSN order.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::pdu::{op, Pdu, BHS, MAX_DATA_SEGMENT};
use super::scsi::{self, Needs, Outcome, Sense};
use super::text::{self, Params};
use super::unit::{Nexus, Unit};

/// Commands an initiator may have outstanding (MaxCmdSN - ExpCmdSN + 1).
const WINDOW: u32 = 32;
/// Longest wait for the next PDU of a login, or for solicited data.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a login's text may be, over all its PDUs.
const MAX_LOGIN_TEXT: usize = 64 << 10;
/// PDUs held while waiting for solicited data (beyond: the connection
/// ends; an initiator has at most a window of commands outstanding).
const MAX_PENDING: usize = 2 * WINDOW as usize;
/// Connections one target takes at once.
const MAX_CONNECTIONS: usize = 32;
/// Discovery sessions at once (they only list targets, and need no CHAP
/// nor allow-list: at most these, so that they never take the places of
/// sessions to the exports).
const MAX_DISCOVERY: usize = 4;
/// A session silent this long is closed (initiators ping every few
/// seconds: open-iscsi's NOP-Out interval is 5 s).
const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// A discovery session silent this long is closed (one lists the targets,
/// then logs out).
const DISCOVERY_IDLE: Duration = Duration::from_secs(30);
/// A normal session silent this long is pinged (a NOP-In that asks for an
/// answer, RFC 7143 §11.19); one that answers nothing for as long again is
/// closed. Initiators that do not ping by themselves (the Microsoft
/// initiator; open-iscsi with its NOP-Out interval at 0) stay logged in.
const PING_AFTER: Duration = Duration::from_secs(30);

/// CHAP credentials (RFC 7143 §12.1.3, MD5): what an initiator must
/// prove, and for mutual CHAP, what the target proves back.
#[derive(Clone)]
pub struct Chap {
    /// The name the initiator gives (CHAP_N).
    pub user: String,
    /// The secret it proves it knows.
    pub secret: Vec<u8>,
    /// For mutual CHAP: the target's name and secret.
    pub mutual: Option<(String, Vec<u8>)>,
}

impl std::fmt::Debug for Chap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secrets.
        f.debug_struct("Chap")
            .field("user", &self.user)
            .field("mutual", &self.mutual.as_ref().map(|(u, _)| u))
            .finish_non_exhaustive()
    }
}

/// The CHAP response: MD5 of the identifier, the secret and the challenge.
pub fn chap_response(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    use md5::Digest as _;
    let mut h = md5::Md5::new();
    h.update([id]);
    h.update(secret);
    h.update(challenge);
    h.finalize().into()
}

/// A CHAP binary value (RFC 7143 §6.1: "0x" and hex digits, or "0b"
/// and base64, which some initiators send), at most 1024 bytes.
fn binary_value(v: &str) -> Option<Vec<u8>> {
    if let Some(digits) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        if digits.len() > 2048 {
            return None;
        }
        return ublk_mirror_common::hex::decode_vec(digits);
    }
    let encoded = v.strip_prefix("0b").or_else(|| v.strip_prefix("0B"))?;
    if encoded.len() > 1368 {
        return None;
    }
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    (bytes.len() <= 1024).then_some(bytes)
}

fn hex_string(bytes: &[u8]) -> String {
    format!("0x{}", ublk_mirror_common::hex::encode(bytes))
}

/// One exported logical unit, behind a target name.
pub struct Export {
    /// The target's name (an IQN).
    pub iqn: String,
    /// What it serves, as LUN 0.
    pub unit: Arc<Unit>,
    /// Initiator names allowed (empty: any).
    pub allowed: Vec<String>,
    /// CHAP the initiator must pass (`None`: no authentication).
    pub chap: Option<Chap>,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("iqn", &self.iqn)
            .field("allowed", &self.allowed)
            .finish_non_exhaustive()
    }
}

impl Export {
    fn allows(&self, initiator: &str) -> bool {
        self.allowed.is_empty() || self.allowed.iter().any(|a| a == initiator)
    }
}

/// A target: its exports and the address it tells initiators.
#[derive(Debug)]
pub struct Target {
    /// What it serves.
    pub exports: Vec<Arc<Export>>,
    /// Sessions made so far (TSIH source).
    sessions: AtomicU16,
    /// Normal sessions by target name and I_T nexus: a new login with
    /// the same initiator name and ISID reinstates the session (RFC 7143
    /// §6.3.5), and the one it replaces is told to end.
    live: std::sync::Mutex<HashMap<(String, Nexus), Live>>,
    /// Numbers the sessions in `live`.
    next_live: AtomicU64,
    /// TCP connections open now (an export's readers, for the metrics).
    connections: std::sync::atomic::AtomicUsize,
    /// Discovery sessions now (at most [`MAX_DISCOVERY`]).
    discovery: Arc<std::sync::atomic::AtomicUsize>,
    /// [`PING_AFTER`], shorter in tests.
    ping_after: Duration,
}

/// A discovery session's place among [`MAX_DISCOVERY`], given back when
/// its connection ends.
#[derive(Debug)]
struct DiscoveryPlace(Arc<std::sync::atomic::AtomicUsize>);

impl DiscoveryPlace {
    fn take(count: &Arc<std::sync::atomic::AtomicUsize>) -> Option<DiscoveryPlace> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_DISCOVERY).then_some(n + 1)
            })
            .ok()
            .map(|_| DiscoveryPlace(count.clone()))
    }
}

impl Drop for DiscoveryPlace {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A session in the full feature phase, as the target knows it.
#[derive(Debug, Clone)]
struct Live {
    id: u64,
    /// Set, and notified, when a new login reinstates the session.
    ended: Arc<Ended>,
    /// Held while one of the nexus's commands runs, handed from a session
    /// to the one that reinstates it: a command the old one had running
    /// ends before any of the new one's starts (RFC 7143 §6.3.5: the old
    /// tasks end first), so a write the initiator sends again never lands
    /// before its older copy.
    exec: Arc<tokio::sync::Mutex<()>>,
}

/// Tells a session that it was replaced.
#[derive(Debug, Default)]
struct Ended {
    flag: AtomicBool,
    notify: tokio::sync::Notify,
}

impl Ended {
    fn end(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.notify.notify_one();
    }

    fn is_ended(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
}

impl Target {
    /// A target serving `exports`.
    pub fn new(exports: Vec<Arc<Export>>) -> Target {
        Target {
            exports,
            sessions: AtomicU16::new(0),
            live: std::sync::Mutex::new(HashMap::new()),
            next_live: AtomicU64::new(0),
            connections: std::sync::atomic::AtomicUsize::new(0),
            discovery: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            ping_after: PING_AFTER,
        }
    }

    /// Ping silent sessions after `d` instead of 30 s.
    pub fn with_ping_after(mut self, d: Duration) -> Target {
        self.ping_after = d;
        self
    }

    /// TCP connections open now.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// Session `id` of `nexus` on `export` enters the full feature
    /// phase: attached to the unit, and what tells it that it was
    /// replaced. A live session of the same nexus is ended first: its
    /// nexus is lost (its RESERVE(6) goes), then it is told. All under
    /// the one lock, so that an ending session cannot detach its
    /// successor.
    fn enter(
        &self,
        export: &Export,
        nexus: &Nexus,
        id: u64,
    ) -> (Arc<Ended>, Arc<tokio::sync::Mutex<()>>, bool) {
        let ended = Arc::new(Ended::default());
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let key = (export.iqn.clone(), nexus.clone());
        let exec = live
            .get(&key)
            .map_or_else(|| Arc::new(tokio::sync::Mutex::new(())), |l| l.exec.clone());
        let old = live.insert(
            key,
            Live {
                id,
                ended: ended.clone(),
                exec: exec.clone(),
            },
        );
        if let Some(old) = &old {
            export.unit.detach(nexus);
            old.ended.end();
        }
        export.unit.attach(nexus);
        (ended, exec, old.is_some())
    }

    /// Session `id` of `nexus` on `export` ended: detached from the unit,
    /// unless a new login took the nexus over.
    fn leave(&self, export: &Export, nexus: &Nexus, id: u64) {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let key = (export.iqn.clone(), nexus.clone());
        if live.get(&key).is_some_and(|l| l.id == id) {
            live.remove(&key);
            export.unit.detach(nexus);
        }
    }

    fn tsih(&self) -> u16 {
        loop {
            let n = self
                .sessions
                .fetch_add(1, Ordering::Relaxed)
                .wrapping_add(1);
            if n != 0 {
                return n;
            }
        }
    }
}

/// Serve `target` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    target: Arc<Target>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    // Connections end with the target.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) if connections.len() >= MAX_CONNECTIONS => {
                    tracing::warn!(%peer, "iSCSI: {MAX_CONNECTIONS} connections already; refusing another");
                    drop(stream);
                }
                Ok((stream, peer)) => {
                    let target = target.clone();
                    connections.spawn(async move {
                        let _counted = Counted::new(target.clone());
                        match Connection::new(stream, peer, target).run().await {
                            Ok(()) => tracing::debug!(%peer, "iSCSI connection closed"),
                            Err(e) => tracing::info!(%peer, "iSCSI connection ended: {e}"),
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!("iSCSI accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            () = &mut shutdown => {
                connections.shutdown().await;
                return;
            }
        }
    }
}

/// A connection counted in [`Target::connections`] while it lives.
struct Counted(Arc<Target>);

impl Counted {
    fn new(target: Arc<Target>) -> Counted {
        target.connections.fetch_add(1, Ordering::Relaxed);
        Counted(target)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why a connection ends.
#[derive(Debug)]
enum End {
    /// The peer closed it, or logged out.
    Done,
    /// Anything else, said for the log.
    Error(String),
}

impl End {
    /// A new login reinstated the session.
    fn replaced() -> End {
        End::Error("the session was ended (a new login reinstated it)".into())
    }
}

impl From<std::io::Error> for End {
    fn from(e: std::io::Error) -> End {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            End::Done
        } else {
            End::Error(e.to_string())
        }
    }
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Done => write!(f, "closed"),
            End::Error(e) => write!(f, "{e}"),
        }
    }
}

/// Why a login is refused: the Status-Class and Status-Detail of the
/// Login Response (RFC 7143 §11.13.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Refusal {
    class: u8,
    detail: u8,
}

impl Refusal {
    const fn new(class: u8, detail: u8) -> Refusal {
        Refusal { class, detail }
    }
}

/// Initiator error: a malformed or unacceptable request.
const INITIATOR_ERROR: Refusal = Refusal::new(0x02, 0x00);
/// Authentication failed (or was not offered where required).
const AUTHENTICATION_FAILURE: Refusal = Refusal::new(0x02, 0x01);
/// The target is not here (or not for this initiator).
const NOT_FOUND: Refusal = Refusal::new(0x02, 0x03);
/// No version in the initiator's range is spoken here.
const UNSUPPORTED_VERSION: Refusal = Refusal::new(0x02, 0x05);
/// A key the login needs is missing.
const MISSING_PARAMETER: Refusal = Refusal::new(0x02, 0x07);
/// The session the connection names does not exist.
const SESSION_DOES_NOT_EXIST: Refusal = Refusal::new(0x02, 0x0a);
/// The target failed (no random challenge).
const TARGET_ERROR: Refusal = Refusal::new(0x03, 0x00);
/// Out of resources (here: discovery sessions).
const OUT_OF_RESOURCES: Refusal = Refusal::new(0x03, 0x02);

/// The stages a login request is in and asks for (its flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LoginStage {
    /// T: the initiator is ready to move to `nsg`.
    transit: bool,
    /// C: more text follows in the next request.
    cont: bool,
    /// The current stage: 0 security, 1 operational.
    csg: u8,
    /// The next stage: 1 operational, 3 full feature phase.
    nsg: u8,
}

impl LoginStage {
    fn of(req: &Pdu) -> LoginStage {
        let flags = req.flags();
        LoginStage {
            transit: flags & 0x80 != 0,
            cont: flags & 0x40 != 0,
            csg: (flags >> 2) & 3,
            nsg: flags & 3,
        }
    }
}

/// What a login keeps from one request to the next.
#[derive(Debug)]
struct LoginProgress {
    /// The login's first text (the initiator's and target's names) is
    /// still to come.
    first: bool,
    /// The target's own declarations were sent.
    declared: bool,
    /// Text of requests continued (C bit) so far.
    text_in: Vec<u8>,
    /// The session's TSIH, once it is made.
    tsih: u16,
    /// CHAP: the challenge sent (identifier, bytes).
    challenge: Option<(u8, Vec<u8>)>,
    /// The initiator has proven itself (true when no CHAP is asked).
    authenticated: bool,
    /// Keys the initiator has said so far: none may be said again
    /// (RFC 7143 §6.2).
    said: std::collections::HashSet<String>,
}

impl LoginProgress {
    fn new() -> LoginProgress {
        LoginProgress {
            first: true,
            declared: false,
            text_in: Vec::new(),
            tsih: 0,
            challenge: None,
            authenticated: false,
            said: std::collections::HashSet::new(),
        }
    }
}

/// The value of key `k` in a login request's `keys`.
fn key(keys: &[(String, String)], k: &str) -> Option<String> {
    keys.iter().find(|(a, _)| a == k).map(|(_, v)| v.clone())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SessionType {
    Discovery,
    Normal,
}

struct Connection {
    stream: TcpStream,
    peer: SocketAddr,
    target: Arc<Target>,
    params: Params,
    /// Digests are used from the full feature phase on.
    digests: bool,
    stat_sn: u32,
    exp_cmd_sn: u32,
    export: Option<Arc<Export>>,
    kind: SessionType,
    initiator: String,
    /// The session's I_T nexus, once logged in to an export.
    nexus: Option<Nexus>,
    /// Told when a new login reinstates this session.
    reinstated: Option<Arc<Ended>>,
    /// PDUs read while waiting for solicited data, to handle after.
    pending: VecDeque<Pdu>,
    next_ttt: u32,
    /// A discovery session's place, held while it lives.
    discovery: Option<DiscoveryPlace>,
    /// The nexus's command gate (see [`Live::exec`]).
    exec: Option<Arc<tokio::sync::Mutex<()>>>,
}

impl Connection {
    fn new(stream: TcpStream, peer: SocketAddr, target: Arc<Target>) -> Connection {
        let _ = stream.set_nodelay(true);
        Connection {
            stream,
            peer,
            target,
            params: Params::default(),
            digests: false,
            stat_sn: 0,
            exp_cmd_sn: 0,
            export: None,
            kind: SessionType::Normal,
            initiator: String::new(),
            nexus: None,
            reinstated: None,
            pending: VecDeque::new(),
            next_ttt: 1,
            discovery: None,
            exec: None,
        }
    }

    async fn run(mut self) -> Result<(), End> {
        match tokio::time::timeout(LOGIN_TIMEOUT, self.login()).await {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => return Ok(()),
            Ok(Err(End::Done)) => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(End::Error("login timed out".into())),
        }
        tracing::info!(
            peer = %self.peer,
            initiator = %self.initiator,
            target = self.export.as_ref().map_or("(discovery)", |e| e.iqn.as_str()),
            header_digest = if self.params.header_digest { "CRC32C" } else { "None" },
            data_digest = if self.params.data_digest { "CRC32C" } else { "None" },
            "iSCSI session up"
        );
        let export = self.export.clone();
        let id = self.target.next_live.fetch_add(1, Ordering::Relaxed);
        if let (Some(export), Some(nexus)) = (&export, &self.nexus) {
            let (ended, exec, replaced) = self.target.enter(export, nexus, id);
            if replaced {
                tracing::info!(peer = %self.peer, initiator = %self.initiator, "session reinstated");
            }
            self.reinstated = Some(ended);
            self.exec = Some(exec);
        }
        let ended = self.full_feature().await;
        // Logout or a lost connection: the I_T nexus is gone (unless a
        // new login took it over).
        if let (Some(export), Some(nexus)) = (&export, &self.nexus) {
            self.target.leave(export, nexus, id);
        }
        match ended {
            Ok(()) | Err(End::Done) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn read_pdu(&mut self) -> Result<Pdu, End> {
        if let Some(p) = self.pending.pop_front() {
            return Ok(p);
        }
        if self.kind == SessionType::Discovery {
            return tokio::time::timeout(DISCOVERY_IDLE, self.read_wire())
                .await
                .map_err(|_| End::Error(format!("nothing received for {DISCOVERY_IDLE:?}")))?;
        }
        // Wait for the next PDU's first byte (peeked: cancel-safe, nothing
        // is consumed; readiness alone may be stale), pinging once the
        // session has been silent for a while.
        let ping_after = self.target.ping_after;
        let mut pinged = false;
        let mut first = [0u8; 1];
        loop {
            match tokio::time::timeout(ping_after, self.stream.peek(&mut first)).await {
                Ok(peeked) => {
                    // At the end of the stream too: the read says so.
                    peeked?;
                    break;
                }
                Err(_) if pinged => {
                    return Err(End::Error(format!(
                        "no answer to a ping for {ping_after:?}"
                    )))
                }
                Err(_) => {
                    let mut ping = Pdu::new(op::NOP_IN);
                    ping.bhs[1] = 0x80;
                    ping.set_u32(16, 0xffff_ffff);
                    let ttt = self.next_ttt;
                    self.next_ttt = self.next_ttt.wrapping_add(1).max(1);
                    ping.set_u32(20, ttt);
                    self.stamp(&mut ping, false);
                    self.send(&ping).await?;
                    pinged = true;
                }
            }
        }
        tokio::time::timeout(IDLE_TIMEOUT, self.read_wire())
            .await
            .map_err(|_| End::Error(format!("nothing received for {IDLE_TIMEOUT:?}")))?
    }

    async fn read_wire(&mut self) -> Result<Pdu, End> {
        let mut bhs = [0u8; BHS];
        self.stream.read_exact(&mut bhs).await?;
        let (hd, dd) = self.digest_flags();
        let len = Pdu::parse_bhs(&bhs, MAX_DATA_SEGMENT).map_err(|e| End::Error(e.to_string()))?;
        let mut rest = vec![0u8; len.rest(hd, dd)];
        self.stream.read_exact(&mut rest).await?;
        let p = Pdu::assemble(bhs, len, &rest, hd, dd).map_err(|e| End::Error(e.to_string()))?;
        tracing::trace!(
            opcode = p.opcode(),
            itt = p.itt(),
            sn = p.u32_at(24),
            sn2 = p.u32_at(36),
            offset = p.u32_at(40),
            len = p.data.len(),
            "PDU in"
        );
        Ok(p)
    }

    fn digest_flags(&self) -> (bool, bool) {
        if self.digests {
            (self.params.header_digest, self.params.data_digest)
        } else {
            (false, false)
        }
    }

    async fn send(&mut self, pdu: &Pdu) -> Result<(), End> {
        let (hd, dd) = self.digest_flags();
        tracing::trace!(
            opcode = pdu.opcode(),
            itt = pdu.itt(),
            status = pdu.bhs[3],
            len = pdu.data.len(),
            "PDU out"
        );
        self.stream.write_all(&pdu.encode(hd, dd)).await?;
        Ok(())
    }

    /// Status fields every response carries: StatSN (advanced when
    /// `advance`), ExpCmdSN, MaxCmdSN.
    fn stamp(&mut self, pdu: &mut Pdu, advance: bool) {
        pdu.set_u32(24, self.stat_sn);
        if advance {
            self.stat_sn = self.stat_sn.wrapping_add(1);
        }
        pdu.set_u32(28, self.exp_cmd_sn);
        pdu.set_u32(32, self.exp_cmd_sn.wrapping_add(WINDOW - 1));
    }

    /// The login phase; `Ok(true)` once in full feature phase, `Ok(false)`
    /// when the login was refused (answered, connection to close).
    async fn login(&mut self) -> Result<bool, End> {
        let mut login = LoginProgress::new();
        loop {
            let req = self.read_wire().await?;
            if req.opcode() != op::LOGIN_REQ {
                return Err(End::Error(format!(
                    "opcode {:#04x} during login",
                    req.opcode()
                )));
            }
            let stage = LoginStage::of(&req);
            if let Err(refusal) = self.take_login_request(&mut login, &req) {
                return self.refuse(&req, refusal).await;
            }
            if stage.cont {
                // More text follows: acknowledge this part.
                let mut rsp = self.login_response(&req, stage.csg, stage.csg, false, login.tsih);
                rsp.data.clear();
                self.send(&rsp).await?;
                continue;
            }
            let (rsp, full_feature) = match self.answer_login(&mut login, &req, stage) {
                Ok(answer) => answer,
                Err(refusal) => return self.refuse(&req, refusal).await,
            };
            self.send(&rsp).await?;
            if full_feature {
                self.digests = true;
                let mut isid = [0u8; 6];
                isid.copy_from_slice(&req.bhs[8..14]);
                self.nexus = Some(Nexus::new(&self.initiator, isid));
                return Ok(true);
            }
        }
    }

    /// Take one login request's sequence numbers and text; the first
    /// request of the login is checked for what this target cannot do.
    fn take_login_request(&mut self, login: &mut LoginProgress, req: &Pdu) -> Result<(), Refusal> {
        if login.first {
            self.stat_sn = req.exp_stat_sn();
            if req.bhs[3] > 0 {
                // Version-min above 0: we speak only 0.
                return Err(UNSUPPORTED_VERSION);
            }
            if req.bhs[14..16] != [0, 0] {
                // A connection for an existing session: sessions here
                // have one connection (MaxConnections=1), so the
                // session named does not exist.
                return Err(SESSION_DOES_NOT_EXIST);
            }
        }
        self.exp_cmd_sn = req.cmd_sn();
        login.text_in.extend_from_slice(&req.data);
        if login.text_in.len() > MAX_LOGIN_TEXT {
            return Err(INITIATOR_ERROR);
        }
        Ok(())
    }

    /// Answer a login request whose text is complete: the response, and
    /// whether it moves the connection to the full feature phase.
    fn answer_login(
        &mut self,
        login: &mut LoginProgress,
        req: &Pdu,
        stage: LoginStage,
    ) -> Result<(Pdu, bool), Refusal> {
        let Some(keys) = text::parse(&login.text_in) else {
            return Err(INITIATOR_ERROR);
        };
        login.text_in.clear();
        let LoginStage {
            transit, csg, nsg, ..
        } = stage;
        tracing::trace!(csg, nsg, transit, ?keys, "login request");
        if let Some((k, _)) = keys.iter().find(|(k, _)| !login.said.insert(k.clone())) {
            tracing::info!(peer = %self.peer, key = %k, "login key said twice: refused");
            return Err(INITIATOR_ERROR);
        }
        let mut answers: Vec<(String, String)> = Vec::new();
        if login.first {
            self.take_login_names(&keys, &mut answers)?;
            login.first = false;
        }
        self.authenticate(login, &keys, csg, &mut answers)?;
        // No operational stage, and no full feature phase, before the
        // initiator proved itself: the target holds the transit until
        // then (the initiator asks for it at once).
        if !login.authenticated && csg != 0 {
            tracing::warn!(peer = %self.peer, initiator = %self.initiator, "login without the CHAP the target requires");
            return Err(AUTHENTICATION_FAILURE);
        }
        let transit = transit && login.authenticated;
        let negotiated = text::negotiate(&keys, &mut self.params);
        answers.extend(negotiated);
        let (transit, nsg) = if transit { (true, nsg) } else { (false, csg) };
        let full_feature = transit && nsg == 3;
        if full_feature {
            login.tsih = self.target.tsih();
        }
        if !login.declared && (csg == 1 || full_feature) {
            // The target's own declarations, but for keys answered
            // already (a key is said once per response).
            for (k, v) in text::declarations() {
                if !answers.iter().any(|(a, _)| *a == k) {
                    answers.push((k, v));
                }
            }
            login.declared = true;
        }
        let mut rsp = self.login_response(req, csg, nsg, transit, login.tsih);
        rsp.data = text::encode(&answers);
        Ok((rsp, full_feature))
    }

    /// The names the first request of a login carries: the initiator's,
    /// the session type, and for a normal session the target's, which must
    /// be an export that allows the initiator.
    fn take_login_names(
        &mut self,
        keys: &[(String, String)],
        answers: &mut Vec<(String, String)>,
    ) -> Result<(), Refusal> {
        let Some(initiator) = key(keys, "InitiatorName") else {
            return Err(MISSING_PARAMETER);
        };
        if initiator.is_empty() || initiator.len() > 223 {
            // Not an iSCSI name (RFC 7143 §4.2.7.1: 223 bytes).
            return Err(INITIATOR_ERROR);
        }
        self.initiator = initiator;
        self.kind = match key(keys, "SessionType").as_deref() {
            None | Some("Normal") => SessionType::Normal,
            Some("Discovery") => SessionType::Discovery,
            Some(_) => return Err(INITIATOR_ERROR),
        };
        if self.kind == SessionType::Discovery && self.discovery.is_none() {
            let Some(place) = DiscoveryPlace::take(&self.target.discovery) else {
                tracing::warn!(peer = %self.peer, "{MAX_DISCOVERY} discovery sessions already; refusing another");
                return Err(OUT_OF_RESOURCES);
            };
            self.discovery = Some(place);
        }
        if self.kind == SessionType::Normal {
            let Some(name) = key(keys, "TargetName") else {
                return Err(MISSING_PARAMETER);
            };
            let found = self.target.exports.iter().find(|e| e.iqn == name).cloned();
            let Some(export) = found else {
                tracing::info!(peer = %self.peer, target = %name, "login to an unknown target");
                return Err(NOT_FOUND);
            };
            if !export.allows(&self.initiator) {
                // As if it were not there (tgt does the same).
                tracing::warn!(peer = %self.peer, initiator = %self.initiator, target = %name, "initiator not allowed");
                return Err(NOT_FOUND);
            }
            self.export = Some(export);
            answers.push(("TargetPortalGroupTag".into(), "1".into()));
        }
        Ok(())
    }

    /// The security stage (`csg` 0): the authentication method, and CHAP
    /// where the export asks for it. Without CHAP the initiator counts as
    /// authenticated; a stage other than security or operational (1) is
    /// refused.
    fn authenticate(
        &self,
        login: &mut LoginProgress,
        keys: &[(String, String)],
        csg: u8,
        answers: &mut Vec<(String, String)>,
    ) -> Result<(), Refusal> {
        let chap = self.export.as_ref().and_then(|e| e.chap.clone());
        if chap.is_none() {
            login.authenticated = true;
        }
        if csg != 0 {
            return if csg == 1 {
                Ok(())
            } else {
                Err(INITIATOR_ERROR)
            };
        }
        if let Some(methods) = key(keys, "AuthMethod") {
            let offered: Vec<&str> = methods.split(',').collect();
            let pick = if chap.is_some() { "CHAP" } else { "None" };
            if !offered.contains(&pick) {
                tracing::warn!(peer = %self.peer, initiator = %self.initiator, offered = %methods, wanted = pick, "authentication method refused");
                return Err(AUTHENTICATION_FAILURE);
            }
            answers.push(("AuthMethod".into(), pick.into()));
        }
        let Some(chap) = &chap else {
            return Ok(());
        };
        if let Some(algorithms) = key(keys, "CHAP_A") {
            if !algorithms.split(',').any(|a| a == "5") {
                return Err(AUTHENTICATION_FAILURE);
            }
            let mut c = vec![0u8; 16];
            let mut id = [0u8; 1];
            if getrandom::fill(&mut c).is_err() || getrandom::fill(&mut id).is_err() {
                return Err(TARGET_ERROR);
            }
            answers.push(("CHAP_A".into(), "5".into()));
            answers.push(("CHAP_I".into(), id[0].to_string()));
            answers.push(("CHAP_C".into(), hex_string(&c)));
            login.challenge = Some((id[0], c));
        }
        if let (Some(name), Some(response)) = (key(keys, "CHAP_N"), key(keys, "CHAP_R")) {
            let Some((id, c)) = login.challenge.take() else {
                return Err(AUTHENTICATION_FAILURE);
            };
            self.check_chap(chap, keys, (id, &c), (&name, &response), answers)?;
            login.authenticated = true;
        }
        Ok(())
    }

    /// Check the initiator's CHAP response (`name`, `response`) to our
    /// `challenge`, and for mutual CHAP answer the initiator's challenge.
    fn check_chap(
        &self,
        chap: &Chap,
        keys: &[(String, String)],
        (id, c): (u8, &[u8]),
        (name, response): (&str, &str),
        answers: &mut Vec<(String, String)>,
    ) -> Result<(), Refusal> {
        let expected = chap_response(id, &chap.secret, c);
        let proven = name == chap.user && binary_value(response).is_some_and(|r| r == expected);
        if !proven {
            tracing::warn!(peer = %self.peer, initiator = %self.initiator, user = %name, "CHAP authentication failed");
            return Err(AUTHENTICATION_FAILURE);
        }
        // Mutual: the initiator challenges the target back.
        if let (Some(their_id), Some(their_c)) = (key(keys, "CHAP_I"), key(keys, "CHAP_C")) {
            let (Some((user, secret)), Ok(their_id), Some(their_c)) =
                (&chap.mutual, their_id.parse::<u8>(), binary_value(&their_c))
            else {
                return Err(AUTHENTICATION_FAILURE);
            };
            if their_c == c || their_c.is_empty() {
                // A reflected challenge proves nothing.
                return Err(AUTHENTICATION_FAILURE);
            }
            answers.push(("CHAP_N".into(), user.clone()));
            answers.push((
                "CHAP_R".into(),
                hex_string(&chap_response(their_id, secret, &their_c)),
            ));
        } else if chap.mutual.is_some() {
            // The target was set up to prove itself: the
            // initiator must ask (else it trusts anyone).
            return Err(AUTHENTICATION_FAILURE);
        }
        Ok(())
    }

    fn login_response(&mut self, req: &Pdu, csg: u8, nsg: u8, transit: bool, tsih: u16) -> Pdu {
        let mut rsp = Pdu::new(op::LOGIN_RSP);
        rsp.bhs[1] = if transit {
            0x80 | (csg << 2) | nsg
        } else {
            csg << 2
        };
        rsp.bhs[2] = 0; // version-max
        rsp.bhs[3] = 0; // version-active
        rsp.bhs[8..14].copy_from_slice(&req.bhs[8..14]);
        rsp.bhs[14..16].copy_from_slice(&tsih.to_be_bytes());
        rsp.set_u32(16, req.itt());
        self.stamp(&mut rsp, true);
        rsp
    }

    /// Answer `req` with `refusal`; the login ends (`Ok(false)`).
    async fn refuse(&mut self, req: &Pdu, refusal: Refusal) -> Result<bool, End> {
        let mut rsp = Pdu::new(op::LOGIN_RSP);
        rsp.bhs[8..14].copy_from_slice(&req.bhs[8..14]);
        rsp.set_u32(16, req.itt());
        self.stamp(&mut rsp, false);
        rsp.bhs[36] = refusal.class;
        rsp.bhs[37] = refusal.detail;
        self.send(&rsp).await?;
        Ok(false)
    }

    async fn full_feature(&mut self) -> Result<(), End> {
        loop {
            let p = match self.reinstated.clone() {
                Some(ended) => tokio::select! {
                    // Replaced: nothing more of this session runs.
                    biased;
                    () = ended.notify.notified() => return Err(End::replaced()),
                    p = self.read_pdu() => p?,
                },
                None => self.read_pdu().await?,
            };
            // Commands that consume a CmdSN: in order, or ignored.
            let counted = !p.immediate()
                && matches!(
                    p.opcode(),
                    op::SCSI_CMD | op::NOP_OUT | op::TEXT_REQ | op::LOGOUT_REQ | op::TMF_REQ
                );
            let nop_ping = p.opcode() == op::NOP_OUT && p.itt() == 0xffff_ffff;
            if counted && !nop_ping {
                if p.cmd_sn() != self.exp_cmd_sn {
                    tracing::debug!(
                        cmd_sn = p.cmd_sn(),
                        expected = self.exp_cmd_sn,
                        "CmdSN out of order: ignored"
                    );
                    continue;
                }
                self.exp_cmd_sn = self.exp_cmd_sn.wrapping_add(1);
            }
            match p.opcode() {
                op::NOP_OUT => {
                    if p.itt() != 0xffff_ffff {
                        let mut rsp = Pdu::new(op::NOP_IN);
                        rsp.bhs[1] = 0x80;
                        rsp.bhs[8..16].copy_from_slice(&p.bhs[8..16]);
                        rsp.set_u32(16, p.itt());
                        rsp.set_u32(20, 0xffff_ffff);
                        self.stamp(&mut rsp, true);
                        rsp.data = p.data.clone();
                        rsp.data.truncate(self.params.max_send_data);
                        self.send(&rsp).await?;
                    }
                }
                op::SCSI_CMD => {
                    if self.kind == SessionType::Discovery {
                        self.reject(&p, 0x0b).await?;
                        continue;
                    }
                    self.scsi_command(p).await?;
                }
                op::TEXT_REQ => self.text(p).await?,
                op::LOGOUT_REQ => {
                    let mut rsp = Pdu::new(op::LOGOUT_RSP);
                    rsp.bhs[1] = 0x80;
                    rsp.set_u32(16, p.itt());
                    self.stamp(&mut rsp, true);
                    self.send(&rsp).await?;
                    let _ = self.stream.shutdown().await;
                    return Err(End::Done);
                }
                op::TMF_REQ => {
                    // A discovery session (no CHAP, no allow-list: it only
                    // lists targets) manages no task: a TARGET COLD RESET
                    // from one would end every session of the export.
                    if self.kind == SessionType::Discovery {
                        self.reject(&p, 0x0b).await?;
                        continue;
                    }
                    let function = p.flags() & 0x7f;
                    let lun0 = p.lun_number() == 0;
                    let mut rsp = Pdu::new(op::TMF_RSP);
                    rsp.bhs[1] = 0x80;
                    // Commands run one at a time and are done by now: the
                    // task to abort no longer exists; a reset finds
                    // nothing left to stop.
                    rsp.bhs[2] = match function {
                        1 => 1,
                        // LUN-addressed: only LUN 0 exists.
                        2 | 4 | 5 if !lun0 || self.export.is_none() => 2,
                        2..=4 => 0,
                        5 | 6 => {
                            // LUN RESET, TARGET WARM RESET: the one unit
                            // resets (RESERVE(6) released, others told).
                            if let (Some(e), Some(nexus)) = (&self.export, &self.nexus) {
                                e.unit.reset(nexus, function != 5);
                            }
                            0
                        }
                        // TARGET COLD RESET would end every session of
                        // every export, other initiators' too: function
                        // authorization failed (as LIO answers by default).
                        7 => 6,
                        // TASK REASSIGN: allegiance reassignment is not
                        // supported at ErrorRecoveryLevel 0 (§11.5.1).
                        8 => 4,
                        _ => 5,
                    };
                    rsp.set_u32(16, p.itt());
                    self.stamp(&mut rsp, true);
                    self.send(&rsp).await?;
                }
                op::DATA_OUT => {
                    // Not solicited (InitialR2T=Yes): a protocol error.
                    self.reject(&p, 0x04).await?;
                }
                _ => self.reject(&p, 0x05).await?,
            }
        }
    }

    async fn reject(&mut self, p: &Pdu, reason: u8) -> Result<(), End> {
        let mut rsp = Pdu::new(op::REJECT);
        rsp.bhs[1] = 0x80;
        rsp.bhs[2] = reason;
        rsp.set_u32(16, 0xffff_ffff);
        self.stamp(&mut rsp, true);
        rsp.data = p.bhs.to_vec();
        self.send(&rsp).await
    }

    async fn text(&mut self, p: Pdu) -> Result<(), End> {
        let keys = text::parse(&p.data).unwrap_or_default();
        let mut answers = Vec::new();
        for (k, v) in &keys {
            if k == "SendTargets" {
                let name = ["iqn.", "eui.", "naa."].iter().any(|p| v.starts_with(p));
                if !(v == "All" || v.is_empty() || name) {
                    // Neither All, nor this session's target, nor an iSCSI
                    // name: a value out of range (RFC 7143 §6.2).
                    answers.push((k.clone(), "Reject".to_string()));
                    continue;
                }
                let address = self
                    .stream
                    .local_addr()
                    .map(|a| match a {
                        SocketAddr::V6(v6) => format!("[{}]:{}", v6.ip(), v6.port()),
                        v4 => v4.to_string(),
                    })
                    .unwrap_or_default();
                for e in &self.target.exports {
                    let wanted = v == "All"
                        || (v.is_empty() && self.export.as_ref().is_some_and(|x| x.iqn == e.iqn))
                        || *v == e.iqn;
                    if wanted && e.allows(&self.initiator) {
                        answers.push(("TargetName".to_string(), e.iqn.clone()));
                        answers.push(("TargetAddress".to_string(), format!("{address},1")));
                    }
                }
            } else {
                answers.push((k.clone(), "NotUnderstood".to_string()));
            }
        }
        let mut rsp = Pdu::new(op::TEXT_RSP);
        rsp.bhs[1] = 0x80;
        rsp.set_u32(16, p.itt());
        rsp.set_u32(20, 0xffff_ffff);
        self.stamp(&mut rsp, true);
        rsp.data = text::encode(&answers);
        rsp.data.truncate(self.params.max_send_data);
        self.send(&rsp).await
    }

    async fn scsi_command(&mut self, p: Pdu) -> Result<(), End> {
        let flags = p.flags();
        let write = flags & 0x20 != 0;
        let edtl = p.u32_at(20) as usize;
        let mut cdb = [0u8; 16];
        cdb.copy_from_slice(&p.bhs[32..48]);
        let unit: Option<(Arc<Unit>, Nexus)> = match (&self.export, &self.nexus, p.lun_number()) {
            (Some(e), Some(nexus), 0) => Some((e.unit.clone(), nexus.clone())),
            _ => None,
        };
        let prepared = match &unit {
            Some((unit, nexus)) => unit.prepare(&cdb, nexus),
            None => scsi::prepare(&cdb, None).map_err(Outcome::Check),
        };
        // The data-out the CDB asks for; what is taken is capped at what
        // the initiator said it would send (the rest is a residual).
        let mut need = 0usize;
        let data_out = match prepared {
            Err(outcome) => return self.respond(&p, outcome, edtl, write, 0).await,
            // COMPARE AND WRITE's two halves, WRITE SAME's one block: the
            // initiator must send exactly that.
            Ok(needs)
                if matches!(cdb[0], 0x89 | 0x41 | 0x93)
                    && edtl as u64
                        != match needs {
                            Needs::Data(n) => n,
                            Needs::Nothing => 0,
                        } =>
            {
                return self
                    .respond(&p, Outcome::Check(scsi::INVALID_FIELD), edtl, write, 0)
                    .await;
            }
            Ok(Needs::Nothing) => Vec::new(),
            Ok(Needs::Data(n)) => {
                need = n as usize;
                if !write || (!scsi::takes_short_data(cdb[0]) && edtl < need) {
                    return self
                        .respond(&p, Outcome::Check(scsi::INVALID_FIELD), edtl, write, 0)
                        .await;
                }
                if edtl < need && edtl as u64 % scsi::BLOCK != 0 {
                    // Fewer bytes than the CDB's blocks, and not whole
                    // blocks: nothing is written (FCP-4 §9.4.2's (b)),
                    // the overflow still told.
                    return self
                        .status(
                            &p,
                            scsi::CHECK_CONDITION,
                            Some(scsi::INVALID_FIELD_IN_IU),
                            0x04,
                            need - edtl,
                        )
                        .await;
                }
                match self.collect(&p, edtl.min(need)).await? {
                    Ok(data) => data,
                    Err(sense) => {
                        return self
                            .respond(&p, Outcome::Check(sense), edtl, write, 0)
                            .await
                    }
                }
            }
        };
        // The old session's command, if one runs, ends first.
        let running = match &self.exec {
            Some(gate) => Some(gate.clone().lock_owned().await),
            None => None,
        };
        if self.reinstated.as_ref().is_some_and(|e| e.is_ended()) {
            // A new login took the session over while this command's data
            // came: it does not run.
            return Err(End::replaced());
        }
        let outcome = tokio::task::spawn_blocking(move || match unit {
            Some((unit, nexus)) => unit.execute(&cdb, &nexus, &data_out),
            None => scsi::execute(&cdb, None, &data_out),
        })
        .await
        .map_err(|e| End::Error(format!("a command failed: {e}")))?;
        drop(running);
        self.respond(&p, outcome, edtl, write, need).await
    }

    /// Gather a write command's data: immediate, then solicited by R2T.
    ///
    /// A sense when a burst came out of sequence (a DataSN or offset that
    /// is not the next one, more than was asked, or less): at error
    /// recovery level 0 the data cannot be asked again, so the rest of
    /// that burst is read and dropped (up to its final PDU, RFC 7143
    /// §11.4.2) and the command ends in CHECK CONDITION while the
    /// connection goes on.
    async fn collect(&mut self, cmd: &Pdu, edtl: usize) -> Result<Result<Vec<u8>, Sense>, End> {
        let mut data = cmd.data.clone();
        data.truncate(edtl);
        data.resize(edtl, 0);
        let mut have = cmd.data.len().min(edtl);
        let mut r2t_sn = 0u32;
        while have < edtl {
            let want = (edtl - have).min(self.params.max_burst);
            let ttt = self.next_ttt;
            self.next_ttt = self.next_ttt.wrapping_add(1).max(1);
            let mut r2t = Pdu::new(op::R2T);
            r2t.bhs[1] = 0x80;
            r2t.bhs[8..16].copy_from_slice(&cmd.bhs[8..16]);
            r2t.set_u32(16, cmd.itt());
            r2t.set_u32(20, ttt);
            self.stamp(&mut r2t, false);
            r2t.set_u32(36, r2t_sn);
            r2t.set_u32(40, have as u32);
            r2t.set_u32(44, want as u32);
            self.send(&r2t).await?;
            r2t_sn += 1;
            let mut got = 0usize;
            let mut expect_sn = 0u32;
            let mut broken = false;
            // A burst of `want` bytes in PDUs of at least one byte each,
            // bar a final empty one: more than that is not a burst.
            let mut budget = want + 1;
            loop {
                let p = tokio::time::timeout(LOGIN_TIMEOUT, self.read_wire())
                    .await
                    .map_err(|_| End::Error("solicited data never came".into()))??;
                if p.opcode() != op::DATA_OUT || p.u32_at(20) != ttt {
                    if self.pending.len() >= MAX_PENDING {
                        return Err(End::Error(
                            "too many PDUs while waiting for solicited data".into(),
                        ));
                    }
                    self.pending.push_back(p);
                    continue;
                }
                budget = budget
                    .checked_sub(1)
                    .ok_or_else(|| End::Error("a data burst that never ends".into()))?;
                let offset = p.u32_at(40) as usize;
                if broken
                    || p.u32_at(36) != expect_sn
                    || offset != have + got
                    || got + p.data.len() > want
                {
                    broken = true;
                } else {
                    data[offset..offset + p.data.len()].copy_from_slice(&p.data);
                    got += p.data.len();
                }
                expect_sn = expect_sn.wrapping_add(1);
                if p.flags() & 0x80 != 0 {
                    break;
                }
            }
            if broken {
                tracing::debug!(itt = cmd.itt(), "Data-Out out of sequence: command ended");
                return Ok(Err(scsi::DATA_LOST));
            }
            have += got;
            if got < want {
                tracing::debug!(itt = cmd.itt(), "a data burst ended short: command ended");
                return Ok(Err(scsi::WRONG_AMOUNT));
            }
        }
        Ok(Ok(data))
    }

    /// Answer a command: its data (reads) and status, with the residual
    /// against the expected length `edtl` (for a write, of the `need`
    /// bytes its CDB asked for).
    async fn respond(
        &mut self,
        cmd: &Pdu,
        outcome: Outcome,
        edtl: usize,
        write: bool,
        need: usize,
    ) -> Result<(), End> {
        match outcome {
            Outcome::Good(data) if !data.is_empty() && !write => {
                let sent = data.len().min(edtl);
                let (flag, residual) = match data.len().cmp(&edtl) {
                    std::cmp::Ordering::Greater => (0x04, data.len() - edtl),
                    std::cmp::Ordering::Less => (0x02, edtl - data.len()),
                    std::cmp::Ordering::Equal => (0, 0),
                };
                if sent == 0 {
                    return self.status(cmd, scsi::GOOD, None, flag, residual).await;
                }
                let step = self.params.max_send_data.max(512);
                // Sequences of at most MaxBurstLength, each ending with F
                // (RFC 7143 §11.7.1, §13.13); DataSN runs on across them.
                let burst = self.params.max_burst.max(512);
                let mut at = 0usize;
                let mut data_sn = 0u32;
                while at < sent {
                    let burst_end = (at / burst + 1) * burst;
                    let end = (at + step).min(sent).min(burst_end);
                    let last = end == sent;
                    let mut rsp = Pdu::new(op::DATA_IN);
                    rsp.bhs[1] = if last {
                        0x80 | 0x01 | flag
                    } else if end == burst_end {
                        0x80
                    } else {
                        0
                    };
                    rsp.set_u32(16, cmd.itt());
                    rsp.set_u32(20, 0xffff_ffff);
                    if last {
                        rsp.bhs[3] = scsi::GOOD;
                        self.stamp(&mut rsp, true);
                        rsp.set_u32(44, residual as u32);
                    } else {
                        rsp.set_u32(28, self.exp_cmd_sn);
                        rsp.set_u32(32, self.exp_cmd_sn.wrapping_add(WINDOW - 1));
                    }
                    rsp.set_u32(36, data_sn);
                    rsp.set_u32(40, at as u32);
                    rsp.data = data[at..end].to_vec();
                    self.send(&rsp).await?;
                    data_sn += 1;
                    at = end;
                }
                Ok(())
            }
            Outcome::Good(_) => {
                let (flag, residual) = if write {
                    match need.cmp(&edtl) {
                        std::cmp::Ordering::Greater => (0x04, need - edtl),
                        std::cmp::Ordering::Less => (0x02, edtl - need),
                        std::cmp::Ordering::Equal => (0, 0),
                    }
                } else if edtl > 0 {
                    (0x02, edtl)
                } else {
                    (0, 0)
                };
                self.status(cmd, scsi::GOOD, None, flag, residual).await
            }
            Outcome::Check(sense) => {
                self.status(cmd, scsi::CHECK_CONDITION, Some(sense), 0, 0)
                    .await
            }
            Outcome::Conflict => {
                self.status(cmd, scsi::RESERVATION_CONFLICT, None, 0, 0)
                    .await
            }
        }
    }

    async fn status(
        &mut self,
        cmd: &Pdu,
        status: u8,
        sense: Option<scsi::Sense>,
        flag: u8,
        residual: usize,
    ) -> Result<(), End> {
        let mut rsp = Pdu::new(op::SCSI_RSP);
        rsp.bhs[1] = 0x80 | flag;
        rsp.bhs[2] = 0; // command completed at target
        rsp.bhs[3] = status;
        rsp.set_u32(16, cmd.itt());
        self.stamp(&mut rsp, true);
        rsp.set_u32(44, residual as u32);
        if let Some(s) = sense {
            let bytes = s.bytes();
            rsp.data = (bytes.len() as u16).to_be_bytes().to_vec();
            rsp.data.extend_from_slice(&bytes);
        }
        self.send(&rsp).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::time::Instant;

    /// A PDU from the target (no digests, no AHS).
    fn read_pdu(s: &mut std::net::TcpStream) -> std::io::Result<Pdu> {
        let mut p = Pdu::new(0);
        s.read_exact(&mut p.bhs)?;
        let len = u32::from_be_bytes([0, p.bhs[5], p.bhs[6], p.bhs[7]]) as usize;
        let mut data = vec![0u8; crate::iscsi::pdu::pad4(len)];
        s.read_exact(&mut data)?;
        data.truncate(len);
        p.data = data;
        Ok(p)
    }

    /// A session that says nothing is pinged (NOP-In asking for an
    /// answer); answered, it stays; not answered, it is closed.
    #[test]
    fn a_silent_session_is_pinged_and_kept_while_it_answers() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let export = Arc::new(Export {
            iqn: "iqn.2026-12.test:ping".into(),
            unit: Arc::new(Unit::new(Arc::new(
                crate::iscsi::scsi::testing::RwMem::new(vec![0; 1 << 20]),
            ))),
            allowed: Vec::new(),
            chap: None,
        });
        let ping = Duration::from_millis(300);
        let target = Arc::new(Target::new(vec![export]).with_ping_after(ping));
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        rt.spawn(serve(listener, target, std::future::pending()));
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut login = Pdu::new(op::LOGIN_REQ);
        login.bhs[0] |= 0x40;
        login.bhs[1] = 0x87;
        login.bhs[8..14].copy_from_slice(&[0x80, 0, 0, 0, 0, 1]);
        login.set_u32(16, 1);
        login.data = super::super::text::encode(&[
            ("InitiatorName".into(), "iqn.2026-12.test:init".into()),
            ("TargetName".into(), "iqn.2026-12.test:ping".into()),
        ]);
        s.write_all(&login.encode(false, false)).unwrap();
        let rsp = read_pdu(&mut s).unwrap();
        assert_eq!((rsp.opcode(), rsp.bhs[36]), (op::LOGIN_RSP, 0));
        let started = Instant::now();
        // Three pings, each answered: the session stays.
        let mut last_stat_sn = None;
        for _ in 0..3 {
            let p = read_pdu(&mut s).unwrap();
            assert_eq!(p.opcode(), op::NOP_IN, "{:02x?}", p.bhs);
            assert_eq!(p.itt(), 0xffff_ffff);
            let ttt = p.u32_at(20);
            assert_ne!(ttt, 0xffff_ffff, "a ping asks for an answer");
            // StatSN is not advanced by a ping.
            let stat_sn = p.u32_at(24);
            assert!(last_stat_sn.is_none_or(|l| l == stat_sn));
            last_stat_sn = Some(stat_sn);
            let mut answer = Pdu::new(op::NOP_OUT);
            answer.bhs[0] |= 0x40;
            answer.bhs[1] = 0x80;
            answer.set_u32(16, 0xffff_ffff);
            answer.set_u32(20, ttt);
            answer.set_u32(24, 1);
            answer.set_u32(28, stat_sn);
            s.write_all(&answer.encode(false, false)).unwrap();
        }
        assert!(started.elapsed() >= 3 * ping);
        // Not answered: the next ping, then the end.
        let p = read_pdu(&mut s).unwrap();
        assert_eq!(p.opcode(), op::NOP_IN);
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        assert!(rest.is_empty(), "{} bytes after the ping", rest.len());
    }

    #[test]
    fn chap_values_are_hex_or_base64_and_anything_else_is_refused_without_a_panic() {
        assert_eq!(binary_value("0x00ab"), Some(vec![0, 0xab]));
        // Base64 (RFC 7143 §6.1 "0b"), as some initiators answer.
        assert_eq!(binary_value("0bAKs="), Some(vec![0, 0xab]));
        assert_eq!(binary_value("0BAKs="), Some(vec![0, 0xab]));
        assert_eq!(binary_value("0bAK"), None, "unpadded");
        assert_eq!(binary_value("0b!!!!"), None, "not base64");
        let long = {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.encode([7u8; 1025])
        };
        assert_eq!(binary_value(&format!("0b{long}")), None, "long");
        assert_eq!(binary_value("0X00AB"), Some(vec![0, 0xab]));
        assert_eq!(hex_string(&[0, 0xab]), "0x00ab");
        assert_eq!(binary_value("00ab"), None, "no 0x");
        assert_eq!(binary_value("0xabc"), None, "odd");
        assert_eq!(
            binary_value(&format!("0x{}", "00".repeat(1025))),
            None,
            "long"
        );
        // A CHAP_R from a stranger, before authentication: a character
        // boundary inside a digit pair once panicked the connection.
        assert_eq!(binary_value("0xaéa"), None);
    }
}
