//! The replication wire protocol between `ublk-mirror` and `mirror-server`.
//!
//! # Framing
//!
//! A stream carries frames. A frame is a 4-byte little-endian length `n`
//! followed by `n` bytes of a [postcard]-encoded [`Message`]. Headers are
//! small: a frame longer than [`MAX_FRAME`] is refused before anything is
//! read into memory. Block data travels apart from the headers: a
//! [`Message::Block`] header is followed by exactly `data_len` raw bytes
//! (at most [`MAX_BLOCK_DATA`]), so the bulk is never parsed.
//!
//! Any decoding failure (short frame, bad length, unknown variant, trailing
//! bytes) is a [`ProtoError`]: the connection that sent it ends with the
//! reason logged; nothing else is affected.
//!
//! # Blocks
//!
//! A device travels in blocks of at most [`crate::block::BLOCK`] (64 KiB)
//! aligned to it, each named by the SHA-256 of its decoded bytes and
//! encoded as [`crate::block`] says (a hole, zstd, or raw); any block up
//! to [`MAX_BLOCK`] is accepted. What each side decides at each step is
//! in [`crate::session`].
//!
//! # Versions
//!
//! The first frame of a connection is [`Message::Hello`] carrying
//! [`MAGIC`] and the sender's [`Version`]; its bytes are pinned by a test,
//! so that any change to them is a deliberate version bump.
//!
//! - [`Version::V1`]: first version.
//! - [`Version::V2`]: an epoch travels over several streams and resumes;
//!   snapshots ([`Message::TakeSnapshot`]); restore ([`Message::Restore`]).
//!   [`Message::BeginEpoch`] opens the epoch on a control stream; the
//!   server answers with what it holds already ([`Message::Staged`], from
//!   an interrupted attempt at the same epoch of the same writer); blocks
//!   go over data streams ([`Message::EpochData`] .. [`Message::EndData`],
//!   each answered by [`Message::Resend`]); [`Message::EndEpoch`] on the
//!   control stream publishes.
//! - [`Version::V3`]: deduplication on the wire. A data stream may ask
//!   which blocks the server holds already ([`Message::HaveChunks`],
//!   answered by [`Message::KnownChunks`]); a block it holds travels as
//!   [`Encoding::Known`]: its header, no data. The server answers only
//!   from chunks the asking client's own volumes reference, so no client
//!   learns what another stores, and from blocks staged earlier in the
//!   same epoch (a block repeated within an epoch, a first sync's most of
//!   all, travels once; the answer means the same to the client, so this
//!   needed no new version). A V3 server speaks V2 to a V2 client
//!   (the hello it answers with is the older of the two); a V3 client
//!   needs a V3 server (upgrade servers first).
//! - [`Version::V4`]: a device takes a volume over
//!   ([`Message::TakeOver`], answered by [`Message::Committed`]): an
//!   instant restore that goes on mirroring becomes the volume's writer,
//!   and the device that wrote it before is refused from then on. The
//!   server publishes an empty epoch whose writer is the new device, by
//!   the same create-only write of the version record as every epoch, so
//!   of two servers (or two devices) racing, one wins. A V4 server speaks
//!   V3 and V2 to older clients; a V4 client needs a V4 server (upgrade
//!   servers first).
//! - [`Version::V5`]: pre-copy rounds. A client may end an epoch's
//!   control stream with [`Message::EndRound`] instead of
//!   [`Message::EndEpoch`]: the server makes what is staged durable,
//!   answers [`Message::RoundStaged`], and keeps the staging for the same
//!   writer without publishing it; the next `BeginEpoch` of the same epoch
//!   and writer finds it (its `Staged` answer says what it holds, which the
//!   client checks against what it sent), and a later round may send a
//!   block again (the later copy wins when the epoch is published). So a
//!   large first sync travels while the device is written, and is
//!   published once, with the consistent cut that ends it (see the
//!   client's `replicator`). A V5 server speaks V4 and older to older
//!   clients; a V5 client needs a V5 server (upgrade servers first).
//! - [`Version::V6`]: a client lists its volume's snapshots
//!   ([`Message::ListSnapshots`], answered by [`Message::SnapshotList`]
//!   frames of at most [`MAX_LISTED`] snapshots each, the last marked
//!   `done`), so that a laptop finds the version to restore without the
//!   server's command line. A V6 server speaks V5 and older to older
//!   clients. A V6 client speaks everything else with a V5 server and
//!   refuses only the listing there, asking for the server's upgrade.
//!
//! # An epoch, step by step (V2)
//!
//! ```text
//! control stream                      data streams (any number, at once)
//! -> BeginEpoch{volume,epoch,writer}
//! <- Staged{ranges,done:false}*       -> EpochData{volume,epoch}
//! <- Staged{ranges,done:true}         -> (Block + data)*
//!                                     -> EndData{blocks}
//!                                     <- Resend{blocks}   (empty: all good)
//! -> EndEpoch                           (V5: or EndRound)
//! <- Committed{epoch} | Refused{reason} (V5: RoundStaged{epoch})
//! ```
//!
//! In V3 a data stream interleaves questions with its blocks; answers
//! come back in order, so a client asks about the next batch before it
//! sends the blocks of this one, and never waits a round trip:
//!
//! ```text
//! -> EpochData{volume,epoch}
//! -> HaveChunks{digests}              (batch 1)
//! -> HaveChunks{digests}              (batch 2)
//!                                     <- KnownChunks{bits}   (batch 1)
//! -> (Block + data | Block{Known})*   (batch 1)
//! ...
//! -> EndData{blocks}
//!                                     <- Resend{blocks}
//! ```
//!
//! A `Known` block the server cannot produce after all (its chunk was
//! collected meanwhile, or the store cannot be read) is asked for again
//! in `Resend`; a resent block always carries its data.

use serde::{Deserialize, Serialize};

/// Marks a ublk-mirror connection's first frame.
pub const MAGIC: [u8; 4] = *b"UBMR";

/// Largest header frame, in bytes (its length prefix excluded).
pub const MAX_FRAME: u32 = 64 << 10;

/// Largest block of data a [`Message::Block`] may carry, uncompressed.
pub const MAX_BLOCK: u32 = 1 << 20;

/// Largest data a [`Message::Block`] header may announce: a block that
/// compresses badly is sent raw, so never more than the block itself.
pub const MAX_BLOCK_DATA: u32 = MAX_BLOCK;

/// Protocol versions; a line in the module docs per bump.
///
/// On the wire a version is its index (V1 is 0) as a varint, as postcard
/// writes an enum's variant; a number past the newest this build knows
/// reads as [`Version::CURRENT`] (a newer peer speaks ours with us), so
/// that a newer client is answered in our version, not cut off with an
/// undecodable hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Version {
    /// First version.
    V1,
    /// Parallel data streams and resumable epochs.
    V2,
    /// Deduplication on the wire ([`Message::HaveChunks`]).
    V3,
    /// Taking a volume over ([`Message::TakeOver`]).
    V4,
    /// Pre-copy rounds ([`Message::EndRound`]).
    V5,
    /// Listing snapshots ([`Message::ListSnapshots`]).
    V6,
}

impl Version {
    /// Every version, oldest first (a version's index is its wire number).
    const ALL: [Version; 6] = [
        Version::V1,
        Version::V2,
        Version::V3,
        Version::V4,
        Version::V5,
        Version::V6,
    ];

    /// The newest version this build speaks.
    pub const CURRENT: Version = Version::V6;
    /// The oldest version this build still speaks (as a server).
    pub const OLDEST: Version = Version::V2;
}

impl Serialize for Version {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(*self as u32)
    }
}

impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = u32::deserialize(d)?;
        Ok(Version::ALL
            .get(n as usize)
            .copied()
            .unwrap_or(Version::CURRENT))
    }
}

/// How a block's bytes travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Encoding {
    /// As they are.
    Raw,
    /// zstd-compressed.
    Zstd,
    /// All zeroes: no data follows; the server makes it a hole.
    Zero,
    /// (V3) The server said it holds a chunk of this digest
    /// ([`Message::KnownChunks`]): no data follows; the server takes the
    /// bytes from its store.
    Known,
}

/// A SHA-256 digest.
pub type Digest = [u8; 32];

/// A device and one of its (local) epochs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Writer {
    /// The device's id (random, made with its journal).
    pub device: [u8; 16],
    /// The device's own epoch number.
    pub epoch: u64,
}

/// One protocol message (a frame's content).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// First frame of a connection, both ways.
    Hello {
        /// [`MAGIC`].
        magic: [u8; 4],
        /// The sender's version.
        version: Version,
    },
    /// The peer's request cannot be met; the connection ends after it.
    Refused {
        /// Why, for the log and the user.
        reason: String,
    },
    /// A block of an epoch: `data_len` bytes of data follow this frame.
    Block {
        /// Device offset in bytes.
        offset: u64,
        /// Bytes of the block once decoded.
        len: u32,
        /// SHA-256 of the decoded bytes.
        sha256: Digest,
        /// How the data travels.
        encoding: Encoding,
        /// Bytes that follow the frame (0 for [`Encoding::Zero`]).
        data_len: u32,
    },
    /// Client: enroll as `name` with the token's one-time secret. A client
    /// the server does not know may send nothing else.
    Enroll {
        /// The name the token was made for.
        name: String,
        /// The token's secret.
        secret: [u8; 32],
    },
    /// Server: enrollment accepted; this certificate is now `name`.
    Enrolled {
        /// The client's name.
        name: String,
    },
    /// Client: open one of its volumes, created (sparse, all zeroes) if new.
    OpenVolume {
        /// Volume name.
        volume: String,
        /// Size in bytes (a volume's size never changes).
        size: u64,
    },
    /// Server: a volume's state.
    VolumeInfo {
        /// Volume name.
        volume: String,
        /// Size in bytes.
        size: u64,
        /// The epoch its image holds (0: none).
        published_epoch: u64,
        /// Made when the volume was created: a volume created again
        /// (another server, a wiped one) has another.
        uuid: [u8; 16],
        /// Which device's epoch the image holds, and its local number.
        writer: Option<Writer>,
    },
    /// Client: epoch `epoch` of `volume` follows as [`Message::Block`]s,
    /// ended by [`Message::EndEpoch`].
    BeginEpoch {
        /// Volume name.
        volume: String,
        /// The epoch (newer than the published one).
        epoch: u64,
        /// Who sends it: a volume takes epochs from one device only.
        writer: Writer,
    },
    /// Client, on the control stream: every data stream of the epoch was
    /// answered with an empty [`Message::Resend`]; publish it.
    EndEpoch,
    /// Server, answering [`Message::EndData`]: blocks of that data stream
    /// that failed their checks (at most [`MAX_RESEND`]): send them again,
    /// on another data stream. Empty: all were staged.
    Resend {
        /// `(offset, len)` of each refused block.
        blocks: Vec<(u64, u32)>,
    },
    /// Server: the epoch is published, durably and whole.
    Committed {
        /// The epoch.
        epoch: u64,
    },
    /// Client: the sha256 of these blocks of the volume's image, to send
    /// only the blocks that differ (resync after a crash, initial sync).
    HashRequest {
        /// Volume name.
        volume: String,
        /// `(offset, len)` of each block, at most [`MAX_HASH_BLOCKS`].
        blocks: Vec<(u64, u32)>,
    },
    /// Server: the digests, in the order asked.
    Hashes {
        /// One per block.
        digests: Vec<Digest>,
    },
    /// Server, answering [`Message::BeginEpoch`]: byte ranges of the epoch
    /// it holds staged already (from an interrupted attempt at the same
    /// epoch of the same writer), at most [`MAX_STAGED_RANGES`] a frame;
    /// the last frame has `done`. Blocks wholly inside them need not travel.
    ///
    /// `adopted`: the staging was left by an *earlier* epoch of the same
    /// device (its daemon restarted mid-epoch) and is taken over by this
    /// one. Its blocks are published with this epoch unless sent again, so
    /// the client must vouch for every one of them: ask their digests
    /// ([`Message::StagedHashes`]) and send those that differ from its own,
    /// and send any staged block it would not have sent.
    Staged {
        /// `(offset, len)` of each range.
        ranges: Vec<(u64, u64)>,
        /// An earlier epoch's staging, taken over.
        adopted: bool,
        /// No more `Staged` frames follow.
        done: bool,
    },
    /// Client: a data stream of the epoch `BeginEpoch` opened on another
    /// stream; [`Message::Block`]s follow, then [`Message::EndData`].
    EpochData {
        /// Volume name.
        volume: String,
        /// The epoch being staged.
        epoch: u64,
    },
    /// Client: this data stream's last block was sent.
    EndData {
        /// Blocks sent on this stream.
        blocks: u64,
    },
    /// Client: the digests of blocks of the epoch being staged, answered
    /// with [`Message::Hashes`]; a block not staged exactly so (same offset
    /// and length) has the digest of all ones.
    StagedHashes {
        /// Volume name.
        volume: String,
        /// The epoch being staged.
        epoch: u64,
        /// `(offset, len)` of each block, at most [`MAX_HASH_BLOCKS`].
        blocks: Vec<(u64, u32)>,
    },
    /// Client: take a snapshot of the volume's published epoch (manual:
    /// kept until deleted).
    TakeSnapshot {
        /// Volume name.
        volume: String,
        /// Its name; `None`: named after the time.
        name: Option<String>,
    },
    /// Client: restore the volume as of a snapshot (`at`: its name, or a
    /// time `YYYY-MM-DD[THH:MM[:SS]]` UTC for the newest snapshot at or
    /// before it; `None`: the published epoch now). Answered with
    /// [`Message::RestoreInfo`]; then any number of [`Message::Have`]s,
    /// each answered with the blocks that differ and [`Message::HaveDone`].
    /// The snapshot is kept (never pruned) while the stream is open.
    Restore {
        /// Volume name.
        volume: String,
        /// Which version.
        at: Option<String>,
    },
    /// Server: what is being restored.
    RestoreInfo {
        /// Volume size in bytes.
        size: u64,
        /// The snapshot read (a temporary one for "now").
        snapshot: String,
        /// The epoch it holds.
        epoch: u64,
        /// When that epoch was published (ms since the Unix epoch).
        epoch_ms: u64,
    },
    /// Client: the digests of consecutive blocks of `len` bytes from
    /// `offset` as the restore target holds them (the last block may end
    /// at the volume's end); the server sends a [`Message::Block`] for each
    /// whose content differs, then [`Message::HaveDone`].
    Have {
        /// Offset of the first block.
        offset: u64,
        /// Bytes per block.
        len: u32,
        /// One per block, at most [`MAX_HASH_BLOCKS`].
        digests: Vec<Digest>,
    },
    /// Server: every differing block of the last [`Message::Have`] was sent.
    HaveDone {
        /// Blocks that were the same (not sent).
        same: u64,
    },
    /// Server: the snapshot was taken.
    SnapshotTaken {
        /// Its name.
        name: String,
        /// The published epoch it holds.
        epoch: u64,
        /// When that epoch was published (ms since the Unix epoch).
        epoch_ms: u64,
    },
    /// Client (V3), on a data stream: which of these chunks does the
    /// server hold for this client? Answered, in order with the stream's
    /// other answers, by [`Message::KnownChunks`].
    HaveChunks {
        /// Digests of blocks about to be sent, at most [`MAX_HASH_BLOCKS`].
        digests: Vec<Digest>,
    },
    /// Server (V3): bit `i` (of byte `i / 8`, least significant first)
    /// set: the server holds the chunk of digest `i` of the question, for
    /// this client; the block may travel as [`Encoding::Known`].
    KnownChunks {
        /// One bit per digest asked, rounded up to whole bytes.
        bits: Vec<u8>,
    },
    /// Client (V4): device `device` becomes the writer of `volume`, whose
    /// writer is `from` now (compare and swap: refused if the volume moved
    /// on). The server publishes an empty epoch written by `device` (its
    /// local epoch 0) and answers [`Message::Committed`] with it; epochs
    /// of any other device are refused from then on.
    TakeOver {
        /// Volume name.
        volume: String,
        /// The writer the client saw ([`Message::VolumeInfo`]).
        from: Option<Writer>,
        /// The device taking over.
        device: [u8; 16],
    },
    /// Client (V5), on the control stream instead of [`Message::EndEpoch`]:
    /// every data stream was answered with an empty [`Message::Resend`];
    /// make what is staged durable and keep it for this writer, but do not
    /// publish (a pre-copy round). Answered by [`Message::RoundStaged`];
    /// the next round (or the epoch's end) comes with a new
    /// [`Message::BeginEpoch`] of the same epoch and writer.
    EndRound,
    /// Server (V5): what the epoch's staging holds is durable; it stays
    /// staged for the same writer.
    RoundStaged {
        /// The epoch.
        epoch: u64,
    },
    /// Client (V6): the snapshots of one of its volumes, as a restore's
    /// `at` may name them. Answered by [`Message::SnapshotList`] frames
    /// until one is `done` (or [`Message::Refused`]).
    ListSnapshots {
        /// Volume name.
        volume: String,
    },
    /// Server (V6): some of the volume's snapshots, in the order shown
    /// (oldest point in time first), at most [`MAX_LISTED`].
    SnapshotList {
        /// These snapshots.
        snapshots: Vec<ListedSnapshot>,
        /// The last frame of the answer.
        done: bool,
        /// On the last frame: why the list may lack snapshots (the chunk
        /// store, where snapshots other servers took are kept, could not
        /// be read), for the user; at most [`MAX_NOTE`] bytes.
        incomplete: Option<String>,
    },
}

/// One snapshot as [`Message::SnapshotList`] lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListedSnapshot {
    /// Its name (what a restore's `at` takes).
    pub name: String,
    /// The published epoch it holds.
    pub epoch: u64,
    /// When that epoch was published (ms since the Unix epoch): the point
    /// in time it shows.
    pub epoch_ms: u64,
    /// When the snapshot was taken (ms since the Unix epoch).
    pub created_ms: u64,
    /// How the server keeps it, in the words `mirror-server snapshots`
    /// uses (`manual`, `scheduled`, `temporary`, `stored`): a name, so
    /// that a kind a newer server adds reaches an older client as text.
    pub kind: String,
}

/// Most ranges one [`Message::Staged`] carries (it must fit in a frame).
pub const MAX_STAGED_RANGES: usize = 2048;

/// Most blocks one [`Message::Resend`] asks for (it must fit in a frame).
pub const MAX_RESEND: usize = 2048;

/// The digest [`Message::StagedHashes`] answers for a block not staged.
pub const NOT_STAGED: Digest = [0xff; 32];

/// Most blocks one [`Message::HashRequest`] may name (its answer must fit
/// in a frame).
pub const MAX_HASH_BLOCKS: usize = 1024;

/// Longest client or volume name.
pub const MAX_NAME: usize = 64;

/// Most snapshots one [`Message::SnapshotList`] carries: each is its name
/// and kind (at most [`MAX_NAME`] bytes each) and three numbers, so the
/// frame stays well inside [`MAX_FRAME`] (a test checks).
pub const MAX_LISTED: usize = 256;

/// Longest note in a [`Message::SnapshotList`].
pub const MAX_NOTE: usize = 2048;

/// Check a client or volume name: 1 to [`MAX_NAME`] characters of
/// `A-Z a-z 0-9 . _ -`, not starting with a dot (names become directories).
pub fn check_name(name: &str) -> Result<(), ProtoError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ProtoError::InvalidName(name.chars().take(80).collect()))
    }
}

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// A frame announced more than [`MAX_FRAME`] bytes.
    #[error("frame of {0} bytes is larger than the limit of {MAX_FRAME}")]
    FrameTooLarge(u32),
    /// The frame's bytes are not a message of this version.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// A block header that cannot be right.
    #[error("invalid block header: {0}")]
    InvalidBlock(&'static str),
    /// A name that cannot be a client or volume name.
    #[error("invalid name {0:?}: use 1 to 64 of A-Z a-z 0-9 . _ -, not starting with a dot")]
    InvalidName(String),
    /// A message of a newer version than the stream speaks.
    #[error("{0} is not part of protocol {1:?}")]
    TooNew(&'static str, Version),
    /// The first frame is not a ublk-mirror hello.
    #[error("not a ublk-mirror peer (bad hello)")]
    NotOurs,
    /// The peer speaks no version we do.
    #[error("peer speaks protocol {0:?}, this build speaks {oldest:?} to {current:?}{hint}", oldest = Version::OLDEST, current = Version::CURRENT, hint = if *.0 < Version::OLDEST { " (upgrade the client)" } else { " (upgrade this side)" })]
    Version(Version),
}

/// Pack one flag a digest into [`Message::KnownChunks`] bits.
pub fn pack_bits(flags: &[bool]) -> Vec<u8> {
    let mut bits = vec![0u8; flags.len().div_ceil(8)];
    for (i, _) in flags.iter().enumerate().filter(|(_, &f)| f) {
        bits[i / 8] |= 1 << (i % 8);
    }
    bits
}

/// The flags of `n` digests from [`Message::KnownChunks`] bits; `None`
/// when the bits are not for `n` digests (a peer's mistake).
pub fn unpack_bits(bits: &[u8], n: usize) -> Option<Vec<bool>> {
    if bits.len() != n.div_ceil(8) {
        return None;
    }
    let flags: Vec<bool> = (0..n).map(|i| bits[i / 8] & (1 << (i % 8)) != 0).collect();
    // Padding bits past `n` are zero: one answer, one encoding.
    (pack_bits(&flags) == bits).then_some(flags)
}

impl Message {
    /// The hello of this build.
    pub fn hello() -> Message {
        Message::hello_at(Version::CURRENT)
    }

    /// A hello that speaks `version` (a server answers an older client
    /// with the client's version).
    pub fn hello_at(version: Version) -> Message {
        Message::Hello {
            magic: MAGIC,
            version,
        }
    }

    /// Check a received hello; returns the version the stream speaks: the
    /// older of the peer's and ours (a version older than
    /// [`Version::OLDEST`] is refused).
    pub fn check_hello(&self) -> Result<Version, ProtoError> {
        match self {
            Message::Hello { magic, version } if *magic == MAGIC => {
                if *version >= Version::OLDEST {
                    Ok((*version).min(Version::CURRENT))
                } else {
                    Err(ProtoError::Version(*version))
                }
            }
            _ => Err(ProtoError::NotOurs),
        }
    }

    /// The oldest version that has this message, and its name (`None`:
    /// every version has it).
    fn since(&self) -> Option<(Version, &'static str)> {
        match self {
            Message::HaveChunks { .. } => Some((Version::V3, "HaveChunks")),
            Message::TakeOver { .. } => Some((Version::V4, "TakeOver")),
            Message::EndRound => Some((Version::V5, "EndRound")),
            Message::RoundStaged { .. } => Some((Version::V5, "RoundStaged")),
            Message::ListSnapshots { .. } => Some((Version::V6, "ListSnapshots")),
            Message::SnapshotList { .. } => Some((Version::V6, "SnapshotList")),
            Message::KnownChunks { .. } => Some((Version::V3, "KnownChunks")),
            Message::Block {
                encoding: Encoding::Known,
                ..
            } => Some((Version::V3, "a Known block")),
            _ => None,
        }
    }

    /// Refuse this message on a stream that speaks `version`.
    pub fn check_version(&self, version: Version) -> Result<(), ProtoError> {
        match self.since() {
            Some((v, name)) if v > version => Err(ProtoError::TooNew(name, version)),
            _ => Ok(()),
        }
    }

    /// Check what a message claims before acting on it.
    pub fn validate(&self) -> Result<(), ProtoError> {
        match self {
            Message::Enroll { name, .. } | Message::Enrolled { name } => check_name(name)?,
            Message::OpenVolume { volume, .. }
            | Message::VolumeInfo { volume, .. }
            | Message::BeginEpoch { volume, .. }
            | Message::TakeOver { volume, .. }
            | Message::ListSnapshots { volume }
            | Message::EpochData { volume, .. } => check_name(volume)?,
            Message::SnapshotList {
                snapshots,
                incomplete,
                ..
            } => {
                if snapshots.len() > MAX_LISTED {
                    return Err(ProtoError::Malformed(format!(
                        "{} snapshots in one list (at most {MAX_LISTED})",
                        snapshots.len()
                    )));
                }
                if incomplete.as_ref().is_some_and(|n| n.len() > MAX_NOTE) {
                    return Err(ProtoError::Malformed("an overlong note".into()));
                }
                for s in snapshots {
                    check_name(&s.name)?;
                    check_name(&s.kind)?;
                }
            }
            Message::TakeSnapshot { volume, name } => {
                check_name(volume)?;
                if let Some(name) = name {
                    check_name(name)?;
                }
            }
            Message::SnapshotTaken { name, .. } => check_name(name)?,
            Message::Restore { volume, at } => {
                check_name(volume)?;
                if at.as_ref().is_some_and(|a| a.len() > MAX_NAME) {
                    return Err(ProtoError::InvalidName(at.clone().unwrap_or_default()));
                }
            }
            Message::RestoreInfo { snapshot, .. } => check_name(snapshot)?,
            Message::Have {
                offset,
                len,
                digests,
            } => {
                if *len == 0 || *len > MAX_BLOCK || digests.len() > MAX_HASH_BLOCKS {
                    return Err(ProtoError::InvalidBlock("impossible blocks in a Have"));
                }
                if offset
                    .checked_add(u64::from(*len) * digests.len() as u64)
                    .is_none()
                {
                    return Err(ProtoError::InvalidBlock("Have wraps"));
                }
            }
            Message::Staged { ranges, .. } => {
                if ranges.len() > MAX_STAGED_RANGES {
                    return Err(ProtoError::InvalidBlock(
                        "too many staged ranges in a frame",
                    ));
                }
                if ranges.iter().any(|&(o, l)| o.checked_add(l).is_none()) {
                    return Err(ProtoError::InvalidBlock("staged range wraps"));
                }
            }
            Message::Resend { blocks } if blocks.len() > MAX_RESEND => {
                return Err(ProtoError::InvalidBlock("too many blocks to resend"));
            }
            Message::HaveChunks { digests } if digests.len() > MAX_HASH_BLOCKS => {
                return Err(ProtoError::InvalidBlock(
                    "too many digests in one HaveChunks",
                ));
            }
            Message::KnownChunks { bits } if bits.len() > MAX_HASH_BLOCKS.div_ceil(8) => {
                return Err(ProtoError::InvalidBlock("too many bits in one KnownChunks"));
            }
            Message::HashRequest { volume, blocks }
            | Message::StagedHashes { volume, blocks, .. } => {
                check_name(volume)?;
                if blocks.len() > MAX_HASH_BLOCKS {
                    return Err(ProtoError::InvalidBlock(
                        "too many blocks in one hash request",
                    ));
                }
                if blocks
                    .iter()
                    .any(|&(o, l)| l == 0 || l > MAX_BLOCK || o.checked_add(u64::from(l)).is_none())
                {
                    return Err(ProtoError::InvalidBlock(
                        "hash request for an impossible block",
                    ));
                }
            }
            _ => {}
        }
        if let Message::Block {
            offset,
            len,
            encoding,
            data_len,
            ..
        } = *self
        {
            if len == 0 || len > MAX_BLOCK {
                return Err(ProtoError::InvalidBlock("length out of range"));
            }
            if offset.checked_add(u64::from(len)).is_none() {
                return Err(ProtoError::InvalidBlock("offset wraps"));
            }
            let data_ok = match encoding {
                Encoding::Zero | Encoding::Known => data_len == 0,
                Encoding::Raw => data_len == len,
                Encoding::Zstd => data_len > 0 && data_len <= MAX_BLOCK_DATA,
            };
            if !data_ok {
                return Err(ProtoError::InvalidBlock(
                    "data length does not match the encoding",
                ));
            }
        }
        Ok(())
    }

    /// The frame of this message: length prefix and postcard bytes.
    pub fn encode(&self) -> Vec<u8> {
        let body = postcard::to_allocvec(self).unwrap_or_default();
        let mut frame = Vec::with_capacity(4 + body.len());
        frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
        frame.extend_from_slice(&body);
        frame
    }

    /// Decode a frame's body (without its length prefix). Trailing bytes
    /// are an error: one frame, one message.
    pub fn decode(body: &[u8]) -> Result<Message, ProtoError> {
        if body.len() > MAX_FRAME as usize {
            return Err(ProtoError::FrameTooLarge(body.len() as u32));
        }
        let (message, rest) = postcard::take_from_bytes::<Message>(body)
            .map_err(|e| ProtoError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(ProtoError::Malformed(format!(
                "{} bytes after the message",
                rest.len()
            )));
        }
        // One message, one encoding: an overlong varint (postcard reads
        // `[142, 0]` as 14) is refused, so that no two peers can read the
        // same bytes differently. Found by the fuzz target.
        // (A hello is canonical up to its version: a newer peer's number
        // reads as ours, see [`Version`].)
        let canonical = postcard::to_allocvec(&message).ok();
        let same = |c: &Vec<u8>| match message {
            Message::Hello { .. } => c.len() >= 5 && body.len() >= 5 && c[..5] == body[..5],
            _ => *c == body,
        };
        if !canonical.as_ref().is_some_and(same) {
            return Err(ProtoError::Malformed("not in canonical form".into()));
        }
        message.validate()?;
        Ok(message)
    }

    /// Read a frame's length prefix: the body's length, if acceptable.
    pub fn frame_len(prefix: [u8; 4]) -> Result<usize, ProtoError> {
        let n = u32::from_le_bytes(prefix);
        if n > MAX_FRAME {
            return Err(ProtoError::FrameTooLarge(n));
        }
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_hello_bytes_are_pinned() {
        // Changing these bytes breaks every peer: bump the version instead.
        assert_eq!(
            Message::hello().encode(),
            [6, 0, 0, 0, 0, b'U', b'B', b'M', b'R', 5]
        );
        assert_eq!(
            Message::hello_at(Version::V5).encode(),
            [6, 0, 0, 0, 0, b'U', b'B', b'M', b'R', 4]
        );
        assert_eq!(
            Message::hello_at(Version::V4).encode(),
            [6, 0, 0, 0, 0, b'U', b'B', b'M', b'R', 3]
        );
        assert_eq!(
            Message::hello_at(Version::V3).encode(),
            [6, 0, 0, 0, 0, b'U', b'B', b'M', b'R', 2]
        );
        assert_eq!(
            Message::hello_at(Version::V2).encode(),
            [6, 0, 0, 0, 0, b'U', b'B', b'M', b'R', 1]
        );
        assert_eq!(
            Message::decode(&Message::hello().encode()[4..])
                .unwrap()
                .check_hello(),
            Ok(Version::V6)
        );
        // A newer peer's hello (a version this build does not know) is
        // answered in ours.
        assert_eq!(
            Message::decode(&[0, b'U', b'B', b'M', b'R', 9])
                .unwrap()
                .check_hello(),
            Ok(Version::CURRENT)
        );
        // But the rest of a hello is canonical: an overlong variant (found
        // by the fuzz target) is refused.
        assert!(Message::decode(&[0x80, 0, b'U', b'B', b'M', b'R', 9]).is_err());
        // A V2 peer is spoken to in V2; a V1 peer is told what we speak.
        assert_eq!(
            Message::hello_at(Version::V2).check_hello(),
            Ok(Version::V2)
        );
        let v1 = Message::hello_at(Version::V1);
        assert_eq!(v1.check_hello(), Err(ProtoError::Version(Version::V1)));
        assert!(v1
            .check_hello()
            .unwrap_err()
            .to_string()
            .contains("upgrade the client"));
    }

    fn listed(name: &str) -> ListedSnapshot {
        ListedSnapshot {
            name: name.to_string(),
            epoch: u64::MAX,
            epoch_ms: u64::MAX,
            created_ms: u64::MAX,
            kind: "k".repeat(MAX_NAME),
        }
    }

    #[test]
    fn a_full_snapshot_list_fits_a_frame_and_is_refused_on_a_v5_stream() {
        let full = Message::SnapshotList {
            snapshots: (0..MAX_LISTED)
                .map(|i| listed(&format!("{i:0>64}")))
                .collect(),
            done: true,
            incomplete: Some("n".repeat(MAX_NOTE)),
        };
        let bytes = full.encode();
        assert!(bytes.len() - 4 <= MAX_FRAME as usize, "{}", bytes.len());
        assert_eq!(Message::decode(&bytes[4..]).unwrap(), full);
        assert_eq!(full.validate(), Ok(()));
        let ask = Message::ListSnapshots {
            volume: "root".into(),
        };
        for m in [&full, &ask] {
            assert_eq!(m.check_version(Version::V6), Ok(()));
            assert!(matches!(
                m.check_version(Version::V5),
                Err(ProtoError::TooNew(_, Version::V5))
            ));
        }
        // One more snapshot, a longer note, or a name no snapshot has: refused.
        let Message::SnapshotList { snapshots, .. } = &full else {
            unreachable!()
        };
        let mut more = snapshots.clone();
        more.push(listed("one-more"));
        let bad = [
            Message::SnapshotList {
                snapshots: more,
                done: true,
                incomplete: None,
            },
            Message::SnapshotList {
                snapshots: vec![],
                done: true,
                incomplete: Some("n".repeat(MAX_NOTE + 1)),
            },
            Message::SnapshotList {
                snapshots: vec![listed("../etc")],
                done: false,
                incomplete: None,
            },
            Message::ListSnapshots {
                volume: "a/b".into(),
            },
        ];
        for m in bad {
            assert!(m.validate().is_err(), "{m:?}");
        }
    }

    #[test]
    fn rounds_are_refused_on_a_v4_stream() {
        for m in [Message::EndRound, Message::RoundStaged { epoch: 3 }] {
            assert_eq!(m.check_version(Version::V5), Ok(()));
            assert!(matches!(
                m.check_version(Version::V4),
                Err(ProtoError::TooNew(_, Version::V4))
            ));
            assert_eq!(Message::decode(&m.encode()[4..]).unwrap(), m);
        }
    }

    #[test]
    fn v3_messages_are_refused_on_a_v2_stream() {
        let ask = Message::HaveChunks {
            digests: vec![[3; 32]],
        };
        let known = Message::Block {
            offset: 0,
            len: 4096,
            sha256: [3; 32],
            encoding: Encoding::Known,
            data_len: 0,
        };
        for m in [&ask, &known] {
            assert_eq!(m.check_version(Version::V3), Ok(()));
            assert!(matches!(
                m.check_version(Version::V2),
                Err(ProtoError::TooNew(_, Version::V2))
            ));
        }
        assert_eq!(Message::EndEpoch.check_version(Version::V2), Ok(()));
        // A Known block carries nothing.
        let with_data = Message::Block {
            offset: 0,
            len: 4096,
            sha256: [3; 32],
            encoding: Encoding::Known,
            data_len: 1,
        };
        assert!(matches!(
            Message::decode(&with_data.encode()[4..]),
            Err(ProtoError::InvalidBlock(_))
        ));
    }

    #[test]
    fn known_bits_round_trip_and_padding_is_zero() {
        for n in [0usize, 1, 7, 8, 9, 33, MAX_HASH_BLOCKS] {
            let flags: Vec<bool> = (0..n).map(|i| i % 3 == 0).collect();
            let bits = pack_bits(&flags);
            assert_eq!(bits.len(), n.div_ceil(8));
            assert_eq!(unpack_bits(&bits, n), Some(flags));
        }
        // Too short, too long, or a padding bit set: not an answer for 3.
        assert_eq!(unpack_bits(&[], 3), None);
        assert_eq!(unpack_bits(&[0, 0], 3), None);
        assert_eq!(unpack_bits(&[0b1000], 3), None);
        assert_eq!(unpack_bits(&[0b101], 3), Some(vec![true, false, true]));
    }

    #[test]
    fn bad_frames_are_refused() {
        assert!(matches!(
            Message::frame_len((MAX_FRAME + 1).to_le_bytes()),
            Err(ProtoError::FrameTooLarge(_))
        ));
        assert!(matches!(
            Message::decode(&[]),
            Err(ProtoError::Malformed(_))
        ));
        assert!(matches!(
            Message::decode(&[200]),
            Err(ProtoError::Malformed(_))
        ));
        // Found by fuzz/fuzz_targets/frame.rs: an overlong varint.
        assert!(matches!(
            Message::decode(&[93, 0, 61, 109, 10, 142, 0][4..]),
            Err(ProtoError::Malformed(_))
        ));
        let mut hello = Message::hello().encode()[4..].to_vec();
        hello.push(0);
        assert!(matches!(
            Message::decode(&hello),
            Err(ProtoError::Malformed(_))
        ));
        let block = |len, encoding, data_len| Message::Block {
            offset: u64::MAX - 10,
            len,
            sha256: [0; 32],
            encoding,
            data_len,
        };
        for m in [
            block(4096, Encoding::Raw, 4096),
            block(0, Encoding::Zero, 0),
            block(MAX_BLOCK + 1, Encoding::Raw, MAX_BLOCK + 1),
        ] {
            assert!(matches!(
                Message::decode(&m.encode()[4..]),
                Err(ProtoError::InvalidBlock(_))
            ));
        }
        for bad in ["", ".", "..", "a/b", "x".repeat(65).as_str(), "é"] {
            let m = Message::OpenVolume {
                volume: bad.to_string(),
                size: 1,
            };
            assert!(
                matches!(
                    Message::decode(&m.encode()[4..]),
                    Err(ProtoError::InvalidName(_))
                ),
                "{bad:?} accepted"
            );
        }
        check_name("root-1.img_x").unwrap();
        let wrong = Message::Hello {
            magic: *b"HTTP",
            version: Version::V1,
        };
        assert_eq!(wrong.check_hello(), Err(ProtoError::NotOurs));
    }

    #[test]
    fn the_largest_hash_answer_fits_in_a_frame() {
        let m = Message::Hashes {
            digests: vec![[0xff; 32]; MAX_HASH_BLOCKS],
        };
        assert!(m.encode().len() - 4 <= MAX_FRAME as usize);
        let q = Message::HashRequest {
            volume: "x".repeat(MAX_NAME),
            blocks: vec![(u64::MAX / 2, MAX_BLOCK); MAX_HASH_BLOCKS],
        };
        assert_eq!(Message::decode(&q.encode()[4..]), Ok(q));
        let staged = Message::Staged {
            ranges: vec![(u64::MAX / 2, u64::MAX / 4); MAX_STAGED_RANGES],
            adopted: true,
            done: false,
        };
        assert!(staged.encode().len() - 4 <= MAX_FRAME as usize);
        let resend = Message::Resend {
            blocks: vec![(u64::MAX / 2, MAX_BLOCK); MAX_RESEND],
        };
        assert!(resend.encode().len() - 4 <= MAX_FRAME as usize);
        let ask = Message::HaveChunks {
            digests: vec![[0xff; 32]; MAX_HASH_BLOCKS],
        };
        assert_eq!(Message::decode(&ask.encode()[4..]), Ok(ask));
        let known = Message::KnownChunks {
            bits: vec![0xff; MAX_HASH_BLOCKS / 8],
        };
        assert_eq!(Message::decode(&known.encode()[4..]), Ok(known));
    }

    proptest! {
        #[test]
        fn any_bytes_decode_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(m) = Message::decode(&bytes) {
                // What decodes re-encodes to the same bytes.
                prop_assert_eq!(&m.encode()[4..], &bytes[..]);
            }
        }

        #[test]
        fn blocks_round_trip(offset in 0u64..1 << 50, len in 1u32..=MAX_BLOCK, zero in any::<bool>(), sha in any::<[u8; 32]>()) {
            let (encoding, data_len) = if zero { (Encoding::Zero, 0) } else { (Encoding::Raw, len) };
            let m = Message::Block { offset, len, sha256: sha, encoding, data_len };
            prop_assert_eq!(Message::decode(&m.encode()[4..]), Ok(m));
        }
    }
}
