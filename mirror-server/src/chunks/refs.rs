//! What each client's volumes reference: the answer to a data stream's
//! `HaveChunks` (protocol V3, [`ublk_mirror_common::proto`]).
//!
//! A client may learn that the server holds a chunk only when one of its
//! own volumes references it: a version of it in the store has the chunk
//! in its map, or an epoch it published since this set was read named
//! it. Anything wider would tell a client what other clients store (ask
//! for the digest of a known document, learn who has it). Chunks other
//! clients sent are still deduplicated in the store when they arrive;
//! they just travel.
//!
//! A client's set is read from the store the first time one of its data
//! streams asks (the unique map segments of every version of each of its
//! volumes), kept while it is used, and dropped [`IDLE`] after its last
//! use or when more than [`MAX_CLIENTS`] sets are held (least recently
//! used first). Each entry is the first 16 bytes of a digest: 16 bytes
//! and the hash table's overhead per distinct chunk, about 32 MiB for a
//! client whose volumes hold 64 GiB of distinct data, held only while it
//! is mirroring; a set stops growing at [`MAX_CHUNKS`].
//!
//! A set only grows while it is held: a chunk whose last version was
//! collected since is still in it. That leaks nothing (the client did
//! reference it), and "known" also needs the chunk to be in the store
//! ([`ChunkStore::has`]); a block whose chunk goes between the answer and
//! its arrival is asked for again with its bytes.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ublk_mirror_common::proto::Digest;

use super::format::HOLE;
use super::ChunkStore;
use crate::error::Result;

/// A set unused this long is dropped (read again when next needed).
pub const IDLE: Duration = Duration::from_secs(15 * 60);

/// Most sets held at once.
pub const MAX_CLIENTS: usize = 256;

/// Most chunks one set holds (256 GiB of a client's distinct data, about
/// 128 MiB of memory): past it, the rest of a client's chunks are not
/// known and their blocks travel. Never more answers, only fewer.
pub const MAX_CHUNKS: usize = 4 << 20;

fn key(d: &Digest) -> u128 {
    let mut k = [0u8; 16];
    k.copy_from_slice(&d[..16]);
    u128::from_le_bytes(k)
}

#[derive(Debug, Default)]
struct ClientRefs {
    /// `None` until read from the store.
    set: Mutex<Option<HashSet<u128>>>,
}

impl ClientRefs {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<HashSet<u128>>> {
        self.set.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The reference sets of the clients mirroring now (see the module docs).
#[derive(Debug, Default)]
pub struct Refs {
    held: Mutex<HashMap<String, (Arc<ClientRefs>, Instant)>>,
}

impl Refs {
    /// No sets yet.
    pub fn new() -> Refs {
        Refs::default()
    }

    /// `client`'s set, marked used now (an empty entry when new; idle and
    /// surplus sets are dropped on the way).
    fn entry(&self, client: &str) -> Arc<ClientRefs> {
        let now = Instant::now();
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((refs, used)) = held.get_mut(client) {
            *used = now;
            return refs.clone();
        }
        held.retain(|_, (_, used)| now.duration_since(*used) < IDLE);
        while held.len() >= MAX_CLIENTS {
            let oldest = held
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(c, _)| c.clone());
            match oldest {
                Some(c) => held.remove(&c),
                None => break,
            };
        }
        let refs = Arc::new(ClientRefs::default());
        held.insert(client.to_string(), (refs.clone(), now));
        refs
    }

    /// For each of `digests`: does the store hold that chunk, and does one
    /// of `client`'s volumes reference it? Reads the client's set from the
    /// store first when it is not held.
    pub fn known(&self, store: &ChunkStore, client: &str, digests: &[Digest]) -> Result<Vec<bool>> {
        let refs = self.entry(client);
        let mut set = refs.lock();
        if set.is_none() {
            let read = read_set(store, client)?;
            tracing::debug!(
                client,
                chunks = read.len(),
                "read the chunks the client's volumes reference"
            );
            *set = Some(read);
        }
        let set = set.as_ref().expect("just read");
        Ok(digests
            .iter()
            .map(|d| *d != HOLE && set.contains(&key(d)) && store.has(d))
            .collect())
    }

    /// `client` published an epoch naming `digests`: add them to its set,
    /// if it is held (one read later includes them anyway).
    pub fn add(&self, client: &str, digests: impl IntoIterator<Item = Digest>) {
        let refs = {
            let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            match held.get(client) {
                Some((refs, _)) => refs.clone(),
                None => return,
            }
        };
        let mut set = refs.lock();
        if let Some(set) = set.as_mut() {
            for d in digests.into_iter().filter(|d| *d != HOLE) {
                if set.len() >= MAX_CHUNKS {
                    break;
                }
                set.insert(key(&d));
            }
        }
    }

    /// How many sets are held (for tests and the log).
    pub fn held(&self) -> usize {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// Every chunk a version of one of `client`'s volumes references.
fn read_set(store: &ChunkStore, client: &str) -> Result<HashSet<u128>> {
    let mut segments = HashSet::new();
    for volume in store.client_volumes(client)? {
        for seq in store.versions(&volume)? {
            // A version collected since the listing fails the read: the
            // set is read again at the next question.
            segments.extend(store.version(&volume, seq)?.segment_ids()?);
        }
    }
    let mut set = HashSet::new();
    'read: for id in segments {
        for d in store.segment(&id)? {
            if set.len() >= MAX_CHUNKS {
                tracing::info!(client, "the client's volumes reference more than {MAX_CHUNKS} chunks: the rest are not deduplicated on the wire");
                break 'read;
            }
            if d != HOLE {
                set.insert(key(&d));
            }
        }
    }
    Ok(set)
}
