//! Verify: read every chunk and map segment that a volume's versions need,
//! check each against its sha256, and report the damage with the versions
//! it touches. Damage is never served: a damaged chunk fails every read
//! (so an image is never rebuilt from it) and is never deduplicated
//! against, so the next time any device sends that content it is stored
//! again. A chunk that a server's image cache still holds (checked against
//! the same sha256) is stored again at once: repaired. What cannot be
//! repaired is recorded: `damaged/AA/HASH-PACK` (JSON `{"found_ms":..}`; the
//! marker stays after a repair, as the damaged copy does, so that no server
//! ever reads that copy again), and `vol/CLIENT/VOLUME/damaged/SEQ` (JSON
//! `{"chunks":["HASH",..],"segments":["ID",..]}`) for each version that
//! needs it, which `mirror-server store` shows. Only what the store holds
//! wrong or has lost is damage: a read the store fails (out of reach, an
//! error after its retries) stops the run, and the last run's records
//! stand.

use std::collections::{BTreeMap, BTreeSet};

use object_store::path::Path as ObjPath;
use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use ublk_mirror_common::clock::now_ms;
use ublk_mirror_common::proto::Digest;

use super::format::{self, PackBuilder, HOLE, SEGMENT_BLOCKS};
use super::{store_err, ChunkStore, LEVEL};
use crate::error::{Error, Result};

/// What a verify run found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Versions whose maps were read.
    pub versions: u64,
    /// Distinct chunks read and checked.
    pub chunks: u64,
    /// Their raw bytes.
    pub bytes: u64,
    /// Chunks found damaged or missing, and then stored again from an
    /// image cache.
    pub repaired: Vec<String>,
    /// Chunks damaged or missing with no good copy here: the versions that
    /// need each (`CLIENT/VOLUME@SEQ`).
    pub damaged: BTreeMap<String, Vec<String>>,
    /// Map segments damaged or missing: the versions that need each.
    pub damaged_segments: BTreeMap<String, Vec<String>>,
}

impl Report {
    /// Nothing is damaged (after repairs).
    pub fn is_clean(&self) -> bool {
        self.damaged.is_empty() && self.damaged_segments.is_empty()
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct DamagedVersion {
    chunks: Vec<String>,
    segments: Vec<String>,
}

impl ChunkStore {
    /// Verify `volume` (every volume: `None`). `cached(volume, block,
    /// hash)` may return the block from an image cache, for repair; it is
    /// checked here against `hash`.
    pub fn verify(
        &self,
        volume: Option<&str>,
        mut cached: impl FnMut(&str, u64, &Digest) -> Option<Vec<u8>>,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<Report> {
        let mut report = Report::default();
        let volumes = match volume {
            Some(v) => vec![v.to_string()],
            None => self.volumes()?,
        };
        // Who needs what: chunk → versions, and where a head has it.
        let mut needs: BTreeMap<Digest, BTreeSet<String>> = BTreeMap::new();
        let mut in_head: BTreeMap<Digest, (String, u64)> = BTreeMap::new();
        let mut bad_segments: BTreeMap<Digest, BTreeSet<String>> = BTreeMap::new();
        // This run's findings replace the last run's, once it has them all:
        // a run the store stops part way changes nothing.
        let mut earlier: Vec<ObjPath> = Vec::new();
        for name in &volumes {
            earlier.extend(self.run(self.list(&format!("vol/{name}/damaged")))?);
            let seqs = self.versions(name)?;
            let head = seqs.last().copied();
            for seq in seqs {
                let record = match self.version(name, seq) {
                    Ok(r) => r,
                    // Collected meanwhile (not kept): nothing to verify.
                    Err(_) if !self.versions(name)?.contains(&seq) => continue,
                    Err(e) => return Err(e),
                };
                report.versions += 1;
                let label = format!("{name}@{seq}");
                for (s, id) in record.segment_ids()?.iter().enumerate() {
                    match self.segment(id) {
                        Ok(digests) => {
                            for (slot, d) in digests.iter().enumerate() {
                                if *d == HOLE {
                                    continue;
                                }
                                needs.entry(*d).or_default().insert(label.clone());
                                if Some(seq) == head {
                                    in_head.entry(*d).or_insert((
                                        name.clone(),
                                        (s * SEGMENT_BLOCKS + slot) as u64,
                                    ));
                                }
                            }
                        }
                        // Collected meanwhile, with its version: not damage.
                        Err(e) if is_damage(&e) && !self.versions(name)?.contains(&seq) => {
                            break;
                        }
                        Err(e) if is_damage(&e) => {
                            tracing::error!("{label}: map segment {}: {e}", format::hex(id));
                            bad_segments.entry(*id).or_default().insert(label.clone());
                        }
                        Err(e) => return Err(stopped(e)),
                    }
                }
            }
        }
        // Read the chunks, a pack at a time.
        self.refresh_index()?;
        let total = needs.len() as u64;
        let mut by_pack: BTreeMap<Digest, Vec<Digest>> = BTreeMap::new();
        let mut bad: BTreeSet<Digest> = BTreeSet::new();
        for h in needs.keys() {
            match self.index().chunks.get(h) {
                Some(loc) => by_pack.entry(loc.pack).or_default().push(*h),
                None => {
                    bad.insert(*h);
                }
            }
        }
        let mut done = 0u64;
        for (pack, hashes) in by_pack {
            for chunk in hashes.chunks(256) {
                for (h, r) in chunk.iter().zip(self.chunks_each(chunk)) {
                    match r {
                        Ok(raw) => report.bytes += raw.len() as u64,
                        Err(e) if is_damage(&e) => {
                            tracing::error!("pack {}: {e}", format::hex(&pack));
                            bad.insert(*h);
                        }
                        Err(e) => return Err(stopped(e)),
                    }
                }
                done += chunk.len() as u64;
                progress(done, total);
            }
        }
        report.chunks = total;
        // Repair what a cache still has; record the rest.
        let mut repair = PackBuilder::new(LEVEL);
        let mut still: BTreeSet<Digest> = BTreeSet::new();
        for h in &bad {
            let good = in_head
                .get(h)
                .and_then(|(v, n)| cached(v, *n, h))
                .filter(|data| format::sha256(data) == *h);
            match good {
                Some(data) => {
                    repair.add(*h, &data);
                    report.repaired.push(format::hex(h));
                }
                None => {
                    still.insert(*h);
                }
            }
        }
        if !repair.is_empty() {
            self.mark_damaged(&bad)?;
            self.run(self.upload_pack(repair))?;
        }
        self.mark_damaged(&still)?;
        let mut per_version: BTreeMap<String, DamagedVersion> = BTreeMap::new();
        let mut record = |versions: &[String], what: String, segment: bool| {
            for v in versions {
                let d = per_version
                    .entry(v.clone())
                    .or_insert_with(|| DamagedVersion {
                        chunks: vec![],
                        segments: vec![],
                    });
                if segment {
                    &mut d.segments
                } else {
                    &mut d.chunks
                }
                .push(what.clone());
            }
        };
        for h in &still {
            let versions: Vec<String> = needs[h].iter().cloned().collect();
            record(&versions, format::hex(h), false);
            report.damaged.insert(format::hex(h), versions);
        }
        for (id, versions) in bad_segments {
            let versions: Vec<String> = versions.into_iter().collect();
            record(&versions, format::hex(&id), true);
            report.damaged_segments.insert(format::hex(&id), versions);
        }
        let mut written = BTreeSet::new();
        for (label, damage) in per_version {
            let (name, seq) = label.rsplit_once('@').expect("labels are NAME@SEQ");
            let body = serde_json::to_vec(&damage).map_err(|e| Error::Corrupt(e.to_string()))?;
            let path = ObjPath::from(format!("vol/{name}/damaged/{seq}"));
            self.run(self.store.put(&path, PutPayload::from(body)))
                .map_err(|e| store_err(format!("writing {}/{path}", self.describe), e))?;
            written.insert(path);
        }
        for path in earlier.into_iter().filter(|p| !written.contains(p)) {
            match self.run(self.store.delete(&path)) {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(store_err(format!("deleting {}/{path}", self.describe), e)),
            }
        }
        Ok(report)
    }

    /// Record chunks as damaged where the index has them: they are read
    /// nowhere and deduplicated against never, until stored again.
    fn mark_damaged(&self, hashes: &BTreeSet<Digest>) -> Result<()> {
        for h in hashes {
            // A chunk no pack holds (its pack lost) needs no marker: it is
            // in no index.
            let Some(pack) = self.index().chunks.get(h).map(|l| l.pack) else {
                continue;
            };
            if !self.index().damaged.insert((pack, *h)) {
                continue;
            }
            let body = serde_json::json!({ "found_ms": now_ms() }).to_string();
            let path = ObjPath::from(format!(
                "{}-{}",
                format::spread("damaged", h),
                format::hex(&pack)
            ));
            self.run(self.store.put(&path, PutPayload::from(body)))
                .map_err(|e| store_err(format!("writing {}/{path}", self.describe), e))?;
        }
        Ok(())
    }

    /// The chunks known damaged (from `damaged/`), for the index.
    pub(super) async fn read_damaged(&self) -> Result<Vec<(Digest, Digest)>> {
        Ok(self
            .list("damaged")
            .await?
            .iter()
            .filter_map(|path| {
                let (h, pack) = path.filename()?.split_once('-')?;
                Some((
                    ublk_mirror_common::hex::decode::<32>(h)?,
                    ublk_mirror_common::hex::decode::<32>(pack)?,
                ))
            })
            .collect())
    }

    /// The versions of `volume` recorded damaged by verify.
    pub fn damaged_versions(&self, volume: &str) -> Result<Vec<u64>> {
        let paths = self.run(self.list(&format!("vol/{volume}/damaged")))?;
        let mut out: Vec<u64> = paths
            .iter()
            .filter_map(|p| p.filename()?.parse().ok())
            .collect();
        out.sort_unstable();
        Ok(out)
    }
}

/// Whether a read failed because what the store holds is damaged or gone
/// (recorded), rather than because the store could not be asked (which
/// stops the run: a network blip must not mark good chunks for good).
fn is_damage(e: &Error) -> bool {
    matches!(e, Error::Corrupt(_) | Error::BadBlock(_))
}

/// A verify run the store stopped: nothing of it was recorded.
fn stopped(e: Error) -> Error {
    match e {
        Error::Store(why) => Error::Store(format!(
            "verify stopped, nothing recorded (run it again): {why}"
        )),
        e => e,
    }
}
