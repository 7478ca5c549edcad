//! The chunk store on an in-memory store (with faults injected at every
//! request), on a directory, and on a real SeaweedFS.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::memory::InMemory;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta,
    PutMultipartOptions, PutResult,
};
use proptest::prelude::*;

use super::*;

#[path = "../../tests/common/seaweed.rs"]
#[allow(dead_code)]
mod seaweed;

const VOL: &str = "laptop/root";

fn block_of(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A volume as the tests expect it: block number → content seed (absent:
/// zeroes).
type Model = BTreeMap<u64, u64>;

fn expected(size: u64, model: &Model) -> Vec<u8> {
    let mut out = vec![0u8; size as usize];
    for (&n, &seed) in model {
        let start = (n * BLOCK) as usize;
        let len = (size - n * BLOCK).min(BLOCK) as usize;
        out[start..start + len].copy_from_slice(&block_of(seed, len));
    }
    out
}

/// Publish `changes` (block → seed, 0: zeroes) on `base`.
fn publish(
    store: &ChunkStore,
    volume: &str,
    base: Option<&VersionRecord>,
    size: u64,
    changes: &Model,
    epoch: u64,
) -> Result<Published> {
    let mut p = store.publication(volume, base, size)?;
    for (&n, &seed) in changes {
        let len = (size - n * BLOCK).min(BLOCK) as usize;
        if seed == 0 {
            p.put(n, None, HOLE)?;
        } else {
            let data = block_of(seed, len);
            p.put(n, Some(&data), format::sha256(&data))?;
        }
    }
    p.finish(epoch, None, "")
}

fn apply(model: &mut Model, changes: &Model) {
    for (&n, &seed) in changes {
        if seed == 0 {
            model.remove(&n);
        } else {
            model.insert(n, seed);
        }
    }
}

fn read_all(store: &Arc<ChunkStore>, record: &VersionRecord) -> Vec<u8> {
    let r = store.reader(record).unwrap();
    let mut buf = vec![0u8; record.size as usize];
    r.read_at(&mut buf, 0).unwrap();
    buf
}

fn memory() -> Arc<InMemory> {
    Arc::new(InMemory::new())
}

fn open_on(inner: Arc<dyn ObjectStore>) -> Arc<ChunkStore> {
    Arc::new(ChunkStore::with(inner, "test".into(), 1 << 20).unwrap())
}

/// Publish, change, publish again, read both versions back; a second
/// volume with the same content costs no chunk.
fn round_trip_and_dedup(store: &Arc<ChunkStore>) {
    // A volume of two segments and a bit, ending in a partial block.
    let size = (2 * SEGMENT_BLOCKS as u64 + 3) * BLOCK - 1000;
    let mut model = Model::new();
    let first: Model = [(0, 1), (1, 2), (4096, 3), (8194, 4), (100, 1)].into();
    apply(&mut model, &first);
    let v1 = publish(store, VOL, None, size, &first, 1).unwrap();
    assert_eq!(v1.record.seq, 1);
    assert_eq!(read_all(store, &v1.record), expected(size, &model));
    // Blocks 0 and 100 are the same: one chunk.
    assert_eq!(store.usage().chunks, 4);

    let second: Model = [(1, 0), (4097, 5), (8194, 6)].into();
    let before = model.clone();
    apply(&mut model, &second);
    let v2 = publish(store, VOL, Some(&v1.record), size, &second, 2).unwrap();
    assert_eq!(v2.record.seq, 2);
    // Segment 0 changed (a hole), 1 and 2 too: all three new ids.
    assert_ne!(v1.record.segments[0], v2.record.segments[0]);
    assert_eq!(read_all(store, &v2.record), expected(size, &model));
    // The old version reads as it was.
    assert_eq!(store.version(VOL, 1).unwrap(), v1.record);
    assert_eq!(read_all(store, &v1.record), expected(size, &before));
    assert_eq!(store.head(VOL).unwrap().unwrap(), v2.record);
    assert_eq!(store.versions(VOL).unwrap(), vec![1, 2]);

    // Another client's copy of the same content: nothing new is stored.
    let usage = store.usage();
    let copy = publish(store, "other/copy", None, size, &model, 1).unwrap();
    assert_eq!((copy.packs, copy.bytes), (0, 0));
    assert_eq!(store.usage(), usage);
    assert_eq!(
        copy.record.segments, v2.record.segments,
        "segments shared too"
    );
    assert_eq!(
        store.volumes().unwrap(),
        vec![VOL.to_string(), "other/copy".into()]
    );
}

#[test]
fn versions_round_trip_and_dedup_in_memory() {
    round_trip_and_dedup(&open_on(memory()));
}

#[test]
fn versions_round_trip_and_dedup_in_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = StoreConfig::local_default();
    let store = Arc::new(ChunkStore::open(&cfg, dir.path()).unwrap());
    round_trip_and_dedup(&store);
    // Opened again (a restarted server): the index comes back from idx/.
    let again = Arc::new(ChunkStore::open(&cfg, dir.path()).unwrap());
    assert_eq!(again.usage(), store.usage());
    let head = again.head(VOL).unwrap().unwrap();
    assert_eq!(read_all(&again, &head), read_all(&store, &head));
}

#[test]
fn versions_round_trip_and_dedup_on_seaweedfs() {
    let weed = seaweed::Seaweed::start();
    let store = Arc::new(open_weed(&weed, "t1").unwrap());
    round_trip_and_dedup(&store);
    let again = Arc::new(open_weed(&weed, "t1").unwrap());
    assert_eq!(again.usage(), store.usage());
}

fn weed_config(weed: &seaweed::Seaweed, prefix: &str) -> (StoreConfig, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let cred = dir.path().join("s3.credentials");
    std::fs::write(
        &cred,
        format!(
            "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            weed.key_id, weed.secret
        ),
    )
    .unwrap();
    std::fs::set_permissions(&cred, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let cfg = StoreConfig {
        url: format!("s3://{}/{prefix}", weed.bucket),
        endpoint: Some(weed.endpoint.clone()),
        region: None,
        path_style: true,
        credentials_file: Some(cred),
        pack_size: ublk_mirror_common::size::ByteSize(1 << 20),
        ..StoreConfig::local_default()
    };
    (cfg, dir)
}

fn open_weed(weed: &seaweed::Seaweed, prefix: &str) -> Result<ChunkStore> {
    let (cfg, dir) = weed_config(weed, prefix);
    ChunkStore::open(&cfg, dir.path())
}

#[test]
fn bad_buckets_and_keys_are_clear_errors() {
    let mut weed = seaweed::Seaweed::start();
    // Wrong keys.
    let (cfg, dir) = weed_config(&weed, "keys");
    std::fs::write(
        cfg.credentials_file.as_ref().unwrap(),
        "aws_access_key_id = nobody\naws_secret_access_key = wrong\n",
    )
    .unwrap();
    let e = ChunkStore::open(&cfg, dir.path()).unwrap_err();
    assert!(matches!(e, Error::Store(_)), "{e}");
    // A bucket that does not exist.
    let (mut cfg, dir) = weed_config(&weed, "x");
    cfg.url = "s3://no-such-bucket/x".into();
    let e = ChunkStore::open(&cfg, dir.path()).unwrap_err();
    assert!(matches!(e, Error::Store(_)), "{e}");
    // The bucket's root, which holds a store under a prefix: something
    // else.
    drop(open_weed(&weed, "mine").unwrap());
    let e = open_weed(&weed, "").unwrap_err();
    assert!(e.to_string().contains("holds something else"), "{e}");
    // Unreachable: the store stopped; nothing is published.
    let store = open_weed(&weed, "down").unwrap();
    weed.stop();
    let e = publish(&store, VOL, None, BLOCK, &[(0, 1)].into(), 1).unwrap_err();
    assert!(matches!(e, Error::Store(_)), "{e}");
    weed.restart();
    // Back: the same publication goes through.
    let ok = publish(&store, VOL, None, BLOCK, &[(0, 1)].into(), 1).unwrap();
    assert_eq!(ok.record.seq, 1);
    assert_eq!(
        read_all(&Arc::new(store), &ok.record),
        block_of(1, BLOCK as usize)
    );
}

#[test]
fn a_store_of_something_else_is_refused() {
    let inner = memory();
    inner
        .put(
            &ObjPath::from("photos/cat.jpg"),
            PutPayload::from_static(b"meow"),
        )
        .now_or_never_blocking();
    let e = ChunkStore::with(inner.clone(), "test".into(), 1 << 20).unwrap_err();
    assert!(e.to_string().contains("holds something else"), "{e}");
    // And a store.json that is not ours.
    let other = memory();
    other
        .put(
            &ObjPath::from(STORE_RECORD),
            PutPayload::from_static(b"{\"x\":1}"),
        )
        .now_or_never_blocking();
    let e = ChunkStore::with(other, "test".into(), 1 << 20).unwrap_err();
    assert!(
        e.to_string().contains("not a ublk-mirror chunk store"),
        "{e}"
    );
}

#[test]
fn a_store_without_conditional_writes_is_refused() {
    let faulty = Arc::new(Faulty::new(memory()));
    faulty.ignore_create.store(true, Ordering::SeqCst);
    let e = ChunkStore::with(faulty, "test".into(), 1 << 20).unwrap_err();
    assert!(e.to_string().contains("conditional writes"), "{e}");
}

#[test]
fn a_read_only_store_is_a_clear_error_and_nothing_is_published() {
    let inner = memory();
    drop(open_on(inner.clone()));
    let faulty = Arc::new(Faulty::new(inner.clone()));
    faulty.read_only.store(true, Ordering::SeqCst);
    let e = ChunkStore::with(faulty.clone(), "test".into(), 1 << 20).unwrap_err();
    assert!(matches!(e, Error::Store(_)), "{e}");
    assert!(e.to_string().contains("read-only"), "{e}");
    // Made read-only after it opened: the publication fails, nothing is
    // published, and it goes through once the store takes writes again.
    faulty.read_only.store(false, Ordering::SeqCst);
    let store = open_on(faulty.clone());
    faulty.read_only.store(true, Ordering::SeqCst);
    let e = publish(&store, VOL, None, BLOCK, &[(0, 1)].into(), 1).unwrap_err();
    assert!(e.to_string().contains("read-only"), "{e}");
    assert!(store.head(VOL).unwrap().is_none());
    faulty.read_only.store(false, Ordering::SeqCst);
    assert_eq!(
        publish(&store, VOL, None, BLOCK, &[(0, 1)].into(), 1)
            .unwrap()
            .record
            .seq,
        1
    );
}

#[test]
fn two_servers_on_one_base_publish_once() {
    let inner = memory();
    let a = open_on(inner.clone());
    let b = open_on(inner);
    let size = 4 * BLOCK;
    let v1 = publish(&a, VOL, None, size, &[(0, 1)].into(), 1).unwrap();
    let v1b = b.head(VOL).unwrap().unwrap();
    publish(&a, VOL, Some(&v1.record), size, &[(1, 2)].into(), 2).unwrap();
    let e = publish(&b, VOL, Some(&v1b), size, &[(2, 3)].into(), 2).unwrap_err();
    assert!(e.to_string().contains("moved on"), "{e}");
    assert_eq!(a.versions(VOL).unwrap(), vec![1, 2]);
    let head = a.head(VOL).unwrap().unwrap();
    assert_eq!(
        read_all(&a, &head),
        expected(size, &[(0, 1), (1, 2)].into())
    );
}

trait Blocking {
    fn now_or_never_blocking(self);
}

impl<F: std::future::Future<Output = object_store::Result<PutResult>>> Blocking for F {
    fn now_or_never_blocking(self) {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(self)
            .unwrap();
    }
}

/// An object store that fails its `fail_at`-th request (counting from 0):
/// before doing it, or after doing it (the answer lost).
#[derive(Debug)]
struct Faulty {
    inner: Arc<dyn ObjectStore>,
    count: AtomicUsize,
    fail_at: AtomicUsize,
    after: AtomicBool,
    ignore_create: AtomicBool,
    read_only: AtomicBool,
}

impl Faulty {
    fn new(inner: Arc<dyn ObjectStore>) -> Faulty {
        Faulty {
            inner,
            count: AtomicUsize::new(0),
            fail_at: AtomicUsize::new(usize::MAX),
            after: AtomicBool::new(false),
            ignore_create: AtomicBool::new(false),
            read_only: AtomicBool::new(false),
        }
    }

    /// Fail the request `n` requests from now.
    fn arm(&self, n: usize, after: bool) {
        self.after.store(after, Ordering::SeqCst);
        self.fail_at
            .store(self.count.load(Ordering::SeqCst) + n, Ordering::SeqCst);
    }

    /// Is this request the one to fail? Counts it.
    fn hit(&self) -> bool {
        self.count.fetch_add(1, Ordering::SeqCst) == self.fail_at.load(Ordering::SeqCst)
    }

    fn fault() -> object_store::Error {
        object_store::Error::Generic {
            store: "faulty",
            source: "injected fault".into(),
        }
    }
}

impl std::fmt::Display for Faulty {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "faulty")
    }
}

#[async_trait]
impl ObjectStore for Faulty {
    async fn put_opts(
        &self,
        location: &ObjPath,
        payload: PutPayload,
        mut opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        if self.ignore_create.load(Ordering::SeqCst) {
            opts.mode = PutMode::Overwrite;
        }
        if self.read_only.load(Ordering::SeqCst) {
            return Err(object_store::Error::PermissionDenied {
                path: location.to_string(),
                source: "AccessDenied".into(),
            });
        }
        let hit = self.hit();
        if hit && !self.after.load(Ordering::SeqCst) {
            return Err(Self::fault());
        }
        let r = self.inner.put_opts(location, payload, opts).await;
        if hit {
            return Err(Self::fault());
        }
        r
    }

    async fn put_multipart_opts(
        &self,
        location: &ObjPath,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &ObjPath,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        if self.hit() {
            return Err(Self::fault());
        }
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(
        &self,
        location: &ObjPath,
        ranges: &[Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        if self.hit() {
            return Err(Self::fault());
        }
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<ObjPath>>,
    ) -> BoxStream<'static, object_store::Result<ObjPath>> {
        self.inner.delete_stream(locations)
    }

    fn list(
        &self,
        prefix: Option<&ObjPath>,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        if self.hit() {
            return futures::stream::once(async { Err(Faulty::fault()) }).boxed();
        }
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(
        &self,
        prefix: Option<&ObjPath>,
    ) -> object_store::Result<ListResult> {
        if self.hit() {
            return Err(Self::fault());
        }
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &ObjPath,
        to: &ObjPath,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

/// Requests a clean publication of `changes` on `base` makes.
fn requests_of(inner: &Arc<InMemory>, changes: &Model, size: u64) -> usize {
    let faulty = Arc::new(Faulty::new(copy_of(inner)));
    let store = open_on(faulty.clone());
    let base = store.head(VOL).unwrap();
    let before = faulty.count.load(Ordering::SeqCst);
    publish(&store, VOL, base.as_ref(), size, changes, 2).unwrap();
    faulty.count.load(Ordering::SeqCst) - before
}

/// A copy of an in-memory store (each fault case starts from the same
/// state).
fn copy_of(inner: &Arc<InMemory>) -> Arc<InMemory> {
    let out = Arc::new(InMemory::new());
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let metas: Vec<ObjectMeta> = inner.list(None).try_collect().await.unwrap();
        for m in metas {
            let bytes = inner.get(&m.location).await.unwrap().bytes().await.unwrap();
            out.put(&m.location, bytes.into()).await.unwrap();
        }
    });
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]

    /// Fail each request of a publication in turn, before it is done and
    /// after (its answer lost): the store then holds exactly the old
    /// version or exactly the new one, every block of it readable; and
    /// publishing again from what the store holds ends with the new
    /// version, published once.
    #[test]
    fn a_publication_failing_at_any_request_leaves_a_whole_version(
        first in proptest::collection::btree_map(0u64..40, 1u64..6, 1..20),
        second in proptest::collection::btree_map(0u64..40, 0u64..9, 1..20),
    ) {
        let size = 40 * BLOCK - 123;
        let base_store = memory();
        {
            let s = open_on(base_store.clone());
            publish(&s, VOL, None, size, &first, 1).unwrap();
        }
        let mut old = Model::new();
        apply(&mut old, &first);
        let mut new = old.clone();
        apply(&mut new, &second);
        let n = requests_of(&base_store, &second, size);
        prop_assert!(n >= 3, "a publication takes at least a segment and a record");
        for k in 0..n {
            for after in [false, true] {
                let inner = copy_of(&base_store);
                let faulty = Arc::new(Faulty::new(inner.clone()));
                let store = open_on(faulty.clone());
                let base = store.head(VOL).unwrap();
                faulty.arm(k, after);
                let result = publish(&store, VOL, base.as_ref(), size, &second, 2);
                // What any server now finds.
                let fresh = open_on(inner.clone());
                let head = fresh.head(VOL).unwrap().unwrap();
                let content = read_all(&fresh, &head);
                if head.seq == 1 {
                    prop_assert!(result.is_err(), "fault {k} after={after}: Ok, yet not published");
                    prop_assert_eq!(&content, &expected(size, &old));
                    // Published again from what the store holds.
                    let again = publish(&fresh, VOL, Some(&head), size, &second, 2).unwrap();
                    prop_assert_eq!(again.record.seq, 2);
                } else {
                    prop_assert_eq!(head.seq, 2, "fault {} after={}", k, after);
                    prop_assert_eq!(head.epoch, 2);
                }
                let head = fresh.head(VOL).unwrap().unwrap();
                prop_assert_eq!(head.seq, 2);
                prop_assert_eq!(fresh.versions(VOL).unwrap(), vec![1, 2]);
                prop_assert_eq!(read_all(&fresh, &head), expected(size, &new));
            }
        }
    }
}

/// Garbage collection frees what no kept version needs, never what one
/// does: pins keep versions, condemned chunks are stored again rather
/// than relied on, and nothing goes before its window.
fn gc_frees_only_the_dead(store: &Arc<ChunkStore>) {
    let size = 3 * BLOCK;
    let mut model = Model::new();
    let mut versions = Vec::new();
    let mut base: Option<VersionRecord> = None;
    // Block 0 stays (seed 1); block 1 is rewritten by every epoch.
    for (epoch, seed) in [(1u64, 10u64), (2, 20), (3, 30), (4, 40)] {
        let changes: Model = if epoch == 1 {
            [(0, 1), (1, seed)].into()
        } else {
            [(1, seed)].into()
        };
        apply(&mut model, &changes);
        let v = publish(store, VOL, base.as_ref(), size, &changes, epoch).unwrap();
        versions.push((v.record.clone(), expected(size, &model)));
        base = Some(v.record);
    }
    // Another server, which read the indexes now and publishes nothing
    // (it serves restores): its index goes stale.
    let stale = open_on_same(store);
    stale.refresh_index().unwrap();
    store.pin(VOL, "before", 1, None).unwrap();
    assert_eq!(store.pins(VOL).unwrap(), [("before".to_string(), 1)].into());
    // Version 2 goes at once (neither pinned nor one of the newest two);
    // its pack is condemned, and not deleted while the window lasts.
    let r = store.gc(Duration::from_secs(3600), |_| {}).unwrap();
    assert_eq!((r.versions_deleted, r.versions_kept), (1, 3), "{r:?}");
    assert_eq!((r.packs_condemned, r.packs_deleted), (1, 0), "{r:?}");
    let r = store.gc(Duration::from_secs(3600), |_| {}).unwrap();
    assert_eq!((r.packs_condemned, r.packs_deleted), (0, 0), "{r:?}");
    assert_eq!(store.versions(VOL).unwrap(), vec![1, 3, 4]);
    // Meanwhile a publication stores block 1 as epoch 2 had it: the
    // condemned pack is not relied on; the chunk is stored again.
    let changes: Model = [(1, 20)].into();
    apply(&mut model, &changes);
    let v5 = publish(store, VOL, base.as_ref(), size, &changes, 5).unwrap();
    assert_eq!(v5.packs, 1, "a condemned chunk was deduplicated against");
    versions.push((v5.record.clone(), expected(size, &model)));
    // A server's scheduled run with a shorter window (its gc_window is
    // shorter than another's) goes by the window the state recorded, which
    // publications judged by: nothing is deleted yet.
    // (It deletes version 3, no longer one of the newest two, and
    // condemns its pack.)
    let r = store.gc_at_least(Duration::ZERO, |_| {}).unwrap();
    assert_eq!((r.packs_condemned, r.packs_deleted), (1, 0), "{r:?}");
    // Asked for exactly (`mirror-server gc --window 0s`), the next run
    // deletes the condemned packs: everything kept reads, also on the
    // server whose index placed block 1's chunk in one of them.
    let r = store.gc(Duration::ZERO, |_| {}).unwrap();
    assert_eq!(r.packs_deleted, 2, "{r:?}");
    assert!(r.bytes_freed > 0);
    assert_eq!(
        read_all(&stale, &v5.record),
        expected(size, &model),
        "a server whose index was stale"
    );
    for (record, content) in &versions {
        if store.versions(VOL).unwrap().contains(&record.seq) {
            assert_eq!(&read_all(store, record), content, "version {}", record.seq);
        }
    }
    assert_eq!(store.versions(VOL).unwrap(), vec![1, 4, 5]);
    // Unpinned, version 1 goes; its pack also holds block 0, which every
    // version has, so it stays whole (no repacking yet).
    store.unpin(VOL, "before").unwrap();
    let r = store.gc(Duration::ZERO, |_| {}).unwrap();
    assert_eq!(r.versions_deleted, 1, "{r:?}");
    let r = store.gc(Duration::ZERO, |_| {}).unwrap();
    assert_eq!(r.packs_deleted, 0, "{r:?}");
    assert_eq!(store.versions(VOL).unwrap(), vec![4, 5]);
    for (record, content) in &versions[3..] {
        assert_eq!(&read_all(store, record), content, "version {}", record.seq);
    }
    // Another process on the store sees the same.
    let again = open_on_same(store);
    let head = again.head(VOL).unwrap().unwrap();
    assert_eq!(read_all(&again, &head), expected(size, &model));
    // One run at a time.
    let lock = ObjPath::from("gc/lock");
    store
        .run(store.create(&lock, Bytes::from_static(b"{}")))
        .unwrap();
    let e = store.gc(Duration::ZERO, |_| {}).unwrap_err();
    assert!(e.to_string().contains("running already"), "{e}");
}

/// A publication during which garbage collection runs sees its packs
/// (named by no version yet) condemned: it publishes all the same, as no
/// run deletes them before a window has passed. One that outlasts the
/// window (here zero: two runs while it is made) sees them deleted, and
/// names none of them: it refuses to publish, and is made again.
#[test]
fn a_publication_names_no_chunk_collected_while_it_was_made() {
    let store = open_on(memory());
    let size = 64 * BLOCK;
    let model: Model = (0..32).map(|n| (n, n + 1)).collect();
    let publication = |model: &Model| {
        let mut p = store.publication(VOL, None, size).unwrap();
        for (&n, &seed) in model {
            let d = block_of(seed, BLOCK as usize);
            p.put(n, Some(&d), format::sha256(&d)).unwrap();
        }
        // 2 MiB of chunks in 1 MiB packs: in the store, named by no version.
        while !p.uploads.is_empty() {
            p.join_one().unwrap();
        }
        assert!(p.written_packs >= 1);
        p
    };
    let other: Model = (0..32).map(|n| (n, n + 100)).collect();
    let p = publication(&other);
    let r = store.gc(Duration::from_secs(3600), |_| {}).unwrap();
    assert!(r.packs_condemned >= 1, "{r:?}");
    let v = p.finish(1, None, "").unwrap();
    assert_eq!(read_all(&store, &v.record), expected(size, &other));
    let p = publication(&model);
    let base = Some(v.record);
    let r = store.gc(Duration::ZERO, |_| {}).unwrap();
    assert!(r.packs_condemned >= 1, "{r:?}");
    let r = store.gc(Duration::ZERO, |_| {}).unwrap();
    assert!(r.packs_deleted >= 1, "{r:?}");
    let e = p.finish(2, None, "").unwrap_err().to_string();
    assert!(e.contains("made again"), "{e}");
    assert_eq!(store.head(VOL).unwrap().unwrap().seq, 1);
    let v = publish(&store, VOL, base.as_ref(), size, &model, 2).unwrap();
    assert_eq!(read_all(&store, &v.record), expected(size, &model));
}

/// Two garbage collection runs that overlapped (the second took a lock it
/// judged abandoned) both write the next generation: a server that read
/// the first one's state still sees the second's.
#[test]
fn a_gc_state_written_again_at_the_same_generation_is_seen() {
    let inner = memory();
    let store = open_on(inner.clone());
    let model: Model = [(0, 7)].into();
    publish(&store, VOL, None, BLOCK, &model, 1).unwrap();
    store.gc(Duration::from_secs(3600), |_| {}).unwrap();
    assert!(!store.sync_gc().unwrap(), "nothing new");
    let chunk = format::sha256(&block_of(7, BLOCK as usize));
    assert!(store.has(&chunk));
    let pack = store.index().chunks[&chunk].pack;
    let state = serde_json::json!({
        "format": 1,
        "generation": 1,
        "nonce": "00ff",
        "packs": {format::hex(&pack): 0},
        "segments": {},
    });
    store
        .run(store.store.put(
            &ObjPath::from("gc/state"),
            PutPayload::from(state.to_string().into_bytes()),
        ))
        .unwrap();
    assert!(store.sync_gc().unwrap());
    assert!(
        !store.has(&chunk),
        "the other run's condemned pack was not seen"
    );
}

/// A pack whose index was never written (its server died between the two
/// uploads) is collected like any dead pack: condemned, then deleted a
/// window later.
#[test]
fn a_pack_left_without_its_index_is_collected() {
    let store = open_on(memory());
    let model: Model = [(0, 3)].into();
    let v = publish(&store, VOL, None, BLOCK, &model, 1).unwrap();
    let orphan = ObjPath::from(format::spread("packs", &[0xab; 32]));
    store
        .run(store.store.put(&orphan, PutPayload::from(vec![1u8; 4096])))
        .unwrap();
    let r = store.gc(Duration::ZERO, |_| {}).unwrap();
    assert_eq!((r.packs_condemned, r.packs_deleted), (1, 0), "{r:?}");
    let r = store.gc(Duration::ZERO, |_| {}).unwrap();
    assert_eq!(r.packs_deleted, 1, "{r:?}");
    assert!(matches!(
        store.run(store.store.head(&orphan)),
        Err(object_store::Error::NotFound { .. })
    ));
    assert_eq!(read_all(&store, &v.record), expected(BLOCK, &model));
}

fn open_on_same(store: &Arc<ChunkStore>) -> Arc<ChunkStore> {
    Arc::new(ChunkStore::with(store.store.clone(), "again".into(), 1 << 20).unwrap())
}

#[test]
fn gc_frees_only_the_dead_in_memory() {
    gc_frees_only_the_dead(&open_on(memory()));
}

/// A run whose lock another run took (it judged it abandoned) stops at
/// its next step: it deletes nothing more, writes no state, and leaves
/// the other run's lock in place; the lock is written again as it goes.
#[test]
fn a_gc_run_that_lost_its_lock_stops_and_leaves_the_others() {
    let store = open_on(memory());
    let mut base: Option<VersionRecord> = None;
    for epoch in 1..=3u64 {
        let changes: Model = [(0, epoch * 10)].into();
        base = Some(
            publish(&store, VOL, base.as_ref(), BLOCK, &changes, epoch)
                .unwrap()
                .record,
        );
    }
    // Version 1 goes, its pack condemned.
    let r = store.gc(Duration::ZERO, |_| {}).unwrap();
    assert_eq!((r.versions_deleted, r.packs_condemned), (1, 1), "{r:?}");
    let lock = ObjPath::from("gc/lock");
    assert!(
        store.run(store.get(&lock)).is_err(),
        "a run deletes its own lock"
    );
    let packs = || store.run(store.list("packs")).unwrap().len();
    let before = packs();
    let state = || store.run(store.get(&ObjPath::from("gc/state"))).unwrap();
    let state_before = state();
    // The next run would delete it; its lock is taken while it marks.
    let foreign = Bytes::from_static(br#"{"server":"other","nonce":"00"}"#);
    let mut seen = Vec::new();
    let e = store
        .gc(Duration::ZERO, |step| {
            seen.push(step.to_string());
            if step == "sweeping" {
                // The run wrote its lock again at the step before.
                let held = store.run(store.get(&lock)).unwrap();
                assert!(String::from_utf8_lossy(&held).contains("nonce"));
                store
                    .run(store.store.put(&lock, PutPayload::from(foreign.clone())))
                    .unwrap();
            }
        })
        .unwrap_err();
    assert!(e.to_string().contains("another run took its lock"), "{e}");
    assert_eq!(seen, ["marking", "sweeping"]);
    assert_eq!(packs(), before, "a run that lost its lock deleted a pack");
    assert_eq!(
        state(),
        state_before,
        "a run that lost its lock wrote the state"
    );
    assert_eq!(
        store.run(store.get(&lock)).unwrap(),
        foreign,
        "the other's lock was deleted"
    );
    // The other run done, the next one deletes the pack.
    store.run(store.store.delete(&lock)).unwrap();
    let r = store.gc(Duration::ZERO, |_| {}).unwrap();
    assert_eq!(r.packs_deleted, 1, "{r:?}");
    assert_eq!(packs(), before - 1);
}

/// A chunk stored as a patch whose base's pack is gone (collected: the
/// patch's pack lived on for other chunks) is not there to deduplicate
/// against: a publication of that content stores it again, and publishes.
#[test]
fn a_patch_whose_base_is_gone_is_stored_again() {
    let store = open_on(memory());
    let size = 2 * BLOCK;
    let v1 = publish(&store, VOL, None, size, &[(0, 1), (1, 2)].into(), 1).unwrap();
    let mut image = expected(size, &[(0, 1), (1, 2)].into());
    let base = format::sha256(&image[BLOCK as usize..]);
    publish_write(&store, &v1.record, &mut image, BLOCK, 3, 2);
    let block = image[BLOCK as usize..].to_vec();
    let patch = format::sha256(&block);
    assert_eq!(
        store.index().chain(&patch),
        Some(1),
        "not stored as a patch"
    );
    assert!(store.has(&patch));
    // The base's pack goes (as a collection would have it go).
    let pack = store.index().chunks[&base].pack;
    for dir in ["idx", "packs"] {
        store
            .run(
                store
                    .store
                    .delete(&ObjPath::from(format::spread(dir, &pack))),
            )
            .unwrap();
    }
    store.rebuild_index().unwrap();
    assert!(
        !store.has(&patch),
        "a patch on a base that is gone is deduplicated against"
    );
    let mut p = store.publication("vol2", None, BLOCK).unwrap();
    p.put(0, Some(&block), patch).unwrap();
    let v = p.finish(1, None, "").unwrap();
    assert_eq!(store.index().chain(&patch), Some(0));
    assert_eq!(read_all(&store, &v.record), block);
}

#[test]
fn gc_frees_only_the_dead_on_seaweedfs() {
    let weed = seaweed::Seaweed::start();
    gc_frees_only_the_dead(&Arc::new(open_weed(&weed, "gc").unwrap()));
}

/// Flip a byte of every pack holding `hash` (as a failing disk would).
fn corrupt(store: &ChunkStore, hash: &Digest) {
    let loc = store.index().chunks.get(hash).copied().unwrap();
    let path = ObjPath::from(format::spread("packs", &loc.pack));
    store.run(async {
        let mut bytes = store
            .store
            .get(&path)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .to_vec();
        bytes[loc.entry.offset as usize + 3] ^= 0x40;
        store
            .store
            .put(&path, PutPayload::from(bytes))
            .await
            .unwrap();
    });
}

/// Verify, with an image cache that still holds block 0 of `VOL` as
/// `seed` wrote it.
fn verify_with_block_0_cached(store: &ChunkStore, seed: u64) -> verify::Report {
    store
        .verify(
            None,
            |v, n, _| (v == VOL && n == 0).then(|| block_of(seed, BLOCK as usize)),
            |_, _| {},
        )
        .unwrap()
}

fn verify_finds_damage_and_repairs_it(store: &Arc<ChunkStore>) {
    let size = 2 * BLOCK;
    let v1 = publish(store, VOL, None, size, &[(0, 1), (1, 2)].into(), 1).unwrap();
    let v2 = publish(store, VOL, Some(&v1.record), size, &[(1, 3)].into(), 2).unwrap();
    let clean = store.verify(None, |_, _, _| None, |_, _| {}).unwrap();
    assert!(clean.is_clean(), "{clean:?}");
    assert_eq!((clean.versions, clean.chunks), (2, 3));

    // Block 0's chunk rots: both versions need it; nothing serves it.
    let h1 = format::sha256(&block_of(1, BLOCK as usize));
    corrupt(store, &h1);
    let r = store.verify(None, |_, _, _| None, |_, _| {}).unwrap();
    assert_eq!(
        r.damaged.get(&format::hex(&h1)),
        Some(&vec![format!("{VOL}@1"), format!("{VOL}@2")]),
        "{r:?}"
    );
    assert_eq!(store.damaged_versions(VOL).unwrap(), vec![1, 2]);
    let reader = store.reader(&v2.record).unwrap();
    let mut buf = vec![0u8; size as usize];
    assert!(matches!(
        reader.read_at(&mut buf, 0),
        Err(Error::Corrupt(_))
    ));
    assert!(!store.has(&h1), "a damaged chunk is deduplicated against");
    // Another server opening the store knows it too.
    assert!(!open_on_same(store).has(&h1));

    // An image cache still has it: repaired, and every version reads.
    let r = verify_with_block_0_cached(store, 1);
    assert_eq!(r.repaired, vec![format::hex(&h1)], "{r:?}");
    assert!(r.is_clean(), "{r:?}");
    assert!(store.damaged_versions(VOL).unwrap().is_empty());
    assert_eq!(
        read_all(store, &v2.record),
        expected(size, &[(0, 1), (1, 3)].into())
    );
    assert_eq!(
        read_all(&open_on_same(store), &v1.record),
        expected(size, &[(0, 1), (1, 2)].into())
    );

    // Block 1's chunk of version 2 rots with no cache to help: the next
    // time the device sends that content, it is stored again.
    let h3 = format::sha256(&block_of(3, BLOCK as usize));
    corrupt(store, &h3);
    let r = store.verify(None, |_, _, _| None, |_, _| {}).unwrap();
    assert_eq!(
        r.damaged.get(&format::hex(&h3)),
        Some(&vec![format!("{VOL}@2")])
    );
    let v3 = publish(store, VOL, Some(&v2.record), size, &[(1, 3)].into(), 3).unwrap();
    assert_eq!(v3.packs, 1, "the damaged chunk was not stored again");
    let r = store.verify(None, |_, _, _| None, |_, _| {}).unwrap();
    assert!(r.is_clean(), "{r:?}");
    assert_eq!(
        read_all(store, &v2.record),
        expected(size, &[(0, 1), (1, 3)].into())
    );
}

/// A server running since before another's verify found a chunk damaged
/// learns it when it next publishes: it stores the chunk again rather
/// than name the damaged copy.
#[test]
fn damage_found_by_another_server_is_not_deduplicated_against() {
    let store = open_on(memory());
    publish(&store, VOL, None, BLOCK, &[(0, 1)].into(), 1).unwrap();
    let other = open_on_same(&store);
    let h1 = format::sha256(&block_of(1, BLOCK as usize));
    assert!(other.has(&h1));
    corrupt(&store, &h1);
    let r = store.verify(None, |_, _, _| None, |_, _| {}).unwrap();
    assert!(!r.is_clean(), "{r:?}");
    let mut p = other.publication("vol2", None, BLOCK).unwrap();
    assert!(
        !other.has(&h1),
        "a server running before verify dedups against damage"
    );
    p.put(0, Some(&block_of(1, BLOCK as usize)), h1).unwrap();
    let v = p.finish(1, None, "").unwrap();
    assert_eq!(v.packs, 1, "nothing was stored");
    assert_eq!(read_all(&other, &v.record), block_of(1, BLOCK as usize));
}

/// A read the store fails (out of reach, an error after its retries) is
/// not damage: wherever it strikes, the run stops or finishes, no good
/// chunk is marked, and the last run's records stand.
#[test]
fn a_store_failing_under_verify_marks_nothing_good_and_keeps_the_last_findings() {
    let faulty = Arc::new(Faulty::new(memory()));
    let store = open_on(faulty.clone());
    let size = 2 * BLOCK;
    publish(&store, VOL, None, size, &[(0, 1), (1, 2)].into(), 1).unwrap();
    let h1 = format::sha256(&block_of(1, BLOCK as usize));
    let h2 = format::sha256(&block_of(2, BLOCK as usize));
    corrupt(&store, &h1);
    let r = store.verify(None, |_, _, _| None, |_, _| {}).unwrap();
    assert!(r.damaged.contains_key(&format::hex(&h1)), "{r:?}");
    let mut stopped = 0;
    for k in 0.. {
        let before = faulty.count.load(Ordering::SeqCst);
        faulty.arm(k, false);
        let run = store.verify(None, |_, _, _| None, |_, _| {});
        let struck = faulty.count.load(Ordering::SeqCst) - before > k;
        faulty.fail_at.store(usize::MAX, Ordering::SeqCst);
        match run {
            Ok(r) => {
                // Retried past the fault, or not struck at all: the same
                // findings.
                assert_eq!(r.damaged.keys().collect::<Vec<_>>(), [&format::hex(&h1)]);
            }
            Err(e) => {
                stopped += 1;
                assert!(matches!(e, Error::Store(_)), "{e}");
            }
        }
        assert!(store.has(&h2), "a good chunk marked damaged (fault at {k})");
        assert!(open_on_same(&store).has(&h2), "fault at {k}");
        assert_eq!(
            store.damaged_versions(VOL).unwrap(),
            vec![1],
            "the last findings were lost (fault at {k})"
        );
        if !struck {
            break;
        }
    }
    assert!(stopped > 0, "no fault ever stopped a run");
    // A map segment gone from the store is damage, recorded, not a run
    // stopped.
    let head = store.head(VOL).unwrap().unwrap();
    let id = head.segment_ids().unwrap()[0];
    store
        .run(
            store
                .store
                .delete(&ObjPath::from(format::spread("maps", &id))),
        )
        .unwrap();
    let r = store.verify(None, |_, _, _| None, |_, _| {}).unwrap();
    assert!(r.damaged_segments.contains_key(&format::hex(&id)), "{r:?}");
}

/// A server whose index was built before another's verify repaired a
/// chunk (marked its copy damaged, stored it again) reads the repair, not
/// the damaged copy, without waiting for the next garbage collection.
#[test]
fn a_repair_by_another_server_s_verify_is_read_at_once() {
    let store = open_on(memory());
    let v1 = publish(&store, VOL, None, BLOCK, &[(0, 1)].into(), 1).unwrap();
    let stale = open_on_same(&store);
    let h1 = format::sha256(&block_of(1, BLOCK as usize));
    corrupt(&store, &h1);
    let r = verify_with_block_0_cached(&store, 1);
    assert_eq!(r.repaired, vec![format::hex(&h1)], "{r:?}");
    assert_eq!(read_all(&stale, &v1.record), block_of(1, BLOCK as usize));
}

#[test]
fn verify_finds_damage_and_repairs_it_in_memory() {
    verify_finds_damage_and_repairs_it(&open_on(memory()));
}

#[test]
fn verify_finds_damage_and_repairs_it_on_seaweedfs() {
    let weed = seaweed::Seaweed::start();
    verify_finds_damage_and_repairs_it(&Arc::new(open_weed(&weed, "verify").unwrap()));
}

/// Publish a 4 KiB write of `seed` at byte `at` of `image` on `base`, as
/// a server stores a catch-up's partial blocks.
fn publish_write(
    store: &ChunkStore,
    base: &VersionRecord,
    image: &mut [u8],
    at: u64,
    seed: u64,
    epoch: u64,
) -> Published {
    let mut p = store
        .publication(VOL, Some(base), image.len() as u64)
        .unwrap();
    let n = at / BLOCK;
    let start = (n * BLOCK) as usize;
    let end = (start + BLOCK as usize).min(image.len());
    let was = format::sha256(&image[start..end]);
    assert_eq!(p.base_digest(n).unwrap(), was);
    image[at as usize..at as usize + 4096].copy_from_slice(&block_of(seed, 4096));
    let block = &image[start..end];
    p.put_patched(
        n,
        block,
        format::sha256(block),
        was,
        &[((at - n * BLOCK) as u32, 4096)],
    )
    .unwrap();
    p.finish(epoch, None, "").unwrap()
}

/// Small writes are stored as patches on the chunk they change, read back
/// through chains no longer than [`format::MAX_CHAIN`]; a base only a
/// patch needs outlives every garbage collection; a base gone bad fails
/// its patches' reads (never wrong bytes), verify names them, and it is
/// not patched on again.
fn patches_are_small_and_keep_their_bases(store: &Arc<ChunkStore>) {
    let size = 3 * BLOCK;
    let v1 = publish(store, VOL, None, size, &[(0, 1), (1, 2)].into(), 1).unwrap();
    let mut image = expected(size, &[(0, 1), (1, 2)].into());
    let mut versions = vec![(v1.record.clone(), image.clone())];
    let mut head = v1.record;
    let mut wholes = 0;
    for (i, epoch) in (2..2 + 2 * format::MAX_CHAIN as u64).enumerate() {
        let at = BLOCK + (i as u64 % 16) * 4096;
        let v = publish_write(store, &head, &mut image, at, 100 + epoch, epoch);
        let digest = format::sha256(&image[BLOCK as usize..2 * BLOCK as usize]);
        let chain = store.index().chain(&digest).unwrap();
        assert!(chain <= format::MAX_CHAIN, "a chain of {chain}");
        if chain == 0 {
            wholes += 1;
            assert!(v.bytes > BLOCK / 2, "{v:?}");
        } else {
            assert!(v.bytes < 4096 + 256, "a patch of {} bytes", v.bytes);
        }
        assert_eq!(read_all(store, &v.record), image, "version {epoch}");
        versions.push((v.record.clone(), image.clone()));
        head = v.record;
    }
    // Every MAX_CHAIN + 1st write of the block stores it whole.
    assert_eq!(wholes, 1);
    assert!(store.usage().patches >= 2 * format::MAX_CHAIN as u64 - 1);
    for (record, content) in &versions {
        assert_eq!(&read_all(store, record), content, "version {}", record.seq);
    }

    // Block 0 changes twice: block 1's first patch after the whole copy is
    // then needed only as the base of what the newest two versions hold.
    let mut seq = head.seq;
    for seed in [7, 8] {
        seq += 1;
        let v = publish(store, VOL, Some(&head), size, &[(0, seed)].into(), seq).unwrap();
        image[..BLOCK as usize].copy_from_slice(&block_of(seed, BLOCK as usize));
        head = v.record;
    }
    let a = publish_write(store, &head, &mut image, BLOCK, 99, seq + 1);
    head = a.record;
    let v = publish(store, VOL, Some(&head), size, &[(0, 9)].into(), seq + 2).unwrap();
    image[..BLOCK as usize].copy_from_slice(&block_of(9, BLOCK as usize));
    head = v.record;
    for _ in 0..2 {
        store.gc(Duration::ZERO, |_| {}).unwrap();
    }
    assert_eq!(store.versions(VOL).unwrap().len(), 2);
    assert_eq!(read_all(store, &head), image);
    assert_eq!(read_all(&open_on_same(store), &head), image);

    // The whole copy under block 1's chain rots: the newest versions'
    // block 1 fails its reads and verify names it; the next write of it
    // is not patched on the bad chain.
    let block1 = |img: &[u8]| format::sha256(&img[BLOCK as usize..2 * BLOCK as usize]);
    let mut at = block1(&image);
    while let Some(Loc {
        entry: Entry {
            codec: format::Codec::Patch { base },
            ..
        },
        ..
    }) = store.index().usable(&at)
    {
        at = base;
    }
    corrupt(store, &at);
    let r = store.verify(None, |_, _, _| None, |_, _| {}).unwrap();
    assert!(
        r.damaged.contains_key(&format::hex(&block1(&image))),
        "{r:?}"
    );
    // (Another server: this one's cache holds the block, checked.)
    let reader = open_on_same(store).reader(&head).unwrap();
    let mut buf = vec![0u8; size as usize];
    assert!(matches!(
        reader.read_at(&mut buf, 0),
        Err(Error::Corrupt(_))
    ));
    let before = image.clone();
    let v = publish_write(store, &head, &mut image, BLOCK + 8192, 123, seq + 3);
    assert!(v.bytes > BLOCK / 2, "patched on a damaged base: {v:?}");
    assert_eq!(read_all(store, &v.record), image);
    assert_eq!(read_all(&open_on_same(store), &v.record), image);
    // The damage stays with the versions that hold it, not the new one.
    let r = store.verify(None, |_, _, _| None, |_, _| {}).unwrap();
    let old = format::hex(&block1(&before));
    assert_eq!(
        r.damaged.get(&old),
        Some(&vec![
            format!("{VOL}@{}", seq + 1),
            format!("{VOL}@{}", seq + 2)
        ]),
        "{r:?}"
    );
    assert_eq!(r.damaged.len(), 1, "{r:?}");
}

#[test]
fn patches_are_small_and_keep_their_bases_in_memory() {
    patches_are_small_and_keep_their_bases(&open_on(memory()));
}

#[test]
fn patches_are_small_and_keep_their_bases_on_seaweedfs() {
    let weed = seaweed::Seaweed::start();
    patches_are_small_and_keep_their_bases(&Arc::new(open_weed(&weed, "patch").unwrap()));
}

#[test]
fn chunks_read_lately_come_from_the_bounded_cache() {
    let store = open_on(memory());
    let size = 4 * BLOCK;
    let model: Model = [(0, 1), (1, 2), (2, 3), (3, 4)].into();
    let v = publish(&store, VOL, None, size, &model, 1).unwrap();
    // Room for two chunks: reading all four keeps the last two.
    store.cache.lock().unwrap().cap = 2 * BLOCK as usize;
    assert_eq!(read_all(&store, &v.record), expected(size, &model));
    assert_eq!(store.cache.lock().unwrap().map.len(), 2);
    // Small reads of one block fetch it once: with its pack gone, a
    // cached block still reads, an evicted one does not.
    let packs: Vec<ObjPath> = store.run(store.list("packs")).unwrap();
    for p in &packs {
        store.run(store.store.delete(p)).unwrap();
    }
    let reader = store.reader(&v.record).unwrap();
    let mut small = vec![0u8; 4096];
    reader.read_at(&mut small, 3 * BLOCK + 8192).unwrap();
    assert_eq!(small, block_of(4, BLOCK as usize)[8192..8192 + 4096]);
    assert!(reader.read_at(&mut small, 0).is_err());
}

#[test]
fn a_client_is_told_only_of_chunks_its_own_volumes_reference() {
    let store = open_on(memory());
    let size = 8 * BLOCK;
    // The laptop's two volumes, the desktop's one; one chunk they share.
    let laptop: Model = [(0, 1), (1, 2), (2, 0)].into();
    publish(&store, "laptop/root", None, size, &laptop, 1).unwrap();
    let v1 = store.head("laptop/root").unwrap().unwrap();
    publish(&store, "laptop/root", Some(&v1), size, &[(1, 3)].into(), 2).unwrap();
    publish(&store, "laptop/data", None, size, &[(5, 4)].into(), 1).unwrap();
    publish(
        &store,
        "desktop/root",
        None,
        size,
        &[(0, 1), (3, 5)].into(),
        1,
    )
    .unwrap();
    let d = |seed| format::sha256(&block_of(seed, BLOCK as usize));
    let refs = refs::Refs::new();
    // Every version of every volume of the laptop counts (seed 2 is only
    // in its older version); the desktop's own chunk (5) does not, nor a
    // chunk nobody stored (6), nor the hole.
    assert_eq!(
        refs.known(
            &store,
            "laptop",
            &[d(1), d(2), d(3), d(4), d(5), d(6), HOLE]
        )
        .unwrap(),
        [true, true, true, true, false, false, false]
    );
    assert_eq!(
        refs.known(&store, "desktop", &[d(1), d(2), d(5)]).unwrap(),
        [true, false, true]
    );
    // A held set grows with what the client publishes; one not held is
    // read from the store when next asked.
    let base = store.head("laptop/data").unwrap().unwrap();
    publish(
        &store,
        "laptop/data",
        Some(&base),
        size,
        &[(6, 5)].into(),
        2,
    )
    .unwrap();
    assert_eq!(refs.known(&store, "laptop", &[d(5)]).unwrap(), [false]);
    refs.add("laptop", [d(5)]);
    assert_eq!(refs.known(&store, "laptop", &[d(5)]).unwrap(), [true]);
    let fresh = refs::Refs::new();
    assert_eq!(fresh.known(&store, "laptop", &[d(5)]).unwrap(), [true]);
    refs.add("nobody", [d(1)]);
    assert_eq!(refs.held(), 2);
    // A client with no volumes knows nothing.
    assert_eq!(refs.known(&store, "nobody", &[d(1)]).unwrap(), [false]);
}
