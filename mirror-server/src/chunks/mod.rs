//! The chunk store: every published version of every volume, kept as
//! content-addressed chunks in packs plus small version records, on a
//! local directory or an S3-compatible bucket (through `object_store`).
//!
//! A volume's image in the data directory is then a cache of the store's
//! newest version of it ([`crate::store`] keeps it in step and rebuilds it
//! from here when it is missing or behind).
//!
//! # Layout (format 1; the object formats are in [`format`](mod@format))
//!
//! ```text
//! store.json                   {"format":1,"kind":"ublk-mirror chunk store",
//!                               "block":65536,"hash":"sha256","segment_blocks":4096}
//! packs/AA/ID                  chunks, named by their sha256, packed ~32 MiB
//! idx/AA/ID                    each pack's index (written after its pack)
//! maps/AA/ID                   map segments: the chunk digests of 4096 blocks
//! vol/CLIENT/VOLUME/v/SEQ      version records (JSON), SEQ = 1, 2, …
//! ```
//!
//! # Deduplication
//!
//! A chunk is stored once per store, whichever volume or client sends it:
//! a publication looks each block's sha256 up in the chunk index (the
//! union of `idx/`, held in memory and refreshed from the store) and packs
//! only what is new. Map segments are content-named too, so an epoch
//! writes only the segments it changes, and two volumes with the same
//! content share them. Holes (blocks of zeroes) are never stored.
//!
//! A block that an epoch changed by a quarter or less (scattered small
//! writes) is packed as a patch on the chunk it held before: what changed,
//! not a new 64 KiB chunk ([`format`](mod@format), "Patches"; [`Publication::put_patched`]).
//!
//! The wire is deduplicated too, within what a client may know: before
//! sending, a client asks which of its blocks the server holds, and is
//! answered from the chunks its own volumes reference ([`refs`]).
//!
//! # Why packs
//!
//! 64 KiB chunks one object each would make 1.5 billion objects of a
//! 100 TB store: as many PUTs to upload it, and as many keys to list for
//! every garbage collection. Packs of 32 MiB (configurable) make that
//! about 3 million; a block is read with one ranged GET, and ranges near
//! each other are coalesced. The cost is that a partly dead pack must be
//! rewritten to free its space (restic's prune works the same way).
//!
//! # Publication and the crash argument
//!
//! Publishing version N of a volume is, in this order:
//! 1. every new chunk into packs: each pack, then its index (create-only
//!    puts of content-named objects: "already exists" means it is there);
//! 2. the changed map segments (content-named, the same way);
//! 3. the version record `v/N`, with a **create-only** put (If-None-Match:
//!    `*` on S3, a hard link in a directory).
//!
//! Step 3 is the one write that makes the version visible; everything it
//! names was written and acknowledged before it. A server that dies before
//! it leaves only unreferenced objects (collected later); one that dies
//! after it published N whole. A reader takes the highest `v/N` and so
//! always sees whole versions. Two servers that publish on the same base
//! race for the same name and exactly one wins; the other is told the
//! volume moved on ([`Error::Invalid`]) and publishes nothing. When the
//! answer to step 3 is lost and the put retried, "already exists" is read
//! back and recognised by the record's random nonce.

pub mod backend;
pub mod format;
pub mod gc;
pub mod refs;
pub mod verify;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};
use ublk_mirror_common::block::{self, BLOCK};
use ublk_mirror_common::clock::now_ms;
use ublk_mirror_common::fsutil;
use ublk_mirror_common::proto::Digest;

pub use self::backend::StoreConfig;
use self::format::{Entry, PackBuilder, Sent, VersionRecord, WriterRecord, HOLE, SEGMENT_BLOCKS};
use crate::error::{Error, Result};

const STORE_RECORD: &str = "store.json";
const STORE_KIND: &str = "ublk-mirror chunk store";
const STORE_FORMAT: u32 = 1;
/// zstd level for chunks the client sent uncompressed or that were
/// imported (the wire's blocks were decoded on arrival).
const LEVEL: i32 = 1;
/// Packs a publication has on their way at once (each compressed on a
/// blocking thread, then uploaded), besides the one filling; each up to
/// the pack size in memory before compression.
const UPLOADS: usize = 3;

/// A pack on its way: its name and entries once stored.
type Upload = tokio::task::JoinHandle<Result<(Digest, Vec<Entry>)>>;

fn joined(e: tokio::task::JoinError) -> Error {
    Error::Store(format!("an upload to the store ended: {e}"))
}

/// What `store.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StoreRecord {
    format: u32,
    kind: String,
    block: u64,
    hash: String,
    segment_blocks: usize,
    /// Made with the store (random, hex): a volume's state names the
    /// store it is kept in, so that another store (a mistyped prefix, a
    /// missing mount) is never taken for it. Stores made before it have
    /// none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<String>,
}

impl StoreRecord {
    fn ours() -> StoreRecord {
        StoreRecord {
            format: STORE_FORMAT,
            kind: STORE_KIND.into(),
            block: BLOCK,
            hash: "sha256".into(),
            segment_blocks: SEGMENT_BLOCKS,
            id: None,
        }
    }

    /// A new store's record, with a fresh id.
    fn new_store() -> StoreRecord {
        let mut id = [0u8; 16];
        getrandom::fill(&mut id).expect("the system's random source");
        StoreRecord {
            id: Some(ublk_mirror_common::hex::encode(&id)),
            ..StoreRecord::ours()
        }
    }
}

/// Where a chunk is.
#[derive(Debug, Clone, Copy)]
struct Loc {
    pack: Digest,
    entry: Entry,
}

/// What the chunk index knows of one pack.
#[derive(Debug, Clone, Default)]
struct PackInfo {
    /// Its chunks' names.
    hashes: Vec<Digest>,
    /// Its patches: (chunk, base).
    patches: Vec<(Digest, Digest)>,
    /// Bytes of chunks in it.
    stored: u64,
}

/// What the chunk index knows.
#[derive(Debug, Default)]
struct Index {
    chunks: HashMap<Digest, Loc>,
    /// Every pack known.
    packs: HashMap<Digest, PackInfo>,
    /// What garbage collection condemned, as of `generation`: never
    /// deduplicated against (see [`gc`]).
    condemned: gc::Condemned,
    /// The `gc/state` generation (and nonce) last applied (`None`: never
    /// read).
    generation: Option<(u64, String)>,
    /// The window of the run that wrote it, ms (0: not said; the default).
    gc_window_ms: u64,
    /// Copies of chunks found damaged by verify: (pack, chunk). Never
    /// deduplicated against; a good copy stored later takes their place.
    damaged: HashSet<(Digest, Digest)>,
}

impl Index {
    /// The usable location of `hash`: none when only a condemned pack
    /// holds it.
    fn usable(&self, hash: &Digest) -> Option<Loc> {
        self.chunks
            .get(hash)
            .filter(|l| !self.condemned.packs.contains_key(&l.pack) && !self.bad(l, hash))
            .copied()
    }

    fn bad(&self, loc: &Loc, hash: &Digest) -> bool {
        self.damaged.contains(&(loc.pack, *hash))
    }

    /// Whether chunk `hash`, and every base down its chain, is in a pack
    /// no garbage collection run can delete before a moment from now: there,
    /// not found damaged, and not condemned for nearly the window (see
    /// [`gc`]: a pack condemned lately is still relied on).
    fn lasting(&self, hash: &Digest, now_ms: u64) -> bool {
        let window = match self.gc_window_ms {
            0 => gc::DEFAULT_WINDOW.as_millis() as u64,
            w => w,
        };
        let margin = (window / 4).min(3_600_000);
        self.chain_where(hash, |pack| {
            self.condemned
                .packs
                .get(pack)
                .is_none_or(|&since| now_ms.saturating_sub(since).saturating_add(margin) < window)
        })
        .is_some()
    }

    /// How many patches reading the usable copy of `hash` goes through (0:
    /// stored whole); `None` when some chunk on the way is not usable.
    fn chain(&self, hash: &Digest) -> Option<usize> {
        self.chain_where(hash, |pack| !self.condemned.packs.contains_key(pack))
    }

    /// How many patches reading `hash` goes through, where every chunk on
    /// the way is held, not found damaged, and in a pack `keep` takes;
    /// `None` otherwise (or past [`format::MAX_CHAIN`]).
    fn chain_where(&self, hash: &Digest, keep: impl Fn(&Digest) -> bool) -> Option<usize> {
        let mut at = *hash;
        for depth in 0..=format::MAX_CHAIN {
            let loc = self
                .chunks
                .get(&at)
                .filter(|l| !self.bad(l, &at) && keep(&l.pack))?;
            match loc.entry.codec {
                format::Codec::Patch { base } => at = base,
                _ => return Some(depth),
            }
        }
        None
    }
}

/// Sizes of what a store holds, for `mirror-server store-stats` and the
/// benchmark.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// Distinct chunks.
    pub chunks: u64,
    /// Their raw bytes.
    pub raw_bytes: u64,
    /// Packs.
    pub packs: u64,
    /// Bytes of chunks in packs (as stored, compressed).
    pub stored_bytes: u64,
    /// Distinct chunks stored as patches on another.
    pub patches: u64,
}

/// Chunks read lately, up to a number of bytes (oldest out first): reads of
/// a stored version by small requests (an iSCSI initiator's) fetch each
/// chunk once.
#[derive(Debug, Default)]
struct ChunkCache {
    map: HashMap<Digest, Arc<Vec<u8>>>,
    order: std::collections::VecDeque<Digest>,
    bytes: usize,
    cap: usize,
}

impl ChunkCache {
    fn get(&self, h: &Digest) -> Option<Vec<u8>> {
        self.map.get(h).map(|d| d.to_vec())
    }

    fn put(&mut self, h: Digest, data: &[u8]) {
        if data.len() > self.cap || self.map.contains_key(&h) {
            return;
        }
        self.map.insert(h, Arc::new(data.to_vec()));
        self.order.push_back(h);
        self.bytes += data.len();
        while self.bytes > self.cap {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(d) = self.map.remove(&old) {
                self.bytes -= d.len();
            }
        }
    }
}

/// The chunk store of one server process.
pub struct ChunkStore {
    rt: Option<tokio::runtime::Runtime>,
    store: Arc<dyn ObjectStore>,
    describe: String,
    index: Mutex<Index>,
    /// Held while the index is rebuilt for a new GC generation: one
    /// rebuild at a time (each holds a whole index aside).
    rebuilding: Mutex<()>,
    pack_target: usize,
    server: String,
    cache: Mutex<ChunkCache>,
    /// The directory of a local store: what is written there is dropped
    /// from the page cache once durable (see [`fsutil::Streamed`]).
    local: Option<std::path::PathBuf>,
    /// The store's id (`store.json`), once claimed; none for a store made
    /// before ids.
    id: std::sync::OnceLock<Option<String>>,
}

impl std::fmt::Debug for ChunkStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkStore")
            .field("store", &self.describe)
            .finish_non_exhaustive()
    }
}

impl Drop for ChunkStore {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn store_err(what: impl std::fmt::Display, e: object_store::Error) -> Error {
    let hint = match &e {
        object_store::Error::PermissionDenied { .. } => {
            " (the store refuses these credentials this operation: a read-only key or bucket? the chunk store must write)"
        }
        object_store::Error::Unauthenticated { .. } => {
            " (check the keys: [store] credentials_file or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)"
        }
        _ => "",
    };
    Error::Store(format!("{what}: {e}{hint}"))
}

fn version_path(volume: &str, seq: u64) -> ObjPath {
    ObjPath::from(format!("vol/{volume}/v/{seq:020}"))
}

/// `I/O` on the store from synchronous code (the volume's publication runs
/// on blocking threads).
impl ChunkStore {
    /// Open the store `config` names, with `data` as the base of a
    /// relative directory: check that it works and is ours (or empty, and
    /// make it ours), check that it honours create-only puts, and load its
    /// chunk index.
    pub fn open(config: &StoreConfig, data: &std::path::Path) -> Result<ChunkStore> {
        let (store, describe) = backend::open(config, data)?;
        let mut chunks = ChunkStore::with(store, describe, config.pack_size.0 as usize)?;
        if let backend::Location::Dir(dir) = backend::location(&config.url, data)? {
            chunks.local = Some(dir);
        }
        chunks.cache.lock().unwrap_or_else(|p| p.into_inner()).cap = config.chunk_cache.0 as usize;
        Ok(chunks)
    }

    /// Open the store `config` names only to read its version records (for
    /// listings): nothing is checked, written or indexed, so it is quick
    /// however large the store; it cannot publish or read chunks.
    pub fn open_for_listing(config: &StoreConfig, data: &std::path::Path) -> Result<ChunkStore> {
        let (store, describe) = backend::open(config, data)?;
        ChunkStore::unchecked(store, describe, config.pack_size.0 as usize)
    }

    fn unchecked(
        store: Arc<dyn ObjectStore>,
        describe: String,
        pack_target: usize,
    ) -> Result<ChunkStore> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("chunk-store")
            .enable_all()
            .build()
            .map_err(|e| Error::io("starting the chunk store's runtime", e))?;
        let host = nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default();
        let chunks = ChunkStore {
            rt: Some(rt),
            store,
            describe,
            index: Mutex::new(Index::default()),
            rebuilding: Mutex::new(()),
            pack_target: pack_target.max(1 << 20),
            server: format!("{host}/{}", std::process::id()),
            cache: Mutex::new(ChunkCache {
                cap: backend::DEFAULT_CHUNK_CACHE as usize,
                ..ChunkCache::default()
            }),
            local: None,
            id: std::sync::OnceLock::new(),
        };
        Ok(chunks)
    }

    /// A store over any `object_store` (tests use an in-memory one with
    /// faults).
    pub fn with(
        store: Arc<dyn ObjectStore>,
        describe: String,
        pack_target: usize,
    ) -> Result<ChunkStore> {
        let chunks = ChunkStore::unchecked(store, describe, pack_target)?;
        chunks.run(chunks.claim())?;
        chunks.run(chunks.probe())?;
        for (hash, pack) in chunks.run(chunks.read_damaged())? {
            chunks.index().damaged.insert((pack, hash));
        }
        chunks.refresh_index()?;
        Ok(chunks)
    }

    /// The store's id, if it has one (see `store.json`).
    pub fn id(&self) -> Option<&str> {
        self.id.get().and_then(|i| i.as_deref())
    }

    /// Where the store is, for messages.
    pub fn describe(&self) -> &str {
        &self.describe
    }

    /// Run `f` on the store's runtime and wait for it; from a task of the
    /// server's (multi-threaded) runtime too, whose worker is handed over
    /// meanwhile.
    fn run<F: std::future::Future>(&self, f: F) -> F::Output {
        let rt = self.rt.as_ref().expect("runtime until drop");
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::task::block_in_place(|| rt.block_on(f))
        } else {
            rt.block_on(f)
        }
    }

    /// `store.json`: read it, or write it into an empty store.
    async fn claim(&self) -> Result<()> {
        let path = ObjPath::from(STORE_RECORD);
        let ours = StoreRecord::new_store();
        match self.store.get(&path).await {
            Ok(r) => {
                let bytes = r.bytes().await.map_err(|e| store_err(&self.describe, e))?;
                return self.check_record(&bytes);
            }
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(store_err(format!("reading {}", self.describe), e)),
        }
        let first = self
            .store
            .list(None)
            .try_next()
            .await
            .map_err(|e| store_err(format!("listing {}", self.describe), e))?;
        if let Some(other) = first {
            return Err(Error::Invalid(format!(
                "the store {} holds something else (for example {}) and no {STORE_RECORD}: give the chunk store a bucket or prefix of its own",
                self.describe, other.location
            )));
        }
        let json = serde_json::to_vec_pretty(&ours).map_err(|e| Error::Corrupt(e.to_string()))?;
        match self.create(&path, json.into()).await {
            Ok(true) => {
                tracing::info!(store = %self.describe, id = ?ours.id, "a new chunk store");
                let _ = self.id.set(ours.id);
                Ok(())
            }
            Ok(false) => {
                // Another server made it at the same time.
                let r = self.get(&path).await?;
                self.check_record(&r)
            }
            Err(e) => Err(e),
        }
    }

    fn check_record(&self, bytes: &[u8]) -> Result<()> {
        let record: StoreRecord = serde_json::from_slice(bytes).map_err(|e| {
            Error::Invalid(format!(
                "{}/{STORE_RECORD} is not a ublk-mirror chunk store's ({e})",
                self.describe
            ))
        })?;
        if record.kind != STORE_KIND {
            return Err(Error::Invalid(format!(
                "{}/{STORE_RECORD} is not a ublk-mirror chunk store's",
                self.describe
            )));
        }
        if (StoreRecord {
            id: None,
            ..record.clone()
        }) != StoreRecord::ours()
        {
            return Err(Error::Invalid(format!(
                "{} is a chunk store of format {} (block {}, {} blocks a segment); this server reads format {STORE_FORMAT}",
                self.describe, record.format, record.block, record.segment_blocks
            )));
        }
        let _ = self.id.set(record.id);
        Ok(())
    }

    /// Refuse a store that does not honour create-only puts: publication
    /// depends on them.
    async fn probe(&self) -> Result<()> {
        let mut nonce = [0u8; 8];
        getrandom::fill(&mut nonce).map_err(|e| Error::Invalid(format!("no randomness: {e}")))?;
        let path = ObjPath::from(format!("probe/{}", ublk_mirror_common::hex::encode(&nonce)));
        let first = self.create(&path, Bytes::from_static(b"1")).await?;
        let second = self.create(&path, Bytes::from_static(b"2")).await?;
        let _ = self.store.delete(&path).await;
        if !first || second {
            return Err(Error::Invalid(format!(
                "the store {} does not honour conditional writes (If-None-Match); a chunk store needs them (SeaweedFS 3.97 or later, AWS S3, …)",
                self.describe
            )));
        }
        Ok(())
    }

    /// Create-only put: `Ok(true)` when written, `Ok(false)` when the name
    /// existed.
    async fn create(&self, path: &ObjPath, bytes: Bytes) -> Result<bool> {
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        let len = bytes.len();
        match self
            .store
            .put_opts(path, PutPayload::from(bytes), opts)
            .await
        {
            Ok(_) => {
                if let Some(dir) = self.local.as_ref().filter(|_| len >= 1 << 20) {
                    // A pack, synced: nothing reads it again soon.
                    if let Ok(f) = std::fs::File::open(dir.join(path.as_ref())) {
                        fsutil::drop_cached(&f);
                    }
                }
                Ok(true)
            }
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(store_err(format!("writing {}/{path}", self.describe), e)),
        }
    }

    async fn get(&self, path: &ObjPath) -> Result<Bytes> {
        let r = self
            .store
            .get(path)
            .await
            .map_err(|e| store_err(format!("reading {}/{path}", self.describe), e))?;
        r.bytes()
            .await
            .map_err(|e| store_err(format!("reading {}/{path}", self.describe), e))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjPath>> {
        let prefix = ObjPath::from(prefix);
        let metas: Vec<_> = self
            .store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|e| store_err(format!("listing {}/{prefix}", self.describe), e))?;
        Ok(metas.into_iter().map(|m| m.location).collect())
    }

    /// Read the indexes of packs this process does not know yet (written
    /// by another server, or before this one started).
    pub fn refresh_index(&self) -> Result<()> {
        let known: HashSet<Digest> = self.index().packs.keys().copied().collect();
        for (id, path) in self.pack_indexes()? {
            if !known.contains(&id) {
                let entries = self.read_pack_index(&path)?;
                self.remember(id, &entries);
            }
        }
        Ok(())
    }

    /// Every pack index in the store: the pack's name and the index's path.
    fn pack_indexes(&self) -> Result<Vec<(Digest, ObjPath)>> {
        Ok(self
            .run(self.list("idx"))?
            .into_iter()
            .filter_map(|p| Some((ublk_mirror_common::hex::decode::<32>(p.filename()?)?, p)))
            .collect())
    }

    /// The entries of the pack index at `path`.
    fn read_pack_index(&self, path: &ObjPath) -> Result<Vec<Entry>> {
        let bytes = self.run(self.get(path))?;
        format::decode_index(&bytes, &format!("{}/{path}", self.describe))
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn remember(&self, pack: Digest, entries: &[Entry]) {
        remember_in(&mut self.index(), pack, entries);
    }

    /// Forget every pack and read the indexes again (after garbage
    /// collection deleted some). The new index is built aside and then put
    /// in place: meanwhile publications and reads use the old one whole (a
    /// half-built one made them store chunks again, or refuse to publish);
    /// packs this process stored meanwhile are carried over.
    fn rebuild_index(&self) -> Result<()> {
        let before: HashSet<Digest> = self.index().packs.keys().copied().collect();
        let mut fresh = {
            let old = self.index();
            Index {
                condemned: old.condemned.clone(),
                generation: old.generation.clone(),
                gc_window_ms: old.gc_window_ms,
                damaged: old.damaged.clone(),
                ..Index::default()
            }
        };
        for (id, path) in self.pack_indexes()? {
            let entries = self.read_pack_index(&path)?;
            remember_in(&mut fresh, id, &entries);
        }
        let mut index = self.index();
        // Packs remembered since the listing (this process's uploads).
        let added: HashSet<Digest> = index
            .packs
            .keys()
            .filter(|&id| !before.contains(id) && !fresh.packs.contains_key(id))
            .copied()
            .collect();
        for id in &added {
            if let Some(info) = index.packs.get(id) {
                fresh.packs.insert(*id, info.clone());
            }
        }
        for (hash, loc) in index.chunks.iter().filter(|(_, l)| added.contains(&l.pack)) {
            if fresh.chain(hash).is_none() {
                fresh.chunks.insert(*hash, *loc);
            }
        }
        // What changed in the old one meanwhile (a newer state, damage).
        fresh.condemned = index.condemned.clone();
        fresh.generation = index.generation.clone();
        fresh.gc_window_ms = index.gc_window_ms;
        fresh.damaged.extend(index.damaged.iter().copied());
        *index = fresh;
        Ok(())
    }
}

/// Add what pack `pack` holds (its index's `entries`) to `index`.
fn remember_in(index: &mut Index, pack: Digest, entries: &[Entry]) {
    let info = PackInfo {
        hashes: entries.iter().map(|e| e.hash).collect(),
        patches: entries
            .iter()
            .filter_map(|e| match e.codec {
                format::Codec::Patch { base } => Some((e.hash, base)),
                _ => None,
            })
            .collect(),
        stored: entries.iter().map(|e| u64::from(e.stored)).sum(),
    };
    index.packs.insert(pack, info);
    for e in entries {
        let loc = Loc { pack, entry: *e };
        // The copy known is not usable (condemned, damaged, or a patch
        // whose chain is broken): this one takes its place.
        let condemned = index.chunks.contains_key(&e.hash)
            && index.chain(&e.hash).is_none()
            && !index.damaged.contains(&(pack, e.hash));
        match index.chunks.entry(e.hash) {
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(loc);
            }
            std::collections::hash_map::Entry::Occupied(mut o) if condemned => {
                o.insert(loc);
            }
            std::collections::hash_map::Entry::Occupied(_) => {}
        }
    }
}

impl ChunkStore {
    /// Does the store hold the chunk `hash` in a pack not condemned, and
    /// every base down its chain if it is a patch (a patch's pack may
    /// outlive its base's: it is kept whole for its other chunks)?
    pub fn has(&self, hash: &Digest) -> bool {
        self.index().chain(hash).is_some()
    }

    /// What the store holds, by its chunk index.
    pub fn usage(&self) -> Usage {
        let index = self.index();
        let mut u = Usage {
            chunks: index.chunks.len() as u64,
            packs: index.packs.len() as u64,
            ..Usage::default()
        };
        for loc in index.chunks.values() {
            u.raw_bytes += u64::from(loc.entry.raw);
            u.patches += u64::from(matches!(loc.entry.codec, format::Codec::Patch { .. }));
        }
        u.stored_bytes = index.packs.values().map(|p| p.stored).sum();
        u
    }

    /// Distinct chunks, bytes in packs, and chunk copies found damaged, as
    /// this server's index knows them: cheap (for metrics).
    pub fn counts(&self) -> (u64, u64, u64) {
        let index = self.index();
        let stored = index.packs.values().map(|p| p.stored).sum();
        (
            index.chunks.len() as u64,
            stored,
            index.damaged.len() as u64,
        )
    }

    /// How many objects the store holds, and their bytes (one listing of
    /// everything: for `mirror-server store` and the benchmark).
    pub fn objects(&self) -> Result<(u64, u64)> {
        self.run(async {
            let metas: Vec<_> = self
                .store
                .list(None)
                .try_collect()
                .await
                .map_err(|e| store_err(format!("listing {}", self.describe), e))?;
            Ok((metas.len() as u64, metas.iter().map(|m| m.size).sum()))
        })
    }

    /// The sequence numbers of `volume`'s versions, oldest first.
    pub fn versions(&self, volume: &str) -> Result<Vec<u64>> {
        let paths = self.run(self.list(&format!("vol/{volume}/v")))?;
        let mut seqs: Vec<u64> = paths
            .iter()
            .filter_map(|p| p.filename()?.parse().ok())
            .collect();
        seqs.sort_unstable();
        Ok(seqs)
    }

    /// Version `seq` of `volume`.
    pub fn version(&self, volume: &str, seq: u64) -> Result<VersionRecord> {
        let path = version_path(volume, seq);
        let bytes = self.run(self.get(&path))?;
        let record: VersionRecord = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Corrupt(format!("{}/{path}: {e}", self.describe)))?;
        if record.format != format::VERSION_FORMAT || record.seq != seq {
            return Err(Error::Corrupt(format!(
                "{}/{path}: format {} seq {} (this server reads format {})",
                self.describe,
                record.format,
                record.seq,
                format::VERSION_FORMAT
            )));
        }
        Ok(record)
    }

    /// The newest version of `volume`, if it has one.
    pub fn head(&self, volume: &str) -> Result<Option<VersionRecord>> {
        match self.versions(volume)?.last() {
            Some(&seq) => self.version(volume, seq).map(Some),
            None => Ok(None),
        }
    }

    /// The volumes (`CLIENT/VOLUME`) with at least one version.
    pub fn volumes(&self) -> Result<Vec<String>> {
        self.volumes_under("vol")
    }

    /// The volumes of `client` that have versions (`CLIENT/VOLUME`).
    pub fn client_volumes(&self, client: &str) -> Result<Vec<String>> {
        self.volumes_under(&format!("vol/{client}"))
    }

    fn volumes_under(&self, prefix: &str) -> Result<Vec<String>> {
        let paths = self.run(self.list(prefix))?;
        let mut out: Vec<String> = paths
            .iter()
            .filter_map(|p| {
                let parts: Vec<_> = p.parts().map(|s| s.as_ref().to_string()).collect();
                (parts.len() == 5 && parts[3] == "v").then(|| format!("{}/{}", parts[1], parts[2]))
            })
            .collect();
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// Start publishing the next version of `volume` (of `size` bytes)
    /// on `base`, its newest version as this server knows it (none: the
    /// volume's first).
    pub fn publication<'a>(
        &'a self,
        volume: &str,
        base: Option<&VersionRecord>,
        size: u64,
    ) -> Result<Publication<'a>> {
        if let Some(b) = base {
            if b.size != size {
                return Err(Error::Invalid(format!(
                    "volume {volume} is {} bytes in the store, not {size}",
                    b.size
                )));
            }
        }
        // What garbage collection condemned is not deduplicated against,
        // nor what verify found damaged, here or on another server.
        self.sync_gc()?;
        let damaged = self.run(self.read_damaged())?;
        self.index()
            .damaged
            .extend(damaged.into_iter().map(|(hash, pack)| (pack, hash)));
        Ok(Publication {
            store: self,
            volume: volume.to_string(),
            base: match base {
                Some(b) => Some((b.seq, b.segment_ids()?)),
                None => None,
            },
            size,
            pack: PackBuilder::new(LEVEL),
            pending: HashSet::new(),
            base_segment: None,
            uploads: std::collections::VecDeque::new(),
            changes: BTreeMap::new(),
            started: std::time::Instant::now(),
            written_packs: 0,
            written_bytes: 0,
            as_sent: 0,
        })
    }

    async fn upload_pack(&self, pack: PackBuilder) -> Result<()> {
        let (id, entries) = self.spawn_upload(pack).await.map_err(joined)??;
        self.remember(id, &entries);
        Ok(())
    }

    /// Upload a pack, then its index, on the store's runtime: its name and
    /// entries once both are stored (the caller remembers them).
    fn spawn_upload(
        &self,
        pack: PackBuilder,
    ) -> tokio::task::JoinHandle<Result<(Digest, Vec<Entry>)>> {
        let store = self.store.clone();
        let describe = self.describe.clone();
        let rt = self.rt.as_ref().expect("runtime until drop");
        rt.spawn(async move {
            // Compressed on a blocking thread: the publication goes on
            // filling the next pack meanwhile, on another core.
            let (bytes, index, entries) = tokio::task::spawn_blocking(move || pack.finish())
                .await
                .map_err(joined)?;
            let mut id = [0u8; 32];
            getrandom::fill(&mut id).map_err(|e| Error::Invalid(format!("no randomness: {e}")))?;
            let opts = || PutOptions {
                mode: PutMode::Create,
                ..Default::default()
            };
            for (dir, body) in [("packs", bytes), ("idx", index)] {
                let path = ObjPath::from(format::spread(dir, &id));
                match store.put_opts(&path, PutPayload::from(body), opts()).await {
                    Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => {}
                    Err(e) => return Err(store_err(format!("writing {describe}/{path}"), e)),
                }
            }
            Ok((id, entries))
        })
    }

    /// The digests of segment `id`.
    pub(crate) fn segment(&self, id: &Digest) -> Result<Vec<Digest>> {
        let path = ObjPath::from(format::spread("maps", id));
        let got = self.run(async {
            let r = self.store.get(&path).await?;
            r.bytes().await
        });
        let bytes = match got {
            Ok(b) => b,
            // Gone: damage (what verify records), not a store out of reach.
            Err(object_store::Error::NotFound { .. }) => {
                return Err(Error::Corrupt(format!(
                    "map segment {} is missing from the store {}",
                    format::hex(id),
                    self.describe
                )))
            }
            Err(e) => return Err(store_err(format!("reading {}/{path}", self.describe), e)),
        };
        format::decode_segment(&bytes, id)
    }

    /// A reader of version `record`.
    pub fn reader(self: &Arc<Self>, record: &VersionRecord) -> Result<VersionReader> {
        Ok(VersionReader {
            store: self.clone(),
            segments: record.segment_ids()?,
            size: record.size,
            cached: Mutex::new(VecDeque::new()),
            next: std::sync::atomic::AtomicU64::new(u64::MAX),
        })
    }

    /// The chunks `hashes` from the store itself (never the cache), with
    /// an answer for each: one damaged chunk does not hide the others (for
    /// verify).
    fn chunks_each(&self, hashes: &[Digest]) -> Vec<Result<Vec<u8>>> {
        match self.read_chunks(hashes) {
            Ok(all) => all.into_iter().map(Ok).collect(),
            Err(_) if hashes.len() > 1 => hashes
                .iter()
                .map(|h| {
                    self.read_chunks(std::slice::from_ref(h))
                        .map(|mut v| v.remove(0))
                })
                .collect(),
            Err(e) => vec![Err(e)],
        }
    }

    /// Read the chunks `hashes` (none a hole), each checked against its
    /// name; ranges of one pack are fetched together.
    pub(crate) fn chunks(&self, hashes: &[Digest]) -> Result<Vec<Vec<u8>>> {
        let mut out: Vec<Option<Vec<u8>>> = {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            hashes.iter().map(|h| cache.get(h)).collect()
        };
        let missing: Vec<usize> = (0..hashes.len()).filter(|&i| out[i].is_none()).collect();
        if !missing.is_empty() {
            let wanted: Vec<Digest> = missing.iter().map(|&i| hashes[i]).collect();
            let got = match self.read_chunks(&wanted) {
                // A copy another server's verify found damaged, and perhaps
                // stored again elsewhere: read once more, knowing it.
                Err(Error::Corrupt(_)) if self.learn_damage()? => self.read_chunks(&wanted)?,
                r => r?,
            };
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            for (&i, data) in missing.iter().zip(got) {
                cache.put(hashes[i], &data);
                out[i] = Some(data);
            }
        }
        Ok(out
            .into_iter()
            .map(|d| d.expect("every chunk read"))
            .collect())
    }

    /// Learn the damage markers other servers' verify runs wrote since
    /// this index was built; if any is new, build the index again, which
    /// then places each chunk in a copy not found damaged, if the store
    /// has one (a repair). Whether any was new.
    fn learn_damage(&self) -> Result<bool> {
        let markers = self.run(self.read_damaged())?;
        let new = {
            let mut index = self.index();
            markers.into_iter().fold(false, |new, (hash, pack)| {
                index.damaged.insert((pack, hash)) || new
            })
        };
        if new {
            let _one = self.rebuilding.lock().unwrap_or_else(|p| p.into_inner());
            self.rebuild_index()?;
        }
        Ok(new)
    }

    /// [`ChunkStore::chunks`] from the store itself, never the cache (what
    /// verify reads).
    fn read_chunks(&self, hashes: &[Digest]) -> Result<Vec<Vec<u8>>> {
        self.read_chained(hashes, 0)
    }

    /// [`ChunkStore::read_chunks`] of chunks `depth` patches down a chain:
    /// the bases of the patches among them are read (together) one level
    /// further down.
    fn read_chained(&self, hashes: &[Digest], depth: usize) -> Result<Vec<Vec<u8>>> {
        let mut locs = Vec::with_capacity(hashes.len());
        for h in hashes {
            let loc = {
                let index = self.index();
                index.usable(h).or_else(|| index.chunks.get(h).copied())
            };
            let loc = match loc {
                Some(l) => l,
                None => {
                    self.refresh_index()?;
                    self.index().chunks.get(h).copied().ok_or_else(|| {
                        Error::Corrupt(format!(
                            "chunk {} is missing from the store {}",
                            format::hex(h),
                            self.describe
                        ))
                    })?
                }
            };
            locs.push(loc);
        }
        let mut by_pack: BTreeMap<Digest, Vec<usize>> = BTreeMap::new();
        for (i, l) in locs.iter().enumerate() {
            by_pack.entry(l.pack).or_default().push(i);
        }
        let mut stored = vec![Bytes::new(); hashes.len()];
        for (pack, which) in by_pack {
            let ranges: Vec<std::ops::Range<u64>> = which
                .iter()
                .map(|&i| {
                    let e = locs[i].entry;
                    e.offset..e.offset + u64::from(e.stored)
                })
                .collect();
            let path = ObjPath::from(format::spread("packs", &pack));
            let got = match self.run(self.store.get_ranges(&path, &ranges)) {
                Ok(got) => got,
                // Deleted by garbage collection (another server's), the
                // chunks held again elsewhere: the index, read again,
                // places them there. Only when the state moved on, so
                // this ends.
                Err(object_store::Error::NotFound { .. }) if self.sync_gc()? => {
                    return self.read_chained(hashes, depth);
                }
                // Gone, and no collection explains it: damage (what verify
                // records), not a store out of reach.
                Err(object_store::Error::NotFound { .. }) => {
                    return Err(Error::Corrupt(format!(
                        "pack {} is missing from the store {}",
                        format::hex(&pack),
                        self.describe
                    )))
                }
                Err(e) => return Err(store_err(format!("reading {}/{path}", self.describe), e)),
            };
            for (&i, bytes) in which.iter().zip(got) {
                stored[i] = bytes;
            }
        }
        let bases: Vec<Digest> = locs
            .iter()
            .filter_map(|l| match l.entry.codec {
                format::Codec::Patch { base } => Some(base),
                _ => None,
            })
            .collect();
        if !bases.is_empty() && depth >= format::MAX_CHAIN {
            return Err(Error::Corrupt(format!(
                "chunk {} is read through more than {} patches",
                format::hex(&bases[0]),
                format::MAX_CHAIN
            )));
        }
        let mut bases = if bases.is_empty() {
            Vec::new()
        } else {
            self.read_chained(&bases, depth + 1)?
        }
        .into_iter();
        locs.iter()
            .zip(&stored)
            .map(|(l, bytes)| {
                let base = match l.entry.codec {
                    format::Codec::Patch { .. } => Some(bases.next().expect("one per patch")),
                    _ => None,
                };
                format::decode_chunk(&l.entry, bytes, base.as_deref())
            })
            .collect()
    }
}

/// Blocks in a volume of `size` bytes.
pub fn blocks_of(size: u64) -> u64 {
    size.div_ceil(BLOCK)
}

/// Blocks in segment `n` of a volume of `size` bytes.
fn segment_len(size: u64, n: usize) -> usize {
    let blocks = blocks_of(size);
    let start = n as u64 * SEGMENT_BLOCKS as u64;
    (blocks - start).min(SEGMENT_BLOCKS as u64) as usize
}

/// A version being published: blocks go in ([`Publication::put`]), new
/// chunks are packed and uploaded as packs fill, and
/// [`Publication::finish`] writes the map and the version record.
#[derive(Debug)]
pub struct Publication<'a> {
    store: &'a ChunkStore,
    volume: String,
    base: Option<(u64, Vec<Digest>)>,
    size: u64,
    pack: PackBuilder,
    /// Chunks this publication packed (uploaded or on their way).
    pending: HashSet<Digest>,
    /// The base's map segment read last (by [`Publication::base_digest`]).
    base_segment: Option<(usize, Vec<Digest>)>,
    /// Packs on their way, oldest first.
    uploads: std::collections::VecDeque<Upload>,
    /// Block number → its new digest ([`HOLE`]: zeroes).
    changes: BTreeMap<u64, Digest>,
    /// When it began (its time is logged).
    started: std::time::Instant,
    written_packs: u64,
    written_bytes: u64,
    /// Chunks packed as the client sent them ([`Publication::put_sent`]).
    as_sent: u64,
}

/// What a publication wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The new version.
    pub record: VersionRecord,
    /// Packs written (chunks the store did not hold yet).
    pub packs: u64,
    /// Their bytes.
    pub bytes: u64,
}

impl Publication<'_> {
    /// Block `n` of the volume is now `data` (`None`: zeroes), whose
    /// sha256 is `hash`. A later put of the same block wins.
    pub fn put(&mut self, n: u64, data: Option<&[u8]>, hash: Digest) -> Result<()> {
        let blocks = blocks_of(self.size);
        if n >= blocks {
            return Err(Error::Invalid(format!(
                "block {n} is past the end of the volume ({blocks} blocks)"
            )));
        }
        let data = data.filter(|d| !block::is_zero(d));
        let Some(data) = data else {
            self.changes.insert(n, HOLE);
            return Ok(());
        };
        let want = (self.size - n * BLOCK).min(BLOCK) as usize;
        if data.len() != want {
            return Err(Error::Invalid(format!(
                "block {n} is {} bytes, not {want}",
                data.len()
            )));
        }
        self.changes.insert(n, hash);
        if self.store.has(&hash) || self.pending.contains(&hash) {
            return Ok(());
        }
        self.pack.add(hash, data);
        self.pending.insert(hash);
        if self.pack.len() >= self.store.pack_target {
            self.flush()?;
        }
        Ok(())
    }

    /// Block `n` of the volume is now the chunk whose sha256 is `hash`,
    /// as the client sent it (checked by the caller): as
    /// [`Publication::put`], but packed as sent instead of compressed
    /// again.
    pub fn put_sent(&mut self, n: u64, sent: Sent, hash: Digest) -> Result<()> {
        let blocks = blocks_of(self.size);
        let want = (self.size.saturating_sub(n * BLOCK)).min(BLOCK);
        let raw = sent.raw_len();
        if n >= blocks || u64::from(raw) != want {
            return Err(Error::Invalid(format!(
                "block {n} of {raw} bytes does not fit a volume of {blocks} blocks of {BLOCK}"
            )));
        }
        if hash == block::zero_digest(raw) {
            self.changes.insert(n, HOLE);
            return Ok(());
        }
        self.changes.insert(n, hash);
        if !self.needs(&hash) {
            return Ok(());
        }
        self.pack.add_sent(hash, sent);
        self.as_sent += 1;
        self.pending.insert(hash);
        if self.pack.len() >= self.store.pack_target {
            self.flush()?;
        }
        Ok(())
    }

    /// Block `n` is now `block`, whose sha256 is `hash`: the chunk `base`
    /// (the caller checked) with the bytes in `ranges` (offsets in the
    /// block, in order, not overlapping) written over it. Stored as a
    /// patch on `base` where that is small ([`format::patchable`]) and
    /// `base` is one to rely on (see the patches in [`format`](mod@format)), else as
    /// [`Publication::put`] does.
    pub fn put_patched(
        &mut self,
        n: u64,
        block: &[u8],
        hash: Digest,
        base: Digest,
        ranges: &[(u32, u32)],
    ) -> Result<()> {
        let want = (self.size.saturating_sub(n * BLOCK)).min(BLOCK) as usize;
        if n >= blocks_of(self.size)
            || block.len() != want
            || base == HOLE
            || !format::patchable(block.len(), ranges)
            || block::is_zero(block)
            || !self.needs(&hash)
        {
            return self.put(n, Some(block), hash);
        }
        // `chain` is `None` unless every chunk on the way is usable (the
        // index's lock let go before `put` takes it again).
        let chain = self.store.index().chain(&base);
        if chain.is_none_or(|c| c >= format::MAX_CHAIN) {
            return self.put(n, Some(block), hash);
        }
        self.changes.insert(n, hash);
        self.pack.add_patch(hash, base, block, ranges);
        self.pending.insert(hash);
        if self.pack.len() >= self.store.pack_target {
            self.flush()?;
        }
        Ok(())
    }

    /// The digest of block `n` in the version this one is published on
    /// ([`HOLE`] where there is none).
    pub fn base_digest(&mut self, n: u64) -> Result<Digest> {
        let Some((_, ids)) = &self.base else {
            return Ok(HOLE);
        };
        let s = n as usize / SEGMENT_BLOCKS;
        let Some(id) = ids.get(s) else {
            return Ok(HOLE);
        };
        if self.base_segment.as_ref().is_none_or(|(at, _)| *at != s) {
            self.base_segment = Some((s, self.store.segment(id)?));
        }
        let (_, digests) = self.base_segment.as_ref().expect("just read");
        Ok(digests
            .get(n as usize % SEGMENT_BLOCKS)
            .copied()
            .unwrap_or(HOLE))
    }

    /// Whether the chunk named `hash` is neither in the store nor packed
    /// by this publication: a [`Publication::put`] of it needs its bytes.
    pub fn needs(&self, hash: &Digest) -> bool {
        !self.store.has(hash) && !self.pending.contains(hash)
    }

    /// Block `n` of the volume is now the chunk named `hash`, which the
    /// store holds or this publication packed ([`Publication::needs`] is
    /// false): no bytes needed.
    pub fn put_known(&mut self, n: u64, hash: Digest) -> Result<()> {
        let blocks = blocks_of(self.size);
        if n >= blocks {
            return Err(Error::Invalid(format!(
                "block {n} is past the end of the volume ({blocks} blocks)"
            )));
        }
        if self.needs(&hash) {
            return Err(Error::Invalid(format!(
                "block {n}: chunk {} is not in the store",
                format::hex(&hash)
            )));
        }
        self.changes.insert(n, hash);
        Ok(())
    }

    /// Send the pack being filled on its way (up to [`UPLOADS`] at once,
    /// while the next fills).
    fn flush(&mut self) -> Result<()> {
        if self.pack.is_empty() {
            return Ok(());
        }
        let pack = std::mem::replace(&mut self.pack, PackBuilder::new(LEVEL));
        self.written_packs += 1;
        self.uploads.push_back(self.store.spawn_upload(pack));
        while self.uploads.len() > UPLOADS {
            self.join_one()?;
        }
        Ok(())
    }

    /// Wait for the oldest upload and remember its chunks.
    fn join_one(&mut self) -> Result<()> {
        if let Some(upload) = self.uploads.pop_front() {
            let (id, entries) = self.store.run(upload).map_err(joined)??;
            self.written_bytes += entries.iter().map(|e| u64::from(e.stored)).sum::<u64>();
            self.store.remember(id, &entries);
        }
        Ok(())
    }

    /// Write the map and create the version record: the version is
    /// published when this returns `Ok`. `epoch`, `writer` and `uuid` are
    /// what it holds (see [`VersionRecord`]).
    pub fn finish(
        mut self,
        epoch: u64,
        writer: Option<WriterRecord>,
        uuid: &str,
    ) -> Result<Published> {
        self.flush()?;
        // Every pack stored before anything names it.
        while !self.uploads.is_empty() {
            self.join_one()?;
        }
        // The map segments are named on a fresh state: a name condemned
        // meanwhile is salted (see [`gc`]).
        self.store.sync_gc()?;
        let segs = blocks_of(self.size).div_ceil(SEGMENT_BLOCKS as u64) as usize;
        let mut ids: Vec<Digest> = match &self.base {
            Some((_, ids)) if ids.len() == segs => ids.clone(),
            Some((seq, ids)) => {
                return Err(Error::Corrupt(format!(
                    "version {seq} of {} has {} map segments, not {segs}",
                    self.volume,
                    ids.len()
                )))
            }
            None => Vec::new(),
        };
        let mut touched: BTreeMap<usize, Vec<(usize, Digest)>> = BTreeMap::new();
        for (&n, &d) in &self.changes {
            let s = n as usize / SEGMENT_BLOCKS;
            touched
                .entry(s)
                .or_default()
                .push((n as usize % SEGMENT_BLOCKS, d));
        }
        let store = self.store;
        let mut new_segments: Vec<(Digest, Vec<u8>)> = Vec::new();
        // Each distinct segment is kept (and uploaded) once: a first
        // version of a big sparse volume is mostly the same all-hole
        // segment, made once (not once per 256 MiB, in memory).
        let mut made: HashSet<Digest> = HashSet::new();
        let mut holes: HashMap<usize, Digest> = HashMap::new();
        for s in 0..segs {
            let changes = touched.get(&s);
            if s < ids.len() && changes.is_none() {
                continue;
            }
            if s >= ids.len() && changes.is_none() {
                if let Some(&id) = holes.get(&segment_len(self.size, s)) {
                    ids.push(id);
                    continue;
                }
            }
            let mut digests = if s < ids.len() {
                store.segment(&ids[s])?
            } else {
                vec![HOLE; segment_len(self.size, s)]
            };
            if digests.len() != segment_len(self.size, s) {
                return Err(Error::Corrupt(format!(
                    "map segment {} of {} has {} blocks, not {}",
                    format::hex(&ids[s]),
                    self.volume,
                    digests.len(),
                    segment_len(self.size, s)
                )));
            }
            for &(slot, d) in changes.into_iter().flatten() {
                digests[slot] = d;
            }
            let mut bytes = format::encode_segment(&digests, [0; 3]);
            let mut id = format::sha256(&bytes);
            while store.index().condemned.segments.contains_key(&id) {
                let mut salt = [0u8; 3];
                getrandom::fill(&mut salt)
                    .map_err(|e| Error::Invalid(format!("no randomness: {e}")))?;
                bytes = format::encode_segment(&digests, salt);
                id = format::sha256(&bytes);
            }
            if s < ids.len() {
                ids[s] = id;
            } else {
                ids.push(id);
                if changes.is_none() {
                    holes.insert(segment_len(self.size, s), id);
                }
            }
            if made.insert(id) {
                new_segments.push((id, bytes));
            }
        }
        store.run(async {
            for (id, bytes) in new_segments {
                store
                    .create(&ObjPath::from(format::spread("maps", &id)), bytes.into())
                    .await?;
            }
            Ok::<_, Error>(())
        })?;
        // And still there to rely on: garbage collection may have deleted
        // what this publication packed or found in the store, or condemned
        // it nearly a window ago, if it took long (see [`gc`]). Asked last,
        // after the map segments are up, so that the version record follows
        // the answer at once.
        store.sync_gc()?;
        {
            let index = store.index();
            let now = now_ms();
            let gone = self
                .changes
                .values()
                .filter(|&&d| d != HOLE && !index.lasting(&d, now))
                .count();
            if gone > 0 {
                return Err(Error::Store(format!(
                    "garbage collection of {} deleted {gone} chunks (or is about to) while version {} of {} was made ({} s): it is made again",
                    store.describe,
                    self.base.as_ref().map_or(1, |(seq, _)| seq + 1),
                    self.volume,
                    self.started.elapsed().as_secs()
                )));
            }
        }
        let mut nonce = [0u8; 16];
        getrandom::fill(&mut nonce).map_err(|e| Error::Invalid(format!("no randomness: {e}")))?;
        let seq = self.base.as_ref().map_or(1, |(seq, _)| seq + 1);
        let record = VersionRecord {
            format: format::VERSION_FORMAT,
            seq,
            size: self.size,
            epoch,
            writer,
            created_ms: now_ms(),
            server: store.server.clone(),
            nonce: ublk_mirror_common::hex::encode(&nonce),
            segments: ids.iter().map(format::hex).collect(),
            uuid: uuid.to_string(),
        };
        let json = serde_json::to_vec(&record).map_err(|e| Error::Corrupt(e.to_string()))?;
        let path = version_path(&self.volume, seq);
        if !store.run(store.create(&path, json.into()))? {
            // Ours, if the first answer was lost and the put retried.
            let there = store.version(&self.volume, seq)?;
            if there.nonce != record.nonce {
                return Err(Error::Invalid(format!(
                    "volume {} moved on in the store: version {seq} was published by {} (this server's copy is behind; it catches up when the volume is opened again)",
                    self.volume, there.server
                )));
            }
        }
        tracing::info!(
            volume = %self.volume,
            seq,
            blocks = self.changes.len(),
            packs = self.written_packs,
            bytes = self.written_bytes,
            as_sent = self.as_sent,
            ms = self.started.elapsed().as_millis() as u64,
            "version stored"
        );
        Ok(Published {
            record,
            packs: self.written_packs,
            bytes: self.written_bytes,
        })
    }
}

/// Reads the blocks of one version.
#[derive(Debug)]
pub struct VersionReader {
    store: Arc<ChunkStore>,
    segments: Vec<Digest>,
    size: u64,
    /// The segments read last, newest first (at most [`SEGMENTS_KEPT`]).
    cached: Mutex<VecDeque<(usize, Arc<Vec<Digest>>)>>,
    /// Where the last read ended: a read that starts there is sequential,
    /// and the blocks after it are fetched with it (into the chunk cache).
    next: std::sync::atomic::AtomicU64,
}

/// Blocks fetched ahead of a sequential read (2 MiB).
const READAHEAD: u64 = 32;

/// Map segments a [`VersionReader`] keeps read (128 KiB each, for 256 MiB
/// of the volume): an export's scattered reads, and checks of the image
/// cache against the map, do not read the same segment again and again.
const SEGMENTS_KEPT: usize = 8;

impl VersionReader {
    /// The version's size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The digests of segment `n` (all of the segment's blocks).
    pub fn segment(&self, n: usize) -> Result<Arc<Vec<Digest>>> {
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(at) = cached.iter().position(|(m, _)| *m == n) {
            let hit = cached.remove(at).expect("found");
            let d = hit.1.clone();
            cached.push_front(hit);
            return Ok(d);
        }
        let id = self
            .segments
            .get(n)
            .ok_or_else(|| Error::Invalid(format!("segment {n} is past the end of the version")))?;
        let d = Arc::new(self.store.segment(id)?);
        if d.len() != segment_len(self.size, n) {
            return Err(Error::Corrupt(format!(
                "map segment {} has {} blocks, not {}",
                format::hex(id),
                d.len(),
                segment_len(self.size, n)
            )));
        }
        cached.push_front((n, d.clone()));
        cached.truncate(SEGMENTS_KEPT);
        Ok(d)
    }

    /// The digest of block `n` ([`HOLE`] for zeroes).
    pub fn digest(&self, n: u64) -> Result<Digest> {
        let seg = self.segment(n as usize / SEGMENT_BLOCKS)?;
        seg.get(n as usize % SEGMENT_BLOCKS)
            .copied()
            .ok_or_else(|| Error::Invalid(format!("block {n} is past the end of the version")))
    }

    /// Blocks `ns` (`None`: zeroes), each checked against its digest.
    pub fn blocks(&self, ns: &[u64]) -> Result<Vec<Option<Vec<u8>>>> {
        let digests: Vec<Digest> = ns.iter().map(|&n| self.digest(n)).collect::<Result<_>>()?;
        let wanted: Vec<Digest> = digests.iter().copied().filter(|d| *d != HOLE).collect();
        let mut got = self.store.chunks(&wanted)?.into_iter();
        Ok(digests
            .iter()
            .map(|d| (*d != HOLE).then(|| got.next().expect("one per digest")))
            .collect())
    }

    /// Read `buf.len()` bytes at `offset` (any alignment).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| {
                Error::Invalid(format!("read at {offset} is past the end of the version"))
            })?;
        if buf.is_empty() {
            return Ok(());
        }
        let first = offset / BLOCK;
        let last = (end - 1) / BLOCK;
        let mut ns: Vec<u64> = (first..=last).collect();
        let wanted = ns.len();
        let sequential = self.next.swap(end, std::sync::atomic::Ordering::Relaxed) == offset;
        if sequential {
            let after = (last + 1..blocks_of(self.size)).take(READAHEAD as usize);
            ns.extend(after);
        }
        let mut got = self.blocks(&ns)?;
        got.truncate(wanted);
        ns.truncate(wanted);
        for (n, data) in ns.iter().zip(got) {
            let start = n * BLOCK;
            let from = offset.max(start);
            let to = end.min(start + BLOCK);
            let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
            match data {
                Some(d) => dst.copy_from_slice(&d[(from - start) as usize..(to - start) as usize]),
                None => dst.fill(0),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
