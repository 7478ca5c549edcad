//! The block codec: how a piece of a volume is named, packed and checked,
//! the same way on the device, in a restore and on the server.
//!
//! - A volume travels in blocks of at most [`BLOCK`] bytes, aligned to
//!   [`BLOCK`] ([`split`]): the unit the device hashes and compresses, the
//!   server verifies and stages, and a restore compares.
//! - A block is named by the SHA-256 of its decoded bytes ([`digest`]);
//!   a block of zeroes has the digest of that many zeroes
//!   ([`zero_digest`], computed once for the common length).
//! - On the wire ([`encode`]) a zero block is a hole (a header, no data);
//!   others are zstd-compressed when that makes them smaller, raw when not.
//! - [`decode`] undoes that and checks the length and the digest: bytes
//!   that do not match their name are never written anywhere.
//!
//! Nothing here does I/O; the wire framing is [`crate::proto`]'s.

use std::borrow::Cow;

use sha2::{Digest as _, Sha256};

use crate::proto::{Digest, Encoding, Message, MAX_BLOCK};
use crate::RangeSet;

/// Bytes per block a volume travels in (hashed and compressed as one).
pub const BLOCK: u64 = 64 << 10;

/// Whether every byte of `data` is zero. Looked at 64 bytes at a time
/// (OR-ed together, which the compiler vectorizes): some 20 times faster
/// than byte by byte on a block of zeroes, which is read to its end.
pub fn is_zero(data: &[u8]) -> bool {
    let mut wide = data.chunks_exact(64);
    wide.all(|c| c.iter().fold(0, |acc, &b| acc | b) == 0)
        && wide.remainder().iter().all(|&b| b == 0)
}

/// The name of a block's content: the SHA-256 of `data` (computed once
/// for the all-zero blocks of the common length).
pub fn digest(data: &[u8]) -> Digest {
    if is_zero(data) {
        zero_digest(data.len() as u32)
    } else {
        Sha256::digest(data).into()
    }
}

/// SHA-256 of `len` zero bytes (the [`BLOCK`] case computed once).
pub fn zero_digest(len: u32) -> Digest {
    static FULL_BLOCK: std::sync::OnceLock<Digest> = std::sync::OnceLock::new();
    let compute = |len: u32| -> Digest {
        let mut h = Sha256::new();
        let zeroes = [0u8; 4096];
        let mut left = len as usize;
        while left > 0 {
            let n = left.min(zeroes.len());
            h.update(&zeroes[..n]);
            left -= n;
        }
        h.finalize().into()
    };
    if u64::from(len) == BLOCK {
        *FULL_BLOCK.get_or_init(|| compute(len))
    } else {
        compute(len)
    }
}

/// The header and payload of the block at `offset`: a zero block travels
/// as a hole, others compressed at zstd `level` when that makes them
/// smaller.
pub fn encode(offset: u64, data: &[u8], level: i32) -> (Message, Vec<u8>) {
    encode_hashed(offset, data, digest(data), level)
}

/// [`encode`] for a block whose digest is known already (`sha256` must be
/// `data`'s [`digest`]: it travels as the block's check).
pub fn encode_hashed(offset: u64, data: &[u8], sha256: Digest, level: i32) -> (Message, Vec<u8>) {
    encode_with(offset, Cow::Borrowed(data), sha256, level)
}

/// [`encode_hashed`] of a block the caller gives up: a block that does
/// not compress travels as these very bytes, not a copy.
pub fn encode_owned(offset: u64, data: Vec<u8>, sha256: Digest, level: i32) -> (Message, Vec<u8>) {
    encode_with(offset, Cow::Owned(data), sha256, level)
}

fn encode_with(offset: u64, data: Cow<'_, [u8]>, sha256: Digest, level: i32) -> (Message, Vec<u8>) {
    let len = data.len() as u32;
    let (encoding, payload) = if is_zero(&data) {
        (Encoding::Zero, Vec::new())
    } else {
        match compress(&data, level) {
            Ok(z) if z.len() < data.len() => (Encoding::Zstd, z),
            _ => (Encoding::Raw, data.into_owned()),
        }
    };
    let header = Message::Block {
        offset,
        len,
        sha256,
        encoding,
        data_len: payload.len() as u32,
    };
    (header, payload)
}

/// zstd contexts kept for reuse: making one per block cost a tenth of a
/// sender's CPU (each zeroes its tables). At most one of each kind per CPU
/// is kept (about 1 MiB each), whatever the number of threads that
/// compress; [`drop_contexts`] hands them back.
struct Contexts {
    compressors: Vec<(i32, zstd::bulk::Compressor<'static>)>,
    decompressors: Vec<zstd::bulk::Decompressor<'static>>,
}

static CONTEXTS: std::sync::Mutex<Contexts> = std::sync::Mutex::new(Contexts {
    compressors: Vec::new(),
    decompressors: Vec::new(),
});

fn contexts() -> std::sync::MutexGuard<'static, Contexts> {
    CONTEXTS.lock().unwrap_or_else(|p| p.into_inner())
}

/// How many contexts of each kind are kept: one per CPU.
fn kept() -> usize {
    static KEPT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *KEPT.get_or_init(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
}

/// `data` compressed by zstd at `level` (one frame, its size in the
/// header), with a kept context.
pub fn compress(data: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    let kept_one = {
        let mut c = contexts();
        let at = c.compressors.iter().position(|(l, _)| *l == level);
        at.map(|i| c.compressors.swap_remove(i))
    };
    let (_, mut compressor) = match kept_one {
        Some(c) => c,
        None => (level, zstd::bulk::Compressor::new(level)?),
    };
    let out = compressor.compress(data);
    let mut c = contexts();
    if c.compressors.len() < kept() {
        c.compressors.push((level, compressor));
    }
    out
}

/// The `capacity` bytes at most that zstd frame `data` decompresses to,
/// with a kept context.
pub fn decompress(data: &[u8], capacity: usize) -> std::io::Result<Vec<u8>> {
    let kept_one = contexts().decompressors.pop();
    let mut decompressor = match kept_one {
        Some(d) => d,
        None => zstd::bulk::Decompressor::new()?,
    };
    let out = decompressor.decompress(data, capacity);
    let mut c = contexts();
    if c.decompressors.len() < kept() {
        c.decompressors.push(decompressor);
    }
    out
}

/// Free the kept zstd contexts (a daemon going idle hands its memory
/// back); the next block makes new ones.
pub fn drop_contexts() {
    let mut c = contexts();
    c.compressors.clear();
    c.decompressors.clear();
}

/// Why a block's bytes were not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    /// The header announces a length no block can have: the sender's
    /// bug, not the link's.
    #[error("block length {0} out of range")]
    Length(u32),
    /// The payload is not zstd data of that length.
    #[error("zstd: {0}")]
    Zstd(String),
    /// The payload decodes to another length than announced.
    #[error("decodes to {got} bytes, not {want}")]
    WrongLength {
        /// Bytes decoded.
        got: usize,
        /// Bytes announced.
        want: u32,
    },
    /// The decoded bytes are not the ones named.
    #[error("sha256 mismatch")]
    Mismatch,
    /// A [`Encoding::Known`] block carries no bytes: the server's own
    /// store has them.
    #[error("a Known block carries no bytes to decode")]
    Known,
}

impl BlockError {
    /// Whether sending the block again may help (the bytes were damaged
    /// on the way), rather than the header being wrong in itself.
    pub fn is_damage(&self) -> bool {
        !matches!(self, BlockError::Length(_) | BlockError::Known)
    }
}

/// The decoded bytes of a block, once they are `len` bytes whose digest is
/// `sha256` (`None`: a zero block, to be written as a hole).
pub fn decode(
    len: u32,
    sha256: &Digest,
    encoding: Encoding,
    payload: &[u8],
) -> Result<Option<Vec<u8>>, BlockError> {
    decode_borrowed(len, sha256, encoding, payload).map(|p| p.map(Cow::into_owned))
}

/// [`decode`], with a raw block's bytes checked where they are instead
/// of copied.
pub fn decode_borrowed<'a>(
    len: u32,
    sha256: &Digest,
    encoding: Encoding,
    payload: &'a [u8],
) -> Result<Option<Cow<'a, [u8]>>, BlockError> {
    if len == 0 || len > MAX_BLOCK {
        return Err(BlockError::Length(len));
    }
    let plain = match encoding {
        Encoding::Zero => None,
        Encoding::Known => return Err(BlockError::Known),
        Encoding::Raw => Some(Cow::Borrowed(payload)),
        Encoding::Zstd => Some(Cow::Owned(
            decompress(payload, len as usize).map_err(|e| BlockError::Zstd(e.to_string()))?,
        )),
    };
    let actual = match &plain {
        Some(p) if p.len() != len as usize => {
            return Err(BlockError::WrongLength {
                got: p.len(),
                want: len,
            })
        }
        Some(p) => Sha256::digest(p).into(),
        None => zero_digest(len),
    };
    if actual != *sha256 {
        return Err(BlockError::Mismatch);
    }
    Ok(plain)
}

/// The blocks (`(offset, len)`) of `ranges` below `size`: each range cut
/// at [`BLOCK`] boundaries.
pub fn split(ranges: &RangeSet, size: u64) -> Vec<(u64, u32)> {
    let mut out = Vec::new();
    for r in ranges.iter() {
        let mut at = r.start;
        let end = r.end.min(size);
        while at < end {
            let stop = ((at / BLOCK + 1) * BLOCK).min(end);
            out.push((at, (stop - at) as u32));
            at = stop;
        }
    }
    out
}

/// The blocks of `[offset, offset + n × BLOCK)` below `size` (the last one
/// may be short): the blocks one batch of a restore compares.
pub fn run(offset: u64, n: usize, size: u64) -> impl Iterator<Item = (u64, u32)> {
    run_of(offset, BLOCK, n, size)
}

/// [`run`] with blocks of `len` bytes.
pub fn run_of(offset: u64, len: u64, n: usize, size: u64) -> impl Iterator<Item = (u64, u32)> {
    (0..n as u64)
        .map(move |i| offset + i * len)
        .take_while(move |&at| at < size)
        .map(move |at| (at, (size - at).min(len) as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_blocks_are_holes_named_by_their_zeroes() {
        let zeroes = vec![0u8; BLOCK as usize];
        assert_eq!(digest(&zeroes), <[u8; 32]>::from(Sha256::digest(&zeroes)));
        assert_eq!(
            zero_digest(100),
            <[u8; 32]>::from(Sha256::digest([0u8; 100]))
        );
        let (header, payload) = encode(BLOCK, &zeroes, 3);
        assert!(payload.is_empty());
        let Message::Block {
            encoding, sha256, ..
        } = header
        else {
            panic!("not a block header")
        };
        assert_eq!(encoding, Encoding::Zero);
        assert_eq!(decode(BLOCK as u32, &sha256, encoding, &payload), Ok(None));
    }

    #[test]
    fn zero_is_found_at_any_length_and_any_byte_breaks_it() {
        let mut data = vec![0u8; 300];
        for len in 0..data.len() {
            assert!(is_zero(&data[..len]), "{len} zero bytes");
            // And from an odd start.
            assert!(is_zero(&data[1..=len.max(1)]));
        }
        for at in [0, 1, 63, 64, 65, 127, 128, 255, 256, 299] {
            data[at] = 0x80;
            assert!(!is_zero(&data), "byte {at} set");
            assert!(is_zero(&data[..at]) && is_zero(&data[at + 1..]));
            data[at] = 0;
        }
    }

    #[test]
    fn kept_zstd_contexts_compress_at_the_level_asked_and_stay_few() {
        let data = b"a block of text, a block of text ".repeat(2000);
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let data = data.clone();
                std::thread::spawn(move || {
                    for level in [1, 3, 19, 3] {
                        let z = compress(&data, level).unwrap();
                        // The same frame a new context makes at that level.
                        assert_eq!(z, zstd::bulk::compress(&data, level).unwrap());
                        assert_eq!(decompress(&z, data.len()).unwrap(), data);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let c = contexts();
        assert!(c.compressors.len() <= kept() && c.decompressors.len() <= kept());
    }

    #[test]
    fn blocks_round_trip_compressed_or_raw() {
        let text: Vec<u8> = b"ublk-mirror ".iter().copied().cycle().take(5000).collect();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let noise: Vec<u8> = (0..5000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        for (data, want) in [(&text, Encoding::Zstd), (&noise, Encoding::Raw)] {
            let (header, payload) = encode(7, data, 3);
            let Message::Block {
                offset,
                len,
                sha256,
                encoding,
                data_len,
            } = header
            else {
                panic!("not a block header")
            };
            assert_eq!((offset, len, encoding), (7, 5000, want));
            assert_eq!(data_len as usize, payload.len());
            assert_eq!(sha256, digest(data));
            assert_eq!(
                decode(len, &sha256, encoding, &payload),
                Ok(Some(data.clone()))
            );
            // Given up by its owner, the same block travels the same way
            // (a raw one as its very bytes).
            let owned = encode_owned(7, data.clone(), digest(data), 3);
            assert_eq!(owned, (header, payload));
        }
        let zero = encode_owned(0, vec![0; 4096], zero_digest(4096), 3);
        assert_eq!(zero, encode(0, &[0; 4096], 3));
        assert!(matches!(
            zero.0,
            Message::Block {
                encoding: Encoding::Zero,
                ..
            }
        ));
    }

    #[test]
    fn damaged_or_impossible_blocks_are_refused() {
        let data = vec![5u8; 4096];
        let (Message::Block { sha256, .. }, payload) = encode(0, &data, 3) else {
            panic!("not a block header")
        };
        let mut bad = payload.clone();
        bad[0] ^= 1;
        assert!(decode(4096, &sha256, Encoding::Zstd, &bad).is_err());
        assert_eq!(
            decode(4096, &[0; 32], Encoding::Zstd, &payload),
            Err(BlockError::Mismatch)
        );
        assert_eq!(
            decode(4095, &sha256, Encoding::Raw, &data),
            Err(BlockError::WrongLength {
                got: 4096,
                want: 4095
            })
        );
        assert_eq!(
            decode(0, &sha256, Encoding::Zero, &[]),
            Err(BlockError::Length(0))
        );
        assert!(!decode(MAX_BLOCK + 1, &sha256, Encoding::Zero, &[])
            .unwrap_err()
            .is_damage());
        assert!(BlockError::Mismatch.is_damage());
    }

    #[test]
    fn ranges_split_at_block_boundaries() {
        let set: RangeSet = [100..200, BLOCK - 10..BLOCK * 2 + 5].into_iter().collect();
        assert_eq!(
            split(&set, 1 << 30),
            vec![
                (100, 100),
                (BLOCK - 10, 10),
                (BLOCK, BLOCK as u32),
                (2 * BLOCK, 5)
            ]
        );
        assert_eq!(split(&set, 150), vec![(100, 50)]);
        assert_eq!(
            run(0, 4, 2 * BLOCK + 1).collect::<Vec<_>>(),
            vec![(0, BLOCK as u32), (BLOCK, BLOCK as u32), (2 * BLOCK, 1)]
        );
    }
}
