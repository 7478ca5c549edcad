//! The volume registry: which volumes a data directory holds
//! (`DATA/volumes/CLIENT/VOLUME`), opening and creating them within the
//! server's quotas, the cache of open volumes that connections, exports
//! and the snapshot schedule share, and the recovery of every volume at
//! start-up.
//!
//! A volume is opened once per process and then shared
//! ([`SharedVolume`]): one [`Volume`] owns a volume's files while the
//! process runs. What a volume is on disk is [`crate::store`]'s.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ublk_mirror_common::proto::Digest;
use ublk_mirror_common::ByteSize;

use crate::chunks::refs::Refs;
use crate::chunks::ChunkStore;
use crate::error::{Error, Result};
use crate::store::{ImageCheck, Recovery, Volume, VOLUMES_DIR};

/// A volume shared by the connections (and exports) that use it.
pub type SharedVolume = Arc<tokio::sync::Mutex<Volume>>;

/// A volume's place among the open ones: filled (with its size) once it
/// is open.
type Slot = Mutex<Option<(u64, SharedVolume)>>;

/// What one client's volumes may add up to (`server.toml`'s limits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Most volumes one client may create.
    pub max_volumes: u32,
    /// Most bytes one client's volumes may add up to (their sizes).
    pub max_bytes: Option<ByteSize>,
}

impl Quota {
    /// No limits: for a process that creates no volumes (a foreground
    /// export).
    pub fn none() -> Quota {
        Quota {
            max_volumes: u32::MAX,
            max_bytes: None,
        }
    }
}

/// The volumes of one data directory, and those of them open.
#[derive(Debug)]
pub struct Volumes {
    data: PathBuf,
    quota: Quota,
    /// Volumes by (client, volume): each slot is filled once it is open
    /// (with its size). Opening one (recovery, a rebuild from the store)
    /// holds its own slot only: the map's lock is held just to find it,
    /// so a slow store stalls no other volume's open.
    open: Mutex<HashMap<(String, String), Arc<Slot>>>,
    /// Held while a new volume is checked against its client's quota and
    /// made, so that two made at once cannot both pass.
    creating: Mutex<()>,
    /// The chunk store every volume is attached to when opened (none:
    /// images only, as commands that run without the server use them).
    chunks: Option<Arc<ChunkStore>>,
    /// What each client's volumes reference, for deduplication on the
    /// wire.
    refs: Refs,
}

impl Volumes {
    /// The volumes under `data`, none open yet; new ones within `quota`.
    pub fn new(data: &Path, quota: Quota) -> Volumes {
        Volumes {
            data: data.to_path_buf(),
            quota,
            open: Mutex::new(HashMap::new()),
            creating: Mutex::new(()),
            chunks: None,
            refs: Refs::new(),
        }
    }

    /// Attach every volume opened to `store`: published epochs become its
    /// versions, and an image that is missing or behind is (re)built from
    /// it.
    pub fn with_store(mut self, store: Arc<ChunkStore>) -> Volumes {
        self.chunks = Some(store);
        self
    }

    /// Block `n` of volume `name`'s image in this data directory, if it has
    /// one (for verify's repairs, which check it against the store's
    /// sha256: no lock needed).
    pub fn cached_block(&self, name: &str, n: u64) -> Option<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let (client, volume) = split_volume(name).ok()?;
        let dir = self.dir(client, volume);
        let size = crate::store::read_state(&dir).ok()?.size;
        let offset = n.checked_mul(ublk_mirror_common::block::BLOCK)?;
        let len = size
            .checked_sub(offset)?
            .min(ublk_mirror_common::block::BLOCK);
        let mut buf = vec![0u8; len as usize];
        std::fs::File::open(dir.join("image"))
            .ok()?
            .read_exact_at(&mut buf, offset)
            .ok()?;
        Some(buf)
    }

    /// Verify the chunk store (one volume, or all), repairing from the
    /// images here what they still hold.
    pub fn verify(
        &self,
        volume: Option<&str>,
        progress: impl FnMut(u64, u64),
    ) -> Result<crate::chunks::verify::Report> {
        let store = self
            .chunks
            .as_ref()
            .ok_or_else(|| Error::Invalid("this server has no chunk store".into()))?;
        store.verify(volume, |v, n, _| self.cached_block(v, n), progress)
    }

    /// Check the image of volume `name` (`CLIENT/VOLUME`) against the
    /// chunk store's version it holds, and make each block that differs
    /// the version's again ([`crate::store::ImageProbe`]): read without
    /// the volume's lock (epochs go on being published), repaired under
    /// it.
    pub async fn check_image(&self, name: &str) -> Result<ImageCheck> {
        let v = self.open_named(name)?;
        let Some(probe) = v.lock().await.image_probe()? else {
            return Ok(ImageCheck::default());
        };
        let (blocks, suspects) = tokio::task::spawn_blocking(move || probe.scan(|_, _| {}))
            .await
            .map_err(|e| Error::Invalid(format!("checking the image of {name}: {e}")))??;
        let mut v = v.lock().await;
        let mut check = tokio::task::block_in_place(|| v.repair_image(&suspects))?;
        check.blocks = blocks;
        Ok(check)
    }

    /// Every volume of this data directory with its state (as `state.json`
    /// has it now; for listings and metrics).
    pub fn states(&self) -> Vec<(String, crate::store::VolumeState)> {
        crate::store::list(&self.data).unwrap_or_default()
    }

    /// The directory of volume `name` (`CLIENT/VOLUME`).
    pub fn volume_dir(&self, name: &str) -> PathBuf {
        match split_volume(name) {
            Ok((client, volume)) => self.dir(client, volume),
            Err(_) => self.data.join(VOLUMES_DIR).join(name),
        }
    }

    /// The chunk store, if any.
    pub fn chunk_store(&self) -> Option<&Arc<ChunkStore>> {
        self.chunks.as_ref()
    }

    /// For each of `digests`: may `client` send that block as `Known`
    /// (the store holds the chunk and one of the client's volumes
    /// references it)? A store that cannot be read answers "no" to all:
    /// the blocks travel.
    pub fn known(&self, client: &str, digests: &[Digest]) -> Vec<bool> {
        let Some(store) = &self.chunks else {
            return vec![false; digests.len()];
        };
        match self.refs.known(store, client, digests) {
            Ok(known) => known,
            Err(e) => {
                tracing::warn!(client, "cannot tell which chunks the client's volumes hold; its blocks travel whole: {e}");
                vec![false; digests.len()]
            }
        }
    }

    /// The bytes of chunks `digests`, each one `client` may send as
    /// `Known` (checked again: a client may send `Known` for what it was
    /// never told). `None` for each the client may not name or the store
    /// cannot give now.
    pub fn known_chunks(&self, client: &str, digests: &[Digest]) -> Vec<Option<Vec<u8>>> {
        let known = self.known(client, digests);
        let wanted: Vec<Digest> = digests
            .iter()
            .zip(&known)
            .filter(|(_, &k)| k)
            .map(|(d, _)| *d)
            .collect();
        let mut got = self.fetch_chunks(client, &wanted).into_iter();
        known
            .iter()
            .map(|&k| if k { got.next().flatten() } else { None })
            .collect()
    }

    /// The bytes of chunks `digests` from the store, which the caller
    /// found `client` may name ([`Volumes::known`]); `None` for each the
    /// store cannot give now.
    pub fn fetch_chunks(&self, client: &str, digests: &[Digest]) -> Vec<Option<Vec<u8>>> {
        let Some(store) = self.chunks.as_ref().filter(|_| !digests.is_empty()) else {
            return vec![None; digests.len()];
        };
        match store.chunks(digests) {
            Ok(all) => all.into_iter().map(Some).collect(),
            Err(e) => {
                tracing::warn!(
                    client,
                    "cannot read known chunks from the store; asking for their bytes: {e}"
                );
                vec![None; digests.len()]
            }
        }
    }

    /// `client` published an epoch naming `digests` (for
    /// [`Volumes::known`]).
    pub fn published(&self, client: &str, digests: impl IntoIterator<Item = Digest>) {
        self.refs.add(client, digests);
    }

    /// Open `dir` and attach it to the chunk store.
    fn open_dir(&self, dir: &Path, client: &str, volume: &str) -> Result<(Volume, Recovery)> {
        let (mut v, recovery) = Volume::open(dir)?;
        if let Some(store) = &self.chunks {
            v.attach(store.clone(), &format!("{client}/{volume}"))?;
        }
        Ok((v, recovery))
    }

    /// The volume's image made again from the chunk store, when the store
    /// has it but this data directory does not (a new server on the
    /// bucket, or a lost cache): `None` when the store has no version.
    fn rebuild(&self, client: &str, volume: &str) -> Result<Option<Volume>> {
        let Some(store) = &self.chunks else {
            return Ok(None);
        };
        let name = format!("{client}/{volume}");
        let Some(head) = store.head(&name)? else {
            return Ok(None);
        };
        tracing::info!(volume = %name, seq = head.seq, "rebuilding the volume's image from the chunk store");
        let dir = self.dir(client, volume);
        let mut v = Volume::create(&dir, head.size)?;
        v.attach(store.clone(), &name)?;
        Ok(Some(v))
    }

    /// Volume `client/volume`'s image is gone (the cache lost, not the
    /// volume): where the chunk store has the volume, its directory is
    /// set aside (hidden, kept for whoever wants to look) so that the
    /// volume is made again from the store; its snapshots stay listed and
    /// readable from the store's pins. Without a store version, nothing is
    /// done (opening it says the image is missing).
    fn set_lost_image_aside(&self, client: &str, volume: &str, dir: &Path) -> Result<()> {
        let Some(store) = &self.chunks else {
            return Ok(());
        };
        let name = format!("{client}/{volume}");
        if store.head(&name)?.is_none() {
            return Ok(());
        }
        let aside = dir.with_file_name(format!(
            ".lost-image-{volume}-{}",
            ublk_mirror_common::clock::now_ms()
        ));
        std::fs::rename(dir, &aside)
            .map_err(|e| Error::io(format!("setting {} aside", dir.display()), e))?;
        tracing::warn!(
            volume = %name,
            aside = %aside.display(),
            "the volume's image is missing: it is made again from the chunk store (the old directory is kept aside)"
        );
        Ok(())
    }

    /// Where volume `client/volume` lives (whether or not it exists).
    pub fn dir(&self, client: &str, volume: &str) -> PathBuf {
        self.data.join(VOLUMES_DIR).join(client).join(volume)
    }

    /// Open every volume once, finishing publications a crash interrupted,
    /// so that no image is left half-applied until its client comes back.
    /// (The chunk store is not read here: each volume is caught up with it,
    /// or stored into it the first time, when it is first opened, so that
    /// a large data directory from before the chunk store does not keep
    /// the server from listening; `mirror-server upgrade` does them all.)
    pub fn recover_all(&self) -> Result<()> {
        let root = self.data.join(VOLUMES_DIR);
        if !root.is_dir() {
            return Ok(());
        }
        for client in std::fs::read_dir(&root)
            .map_err(|e| Error::io(format!("listing {}", root.display()), e))?
            .flatten()
        {
            for volume in std::fs::read_dir(client.path())
                .into_iter()
                .flatten()
                .flatten()
                .filter(|v| !v.file_name().to_string_lossy().starts_with('.'))
            {
                match Volume::open(&volume.path()) {
                    Ok((_, r)) if r != Default::default() => {
                        tracing::warn!(volume = %volume.path().display(), recovery = ?r, "volume recovered");
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!(volume = %volume.path().display(), "cannot open volume: {e}");
                    }
                }
            }
        }
        Ok(())
    }

    /// Every `CLIENT/VOLUME` in the data directory or the chunk store,
    /// sorted.
    pub fn all(&self) -> Vec<(String, String)> {
        let mut out = self.cached();
        if let Some(store) = &self.chunks {
            match store.volumes() {
                Ok(names) => out.extend(names.iter().filter_map(|n| {
                    let (c, v) = split_volume(n).ok()?;
                    Some((c.to_string(), v.to_string()))
                })),
                Err(e) => tracing::warn!("cannot list the chunk store's volumes: {e}"),
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// Every `CLIENT/VOLUME` with an image in the data directory (what
    /// this server serves), sorted.
    pub fn cached(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let root = self.data.join(VOLUMES_DIR);
        for client in std::fs::read_dir(root).into_iter().flatten().flatten() {
            for volume in std::fs::read_dir(client.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let hidden = volume.file_name().to_string_lossy().starts_with('.');
                if !hidden && volume.path().join("state.json").exists() {
                    out.push((
                        client.file_name().to_string_lossy().into_owned(),
                        volume.file_name().to_string_lossy().into_owned(),
                    ));
                }
            }
        }
        out.sort();
        out
    }

    /// The volume `CLIENT/VOLUME` as one name (an admin request's, an
    /// export's), opened: it must exist.
    pub fn open_named(&self, volume: &str) -> Result<SharedVolume> {
        let (client, name) = split_volume(volume)?;
        self.open(client, name, None)
    }

    /// The volume `client/volume`, opened once (finishing an interrupted
    /// commit) and shared; created when `size` is given and it is new.
    pub fn open(&self, client: &str, volume: &str, size: Option<u64>) -> Result<SharedVolume> {
        let key = (client.to_string(), volume.to_string());
        let slot = self
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .clone();
        // Another request opening this volume is waited for (off the
        // async worker: that may take long).
        let mut guard = match slot.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                tokio::task::block_in_place(|| slot.lock().unwrap_or_else(|p| p.into_inner()))
            }
        };
        let opened = self.open_in(&mut guard, client, volume, size);
        if opened.is_err() && guard.is_none() {
            drop(guard);
            // A slot no volume filled goes, unless another request waits
            // on it: names asked for that are not there (or refused) do
            // not pile up.
            let mut map = self.open.lock().unwrap_or_else(|p| p.into_inner());
            if map.get(&key).is_some_and(|s| Arc::ptr_eq(s, &slot)) && Arc::strong_count(&slot) == 2
            {
                map.remove(&key);
            }
        }
        opened
    }

    /// [`Volumes::open`] with the volume's slot held.
    fn open_in(
        &self,
        slot: &mut Option<(u64, SharedVolume)>,
        client: &str,
        volume: &str,
        size: Option<u64>,
    ) -> Result<SharedVolume> {
        if let Some((have, v)) = &*slot {
            if let Some(size) = size.filter(|s| s != have) {
                return Err(size_mismatch(volume, *have, size));
            }
            return Ok(v.clone());
        }
        let dir = self.dir(client, volume);
        if dir.join("state.json").exists() && !dir.join("image").exists() {
            tokio::task::block_in_place(|| self.set_lost_image_aside(client, volume, &dir))?;
        }
        let rebuilt = if dir.exists() {
            None
        } else {
            tokio::task::block_in_place(|| self.rebuild(client, volume))?
        };
        let opened = if let Some(v) = rebuilt {
            if let Some(size) = size.filter(|&s| s != v.state().size) {
                return Err(size_mismatch(volume, v.state().size, size));
            }
            v
        } else if dir.exists() {
            let (v, recovery) =
                tokio::task::block_in_place(|| self.open_dir(&dir, client, volume))?;
            if recovery != Default::default() {
                tracing::warn!(client, volume, ?recovery, "volume recovered");
            }
            if let Some(size) = size {
                if v.state().size != size {
                    return Err(size_mismatch(volume, v.state().size, size));
                }
            }
            v
        } else {
            let Some(size) = size else {
                // Asked for by name (a restore, a snapshot): say what there
                // is, and the likely mistake (a machine enrolled anew is a
                // new client, with no volumes).
                let theirs: Vec<String> = dir
                    .parent()
                    .and_then(|d| crate::store::subdirs(d).ok())
                    .into_iter()
                    .flatten()
                    .map(|(name, _)| name)
                    .collect();
                let listed = if theirs.is_empty() {
                    "none".to_string()
                } else {
                    theirs.join(", ")
                };
                return Err(Error::Invalid(format!(
                    "client {client} has no volume {volume} on this server (its volumes: {listed}); a machine enrolled anew is a new client: a token from `mirror-server client add OLD-NAME --replace` enrolls it as the old one, with its volumes"
                )));
            };
            tokio::task::block_in_place(|| {
                let _creating = self.creating.lock().unwrap_or_else(|p| p.into_inner());
                self.check_quota(client, size)?;
                tracing::info!(client, volume, size, "new volume");
                let mut v = Volume::create(&dir, size)?;
                if let Some(store) = &self.chunks {
                    v.attach(store.clone(), &format!("{client}/{volume}"))?;
                }
                Ok::<_, Error>(v)
            })?
        };
        let have = opened.state().size;
        let v = Arc::new(tokio::sync::Mutex::new(opened));
        *slot = Some((have, v.clone()));
        Ok(v)
    }

    /// Refuse a new volume of `size` that would take `client` past the
    /// quota.
    fn check_quota(&self, client: &str, size: u64) -> Result<()> {
        let cdir = self.data.join(VOLUMES_DIR).join(client);
        let mut count = 0u32;
        let mut bytes = 0u64;
        for entry in std::fs::read_dir(&cdir).into_iter().flatten().flatten() {
            if let Ok(state) = crate::store::read_state(&entry.path()) {
                count += 1;
                bytes = bytes.saturating_add(state.size);
            }
        }
        if count >= self.quota.max_volumes {
            return Err(Error::Invalid(format!(
                "client {client} has {count} volumes, the most this server allows (max_volumes_per_client in server.toml)"
            )));
        }
        if let Some(max) = self.quota.max_bytes {
            if bytes.saturating_add(size) > max.0 {
                return Err(Error::Invalid(format!(
                    "a volume of {} would take client {client} past its {} (it has {} in volumes; max_bytes_per_client in server.toml)",
                    ByteSize(size),
                    max,
                    ByteSize(bytes)
                )));
            }
        }
        Ok(())
    }
}

/// `CLIENT/VOLUME` split at the `/`, both names checked.
pub fn split_volume(volume: &str) -> Result<(&str, &str)> {
    let (client, name) = volume
        .split_once('/')
        .ok_or_else(|| Error::Invalid(format!("{volume:?}: name a volume as CLIENT/VOLUME")))?;
    for part in [client, name] {
        ublk_mirror_common::proto::check_name(part).map_err(|e| Error::Invalid(e.to_string()))?;
    }
    Ok((client, name))
}

fn size_mismatch(volume: &str, have: u64, asked: u64) -> Error {
    Error::Invalid(format!(
        "volume {volume} is {have} bytes on the server, not {asked}: a volume's size never changes (use another volume name)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names asked for that are not there, or refused, leave nothing
    /// behind; an open volume is shared, and a size that differs refused.
    #[tokio::test(flavor = "multi_thread")]
    async fn opens_that_fail_leave_no_slot_and_open_volumes_are_shared() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(VOLUMES_DIR)).unwrap();
        let volumes = Volumes::new(dir.path(), Quota::none());
        for i in 0..50 {
            assert!(volumes.open("c", &format!("nope{i}"), None).is_err());
        }
        assert_eq!(volumes.open.lock().unwrap().len(), 0);
        let a = volumes.open("c", "v", Some(1 << 20)).unwrap();
        let b = volumes.open("c", "v", None).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert!(volumes.open("c", "v", Some(2 << 20)).is_err());
        assert_eq!(volumes.open.lock().unwrap().len(), 1, "the open one stays");
    }
}
