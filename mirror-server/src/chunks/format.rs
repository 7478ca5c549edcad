//! The chunk store's object formats, sans I/O: packs, their indexes, map
//! segments and version records. Every format starts with a magic and a
//! version byte; a reader refuses versions it does not know.
//!
//! # Pack (`packs/AA/ID`, formats 1 and 2)
//!
//! ```text
//! "UMPK" ver [0;3]
//! chunk bytes, back to back (each raw, zstd or a zstd patch, as its entry says)
//! trailer: N entries of 49 bytes (format 1) or 81 bytes (format 2):
//!     sha256 of the raw chunk [32] | offset in the pack u64 LE |
//!     stored length u32 LE | raw length u32 LE |
//!     codec u8 (0 raw, 1 zstd, 2 patch: format 2 only) |
//!     format 2: the base's sha256 [32] (a patch's; zeroes otherwise)
//! N u32 LE | sha256(trailer) [32] | "KPMU"
//! ```
//!
//! `ID` is 32 random bytes (hex), new for every pack written: a pack
//! never takes the name of another, so garbage collection can condemn and
//! later delete a pack while a chunk of it is stored again elsewhere. The
//! trailer makes a pack self-describing: a lost index is rebuilt from the
//! header, the last 40 bytes and one ranged read. A pack with no patch is
//! written in format 1, which servers before patches read too.
//!
//! ## Patches (codec 2)
//!
//! A chunk is still named by the sha256 of its whole raw bytes, but may be
//! stored as the bytes that differ from another chunk, its *base*: the
//! zstd of
//!
//! ```text
//! count u32 LE | count × (offset u32 LE, length u32 LE) | the bytes, back to back
//! ```
//!
//! (ranges in order, not overlapping, inside the raw length). Reading one
//! reads its base (itself maybe a patch: a chain is at most
//! [`MAX_CHAIN`] patches long), writes the ranges over it, and checks the
//! sha256 of the result against the name, as for any chunk. A 4 KiB write
//! into a 64 KiB block so costs the store 4 KiB, not a new 64 KiB chunk.
//! What keeps a base: garbage collection marks the base of every live
//! patch live (see [`super::gc`]), and a publication patches only on a
//! base it could deduplicate against (in a pack not condemned, not
//! damaged), so the condemn-then-delete argument covers bases as it
//! covers chunks deduplicated against.
//!
//! # Pack index (`idx/AA/ID`, formats 1 and 2)
//!
//! ```text
//! "UMIX" ver [0;3] | the pack's trailer | N u32 LE | sha256(trailer) [32] | "XIMU"
//! ```
//!
//! Written after its pack, in its pack's format; the store's chunk index is
//! the union of them.
//!
//! # Map segment (`maps/AA/ID`, format 1)
//!
//! ```text
//! "UMSG" ver=1 salt [3] | count u32 LE | count × sha256 [32]
//! ```
//!
//! The digests of [`SEGMENT_BLOCKS`] consecutive blocks of a volume (the
//! last segment may be shorter); all zero bytes mean a hole (a block of
//! zeroes, never stored). `ID` is the sha256 of the encoded segment, so
//! segments are shared between versions and volumes like chunks. The salt
//! is zero, except when the zero-salt segment is condemned by garbage
//! collection: then a random salt gives the same digests another name.
//!
//! # Version record (`vol/CLIENT/VOLUME/v/SEQ`, format 1, JSON)
//!
//! [`VersionRecord`]: the volume's size, the epoch it holds, who wrote it,
//! and the list of its segments. `SEQ` is 20 decimal digits, so names sort
//! as numbers. Records are created with a create-only put (If-None-Match),
//! which is the publication: see the crash argument in [`super`].

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use ublk_mirror_common::block;
use ublk_mirror_common::proto::Digest;

use crate::error::{Error, Result};

/// Blocks per map segment: 4096 × 64 KiB = 256 MiB of volume, 128 KiB of
/// digests.
pub const SEGMENT_BLOCKS: usize = 4096;

/// The digest that marks a hole in a segment.
pub const HOLE: Digest = [0; 32];

const PACK_MAGIC: &[u8; 4] = b"UMPK";
const PACK_END: &[u8; 4] = b"KPMU";
const INDEX_MAGIC: &[u8; 4] = b"UMIX";
const INDEX_END: &[u8; 4] = b"XIMU";
const SEGMENT_MAGIC: &[u8; 4] = b"UMSG";
const FORMAT: u8 = 1;
/// The pack and index format of a pack holding a patch.
const PATCH_FORMAT: u8 = 2;
const HEADER: usize = 8;
/// A trailer entry of format 1.
const ENTRY: usize = 49;
/// A trailer entry of format 2 (the base's digest after it).
const ENTRY_2: usize = ENTRY + 32;
/// The longest chain of patches a chunk is read through.
pub const MAX_CHAIN: usize = 4;
/// Ranges a patch holds at most.
pub const MAX_RANGES: usize = 256;
/// What follows the trailer: count, its digest, the end magic.
pub const FOOTER: usize = 4 + 32 + 4;

/// How a chunk is stored in its pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// As it is.
    Raw,
    /// zstd.
    Zstd,
    /// The zstd of the ranges that differ from the chunk `base` (see
    /// the module docs).
    Patch {
        /// The sha256 of the chunk the ranges are written over.
        base: Digest,
    },
}

/// One chunk of a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// sha256 of the raw chunk: its name.
    pub hash: Digest,
    /// Where its stored bytes start in the pack.
    pub offset: u64,
    /// How many bytes it takes in the pack.
    pub stored: u32,
    /// Its length once decoded.
    pub raw: u32,
    /// How it is stored.
    pub codec: Codec,
}

/// sha256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> Digest {
    Sha256::digest(bytes).into()
}

/// Lowercase hex of a digest.
pub fn hex(d: &Digest) -> String {
    ublk_mirror_common::hex::encode(d)
}

/// `DIR/AA/HEX`: content-named objects spread over 256 prefixes.
pub fn spread(dir: &str, d: &Digest) -> String {
    let h = hex(d);
    format!("{dir}/{}/{h}", &h[..2])
}

/// A chunk's bytes as a client sent them, checked to be the chunk (see
/// [`PackBuilder::add_sent`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sent {
    /// A zstd frame of the chunk's `raw` bytes.
    Zstd { frame: Vec<u8>, raw: u32 },
    /// The chunk itself: the client found it does not compress.
    Raw(Vec<u8>),
}

impl Sent {
    /// The chunk's length.
    pub fn raw_len(&self) -> u32 {
        match self {
            Sent::Zstd { raw, .. } => *raw,
            Sent::Raw(b) => b.len() as u32,
        }
    }
}

/// A chunk waiting in a [`PackBuilder`].
#[derive(Debug)]
enum Body {
    Whole(Vec<u8>),
    /// A chunk as the client sent it, stored as it is.
    Sent(Sent),
    /// A patch's ranges (encoded, not compressed yet) on `base`, of a
    /// chunk of `raw` bytes.
    Patch {
        base: Digest,
        ranges: Vec<u8>,
        raw: u32,
    },
}

/// A pack being filled: its chunks are kept as they come and compressed
/// by [`PackBuilder::finish`], so that a publication fills the next pack
/// while earlier ones are compressed on other cores.
#[derive(Debug)]
pub struct PackBuilder {
    chunks: Vec<(Digest, Body)>,
    raw: usize,
    level: i32,
}

impl PackBuilder {
    /// An empty pack; chunks compressed with zstd at `level`.
    pub fn new(level: i32) -> PackBuilder {
        PackBuilder {
            chunks: Vec::new(),
            raw: 0,
            level,
        }
    }

    /// Add a chunk whose sha256 is `hash` (checked by the caller).
    pub fn add(&mut self, hash: Digest, raw: &[u8]) {
        self.raw += raw.len();
        self.chunks.push((hash, Body::Whole(raw.to_vec())));
    }

    /// Add the chunk whose sha256 is `hash` as the client sent it
    /// (checked by the caller), stored as it is: not compressed again
    /// (zstd), or not tried (raw: the client's zstd did not shrink it).
    pub fn add_sent(&mut self, hash: Digest, sent: Sent) {
        self.raw += sent.raw_len() as usize;
        self.chunks.push((hash, Body::Sent(sent)));
    }

    /// Add the chunk `hash` (checked by the caller) as a patch: `chunk`'s
    /// bytes in `ranges` (in order, not overlapping) written over the
    /// chunk `base`, which is as long as `chunk`.
    pub fn add_patch(&mut self, hash: Digest, base: Digest, chunk: &[u8], ranges: &[(u32, u32)]) {
        let ranges = encode_patch(chunk, ranges);
        self.raw += ranges.len();
        self.chunks.push((
            hash,
            Body::Patch {
                base,
                ranges,
                raw: chunk.len() as u32,
            },
        ));
    }

    /// Bytes of the chunks so far, before compression.
    pub fn len(&self) -> usize {
        self.raw
    }

    /// No chunk yet.
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Compress the chunks (each with zstd at the builder's level, or kept
    /// raw where that does not shrink it): the pack's bytes, its index
    /// object's bytes and its entries.
    pub fn finish(self) -> (Vec<u8>, Vec<u8>, Vec<Entry>) {
        let format = if self
            .chunks
            .iter()
            .any(|(_, b)| matches!(b, Body::Patch { .. }))
        {
            PATCH_FORMAT
        } else {
            FORMAT
        };
        let mut bytes = Vec::with_capacity(HEADER + self.raw / 2);
        bytes.extend_from_slice(PACK_MAGIC);
        bytes.extend_from_slice(&[format, 0, 0, 0]);
        let mut entries = Vec::with_capacity(self.chunks.len());
        for (hash, body) in self.chunks {
            let offset = bytes.len() as u64;
            let (codec, stored, raw) = match body {
                Body::Whole(raw) => match block::compress(&raw, self.level).ok() {
                    Some(c) if c.len() < raw.len() => {
                        bytes.extend_from_slice(&c);
                        (Codec::Zstd, c.len(), raw.len())
                    }
                    _ => {
                        bytes.extend_from_slice(&raw);
                        (Codec::Raw, raw.len(), raw.len())
                    }
                },
                Body::Sent(Sent::Zstd { frame, raw }) => {
                    bytes.extend_from_slice(&frame);
                    (Codec::Zstd, frame.len(), raw as usize)
                }
                Body::Sent(Sent::Raw(raw)) => {
                    bytes.extend_from_slice(&raw);
                    (Codec::Raw, raw.len(), raw.len())
                }
                Body::Patch { base, ranges, raw } => {
                    let c =
                        block::compress(&ranges, self.level).expect("zstd compresses into memory");
                    bytes.extend_from_slice(&c);
                    (Codec::Patch { base }, c.len(), raw as usize)
                }
            };
            entries.push(Entry {
                hash,
                offset,
                stored: stored as u32,
                raw: raw as u32,
                codec,
            });
        }
        let trailer = encode_trailer(&entries, format);
        bytes.extend_from_slice(&trailer);
        footer(&mut bytes, &trailer, entries.len(), PACK_END);
        let mut index = Vec::with_capacity(HEADER + trailer.len() + FOOTER);
        index.extend_from_slice(INDEX_MAGIC);
        index.extend_from_slice(&[format, 0, 0, 0]);
        index.extend_from_slice(&trailer);
        footer(&mut index, &trailer, entries.len(), INDEX_END);
        (bytes, index, entries)
    }
}

/// Whether a chunk of `len` bytes changed in `ranges` (offset, length) is
/// worth a patch: a quarter of it or less, in at most [`MAX_RANGES`].
pub fn patchable(len: usize, ranges: &[(u32, u32)]) -> bool {
    let changed: usize = ranges.iter().map(|r| r.1 as usize).sum();
    !ranges.is_empty() && ranges.len() <= MAX_RANGES && changed <= len / 4
}

/// A patch's ranges, uncompressed (see the module docs).
fn encode_patch(chunk: &[u8], ranges: &[(u32, u32)]) -> Vec<u8> {
    let len: usize = ranges.iter().map(|r| r.1 as usize).sum();
    let mut out = Vec::with_capacity(4 + 8 * ranges.len() + len);
    out.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
    for &(at, n) in ranges {
        out.extend_from_slice(&at.to_le_bytes());
        out.extend_from_slice(&n.to_le_bytes());
    }
    for &(at, n) in ranges {
        out.extend_from_slice(&chunk[at as usize..(at + n) as usize]);
    }
    out
}

/// Write a patch's ranges over `base` (a copy of the base chunk, as long
/// as the chunk): `Err` says what is wrong with them.
fn apply_patch(body: &[u8], base: &mut [u8]) -> std::result::Result<(), &'static str> {
    let n = body
        .get(..4)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
        .ok_or("no range count")?;
    if n > MAX_RANGES {
        return Err("too many ranges");
    }
    let heads = body.get(4..4 + 8 * n).ok_or("its ranges are cut short")?;
    let mut data = &body[4 + 8 * n..];
    let mut end = 0usize;
    for h in heads.chunks_exact(8) {
        let at = u32::from_le_bytes(h[..4].try_into().expect("4 bytes")) as usize;
        let len = u32::from_le_bytes(h[4..].try_into().expect("4 bytes")) as usize;
        if at < end || at + len > base.len() || len > data.len() {
            return Err("a range is out of order or out of bounds");
        }
        base[at..at + len].copy_from_slice(&data[..len]);
        data = &data[len..];
        end = at + len;
    }
    if !data.is_empty() {
        return Err("bytes follow the last range");
    }
    Ok(())
}

fn encode_trailer(entries: &[Entry], format: u8) -> Vec<u8> {
    let size = if format == FORMAT { ENTRY } else { ENTRY_2 };
    let mut t = Vec::with_capacity(entries.len() * size);
    for e in entries {
        t.extend_from_slice(&e.hash);
        t.extend_from_slice(&e.offset.to_le_bytes());
        t.extend_from_slice(&e.stored.to_le_bytes());
        t.extend_from_slice(&e.raw.to_le_bytes());
        t.push(match e.codec {
            Codec::Raw => 0,
            Codec::Zstd => 1,
            Codec::Patch { .. } => 2,
        });
        if format == PATCH_FORMAT {
            t.extend_from_slice(match &e.codec {
                Codec::Patch { base } => base,
                _ => &HOLE,
            });
        }
    }
    t
}

fn footer(out: &mut Vec<u8>, trailer: &[u8], n: usize, end: &[u8; 4]) {
    out.extend_from_slice(&(n as u32).to_le_bytes());
    out.extend_from_slice(&sha256(trailer));
    out.extend_from_slice(end);
}

/// The size of a trailer entry of pack or index format `format`.
fn entry_size(format: u8, what: &str) -> Result<usize> {
    match format {
        FORMAT => Ok(ENTRY),
        PATCH_FORMAT => Ok(ENTRY_2),
        f => Err(Error::Corrupt(format!(
            "{what}: pack format {f} is not supported (this server reads {FORMAT} and {PATCH_FORMAT})"
        ))),
    }
}

fn decode_trailer(
    trailer: &[u8],
    footer: &[u8],
    end: &[u8; 4],
    format: u8,
    what: &str,
) -> Result<Vec<Entry>> {
    let bad = |why: &str| Error::Corrupt(format!("{what}: {why}"));
    let size = entry_size(format, what)?;
    if footer.len() != FOOTER || &footer[36..] != end {
        return Err(bad("no end marker"));
    }
    let n = u32::from_le_bytes(footer[..4].try_into().expect("4 bytes")) as usize;
    if trailer.len() != n * size {
        return Err(bad("the trailer's length does not match its count"));
    }
    if sha256(trailer)[..] != footer[4..36] {
        return Err(bad("the trailer fails its checksum"));
    }
    trailer
        .chunks_exact(size)
        .map(|e| {
            Ok(Entry {
                hash: e[..32].try_into().expect("32 bytes"),
                offset: u64::from_le_bytes(e[32..40].try_into().expect("8 bytes")),
                stored: u32::from_le_bytes(e[40..44].try_into().expect("4 bytes")),
                raw: u32::from_le_bytes(e[44..48].try_into().expect("4 bytes")),
                codec: match e[48] {
                    0 => Codec::Raw,
                    1 => Codec::Zstd,
                    2 if format == PATCH_FORMAT => Codec::Patch {
                        base: e[49..81].try_into().expect("32 bytes"),
                    },
                    c => return Err(bad(&format!("unknown codec {c}"))),
                },
            })
        })
        .collect()
}

/// The entries of an index object.
pub fn decode_index(bytes: &[u8], what: &str) -> Result<Vec<Entry>> {
    if bytes.len() < HEADER + FOOTER || &bytes[..4] != INDEX_MAGIC {
        return Err(Error::Corrupt(format!("{what}: not a pack index")));
    }
    let (trailer, footer) = bytes[HEADER..].split_at(bytes.len() - HEADER - FOOTER);
    decode_trailer(trailer, footer, INDEX_END, bytes[4], what)
}

/// How many trailer bytes a pack announces, from its first 8
/// bytes and its last [`FOOTER`] bytes.
pub fn pack_trailer_len(header: &[u8], footer: &[u8], what: &str) -> Result<usize> {
    if header.len() < HEADER
        || &header[..4] != PACK_MAGIC
        || footer.len() != FOOTER
        || &footer[36..] != PACK_END
    {
        return Err(Error::Corrupt(format!("{what}: not a pack")));
    }
    let n = u32::from_le_bytes(footer[..4].try_into().expect("4 bytes")) as usize;
    Ok(n * entry_size(header[4], what)?)
}

/// The entries of a pack, from its header, trailer and footer (rebuilding
/// a lost index).
pub fn decode_pack_trailer(
    header: &[u8],
    trailer: &[u8],
    footer: &[u8],
    what: &str,
) -> Result<Vec<Entry>> {
    if header.len() < HEADER || &header[..4] != PACK_MAGIC {
        return Err(Error::Corrupt(format!("{what}: not a pack")));
    }
    decode_trailer(trailer, footer, PACK_END, header[4], what)
}

/// A chunk's raw bytes from its stored bytes, checked against its name.
/// A patch ([`Codec::Patch`]) needs its base's raw bytes: `base`.
pub fn decode_chunk(entry: &Entry, stored: &[u8], base: Option<&[u8]>) -> Result<Vec<u8>> {
    let damaged = |why: String| Error::Corrupt(format!("chunk {}: {why}", hex(&entry.hash)));
    let raw = match entry.codec {
        Codec::Raw => stored.to_vec(),
        Codec::Zstd => block::decompress(stored, entry.raw as usize)
            .map_err(|e| damaged(format!("does not decompress: {e}")))?,
        Codec::Patch { base: name } => {
            let Some(base) = base else {
                return Err(damaged(format!(
                    "a patch read without its base {}",
                    hex(&name)
                )));
            };
            if base.len() != entry.raw as usize {
                return Err(damaged(format!(
                    "its base {} is {} bytes, not {}",
                    hex(&name),
                    base.len(),
                    entry.raw
                )));
            }
            let cap = 4 + 8 * MAX_RANGES + entry.raw as usize;
            let body = block::decompress(stored, cap)
                .map_err(|e| damaged(format!("does not decompress: {e}")))?;
            let mut raw = base.to_vec();
            apply_patch(&body, &mut raw).map_err(|why| damaged(format!("a bad patch: {why}")))?;
            raw
        }
    };
    if raw.len() != entry.raw as usize || sha256(&raw) != entry.hash {
        return Err(damaged("its content does not match its sha256".into()));
    }
    Ok(raw)
}

/// A map segment's bytes (`salt`: see the module docs; normally 0).
pub fn encode_segment(digests: &[Digest], salt: [u8; 3]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + 4 + digests.len() * 32);
    out.extend_from_slice(SEGMENT_MAGIC);
    out.extend_from_slice(&[FORMAT, salt[0], salt[1], salt[2]]);
    out.extend_from_slice(&(digests.len() as u32).to_le_bytes());
    for d in digests {
        out.extend_from_slice(d);
    }
    out
}

/// A map segment from its bytes, checked against its name `id`.
pub fn decode_segment(bytes: &[u8], id: &Digest) -> Result<Vec<Digest>> {
    let what = format!("map segment {}", hex(id));
    if sha256(bytes) != *id {
        return Err(Error::Corrupt(format!(
            "{what}: its content does not match its sha256"
        )));
    }
    if bytes.len() < HEADER + 4 || &bytes[..4] != SEGMENT_MAGIC || bytes[4] != FORMAT {
        return Err(Error::Corrupt(format!(
            "{what}: not a map segment of format {FORMAT}"
        )));
    }
    let n = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize;
    let body = &bytes[12..];
    if body.len() != n * 32 || n > SEGMENT_BLOCKS {
        return Err(Error::Corrupt(format!("{what}: wrong length")));
    }
    Ok(body
        .chunks_exact(32)
        .map(|d| d.try_into().expect("32 bytes"))
        .collect())
}

/// The device and its epoch a version holds (as in the staging's marker).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriterRecord {
    /// The device (hex).
    #[serde(with = "hex16")]
    pub device: [u8; 16],
    /// Its own epoch number.
    pub epoch: u64,
}

/// A version of a volume: what `vol/CLIENT/VOLUME/v/SEQ` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRecord {
    /// Format of this record (1).
    pub format: u32,
    /// Its place in the volume's chain (1, 2, …).
    pub seq: u64,
    /// The volume's size in bytes.
    pub size: u64,
    /// The server-side epoch number it holds (as in `state.json`).
    pub epoch: u64,
    /// The device epoch it holds, if a device wrote it (none: imported).
    pub writer: Option<WriterRecord>,
    /// When it was published, ms since the Unix epoch.
    pub created_ms: u64,
    /// Which server published it (host name and process id).
    pub server: String,
    /// Random, per publication: tells our own record from another's when a
    /// create-only put's answer was lost and it was retried.
    pub nonce: String,
    /// The map: one segment id (hex) per [`SEGMENT_BLOCKS`] blocks.
    pub segments: Vec<String>,
    /// The volume's uuid (hex, as in its `state.json`): the same volume on
    /// whichever server, so that its clients trust a rebuilt image.
    #[serde(default)]
    pub uuid: String,
}

/// The format a version record is written in.
pub const VERSION_FORMAT: u32 = 1;

impl VersionRecord {
    /// The segment ids as digests.
    pub fn segment_ids(&self) -> Result<Vec<Digest>> {
        self.segments
            .iter()
            .map(|s| {
                ublk_mirror_common::hex::decode::<32>(s).ok_or_else(|| {
                    Error::Corrupt(format!("version {}: bad segment id {s:?}", self.seq))
                })
            })
            .collect()
    }
}

mod hex16 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8; 16], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&ublk_mirror_common::hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 16], D::Error> {
        let text = String::deserialize(d)?;
        ublk_mirror_common::hex::decode::<16>(&text)
            .ok_or_else(|| serde::de::Error::custom("expected 32 hex digits"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pack_round_trips_and_its_index_matches_its_trailer() {
        let mut b = PackBuilder::new(1);
        let zeroish = vec![7u8; 65536];
        let noise = noise(88172645463325252, 4096);
        b.add(sha256(&zeroish), &zeroish);
        b.add(sha256(&noise), &noise);
        let (pack, index, entries) = b.finish();
        assert_eq!(entries[0].codec, Codec::Zstd);
        assert_eq!(entries[1].codec, Codec::Raw);
        assert_eq!(decode_index(&index, "t").unwrap(), entries);
        let footer = &pack[pack.len() - FOOTER..];
        let tl = pack_trailer_len(&pack[..HEADER], footer, "t").unwrap();
        let trailer = &pack[pack.len() - FOOTER - tl..pack.len() - FOOTER];
        assert_eq!(
            decode_pack_trailer(&pack[..HEADER], trailer, footer, "t").unwrap(),
            entries
        );
        for (e, want) in entries.iter().zip([&zeroish, &noise]) {
            let stored = &pack[e.offset as usize..e.offset as usize + e.stored as usize];
            assert_eq!(&decode_chunk(e, stored, None).unwrap(), want);
        }
        // No patch in it: format 1, as servers before patches wrote.
        assert_eq!(pack[4], FORMAT);
        assert_eq!(index[4], FORMAT);
    }

    fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn a_patch_is_stored_small_and_reads_back_over_its_base_only() {
        let base = noise(3, 65536);
        let mut chunk = base.clone();
        chunk[4096..8192].copy_from_slice(&noise(4, 4096));
        chunk[65000..65536].copy_from_slice(&noise(5, 536));
        let ranges = [(4096, 4096), (65000, 536)];
        let mut b = PackBuilder::new(1);
        b.add(sha256(&base), &base);
        b.add_patch(sha256(&chunk), sha256(&base), &chunk, &ranges);
        let (pack, index, entries) = b.finish();
        assert_eq!(pack[4], PATCH_FORMAT);
        assert_eq!(decode_index(&index, "t").unwrap(), entries);
        let footer = &pack[pack.len() - FOOTER..];
        let tl = pack_trailer_len(&pack[..HEADER], footer, "t").unwrap();
        assert_eq!(tl, 2 * ENTRY_2);
        let trailer = &pack[pack.len() - FOOTER - tl..pack.len() - FOOTER];
        assert_eq!(
            decode_pack_trailer(&pack[..HEADER], trailer, footer, "t").unwrap(),
            entries
        );
        let e = entries[1];
        assert_eq!(
            e.codec,
            Codec::Patch {
                base: sha256(&base)
            }
        );
        assert_eq!(e.raw, 65536);
        assert!(e.stored < 4096 + 536 + 100, "{}", e.stored);
        let stored = &pack[e.offset as usize..e.offset as usize + e.stored as usize];
        assert_eq!(decode_chunk(&e, stored, Some(&base)).unwrap(), chunk);
        // Without its base, or over another, it is damage, never wrong bytes.
        assert!(matches!(
            decode_chunk(&e, stored, None),
            Err(Error::Corrupt(_))
        ));
        assert!(matches!(
            decode_chunk(&e, stored, Some(&noise(6, 65536))),
            Err(Error::Corrupt(_))
        ));
        assert!(decode_chunk(&e, stored, Some(&base[..4096])).is_err());
        // Ranges out of order or past the end are refused.
        for bad in [
            encode_patch(&chunk, &[(8000, 10), (4096, 10)]),
            encode_patch(&chunk, &[(65530, 6)])[..10].to_vec(),
            [encode_patch(&chunk, &[(0, 4)]), vec![1]].concat(),
        ] {
            assert!(apply_patch(&bad, &mut base.clone()).is_err());
        }
        let mut over = base.clone();
        let body = encode_patch(&chunk, &ranges);
        apply_patch(&body, &mut over).unwrap();
        assert_eq!(over, chunk);
        let mut past = body.clone();
        past[4..8].copy_from_slice(&65535u32.to_le_bytes());
        assert!(apply_patch(&past, &mut base.clone()).is_err());
    }

    #[test]
    fn damage_is_found_not_served() {
        let mut b = PackBuilder::new(1);
        let data = vec![1u8; 1000];
        b.add(sha256(&data), &data);
        let (mut pack, mut index, entries) = b.finish();
        let clean = index.clone();
        let e = entries[0];
        let mut stored =
            pack[e.offset as usize..(e.offset + u64::from(e.stored)) as usize].to_vec();
        stored[0] ^= 1;
        assert!(matches!(
            decode_chunk(&e, &stored, None),
            Err(Error::Corrupt(_))
        ));
        let last = index.len() - FOOTER - 1;
        index[last] ^= 1;
        assert!(decode_index(&index, "t").is_err());
        let n = pack.len();
        pack[n - 1] = b'X';
        assert!(pack_trailer_len(&pack[..HEADER], &pack[n - FOOTER..], "t").is_err());
        // A format this server does not know is refused, not misread.
        let mut future = clean;
        future[4] = 9;
        assert!(decode_index(&future, "t").is_err());
    }

    #[test]
    fn a_segment_is_checked_against_its_name() {
        let digests = vec![HOLE, [5; 32], [9; 32]];
        let bytes = encode_segment(&digests, [0; 3]);
        let id = sha256(&bytes);
        let salted = encode_segment(&digests, [1, 2, 3]);
        assert_ne!(sha256(&salted), id);
        assert_eq!(decode_segment(&salted, &sha256(&salted)).unwrap(), digests);
        assert_eq!(decode_segment(&bytes, &id).unwrap(), digests);
        let mut bad = bytes.clone();
        bad[20] ^= 1;
        assert!(decode_segment(&bad, &id).is_err());
        assert!(decode_segment(&bytes, &[0; 32]).is_err());
    }

    #[test]
    fn a_version_record_reads_back() {
        let r = VersionRecord {
            format: VERSION_FORMAT,
            seq: 3,
            size: 1 << 30,
            epoch: 7,
            writer: Some(WriterRecord {
                device: [0xab; 16],
                epoch: 9,
            }),
            created_ms: 1,
            server: "h/1".into(),
            nonce: "00".into(),
            segments: vec![hex(&[1; 32])],
            uuid: "ab".repeat(16),
        };
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains("\"device\":\"abababab"), "{json}");
        let back: VersionRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.segment_ids().unwrap(), vec![[1; 32]]);
    }
}
