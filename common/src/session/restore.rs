//! A restore, both sides.
//!
//! ```text
//! client (RestoreReader)                 server (plan_have)
//! -> Restore{volume, at}
//! <- RestoreInfo{size, snapshot, ...}   (or Refused)
//! -> Have{offset, len, digests}  ×window  the target's digests of a batch
//! <- (Block + data)*                       each block whose content differs
//! <- HaveDone{same}                        per Have, in order
//! ```
//!
//! A server whose chunk store is out of reach mid-restore resets the
//! stream (code 4) rather than refusing: the reader sees a lost link and
//! asks again, going on where it was.
//!
//! The reader asks up to [`IN_FLIGHT`] batches ahead, checks that each
//! block it receives lies inside a batch it asked for and inside the
//! volume, and has its bytes verified ([`BlockToWrite::decode`]) before
//! they are written. Progress is counted per batch answered.

use crate::block::{self, BLOCK};
use crate::proto::{Digest, Encoding, Message, MAX_HASH_BLOCKS};
use crate::session::unexpected;
use crate::{Error, Result};

/// Blocks per batch ([`Message::Have`]).
pub const BATCH: usize = 256;
/// Batches asked for at once.
pub const IN_FLIGHT: usize = 4;
/// Most bytes one batch may cover.
pub const MAX_BATCH_BYTES: u64 = 64 << 20;

/// The largest block a [`Message::Have`] may name: the server holds one
/// at a time per stream (clients ask for [`BLOCK`]s).
pub const MAX_HAVE_BLOCK: u64 = 1 << 20;

/// What is being restored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreInfo {
    /// The volume's size.
    pub size: u64,
    /// The snapshot read.
    pub snapshot: String,
    /// The epoch it holds.
    pub epoch: u64,
    /// When that epoch was published (ms since the Unix epoch).
    pub epoch_ms: u64,
}

/// How far a restore is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Bytes of the volume compared and written so far.
    pub done: u64,
    /// The volume's size.
    pub total: u64,
    /// Block bytes received (after compression).
    pub received: u64,
    /// Blocks the target held already.
    pub blocks_same: u64,
    /// Blocks received.
    pub blocks_received: u64,
}

/// A block received, to be verified and written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockToWrite {
    /// Where it goes.
    pub offset: u64,
    /// Its length decoded.
    pub len: u32,
    sha256: Digest,
    encoding: Encoding,
    payload: Vec<u8>,
}

impl BlockToWrite {
    /// Its bytes, verified (`None`: zeroes, to be written as a hole).
    pub fn decode(&self) -> Result<Option<Vec<u8>>> {
        block::decode(self.len, &self.sha256, self.encoding, &self.payload)
            .map_err(|e| Error::Peer(format!("block at {}: {e}", self.offset)))
    }

    /// The block whose header was announced, with its data.
    fn announced(
        header: Option<(u64, u32, Digest, Encoding)>,
        payload: Vec<u8>,
    ) -> Result<BlockToWrite> {
        let (offset, len, sha256, encoding) = header
            .ok_or_else(|| Error::Link("block data without a header (a driver bug)".into()))?;
        Ok(BlockToWrite {
            offset,
            len,
            sha256,
            encoding,
            payload,
        })
    }

    /// Its bytes as they travelled.
    pub fn wire_len(&self) -> u64 {
        self.payload.len() as u64
    }
}

/// What the driver of a [`RestoreReader`] does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreStep {
    /// Read `data_len` raw bytes and give them to
    /// [`RestoreReader::on_data`].
    ReadData(u32),
    /// Verify and write this block.
    Write(BlockToWrite),
    /// A batch was answered: report progress.
    Progress(Progress),
}

/// The client's side of a restore.
#[derive(Debug, Clone)]
pub struct RestoreReader {
    info: RestoreInfo,
    batches: u64,
    asked: u64,
    finished: u64,
    /// The header of the block whose data is awaited.
    header: Option<(u64, u32, Digest, Encoding)>,
    /// Blocks received of the batch being answered (the oldest asked),
    /// and where the last of them ended: the server answers the batches
    /// in order, each block once, ascending, then says how many were the
    /// same; blocks and same make up the batch, or the answer is wrong.
    batch_blocks: u64,
    batch_end: u64,
    progress: Progress,
}

impl RestoreReader {
    /// The request that starts a restore of `volume` as of `at`.
    pub fn request(volume: &str, at: Option<&str>) -> Message {
        Message::Restore {
            volume: volume.to_string(),
            at: at.map(str::to_string),
        }
    }

    /// The server's answer to the request.
    pub fn new(answer: Message) -> Result<RestoreReader> {
        let info = match answer {
            Message::RestoreInfo {
                size,
                snapshot,
                epoch,
                epoch_ms,
            } => RestoreInfo {
                size,
                snapshot,
                epoch,
                epoch_ms,
            },
            Message::Refused { reason } => return Err(Error::Refused(reason)),
            other => return Err(unexpected(&other, "answering Restore")),
        };
        Ok(RestoreReader {
            batches: info.size.div_ceil(Self::batch_bytes()),
            asked: 0,
            finished: 0,
            header: None,
            batch_blocks: 0,
            batch_end: 0,
            progress: Progress {
                total: info.size,
                ..Progress::default()
            },
            info,
        })
    }

    fn batch_bytes() -> u64 {
        BLOCK * BATCH.min(MAX_HASH_BLOCKS) as u64
    }

    /// What is being restored.
    pub fn info(&self) -> &RestoreInfo {
        &self.info
    }

    /// The next batch to hash and send as [`RestoreReader::have`], if the
    /// window allows one: its blocks `(offset, len)`.
    pub fn next_batch(&mut self) -> Option<Vec<(u64, u32)>> {
        if self.asked - self.finished >= IN_FLIGHT as u64 {
            return None;
        }
        let batch = self.upcoming()?;
        self.asked += 1;
        Some(batch)
    }

    /// The batch [`RestoreReader::next_batch`] hands out next, once the
    /// window allows (`None`: every batch was asked for): so that its
    /// digests can be computed ahead.
    pub fn upcoming(&self) -> Option<Vec<(u64, u32)>> {
        if self.asked >= self.batches {
            return None;
        }
        let offset = self.asked * Self::batch_bytes();
        Some(block::run(offset, BATCH.min(MAX_HASH_BLOCKS), self.info.size).collect())
    }

    /// The message for a batch from [`RestoreReader::next_batch`], with
    /// the target's digests of its blocks.
    pub fn have(batch: &[(u64, u32)], digests: Vec<Digest>) -> Message {
        Message::Have {
            offset: batch.first().map_or(0, |&(o, _)| o),
            len: BLOCK as u32,
            digests,
        }
    }

    /// Whether every batch was answered.
    pub fn is_done(&self) -> bool {
        self.finished >= self.batches
    }

    /// Go on from `earlier`, the progress of a restore of this same
    /// version that was cut short (its link failed): the batches it
    /// finished are not asked for again, and its counts go on. Called
    /// before any batch is asked for; a later call does nothing.
    pub fn resume(&mut self, earlier: Progress) {
        if self.asked > 0 {
            return;
        }
        let batches = (earlier.done / Self::batch_bytes()).min(self.batches);
        self.asked = batches;
        self.finished = batches;
        self.batch_end = (batches * Self::batch_bytes()).min(self.info.size);
        self.progress = Progress {
            total: self.info.size,
            done: (batches * Self::batch_bytes()).min(self.info.size),
            ..earlier
        };
    }

    /// A message from the server.
    pub fn on_message(&mut self, m: Message) -> Result<RestoreStep> {
        if self.header.is_some() {
            return Err(Error::Link(
                "a message while block data was awaited (a driver bug)".into(),
            ));
        }
        match m {
            Message::Block {
                offset,
                len,
                sha256,
                encoding,
                data_len,
            } => {
                let end = offset.checked_add(u64::from(len));
                if end.is_none_or(|end| end > self.info.size) {
                    return Err(Error::Peer(format!(
                        "a block at {offset} is past the volume's end"
                    )));
                }
                // In the batch being answered, after the last block of it,
                // a whole block of the volume.
                let batch = (self.finished * Self::batch_bytes())
                    ..((self.finished + 1) * Self::batch_bytes()).min(self.info.size);
                if self.finished >= self.asked || !batch.contains(&offset) {
                    return Err(Error::Peer(format!(
                        "a block at {offset}, outside the batch being answered"
                    )));
                }
                if offset < self.batch_end
                    || offset % BLOCK != 0
                    || u64::from(len) != BLOCK.min(self.info.size - offset)
                {
                    return Err(Error::Peer(format!(
                        "a block at {offset} of {len} bytes: not the volume's next block in the batch"
                    )));
                }
                self.batch_blocks += 1;
                self.batch_end = offset + u64::from(len);
                self.header = Some((offset, len, sha256, encoding));
                Ok(RestoreStep::ReadData(data_len))
            }
            Message::HaveDone { same } if self.finished < self.asked => {
                let start = self.finished * Self::batch_bytes();
                let end = (start + Self::batch_bytes()).min(self.info.size);
                let blocks = (end - start).div_ceil(BLOCK);
                if self.batch_blocks.checked_add(same) != Some(blocks) {
                    return Err(Error::Peer(format!(
                        "the batch at {start} has {blocks} blocks, answered with {} sent and {same} the same",
                        self.batch_blocks
                    )));
                }
                self.batch_blocks = 0;
                self.batch_end = end;
                self.finished += 1;
                self.progress.blocks_same += same;
                self.progress.done = (self.finished * Self::batch_bytes()).min(self.info.size);
                Ok(RestoreStep::Progress(self.progress))
            }
            Message::Refused { reason } => Err(Error::Refused(reason)),
            other => Err(unexpected(&other, "inside a restore")),
        }
    }

    /// The data of the block announced last.
    pub fn on_data(&mut self, payload: Vec<u8>) -> Result<RestoreStep> {
        let block = BlockToWrite::announced(self.header.take(), payload)?;
        self.progress.blocks_received += 1;
        self.progress.received += block.wire_len();
        Ok(RestoreStep::Write(block))
    }

    /// The counts so far.
    pub fn progress(&self) -> Progress {
        self.progress
    }
}

/// A digest no content has: sent for a block the reader holds nothing
/// of, so the server sends it whatever it is (zeroes as a hole).
pub const NO_DIGEST: Digest = [0u8; 32];

/// Blocks per [`BlockReader::ask`] at most.
pub const MAX_ASK: usize = BATCH;

/// What the driver of a [`BlockReader`] does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadStep {
    /// Read `data_len` raw bytes and give them to [`BlockReader::on_data`].
    ReadData(u32),
    /// A block of the oldest run asked for: verify and keep it.
    Block(BlockToWrite),
    /// The oldest run asked for is answered: `blocks` were asked, and the
    /// server sent exactly `received` of them (the others are as the
    /// reader's digests said).
    Answered {
        /// The run asked for, `(offset, len)`.
        blocks: Vec<(u64, u32)>,
        /// Offsets of the blocks sent.
        received: Vec<u64>,
    },
}

#[derive(Debug, Clone)]
struct Asked {
    blocks: Vec<(u64, u32)>,
    received: Vec<u64>,
}

/// The client's side of reading chosen blocks of one version, in any
/// order: what `attach` and an instant restore fetch on demand.
///
/// The same exchange as a whole restore ([`RestoreReader`]): the request
/// pins a version; each [`Message::Have`] names a run of blocks with the
/// reader's digests of them (or [`NO_DIGEST`]), and the server answers
/// runs in the order asked, sending each block whose content differs, then
/// [`Message::HaveDone`]. The reader checks every block it receives
/// belongs to the oldest run unanswered and comes once, and that the
/// count the server calls the same adds up.
#[derive(Debug, Clone)]
pub struct BlockReader {
    info: RestoreInfo,
    asked: std::collections::VecDeque<Asked>,
    header: Option<(u64, u32, Digest, Encoding)>,
}

impl BlockReader {
    /// The server's answer to [`RestoreReader::request`].
    pub fn new(answer: Message) -> Result<BlockReader> {
        let info = RestoreReader::new(answer)?.info;
        Ok(BlockReader {
            info,
            asked: std::collections::VecDeque::new(),
            header: None,
        })
    }

    /// The version being read.
    pub fn info(&self) -> &RestoreInfo {
        &self.info
    }

    /// Runs asked for and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.asked.len()
    }

    /// Ask for `count` blocks from `offset` (a multiple of [`BLOCK`]),
    /// given the reader's digests of them: the message to send.
    pub fn ask(&mut self, offset: u64, count: usize, digests: Vec<Digest>) -> Result<Message> {
        if offset % BLOCK != 0 || offset >= self.info.size || count == 0 || count > MAX_ASK {
            return Err(Error::Link(format!(
                "asking for {count} blocks at {offset} of a volume of {} (a driver bug)",
                self.info.size
            )));
        }
        let blocks: Vec<(u64, u32)> = block::run(offset, count, self.info.size).collect();
        if digests.len() != blocks.len() {
            return Err(Error::Link(format!(
                "{} digests for {} blocks (a driver bug)",
                digests.len(),
                blocks.len()
            )));
        }
        let message = RestoreReader::have(&blocks, digests);
        self.asked.push_back(Asked {
            blocks,
            received: Vec::new(),
        });
        Ok(message)
    }

    /// A message from the server.
    pub fn on_message(&mut self, m: Message) -> Result<ReadStep> {
        if self.header.is_some() {
            return Err(Error::Link(
                "a message while block data was awaited (a driver bug)".into(),
            ));
        }
        let Some(front) = self.asked.front() else {
            return match m {
                Message::Refused { reason } => Err(Error::Refused(reason)),
                other => Err(unexpected(&other, "with no blocks asked for")),
            };
        };
        match m {
            Message::Block {
                offset,
                len,
                sha256,
                encoding,
                data_len,
            } => {
                if !front.blocks.contains(&(offset, len)) {
                    return Err(Error::Peer(format!(
                        "a block at {offset} ({len} bytes), outside the run asked for"
                    )));
                }
                if front.received.contains(&offset) {
                    return Err(Error::Peer(format!("the block at {offset} came twice")));
                }
                self.header = Some((offset, len, sha256, encoding));
                Ok(ReadStep::ReadData(data_len))
            }
            Message::HaveDone { same } => {
                let Some(done) = self.asked.pop_front() else {
                    unreachable!("a front was found above")
                };
                if (done.received.len() as u64).checked_add(same) != Some(done.blocks.len() as u64)
                {
                    return Err(Error::Peer(format!(
                        "{} blocks asked for, {} sent and {same} called the same",
                        done.blocks.len(),
                        done.received.len()
                    )));
                }
                Ok(ReadStep::Answered {
                    blocks: done.blocks,
                    received: done.received,
                })
            }
            Message::Refused { reason } => Err(Error::Refused(reason)),
            other => Err(unexpected(&other, "inside a restore")),
        }
    }

    /// The data of the block announced last.
    pub fn on_data(&mut self, payload: Vec<u8>) -> Result<ReadStep> {
        let block = BlockToWrite::announced(self.header.take(), payload)?;
        if let Some(front) = self.asked.front_mut() {
            front.received.push(block.offset);
        }
        Ok(ReadStep::Block(block))
    }
}

/// The server's side: the blocks of a [`Message::Have`] for a volume of
/// `size` bytes, or why it is refused.
pub fn plan_have(
    offset: u64,
    len: u32,
    digests: usize,
    size: u64,
) -> std::result::Result<Vec<(u64, u32)>, String> {
    if u64::from(len) * digests as u64 > MAX_BATCH_BYTES {
        return Err("restore: a batch of more than 64 MiB".into());
    }
    if u64::from(len) > MAX_HAVE_BLOCK {
        return Err(format!(
            "restore: blocks of {len} bytes (at most {MAX_HAVE_BLOCK})"
        ));
    }
    if len == 0 || offset >= size || offset % u64::from(len) != 0 {
        return Err(format!("restore: blocks at {offset} are not in the volume"));
    }
    Ok(block::run_of(offset, u64::from(len), digests, size).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    fn info(size: u64) -> Message {
        Message::RestoreInfo {
            size,
            snapshot: "s".into(),
            epoch: 4,
            epoch_ms: 5,
        }
    }

    fn batch_bytes() -> u64 {
        RestoreReader::batch_bytes()
    }

    #[test]
    fn chosen_runs_are_answered_in_order_and_checked() {
        let size = 10 * BLOCK + 100;
        let mut r = BlockReader::new(info(size)).unwrap();
        // The last block is short; a run past the end is cut at the end.
        let m = r.ask(9 * BLOCK, 4, vec![NO_DIGEST; 2]).unwrap();
        assert!(
            matches!(m, Message::Have { offset, ref digests, .. } if offset == 9 * BLOCK && digests.len() == 2)
        );
        r.ask(2 * BLOCK, 1, vec![NO_DIGEST]).unwrap();
        assert_eq!(r.in_flight(), 2);
        let block = |offset: u64, len: u32| Message::Block {
            offset,
            len,
            sha256: NO_DIGEST,
            encoding: Encoding::Zero,
            data_len: 0,
        };
        // A block of the second run while the first is unanswered.
        assert_eq!(
            r.clone()
                .on_message(block(2 * BLOCK, BLOCK as u32))
                .unwrap_err()
                .kind(),
            ErrorKind::Peer
        );
        assert_eq!(
            r.on_message(block(10 * BLOCK, 100)).unwrap(),
            ReadStep::ReadData(0)
        );
        assert!(
            matches!(r.on_data(Vec::new()).unwrap(), ReadStep::Block(b) if b.offset == 10 * BLOCK && b.len == 100)
        );
        // Twice is refused.
        let mut twice = r.clone();
        assert_eq!(
            twice.on_message(block(10 * BLOCK, 100)).unwrap_err().kind(),
            ErrorKind::Peer
        );
        // The counts must add up.
        assert_eq!(
            r.clone()
                .on_message(Message::HaveDone { same: 0 })
                .unwrap_err()
                .kind(),
            ErrorKind::Peer
        );
        assert_eq!(
            r.on_message(Message::HaveDone { same: 1 }).unwrap(),
            ReadStep::Answered {
                blocks: vec![(9 * BLOCK, BLOCK as u32), (10 * BLOCK, 100)],
                received: vec![10 * BLOCK],
            }
        );
        assert_eq!(
            r.on_message(Message::HaveDone { same: 1 }).unwrap(),
            ReadStep::Answered {
                blocks: vec![(2 * BLOCK, BLOCK as u32)],
                received: vec![],
            }
        );
        // Nothing asked: an answer is a protocol error; misaligned asks are bugs.
        assert!(r.clone().on_message(Message::HaveDone { same: 0 }).is_err());
        assert!(r.ask(1, 1, vec![NO_DIGEST]).is_err());
        assert!(r.ask(11 * BLOCK, 1, vec![NO_DIGEST]).is_err());
        assert!(r.ask(0, 2, vec![NO_DIGEST]).is_err());
    }

    #[test]
    fn batches_are_asked_a_window_ahead_and_progress_per_answer() {
        // Six batches, the last one short.
        let size = 5 * batch_bytes() + 3;
        let mut r = RestoreReader::new(info(size)).unwrap();
        let mut asked = Vec::new();
        while let Some(b) = r.next_batch() {
            asked.push(b);
        }
        assert_eq!(asked.len(), IN_FLIGHT);
        // The window is full; the next batch is known all the same.
        assert_eq!(
            r.upcoming().unwrap()[0],
            (IN_FLIGHT as u64 * batch_bytes(), BLOCK as u32)
        );
        assert_eq!(asked[1][0], (batch_bytes(), BLOCK as u32));
        assert_eq!(
            RestoreReader::have(&asked[1], vec![]),
            Message::Have {
                offset: batch_bytes(),
                len: BLOCK as u32,
                digests: vec![]
            }
        );
        // A batch's answer counts all its blocks (none sent here: all the
        // same); fewer is the peer's fault.
        let whole = batch_bytes() / BLOCK;
        let short = r.clone().on_message(Message::HaveDone { same: whole - 1 });
        assert_eq!(short.unwrap_err().kind(), ErrorKind::Peer);
        let RestoreStep::Progress(p) = r.on_message(Message::HaveDone { same: whole }).unwrap()
        else {
            panic!("no progress")
        };
        assert_eq!(
            (p.done, p.blocks_same, p.total),
            (batch_bytes(), whole, size)
        );
        // One answered: one more may be asked.
        assert!(r.next_batch().is_some());
        assert!(r.next_batch().is_none());
        for _ in 0..IN_FLIGHT {
            r.on_message(Message::HaveDone { same: whole }).unwrap();
        }
        let last = r.next_batch().unwrap();
        assert_eq!(last, vec![(5 * batch_bytes(), 3)]);
        assert!(!r.is_done());
        let RestoreStep::Progress(p) = r.on_message(Message::HaveDone { same: 1 }).unwrap() else {
            panic!("no progress")
        };
        assert_eq!(p.done, size);
        assert!(r.is_done());
        // An answer nobody asked for.
        assert!(r.on_message(Message::HaveDone { same: 0 }).is_err());
    }

    #[test]
    fn blocks_are_checked_where_they_land_and_by_their_content() {
        let size = 2 * batch_bytes();
        let mut r = RestoreReader::new(info(size)).unwrap();
        let first = r.next_batch().unwrap();
        let data = vec![9u8; BLOCK as usize];
        let (header, payload) = block::encode(first[3].0, &data, 3);
        let RestoreStep::ReadData(n) = r.on_message(header.clone()).unwrap() else {
            panic!("no data asked")
        };
        assert_eq!(n as usize, payload.len());
        let RestoreStep::Write(w) = r.on_data(payload.clone()).unwrap() else {
            panic!("nothing to write")
        };
        assert_eq!((w.offset, u64::from(w.len)), (first[3].0, BLOCK));
        assert_eq!(w.decode().unwrap(), Some(data.clone()));
        assert_eq!(r.progress().blocks_received, 1);
        // The same block again, or one before it, or one not where a
        // block of the volume starts, is the peer's fault.
        assert_eq!(
            r.clone().on_message(header).unwrap_err().kind(),
            ErrorKind::Peer
        );
        let (before, _) = block::encode(first[1].0, &data, 3);
        assert_eq!(
            r.clone().on_message(before).unwrap_err().kind(),
            ErrorKind::Peer
        );
        let (askew, _) = block::encode(first[4].0 + 512, &data, 3);
        assert_eq!(
            r.clone().on_message(askew).unwrap_err().kind(),
            ErrorKind::Peer
        );
        let (short, _) = block::encode(first[4].0, &data[..1000], 3);
        assert_eq!(
            r.clone().on_message(short).unwrap_err().kind(),
            ErrorKind::Peer
        );
        // Damaged bytes are the peer's fault and never written.
        let (header, payload) = block::encode(first[4].0, &data, 3);
        r.on_message(header).unwrap();
        let mut bad = payload;
        bad[0] ^= 0xff;
        let RestoreStep::Write(w) = r.on_data(bad).unwrap() else {
            panic!("nothing to write")
        };
        assert_eq!(w.decode().unwrap_err().kind(), ErrorKind::Peer);
        // Two sent and the rest the same: the batch is answered.
        let rest = batch_bytes() / BLOCK - 2;
        assert!(matches!(
            r.on_message(Message::HaveDone { same: rest }).unwrap(),
            RestoreStep::Progress(_)
        ));
        // In the second batch, not asked for yet.
        let (header, _) = block::encode(batch_bytes(), &[1], 3);
        assert_eq!(r.on_message(header).unwrap_err().kind(), ErrorKind::Peer);
        // Past the end.
        let mut r = RestoreReader::new(info(size)).unwrap();
        r.next_batch();
        r.next_batch();
        let (header, _) = block::encode(size - 1, &[1, 2], 3);
        assert_eq!(r.on_message(header).unwrap_err().kind(), ErrorKind::Peer);
    }

    /// Going on from an earlier restore's progress: the batches it
    /// finished are not asked for again (one part done is, whole), its
    /// counts go on, and the answers are checked from the batch it goes
    /// on at.
    #[test]
    fn a_restore_goes_on_from_the_batches_an_earlier_one_finished() {
        let size = 3 * batch_bytes();
        let mut r = RestoreReader::new(info(size)).unwrap();
        r.resume(Progress {
            done: batch_bytes() + 5,
            total: size,
            received: 10,
            blocks_same: 3,
            blocks_received: 2,
        });
        assert_eq!(
            (r.progress().done, r.progress().blocks_same),
            (batch_bytes(), 3)
        );
        assert_eq!(r.next_batch().unwrap()[0].0, batch_bytes());
        let (before, _) = block::encode(0, &vec![1u8; BLOCK as usize], 3);
        assert_eq!(
            r.clone().on_message(before).unwrap_err().kind(),
            ErrorKind::Peer
        );
        let whole = batch_bytes() / BLOCK;
        let RestoreStep::Progress(p) = r.on_message(Message::HaveDone { same: whole }).unwrap()
        else {
            panic!("no progress")
        };
        assert_eq!(
            (p.done, p.blocks_same, p.blocks_received, p.received),
            (2 * batch_bytes(), 3 + whole, 2, 10)
        );
        // Once under way, a resume changes nothing.
        r.resume(Progress::default());
        assert_eq!(r.progress().done, 2 * batch_bytes());
    }

    #[test]
    fn refusals_and_surprises_keep_their_kind() {
        let e = RestoreReader::new(Message::Refused {
            reason: "no such snapshot".into(),
        })
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Refused);
        assert_eq!(
            RestoreReader::new(Message::EndEpoch).unwrap_err().kind(),
            ErrorKind::Peer
        );
        let mut r = RestoreReader::new(info(10)).unwrap();
        r.next_batch();
        assert_eq!(
            r.on_message(Message::Committed { epoch: 1 })
                .unwrap_err()
                .kind(),
            ErrorKind::Peer
        );
        // An empty volume is done at once.
        let mut r = RestoreReader::new(info(0)).unwrap();
        assert!(r.is_done());
        assert!(r.next_batch().is_none());
    }

    #[test]
    fn the_server_plans_a_have_inside_the_volume_only() {
        let size = 3 * BLOCK + 5;
        assert_eq!(
            plan_have(2 * BLOCK, BLOCK as u32, 4, size).unwrap(),
            vec![(2 * BLOCK, BLOCK as u32), (3 * BLOCK, 5)]
        );
        assert!(plan_have(size, BLOCK as u32, 1, size).is_err());
        assert!(plan_have(1, BLOCK as u32, 1, size).is_err());
        assert!(plan_have(0, 0, 1, size).is_err());
        assert!(plan_have(0, BLOCK as u32, 1025, size)
            .unwrap_err()
            .contains("64 MiB"));
        // One block of 64 MiB fits the batch, not the block limit.
        assert!(plan_have(0, 64 << 20, 1, 128 << 20)
            .unwrap_err()
            .contains("at most"));
        assert!(plan_have(0, MAX_HAVE_BLOCK as u32, 2, 128 << 20).is_ok());
    }
}
