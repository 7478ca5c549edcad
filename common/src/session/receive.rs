//! The server's side of an epoch.
//!
//! ```text
//! control stream                          each data stream
//! BeginEpoch  ─▶ (driver opens staging)   EpochData ─▶ (driver finds staging)
//! staged()    ─▶ Staged frames            Block     ─▶ Stage (driver checks,
//! EndEpoch    ─▶ Publish                               stages, reports back)
//! published() ─▶ Committed                EndData   ─▶ Resend{refused}
//! EndRound    ─▶ Sync (V5: durable, kept, not published)
//! synced()    ─▶ RoundStaged
//! ```
//!
//! In V3 a data stream may also ask which chunks the server holds
//! (`HaveChunks` ─▶ [`DataAction::Query`]; the driver answers
//! `KnownChunks` at once, in order with the stream's other answers), and
//! a block may then travel as `Known`: its bytes come from the server's
//! store, and are checked against the digest like any others.
//!
//! A block that fails its check (damaged on the way) is asked for again,
//! up to [`MAX_RESEND`] a stream; more than that, or a failure of the
//! server's own storage, refuses the stream with the reason. A block
//! count at `EndData` that is not what arrived, or any frame out of
//! place, is a protocol violation ([`Error::Peer`]): the driver ends the
//! connection. A data stream that stays silent for [`MESSAGE_TIMEOUT`]
//! is dropped ([`DataReceiver::deadline`]; time is a value here).

use std::time::{Duration, Instant};

use crate::proto::{Digest, Encoding, Message, Version, MAX_RESEND, MAX_STAGED_RANGES};
use crate::session::unexpected;
use crate::{Error, Result};

/// Longest wait for the next message of a data stream.
pub const MESSAGE_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Opening,
    Receiving,
    Publishing,
    Syncing,
    Done,
}

/// What the driver does once the client ended the control stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// `EndEpoch`: publish the epoch, then [`EpochReceiver::published`].
    Publish,
    /// `EndRound` (V5): make the staging durable and keep it for the same
    /// writer, then [`EpochReceiver::synced`].
    Round,
}

/// The control stream of one epoch being received.
#[derive(Debug, Clone)]
pub struct EpochReceiver {
    epoch: u64,
    state: State,
}

impl EpochReceiver {
    /// Epoch `epoch`, begun (its staging being opened by the driver).
    pub fn new(epoch: u64) -> EpochReceiver {
        EpochReceiver {
            epoch,
            state: State::Opening,
        }
    }

    /// The staging is open and holds `ranges` (`(offset, len)`) already;
    /// `adopted`: taken over from an earlier epoch of the writer. The
    /// frames that tell the client (at least one; the last is `done`).
    pub fn staged(&mut self, ranges: &[(u64, u64)], adopted: bool) -> Vec<Message> {
        assert_eq!(self.state, State::Opening, "staged twice");
        self.state = State::Receiving;
        let mut frames: Vec<Message> = ranges
            .chunks(MAX_STAGED_RANGES)
            .map(|chunk| Message::Staged {
                ranges: chunk.to_vec(),
                adopted,
                done: false,
            })
            .collect();
        if frames.is_empty() {
            frames.push(Message::Staged {
                ranges: Vec::new(),
                adopted,
                done: false,
            });
        }
        if let Some(Message::Staged { done, .. }) = frames.last_mut() {
            *done = true;
        }
        frames
    }

    /// A message on the control stream after the `Staged` frames: only
    /// `EndEpoch` (publish now) or `EndRound` (keep it staged) is allowed.
    pub fn on_control(&mut self, m: &Message) -> Result<Ending> {
        match (self.state, m) {
            (State::Receiving, Message::EndEpoch) => {
                self.state = State::Publishing;
                Ok(Ending::Publish)
            }
            (State::Receiving, Message::EndRound) => {
                self.state = State::Syncing;
                Ok(Ending::Round)
            }
            (state, m) => Err(unexpected(m, &format!("inside an epoch ({state:?})"))),
        }
    }

    /// The epoch is published: the answer.
    pub fn published(&mut self) -> Message {
        assert_eq!(self.state, State::Publishing, "published before EndEpoch");
        self.state = State::Done;
        Message::Committed { epoch: self.epoch }
    }

    /// The round's staging is durable: the answer.
    pub fn synced(&mut self) -> Message {
        assert_eq!(self.state, State::Syncing, "synced before EndRound");
        self.state = State::Done;
        Message::RoundStaged { epoch: self.epoch }
    }

    /// Publishing (or syncing a round) failed (`why`): the answer.
    pub fn publish_failed(&mut self, why: &str) -> Message {
        self.state = State::Done;
        Message::Refused {
            reason: format!("the server cannot publish epoch {}: {why}", self.epoch),
        }
    }
}

/// What the driver of a [`DataReceiver`] does with a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataAction {
    /// Read the block's `data_len` bytes, check and stage them, and report
    /// with [`DataReceiver::on_staged`].
    Stage {
        /// Device offset.
        offset: u64,
        /// Decoded length.
        len: u32,
        /// Its digest.
        sha256: Digest,
        /// How it travels.
        encoding: Encoding,
        /// Bytes that follow the header.
        data_len: u32,
    },
    /// (V3) Answer with [`Message::KnownChunks`]: which of these chunks
    /// the server holds for this client.
    Query(Vec<Digest>),
    /// The stream is over: send this answer and finish.
    Answer(Message),
}

/// How staging one block went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StageOutcome {
    /// Checked and staged.
    Staged,
    /// Its bytes failed their check (why): ask for it again.
    Damaged(String),
    /// It cannot be staged at all (why): the stream is refused.
    Failed(String),
}

/// One data stream of an epoch being received.
#[derive(Debug, Clone)]
pub struct DataReceiver {
    epoch: u64,
    version: Version,
    received: u64,
    refused: Vec<(u64, u32)>,
    deadline: Instant,
    ended: bool,
}

impl DataReceiver {
    /// A data stream of `epoch` that speaks `version`, opened at `now`.
    pub fn new(epoch: u64, version: Version, now: Instant) -> DataReceiver {
        DataReceiver {
            epoch,
            version,
            received: 0,
            refused: Vec::new(),
            deadline: now + MESSAGE_TIMEOUT,
            ended: false,
        }
    }

    /// When the stream is dropped if nothing more arrives.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Why the stream is dropped once its [`DataReceiver::deadline`]
    /// passed with nothing received.
    pub fn timed_out(&self) -> Error {
        Error::Link(format!(
            "epoch {}: nothing received for {MESSAGE_TIMEOUT:?}; dropping the stream",
            self.epoch
        ))
    }

    /// A message arrived at `now`.
    pub fn on_message(&mut self, m: Message, now: Instant) -> Result<DataAction> {
        if self.ended {
            return Err(unexpected(&m, "after EndData"));
        }
        self.deadline = now + MESSAGE_TIMEOUT;
        m.check_version(self.version)?;
        match m {
            Message::HaveChunks { digests } => Ok(DataAction::Query(digests)),
            Message::Block {
                offset,
                len,
                sha256,
                encoding,
                data_len,
            } => {
                self.received += 1;
                Ok(DataAction::Stage {
                    offset,
                    len,
                    sha256,
                    encoding,
                    data_len,
                })
            }
            Message::EndData { blocks } if blocks == self.received => {
                self.ended = true;
                Ok(DataAction::Answer(Message::Resend {
                    blocks: std::mem::take(&mut self.refused),
                }))
            }
            Message::EndData { blocks } => Err(Error::Peer(format!(
                "epoch {}: {blocks} blocks announced, {} received",
                self.epoch, self.received
            ))),
            other => Err(unexpected(&other, "inside an epoch's data")),
        }
    }

    /// How staging the block at `offset` went; `Some(reason)`: refuse
    /// the stream with it.
    pub fn on_staged(&mut self, offset: u64, len: u32, outcome: StageOutcome) -> Option<String> {
        match outcome {
            StageOutcome::Staged => None,
            StageOutcome::Damaged(why) => {
                tracing::warn!(
                    epoch = self.epoch,
                    offset,
                    "block refused, asking for it again: {why}"
                );
                if self.refused.len() >= MAX_RESEND {
                    return Some(format!(
                        "epoch {}: more than {MAX_RESEND} blocks failed their checks; is the link corrupting data?",
                        self.epoch
                    ));
                }
                self.refused.push((offset, len));
                None
            }
            StageOutcome::Failed(why) => Some(why),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn staged_ranges_go_in_frames_the_last_one_done() {
        let mut r = EpochReceiver::new(3);
        assert_eq!(
            r.staged(&[], true),
            vec![Message::Staged {
                ranges: vec![],
                adopted: true,
                done: true
            }]
        );
        let ranges: Vec<(u64, u64)> = (0..MAX_STAGED_RANGES as u64 + 1)
            .map(|i| (i * 10, 5))
            .collect();
        let mut r = EpochReceiver::new(3);
        let frames = r.staged(&ranges, false);
        assert_eq!(frames.len(), 2);
        let dones: Vec<bool> = frames
            .iter()
            .map(|f| matches!(f, Message::Staged { done: true, .. }))
            .collect();
        assert_eq!(dones, vec![false, true]);
        let back: Vec<(u64, u64)> = frames
            .into_iter()
            .flat_map(|f| match f {
                Message::Staged { ranges, .. } => ranges,
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(back, ranges);
    }

    #[test]
    fn only_end_epoch_publishes() {
        let mut r = EpochReceiver::new(3);
        // Before the staging is open, nothing is expected.
        assert_eq!(
            r.on_control(&Message::EndEpoch).unwrap_err().kind(),
            ErrorKind::Peer
        );
        let mut r = EpochReceiver::new(3);
        r.staged(&[], false);
        let e = r.on_control(&Message::EndData { blocks: 0 }).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Peer);
        let mut r = EpochReceiver::new(3);
        r.staged(&[], false);
        r.on_control(&Message::EndEpoch).unwrap();
        assert_eq!(r.published(), Message::Committed { epoch: 3 });
        // Twice is too many.
        assert!(r.on_control(&Message::EndEpoch).is_err());
        let mut r = EpochReceiver::new(4);
        assert!(
            matches!(r.publish_failed("disk full"), Message::Refused { reason } if reason.contains("epoch 4") && reason.contains("disk full"))
        );
    }

    #[test]
    fn end_round_keeps_the_epoch_staged() {
        let mut r = EpochReceiver::new(3);
        r.staged(&[], false);
        assert_eq!(r.on_control(&Message::EndRound).unwrap(), Ending::Round);
        assert_eq!(r.synced(), Message::RoundStaged { epoch: 3 });
        // One ending per control stream.
        assert!(r.on_control(&Message::EndEpoch).is_err());
        let mut r = EpochReceiver::new(3);
        r.staged(&[], false);
        assert_eq!(r.on_control(&Message::EndEpoch).unwrap(), Ending::Publish);
    }

    fn block(offset: u64) -> Message {
        Message::Block {
            offset,
            len: 4096,
            sha256: [0; 32],
            encoding: Encoding::Zero,
            data_len: 0,
        }
    }

    #[test]
    fn a_data_stream_stages_blocks_and_answers_with_the_damaged_ones() {
        let t0 = Instant::now();
        let mut d = DataReceiver::new(9, Version::CURRENT, t0);
        for (i, outcome) in [
            StageOutcome::Staged,
            StageOutcome::Damaged("sha256".into()),
            StageOutcome::Staged,
        ]
        .into_iter()
        .enumerate()
        {
            let at = i as u64 * 4096;
            let DataAction::Stage { offset, len, .. } = d.on_message(block(at), t0).unwrap() else {
                panic!("not staged")
            };
            assert_eq!((offset, len), (at, 4096));
            assert_eq!(d.on_staged(offset, len, outcome), None);
        }
        assert_eq!(
            d.on_message(Message::EndData { blocks: 3 }, t0).unwrap(),
            DataAction::Answer(Message::Resend {
                blocks: vec![(4096, 4096)]
            })
        );
        assert!(d.on_message(block(0), t0).is_err());
    }

    #[test]
    fn a_miscount_or_a_stray_frame_is_a_violation() {
        let t0 = Instant::now();
        let mut d = DataReceiver::new(9, Version::CURRENT, t0);
        d.on_message(block(0), t0).unwrap();
        let e = d
            .on_message(Message::EndData { blocks: 2 }, t0)
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Peer);
        let mut d = DataReceiver::new(9, Version::CURRENT, t0);
        let e = d.on_message(Message::EndEpoch, t0).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Peer);
    }

    #[test]
    fn too_many_damaged_blocks_or_a_storage_failure_refuse_the_stream() {
        let t0 = Instant::now();
        let mut d = DataReceiver::new(9, Version::CURRENT, t0);
        for i in 0..MAX_RESEND as u64 {
            assert_eq!(d.on_staged(i, 1, StageOutcome::Damaged("x".into())), None);
        }
        let why = d
            .on_staged(0, 1, StageOutcome::Damaged("x".into()))
            .unwrap();
        assert!(why.contains("corrupting"), "{why}");
        let mut d = DataReceiver::new(9, Version::CURRENT, t0);
        assert_eq!(
            d.on_staged(0, 1, StageOutcome::Failed("disk full".into())),
            Some("disk full".into())
        );
    }

    #[test]
    fn v3_streams_ask_which_chunks_are_known_and_v2_streams_may_not() {
        let t0 = Instant::now();
        let ask = Message::HaveChunks {
            digests: vec![[1; 32], [2; 32]],
        };
        let known = Message::Block {
            offset: 0,
            len: 4096,
            sha256: [1; 32],
            encoding: Encoding::Known,
            data_len: 0,
        };
        let mut d = DataReceiver::new(9, Version::V3, t0);
        assert_eq!(
            d.on_message(ask.clone(), t0).unwrap(),
            DataAction::Query(vec![[1; 32], [2; 32]])
        );
        assert!(matches!(
            d.on_message(known.clone(), t0).unwrap(),
            DataAction::Stage {
                encoding: Encoding::Known,
                ..
            }
        ));
        // Questions are not blocks: the count is of blocks only.
        assert_eq!(
            d.on_message(Message::EndData { blocks: 1 }, t0).unwrap(),
            DataAction::Answer(Message::Resend { blocks: vec![] })
        );
        for m in [ask, known] {
            let mut d = DataReceiver::new(9, Version::V2, t0);
            let e = d.on_message(m, t0).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Peer, "{e}");
        }
    }

    #[test]
    fn a_silent_stream_times_out_and_each_message_extends_it() {
        let t0 = Instant::now();
        let mut d = DataReceiver::new(9, Version::CURRENT, t0);
        assert_eq!(d.deadline(), t0 + MESSAGE_TIMEOUT);
        let later = t0 + MESSAGE_TIMEOUT / 2;
        d.on_message(block(0), later).unwrap();
        assert_eq!(d.deadline(), later + MESSAGE_TIMEOUT);
        assert_eq!(d.timed_out().kind(), ErrorKind::Link);
    }
}
