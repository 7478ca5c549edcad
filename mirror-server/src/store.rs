//! Volumes on the server's disk: a sparse image that always holds one
//! published epoch, and the staging through which the next one arrives.
//!
//! # On-disk layout, version 1
//!
//! ```text
//! VOLUME_DIR/
//!   image            sparse file, the volume as of the published epoch
//!   state.json       {"format":1,"size":..,"published_epoch":..,"published_ms":..,
//!                     "uuid":"<hex>","owner":"<device hex>"|null,"writer_epoch":..}
//!   staging/
//!     N.data         decoded bytes of epoch N's data blocks, appended
//!     N.index        postcard records of epoch N's blocks (offset, len,
//!                    kind: data at an offset of N.data, or zero), each
//!                    with its sha256
//!     N.commit       written (via rename) once N.data and N.index are
//!                    durable: the epoch is complete and must be published;
//!                    JSON {"device":"<hex>","epoch":<the device's epoch>}
//! ```
//!
//! # Why a reader never sees half an epoch
//!
//! Blocks are verified (sha256 after decoding) and staged; nothing touches
//! the image until the whole epoch is staged durably and its commit marker
//! exists. Publishing then applies the staged blocks to the image, syncs
//! it, and records the epoch in `state.json` (written to a temporary file,
//! synced, renamed, directory synced), before the staging is removed. If
//! the server dies anywhere in that sequence, opening the volume finds the
//! commit marker of an epoch newer than the published one and applies it
//! again (writing the same bytes to the same places is harmless), so the
//! image ends as exactly that epoch. A staging without a commit marker is
//! an epoch the client never saw acknowledged: it is dropped, and the
//! client sends it again. In-process readers take the volume's lock, which
//! publishing holds for writing.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use ublk_mirror_common::fsutil;
use ublk_mirror_common::hex::{self, encode as hex_encode};
use ublk_mirror_common::proto::{Digest, Encoding, Writer, MAX_BLOCK};

use crate::error::{Error, Result};

/// Where the volumes live in the data directory: `volumes/CLIENT/VOLUME/`.
pub const VOLUMES_DIR: &str = "volumes";

const STATE_FORMAT: u32 = 1;
const IMAGE: &str = "image";
const STATE: &str = "state.json";
const STAGING: &str = "staging";

/// What `state.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeState {
    /// Format of this file.
    pub format: u32,
    /// Volume size in bytes.
    pub size: u64,
    /// The epoch the image holds (0: none yet, the image is all zeroes).
    pub published_epoch: u64,
    /// When it was published, ms since the Unix epoch (0: never).
    pub published_ms: u64,
    /// Made at creation: a volume made again is another volume (hex).
    pub uuid: String,
    /// The device whose epochs this volume takes (hex), once it sent one.
    pub owner: Option<String>,
    /// That device's own number for the published epoch.
    pub writer_epoch: u64,
}

impl VolumeState {
    /// The uuid as bytes.
    pub fn uuid_bytes(&self) -> [u8; 16] {
        hex::decode(&self.uuid).unwrap_or_default()
    }

    /// The device and local epoch the image holds.
    pub fn writer(&self) -> Option<Writer> {
        let device = hex::decode(self.owner.as_deref()?)?;
        Some(Writer {
            device,
            epoch: self.writer_epoch,
        })
    }
}

/// What a commit marker records.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Marker {
    device: [u8; 16],
    epoch: u64,
}

/// A staged block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    offset: u64,
    len: u32,
    /// Offset of its bytes in `N.data`; `None`: zeroes.
    data_at: Option<u64>,
    sha256: Digest,
}

/// What opening a volume found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// An epoch whose commit was interrupted, now published.
    pub completed: Option<u64>,
    /// Incomplete stagings dropped (their clients send them again).
    pub dropped: Vec<u64>,
}

/// One volume: its image and state.
#[derive(Debug)]
pub struct Volume {
    dir: PathBuf,
    image: File,
    state: VolumeState,
    /// A publication failed: what the image holds is unknown until a
    /// committed staging is applied again (at the next begin or open).
    poisoned: bool,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(format!("syncing directory {}", dir.display()), e))
}

fn staging_path(dir: &Path, epoch: u64, ext: &str) -> PathBuf {
    dir.join(STAGING).join(format!("{epoch}.{ext}"))
}

impl Volume {
    /// Create a volume of `size` bytes in `dir` (which must not exist).
    pub fn create(dir: &Path, size: u64) -> Result<Volume> {
        if dir.exists() {
            return Err(Error::Invalid(format!(
                "volume directory {} exists already",
                dir.display()
            )));
        }
        std::fs::create_dir_all(dir.join(STAGING))
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let image = File::create(dir.join(IMAGE))
            .and_then(|f| f.set_len(size).map(|()| f))
            .map_err(|e| Error::io(format!("creating the image in {}", dir.display()), e))?;
        image
            .sync_all()
            .map_err(|e| Error::io("syncing the new image", e))?;
        let mut uuid = [0u8; 16];
        getrandom::fill(&mut uuid)
            .map_err(|e| Error::Invalid(format!("no randomness for the volume's uuid: {e}")))?;
        let state = VolumeState {
            format: STATE_FORMAT,
            size,
            published_epoch: 0,
            published_ms: 0,
            uuid: hex_encode(&uuid),
            owner: None,
            writer_epoch: 0,
        };
        write_state(dir, &state)?;
        // The directories made (VOLUME, CLIENT, volumes), so that the
        // volume survives a power cut.
        for parent in dir.ancestors().skip(1).take(3) {
            sync_dir(parent)?;
        }
        Volume::open(dir).map(|(v, _)| v)
    }

    /// Open a volume, finishing an interrupted publication and dropping
    /// incomplete stagings.
    pub fn open(dir: &Path) -> Result<(Volume, Recovery)> {
        let text = std::fs::read_to_string(dir.join(STATE))
            .map_err(|e| Error::io(format!("reading {}", dir.join(STATE).display()), e))?;
        let state: VolumeState = serde_json::from_str(&text)
            .map_err(|e| Error::Corrupt(format!("{}: {e}", dir.join(STATE).display())))?;
        if state.format != STATE_FORMAT {
            return Err(Error::Corrupt(format!(
                "{}: format {} is not supported (this is {STATE_FORMAT})",
                dir.join(STATE).display(),
                state.format
            )));
        }
        let image = OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.join(IMAGE))
            .map_err(|e| Error::io(format!("opening the image in {}", dir.display()), e))?;
        let mut volume = Volume {
            dir: dir.to_path_buf(),
            image,
            state,
            poisoned: false,
        };
        let recovery = volume.recover()?;
        Ok((volume, recovery))
    }

    fn recover(&mut self) -> Result<Recovery> {
        let staging = self.dir.join(STAGING);
        let mut epochs: Vec<(u64, bool)> = Vec::new();
        let entries = std::fs::read_dir(&staging)
            .map_err(|e| Error::io(format!("listing {}", staging.display()), e))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some((n, ext)) = name.split_once('.') else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match epochs.iter_mut().find(|(e, _)| *e == n) {
                Some(e) => e.1 |= ext == "commit",
                None => epochs.push((n, ext == "commit")),
            }
        }
        epochs.sort_unstable();
        let mut recovery = Recovery::default();
        for (epoch, committed) in epochs {
            if committed && epoch > self.state.published_epoch {
                tracing::warn!(
                    epoch,
                    "finishing the publication of an epoch interrupted by a crash"
                );
                let index = read_index(&staging_path(&self.dir, epoch, "index"))?;
                let marker = read_marker(&staging_path(&self.dir, epoch, "commit"))?;
                self.publish(epoch, &index, marker, true)?;
                recovery.completed = Some(epoch);
            } else if !committed {
                recovery.dropped.push(epoch);
            }
            remove_staging(&self.dir, epoch);
        }
        Ok(recovery)
    }

    /// The volume's state.
    pub fn state(&self) -> &VolumeState {
        &self.state
    }

    /// Read the image (the published epoch) at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|end| end > self.state.size)
        {
            return Err(Error::Invalid(format!(
                "read of {} bytes at {offset} is past the end of the volume",
                buf.len()
            )));
        }
        self.image
            .read_exact_at(buf, offset)
            .map_err(|e| Error::io("reading the image", e))
    }

    /// The sha256 of each block of the image (the published epoch).
    pub fn hashes(&self, blocks: &[(u64, u32)]) -> Result<Vec<Digest>> {
        let mut buf = Vec::new();
        blocks
            .iter()
            .map(|&(offset, len)| {
                buf.resize(len as usize, 0);
                self.read_at(&mut buf, offset)?;
                Ok(if buf.iter().all(|&b| b == 0) {
                    zero_digest(len)
                } else {
                    Sha256::digest(&buf).into()
                })
            })
            .collect()
    }

    /// Start staging `epoch` of `writer`, which must be newer than the
    /// published one. A volume takes epochs from one device only. A staging
    /// left from an earlier attempt at the same epoch is replaced; one that
    /// was committed but not published (a failed publication) is
    /// published first.
    pub fn begin(&mut self, epoch: u64, writer: Writer) -> Result<Staging> {
        if self.poisoned {
            self.recover()?;
            self.poisoned = false;
        }
        if let Some(owner) = self.state.writer().map(|w| w.device) {
            if owner != writer.device {
                return Err(Error::Invalid(format!(
                    "this volume is mirrored by another device ({}); mirror this one to another volume name",
                    hex_encode(&owner)
                )));
            }
        }
        if epoch <= self.state.published_epoch {
            return Err(Error::Invalid(format!(
                "epoch {epoch} is not newer than the published epoch {}",
                self.state.published_epoch
            )));
        }
        remove_staging(&self.dir, epoch);
        let create = |ext| {
            let path = staging_path(&self.dir, epoch, ext);
            OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(|e| Error::io(format!("creating {}", path.display()), e))
        };
        Ok(Staging {
            epoch,
            writer,
            size: self.state.size,
            data: create("data")?,
            data_len: 0,
            index: Vec::new(),
        })
    }

    /// Publish a fully staged epoch: durable staging, commit marker, apply
    /// to the image, record the state. When this returns, the image is the
    /// epoch, durably.
    pub fn commit(&mut self, staging: Staging) -> Result<()> {
        let result = self.commit_until(staging, None);
        if result.is_err() {
            // The image may hold part of the epoch: publish it again
            // before anything else (next begin, or next open).
            self.poisoned = true;
        }
        result
    }

    /// [`Volume::commit`], stopping after `stop` as if the process died
    /// there (what is on disk is left as it is); for crash tests.
    fn commit_until(&mut self, staging: Staging, stop: Option<CommitStep>) -> Result<()> {
        let epoch = staging.epoch;
        staging
            .data
            .sync_all()
            .map_err(|e| Error::io("syncing staged data", e))?;
        let index_path = staging_path(&self.dir, epoch, "index");
        let mut index = File::create(&index_path)
            .map_err(|e| Error::io(format!("creating {}", index_path.display()), e))?;
        let bytes = postcard::to_allocvec(&staging.index)
            .map_err(|e| Error::Corrupt(format!("encoding the index: {e}")))?;
        index
            .write_all(&bytes)
            .and_then(|()| index.sync_all())
            .map_err(|e| Error::io(format!("writing {}", index_path.display()), e))?;
        if stop == Some(CommitStep::Staged) {
            return Ok(());
        }
        // The staged files' names durable before the marker that says
        // they are complete.
        sync_dir(&self.dir.join(STAGING))?;
        let marker = Marker {
            device: staging.writer.device,
            epoch: staging.writer.epoch,
        };
        let marker_json = serde_json::to_vec(&marker).map_err(|e| Error::Corrupt(e.to_string()))?;
        fsutil::write_durably(&staging_path(&self.dir, epoch, "commit"), &marker_json)
            .map_err(|e| Error::io("writing the commit marker", e))?;
        if stop == Some(CommitStep::Marked) {
            return Ok(());
        }
        let applied = match stop {
            Some(CommitStep::HalfApplied) => staging.index.len() / 2,
            _ => staging.index.len(),
        };
        self.publish(epoch, &staging.index[..applied], marker, stop.is_none())?;
        if stop.is_some() {
            return Ok(());
        }
        remove_staging(&self.dir, epoch);
        Ok(())
    }

    /// Apply staged blocks to the image and (if `record`) record the epoch.
    fn publish(&mut self, epoch: u64, index: &[Entry], marker: Marker, record: bool) -> Result<()> {
        let data_path = staging_path(&self.dir, epoch, "data");
        let data = File::open(&data_path)
            .map_err(|e| Error::io(format!("opening {}", data_path.display()), e))?;
        let mut buf = Vec::new();
        for e in index {
            match e.data_at {
                Some(at) => {
                    buf.resize(e.len as usize, 0);
                    data.read_exact_at(&mut buf, at).map_err(|err| {
                        Error::io(format!("reading {}", data_path.display()), err)
                    })?;
                    self.image
                        .write_all_at(&buf, e.offset)
                        .map_err(|err| Error::io("writing the image", err))?;
                }
                None => fsutil::punch_or_zero(&self.image, e.offset, u64::from(e.len))
                    .map_err(|err| Error::io("punching a hole in the image", err))?,
            }
        }
        self.image
            .sync_all()
            .map_err(|e| Error::io("syncing the image", e))?;
        if !record {
            return Ok(());
        }
        let state = VolumeState {
            published_epoch: epoch,
            published_ms: now_ms(),
            owner: Some(hex_encode(&marker.device)),
            writer_epoch: marker.epoch,
            ..self.state.clone()
        };
        write_state(&self.dir, &state)?;
        self.state = state;
        tracing::info!(epoch, blocks = index.len(), "epoch published");
        Ok(())
    }
}

/// Where a simulated crash stops [`Volume::commit`] (crash tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(test), allow(dead_code))]
enum CommitStep {
    /// Data and index durable, no commit marker.
    Staged,
    /// Commit marker written, image untouched.
    Marked,
    /// Half the blocks applied to the image, state not recorded.
    HalfApplied,
}

/// Every volume under `data`, as `CLIENT/VOLUME` with its state, sorted.
/// Reads only (no recovery): a volume whose commit was interrupted shows
/// the epoch published before it until the server opens it.
pub fn list(data: &Path) -> Result<Vec<(String, VolumeState)>> {
    let root = data.join(VOLUMES_DIR);
    if !root.is_dir() {
        return Err(Error::Invalid(format!(
            "{} holds no volumes directory: is it the data directory? (`mirror-server init --data {}` makes one)",
            data.display(),
            data.display()
        )));
    }
    let dirs = |p: &Path| -> Result<Vec<(String, PathBuf)>> {
        let mut v: Vec<(String, PathBuf)> = std::fs::read_dir(p)
            .map_err(|e| Error::io(format!("listing {}", p.display()), e))?
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
            .collect();
        v.sort();
        Ok(v)
    };
    let mut out = Vec::new();
    for (client, cdir) in dirs(&root)? {
        for (volume, vdir) in dirs(&cdir)? {
            let path = vdir.join(STATE);
            let state: VolumeState = std::fs::read_to_string(&path)
                .map_err(|e| Error::io(format!("reading {}", path.display()), e))
                .and_then(|t| {
                    serde_json::from_str(&t)
                        .map_err(|e| Error::Corrupt(format!("{}: {e}", path.display())))
                })?;
            out.push((format!("{client}/{volume}"), state));
        }
    }
    Ok(out)
}

/// An epoch being received: verified blocks, staged on disk.
#[derive(Debug)]
pub struct Staging {
    epoch: u64,
    writer: Writer,
    size: u64,
    data: File,
    data_len: u64,
    index: Vec<Entry>,
}

impl Staging {
    /// The epoch staged.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Blocks staged so far.
    pub fn blocks(&self) -> usize {
        self.index.len()
    }

    /// Decode, verify and stage one block. A block whose hash does not
    /// match is refused with [`Error::BadBlock`] and nothing is staged: the
    /// sender sends it again.
    pub fn add(
        &mut self,
        offset: u64,
        len: u32,
        sha256: &Digest,
        encoding: Encoding,
        bytes: &[u8],
    ) -> Result<()> {
        if len == 0 || len > MAX_BLOCK {
            return Err(Error::BadBlock(format!("block length {len} out of range")));
        }
        if offset
            .checked_add(u64::from(len))
            .is_none_or(|end| end > self.size)
        {
            return Err(Error::BadBlock(format!(
                "block of {len} bytes at {offset} is past the end of the volume ({} bytes)",
                self.size
            )));
        }
        let decoded;
        let plain: Option<&[u8]> = match encoding {
            Encoding::Zero => None,
            Encoding::Raw => Some(bytes),
            Encoding::Zstd => {
                decoded = zstd::bulk::decompress(bytes, len as usize)
                    .map_err(|e| Error::BadBlock(format!("zstd: {e}")))?;
                Some(&decoded)
            }
        };
        let actual: Digest = match plain {
            Some(p) if p.len() != len as usize => {
                return Err(Error::BadBlock(format!(
                    "block at {offset} decodes to {} bytes, not {len}",
                    p.len()
                )))
            }
            Some(p) => Sha256::digest(p).into(),
            None => zero_digest(len),
        };
        if actual != *sha256 {
            return Err(Error::BadBlock(format!(
                "block at {offset}: sha256 mismatch"
            )));
        }
        let data_at = match plain {
            Some(p) => {
                self.data
                    .write_all_at(p, self.data_len)
                    .map_err(|e| Error::io("staging a block", e))?;
                let at = self.data_len;
                self.data_len += u64::from(len);
                Some(at)
            }
            None => None,
        };
        self.index.push(Entry {
            offset,
            len,
            data_at,
            sha256: *sha256,
        });
        Ok(())
    }
}

pub use ublk_mirror_common::client::zero_digest;

fn read_marker(path: &Path) -> Result<Marker> {
    let bytes =
        std::fs::read(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt(format!("{}: {e}", path.display())))
}

fn read_index(path: &Path) -> Result<Vec<Entry>> {
    let bytes =
        std::fs::read(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    postcard::from_bytes(&bytes).map_err(|e| Error::Corrupt(format!("{}: {e}", path.display())))
}

fn remove_staging(dir: &Path, epoch: u64) {
    for ext in ["commit", "commit.tmp", "index", "data"] {
        let _ = std::fs::remove_file(staging_path(dir, epoch, ext));
    }
}

fn write_state(dir: &Path, state: &VolumeState) -> Result<()> {
    let text = serde_json::to_vec_pretty(state).map_err(|e| Error::Corrupt(e.to_string()))?;
    fsutil::write_durably(&dir.join(STATE), &text)
        .map_err(|e| Error::io(format!("writing {}", dir.join(STATE).display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SIZE: u64 = 1 << 20;

    fn block(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| seed.wrapping_add((i % 253) as u8))
            .collect()
    }

    fn me(epoch: u64) -> Writer {
        Writer {
            device: [1; 16],
            epoch,
        }
    }

    fn digest(b: &[u8]) -> Digest {
        Sha256::digest(b).into()
    }

    #[test]
    fn epochs_are_verified_staged_and_published() {
        let dir = tempfile::tempdir().unwrap();
        let vdir = dir.path().join("vol");
        let mut v = Volume::create(&vdir, SIZE).unwrap();
        assert_eq!(v.state().published_epoch, 0);
        let mut s = v.begin(1, me(1)).unwrap();
        let a = block(1, 8192);
        s.add(0, 8192, &digest(&a), Encoding::Raw, &a).unwrap();
        let b = block(2, 4096);
        let z = zstd::bulk::compress(&b, 3).unwrap();
        s.add(65536, 4096, &digest(&b), Encoding::Zstd, &z).unwrap();
        // Refused blocks: nothing staged, the epoch goes on.
        let err = s.add(0, 8192, &digest(&b), Encoding::Raw, &a).unwrap_err();
        assert!(err.to_string().contains("sha256 mismatch"), "{err}");
        assert!(s
            .add(0, 4096, &digest(&b), Encoding::Zstd, b"junk")
            .is_err());
        assert!(s
            .add(SIZE - 4096, 8192, &digest(&a), Encoding::Raw, &a)
            .is_err());
        assert_eq!(s.blocks(), 2);
        // Not visible before the commit.
        let mut buf = vec![0u8; 8192];
        v.read_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&x| x == 0));
        v.commit(s).unwrap();
        v.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, a);
        assert_eq!(v.state().published_epoch, 1);
        // A zero block becomes a hole.
        let mut s = v.begin(2, me(2)).unwrap();
        s.add(0, 4096, &zero_digest(4096), Encoding::Zero, &[])
            .unwrap();
        v.commit(s).unwrap();
        v.read_at(&mut buf, 0).unwrap();
        assert!(buf[..4096].iter().all(|&x| x == 0) && buf[4096..] == a[4096..]);
        assert!(v.begin(2, me(3)).is_err(), "an old epoch was accepted");
        // Another device's epochs are refused.
        let other = Writer {
            device: [9; 16],
            epoch: 1,
        };
        let err = v.begin(3, other).unwrap_err().to_string();
        assert!(err.contains("another device"), "{err}");
        assert_eq!(v.state().writer(), Some(me(2)));
        drop(v);
        let (v, recovery) = Volume::open(&vdir).unwrap();
        assert_eq!(recovery, Recovery::default());
        assert_eq!(v.state().published_epoch, 2);
    }

    #[derive(Debug, Clone)]
    enum Blk {
        Data {
            at: u64,
            blocks: u64,
            seed: u8,
            zstd: bool,
        },
        Zero {
            at: u64,
            blocks: u64,
        },
    }

    fn blk() -> impl Strategy<Value = Blk> {
        let place = (0..SIZE / 4096).prop_flat_map(|b| (Just(b), 1..=(SIZE / 4096 - b).min(16)));
        prop_oneof![
            3 => (place.clone(), any::<u8>(), any::<bool>())
                .prop_map(|((at, blocks), seed, zstd)| Blk::Data { at, blocks, seed, zstd }),
            1 => place.prop_map(|(at, blocks)| Blk::Zero { at, blocks }),
        ]
    }

    fn crash() -> impl Strategy<Value = Option<CommitStep>> {
        prop_oneof![
            4 => Just(None),
            1 => Just(Some(CommitStep::Staged)),
            1 => Just(Some(CommitStep::Marked)),
            1 => Just(Some(CommitStep::HalfApplied)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

        /// Whatever point a commit dies at, the reopened volume is exactly
        /// one published epoch: the new one once its marker exists, else
        /// the one before.
        #[test]
        fn the_image_is_always_a_published_epoch(
            epochs in proptest::collection::vec(
                (proptest::collection::vec(blk(), 1..8), crash()), 1..8),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let vdir = dir.path().join("vol");
            let mut v = Volume::create(&vdir, SIZE).unwrap();
            let mut published = vec![0u8; SIZE as usize];
            for (n, (blocks, crash)) in epochs.into_iter().enumerate() {
                let epoch = v.state().published_epoch + 1;
                let mut next = published.clone();
                let mut s = v.begin(epoch, me(epoch)).unwrap();
                for b in &blocks {
                    match *b {
                        Blk::Data { at, blocks, seed, zstd } => {
                            let data = block(seed.wrapping_add(n as u8), (blocks * 4096) as usize);
                            let len = data.len() as u32;
                            if zstd {
                                let z = zstd::bulk::compress(&data, 1).unwrap();
                                s.add(at * 4096, len, &digest(&data), Encoding::Zstd, &z).unwrap();
                            } else {
                                s.add(at * 4096, len, &digest(&data), Encoding::Raw, &data).unwrap();
                            }
                            next[(at * 4096) as usize..][..data.len()].copy_from_slice(&data);
                        }
                        Blk::Zero { at, blocks } => {
                            let len = (blocks * 4096) as u32;
                            s.add(at * 4096, len, &zero_digest(len), Encoding::Zero, &[]).unwrap();
                            next[(at * 4096) as usize..][..len as usize].fill(0);
                        }
                    }
                }
                v.commit_until(s, crash).unwrap();
                if crash.is_some() {
                    drop(v);
                    let (reopened, recovery) = Volume::open(&vdir).unwrap();
                    v = reopened;
                    if crash == Some(CommitStep::Staged) {
                        prop_assert_eq!(recovery.dropped, vec![epoch]);
                        prop_assert_eq!(v.state().published_epoch, epoch - 1);
                    } else {
                        prop_assert_eq!(recovery.completed, Some(epoch));
                    }
                }
                if v.state().published_epoch == epoch {
                    published = next;
                }
                let mut image = vec![0u8; SIZE as usize];
                v.read_at(&mut image, 0).unwrap();
                prop_assert!(image == published, "the image is not published epoch {}", v.state().published_epoch);
                prop_assert!(std::fs::read_dir(vdir.join(STAGING)).unwrap().next().is_none(), "staging left behind");
            }
        }
    }
}
