//! The client's side of an epoch: what to send, what the server holds
//! already, what to vouch for, what to send again.
//!
//! ```text
//!  start ─▶ Control(BeginEpoch)
//!  Staged{done:false}*  ─▶ (wait)
//!  Staged{done:true}    ─▶ Compare(batch)*   only when the staging was adopted
//!  Compared             ─▶ Compare(next) | Round(todo)
//!  RoundDone{refused}   ─▶ Round(refused)    at most ROUNDS rounds in all
//!                       ─▶ Control(EndEpoch) nothing refused
//!                          (a pre-copy round: Control(EndRound))
//!  Committed{epoch}     ─▶ Published(shipped)
//!  RoundStaged{epoch}   ─▶ RoundStaged(shipped)
//!  Refused | Lost       ─▶ error (the epoch stays unpublished and is tried
//!                          again on a new link, resuming what was staged)
//! ```
//!
//! **Resume.** The server answers `BeginEpoch` with the ranges it holds
//! staged from an interrupted attempt at the same epoch of the same
//! writer; blocks wholly inside them do not travel again.
//!
//! **Take-over.** When the staging was left by an *earlier* epoch of the
//! same device (`adopted`), the server publishes every staged byte with
//! this epoch unless it is sent again, so the client vouches for all of
//! it: staged blocks of this epoch are compared by digest (the server's
//! against the device's at this epoch) and sent when they differ, and
//! staged bytes outside this epoch's blocks are sent as this epoch has
//! them, in aligned pieces of at most [`block::BLOCK`].
//!
//! **Pre-copy rounds** (V5, [`EpochSender::round`]). An epoch may be sent
//! in rounds of the same epoch and writer, each but the last ended with
//! `EndRound` (kept staged, not published). The first round resumes as
//! above. A later round (`held`: what the earlier rounds sent) skips
//! nothing: a staged copy of one of its blocks may be an earlier round's,
//! older than the device's. What the earlier rounds sent and the server
//! no longer holds (another server, a staging dropped) is sent again, as
//! the device has it now; a round that was to publish then ends with
//! `EndRound` instead ([`SendAction::RoundStaged`]): those blocks were
//! not read at its cut, so another round must follow.

use crate::block;
use crate::proto::{Digest, Message, Writer, MAX_HASH_BLOCKS};
use crate::session::{unexpected, Shipped};
use crate::{Error, RangeSet, Result};

/// Rounds of data streams an epoch may take (the first and resends).
pub const ROUNDS: usize = 3;

/// What the driver of an [`EpochSender`] does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendAction {
    /// Send this on the control stream.
    Control(Message),
    /// Compare these staged blocks: ask the server their staged digests
    /// ([`Message::StagedHashes`]) and hash them as this epoch has them;
    /// report [`SendEvent::Compared`].
    Compare(Vec<(u64, u32)>),
    /// Send these blocks over data streams ([`DataSender`]); report
    /// [`SendEvent::RoundDone`].
    Round(Vec<(u64, u32)>),
    /// The server published the epoch.
    Published(Shipped),
    /// The server holds the round durably staged, unpublished.
    RoundStaged(Shipped),
}

/// How an epoch's sending ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// `EndEpoch`: publish it.
    Publish,
    /// `EndRound` (V5): keep it staged for another round.
    Round,
}

/// What happened, for an [`EpochSender`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendEvent {
    /// A message arrived on the control stream.
    Control(Message),
    /// The digests of a [`SendAction::Compare`] batch, in its order.
    Compared {
        /// The server's.
        theirs: Vec<Digest>,
        /// This epoch's.
        mine: Vec<Digest>,
    },
    /// Every data stream of a round ended.
    RoundDone {
        /// Blocks the server refused (they failed their checks).
        refused: Vec<(u64, u32)>,
        /// What the round's streams sent.
        shipped: Shipped,
    },
    /// The link failed (why).
    Lost(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    New,
    /// Waiting for the last `Staged` frame.
    Opening,
    /// Waiting for the digests of `check[next - 1]`.
    Comparing {
        next: usize,
    },
    /// Waiting for round `round` (1-based) to end.
    Sending {
        round: usize,
    },
    /// `EndEpoch` (or `EndRound`) sent; waiting for `Committed` (or
    /// `RoundStaged`).
    Ending,
    Published,
    Failed,
}

/// One epoch being sent.
#[derive(Debug, Clone)]
pub struct EpochSender {
    volume: String,
    epoch: u64,
    writer: Writer,
    blocks: Vec<(u64, u32)>,
    state: State,
    staged: RangeSet,
    adopted: bool,
    /// Staged blocks to compare, in batches.
    check: Vec<Vec<(u64, u32)>>,
    todo: Vec<(u64, u32)>,
    shipped: Shipped,
    finish: Finish,
    /// A later pre-copy round: what the earlier ones sent.
    held: Option<Held>,
    /// Part of a pre-copy run ([`EpochSender::round`]): may end as a
    /// round instead of publishing.
    rounds: bool,
}

impl EpochSender {
    /// Send `blocks` (`(offset, len)`, in the order they should go) as
    /// epoch `epoch` of `volume`, written by `writer`.
    pub fn new(volume: &str, epoch: u64, writer: Writer, blocks: Vec<(u64, u32)>) -> EpochSender {
        let mut sender = EpochSender::round(volume, epoch, writer, blocks, Finish::Publish, None);
        sender.rounds = false;
        sender
    }

    /// A pre-copy round (see the module docs): `blocks` of epoch `epoch`,
    /// ended as `finish` says; `held`: what earlier rounds of the same
    /// epoch and writer sent (`None`: this is the first).
    pub fn round(
        volume: &str,
        epoch: u64,
        writer: Writer,
        blocks: Vec<(u64, u32)>,
        finish: Finish,
        held: Option<Held>,
    ) -> EpochSender {
        EpochSender {
            volume: volume.to_string(),
            epoch,
            writer,
            blocks,
            state: State::New,
            staged: RangeSet::new(),
            adopted: false,
            check: Vec::new(),
            todo: Vec::new(),
            shipped: Shipped::default(),
            finish,
            held,
            rounds: true,
        }
    }

    /// How it ends: [`Finish::Round`] also when it was to publish but
    /// found earlier rounds' blocks missing on the server.
    pub fn finish(&self) -> Finish {
        self.finish
    }

    /// The first thing to do.
    pub fn start(&mut self) -> SendAction {
        assert_eq!(self.state, State::New, "started twice");
        self.state = State::Opening;
        SendAction::Control(Message::BeginEpoch {
            volume: self.volume.clone(),
            epoch: self.epoch,
            writer: self.writer,
        })
    }

    /// The volume the epoch is for.
    pub fn volume(&self) -> &str {
        &self.volume
    }

    /// The epoch's number on the server.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Whether the server took over an earlier epoch's staging.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// What has been shipped so far.
    pub fn shipped(&self) -> Shipped {
        self.shipped
    }

    /// Take `event`; the next thing to do, if any (`None`: wait for the
    /// next event). An error ends the attempt.
    pub fn handle(&mut self, event: SendEvent) -> Result<Option<SendAction>> {
        let next = self.step(event);
        if next.is_err() {
            self.state = State::Failed;
        }
        next
    }

    fn step(&mut self, event: SendEvent) -> Result<Option<SendAction>> {
        match (self.state.clone(), event) {
            (_, SendEvent::Lost(why)) => Err(Error::Link(why)),
            (State::Failed | State::Published | State::New, e) => Err(Error::Link(format!(
                "epoch {}: {e:?} after the attempt ended",
                self.epoch
            ))),
            (_, SendEvent::Control(Message::Refused { reason })) => Err(Error::Refused(reason)),
            (
                State::Opening,
                SendEvent::Control(Message::Staged {
                    ranges,
                    adopted,
                    done,
                }),
            ) => {
                self.adopted |= adopted;
                for (offset, len) in ranges {
                    let end = offset.checked_add(len).ok_or_else(|| {
                        Error::Peer(format!("a staged range at {offset} overflows"))
                    })?;
                    self.staged.insert(offset..end);
                }
                if !done {
                    return Ok(None);
                }
                self.plan();
                Ok(Some(self.after_compare(0)))
            }
            (State::Comparing { next }, SendEvent::Compared { theirs, mine }) => {
                let batch = &self.check[next - 1];
                if theirs.len() != batch.len() || mine.len() != batch.len() {
                    return Err(Error::Peer(format!(
                        "{} digests for {} staged blocks",
                        theirs.len(),
                        batch.len()
                    )));
                }
                for ((&(offset, len), m), t) in batch.iter().zip(&mine).zip(&theirs) {
                    if m == t {
                        self.shipped.resumed_bytes += u64::from(len);
                    } else {
                        self.todo.push((offset, len));
                    }
                }
                Ok(Some(self.after_compare(next)))
            }
            (State::Sending { round }, SendEvent::RoundDone { refused, shipped }) => {
                self.shipped.add(&shipped);
                if refused.is_empty() {
                    return Ok(Some(self.end()));
                }
                if round >= ROUNDS {
                    return Err(Error::Link(format!(
                        "epoch {}: {} blocks kept failing their checks on the server",
                        self.epoch,
                        refused.len()
                    )));
                }
                tracing::warn!(
                    blocks = refused.len(),
                    "the server refused blocks; sending them again"
                );
                self.state = State::Sending { round: round + 1 };
                Ok(Some(SendAction::Round(refused)))
            }
            (State::Ending, SendEvent::Control(Message::Committed { epoch }))
                if epoch == self.epoch && self.finish == Finish::Publish =>
            {
                self.state = State::Published;
                Ok(Some(SendAction::Published(self.shipped)))
            }
            (State::Ending, SendEvent::Control(Message::RoundStaged { epoch }))
                if epoch == self.epoch && self.finish == Finish::Round =>
            {
                self.state = State::Published;
                Ok(Some(SendAction::RoundStaged(self.shipped)))
            }
            (state, SendEvent::Control(m)) => Err(unexpected(&m, &format!("in {state:?}"))),
            (state, e) => Err(Error::Link(format!(
                "epoch {}: {e:?} while {state:?} (a driver bug)",
                self.epoch
            ))),
        }
    }

    /// Split the epoch's blocks by what the server holds.
    fn plan(&mut self) {
        let mut check = Vec::new();
        if self.held.is_some() {
            // A later round: the first one vouched for what it took
            // over, and a staged copy may be an earlier round's.
            self.adopted = false;
            self.todo.extend(self.blocks.iter().copied());
        } else if self.adopted {
            let mut covered = RangeSet::new();
            for &(offset, len) in &self.blocks {
                let range = offset..offset + u64::from(len);
                covered.insert(range.clone());
                if self.staged.contains_range(range) {
                    check.push((offset, len));
                } else {
                    self.todo.push((offset, len));
                }
            }
            // Staged, and not this epoch's to send: sent again as this
            // epoch has it.
            let mut extra = self.staged.clone();
            extra.subtract(&covered);
            if !extra.is_empty() && self.rounds {
                // A pre-copy run reads them as the device is now, not
                // at a cut: another round must follow.
                self.finish = Finish::Round;
            }
            self.todo.extend(block::split(&extra, u64::MAX));
        } else {
            for &(offset, len) in &self.blocks {
                if self.staged.contains_range(offset..offset + u64::from(len)) {
                    self.shipped.resumed_bytes += u64::from(len);
                } else {
                    self.todo.push((offset, len));
                }
            }
        }
        if let Some(held) = &self.held {
            let mut missing = held.ranges.clone();
            if held.here {
                missing.subtract(&self.staged);
            } else if !missing.is_empty() {
                // Staged on another server: what this one holds of the
                // run may be an older round's copy of a block rewritten
                // since, and would be published as it is.
                tracing::warn!(
                    epoch = self.epoch,
                    bytes = missing.len(),
                    "earlier pre-copy rounds were staged on another server: sending them again"
                );
            }
            let mine: RangeSet = self
                .blocks
                .iter()
                .map(|&(o, l)| o..o + u64::from(l))
                .collect();
            missing.subtract(&mine);
            if !missing.is_empty() {
                tracing::warn!(
                    epoch = self.epoch,
                    bytes = missing.len(),
                    "the server no longer holds what earlier pre-copy rounds sent: sending it again"
                );
                self.todo.extend(block::split(&missing, u64::MAX));
                self.todo.sort_unstable();
                // Read now, not at a cut: another round must follow.
                self.finish = Finish::Round;
            }
        }
        self.check = check.chunks(MAX_HASH_BLOCKS).map(<[_]>::to_vec).collect();
        if self.shipped.resumed_bytes > 0 || self.adopted {
            tracing::info!(
                epoch = self.epoch,
                staged = self.staged.len(),
                adopted = self.adopted,
                "resuming: the server holds part of this epoch already"
            );
        }
    }

    /// After `done` compare batches: the next batch, or the first round.
    fn after_compare(&mut self, done: usize) -> SendAction {
        if let Some(batch) = self.check.get(done) {
            self.state = State::Comparing { next: done + 1 };
            return SendAction::Compare(batch.clone());
        }
        let mut todo = std::mem::take(&mut self.todo);
        if self.adopted {
            // Vouched-for blocks were added out of order.
            todo.sort_unstable();
        }
        if todo.is_empty() {
            return self.end();
        }
        self.state = State::Sending { round: 1 };
        SendAction::Round(todo)
    }

    fn end(&mut self) -> SendAction {
        self.state = State::Ending;
        SendAction::Control(match self.finish {
            Finish::Publish => Message::EndEpoch,
            Finish::Round => Message::EndRound,
        })
    }
}

/// What earlier pre-copy rounds of a run sent, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// The bytes they sent.
    pub ranges: RangeSet,
    /// They were staged on the server this round goes to. When not (the
    /// client moved to another server and back, say), a staged copy of
    /// one of them there may be an older round's, of a block rewritten
    /// since: all of them are sent again.
    pub here: bool,
}

/// One data stream of an epoch: opened, blocks counted as they go, ended
/// with the count, answered with the blocks to send again.
#[derive(Debug, Clone)]
pub struct DataSender {
    shipped: Shipped,
    ended: bool,
}

impl DataSender {
    /// A data stream of `epoch` of `volume`, and its first frame.
    pub fn open(volume: &str, epoch: u64) -> (DataSender, Message) {
        let first = Message::EpochData {
            volume: volume.to_string(),
            epoch,
        };
        let me = DataSender {
            shipped: Shipped::default(),
            ended: false,
        };
        (me, first)
    }

    /// A block of `len` bytes went as `wire` bytes of payload.
    pub fn sent(&mut self, len: u32, wire: usize) {
        debug_assert!(!self.ended, "a block after EndData");
        self.shipped.count(len, wire);
    }

    /// A block of `len` bytes went as its digest only (the server holds
    /// it).
    pub fn sent_known(&mut self, len: u32) {
        debug_assert!(!self.ended, "a block after EndData");
        self.shipped.count_known(len);
    }

    /// No more blocks: the last frame.
    pub fn end(&mut self) -> Message {
        self.ended = true;
        Message::EndData {
            blocks: self.shipped.blocks,
        }
    }

    /// The server's answer to [`DataSender::end`]: the blocks it refused,
    /// and what this stream shipped.
    pub fn answer(self, m: Message) -> Result<(Vec<(u64, u32)>, Shipped)> {
        match m {
            Message::Resend { blocks } if self.ended => Ok((blocks, self.shipped)),
            Message::Refused { reason } => Err(Error::Refused(reason)),
            other => Err(unexpected(&other, "ending a data stream")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    const B: u32 = block::BLOCK as u32;

    fn me() -> Writer {
        Writer {
            device: [7; 16],
            epoch: 40,
        }
    }

    fn blocks(n: u64) -> Vec<(u64, u32)> {
        (0..n).map(|i| (i * u64::from(B), B)).collect()
    }

    fn staged(ranges: Vec<(u64, u64)>, adopted: bool, done: bool) -> SendEvent {
        SendEvent::Control(Message::Staged {
            ranges,
            adopted,
            done,
        })
    }

    fn round_ok(shipped_blocks: &[(u64, u32)]) -> SendEvent {
        let mut shipped = Shipped::default();
        for &(_, len) in shipped_blocks {
            shipped.count(len, 10);
        }
        SendEvent::RoundDone {
            refused: Vec::new(),
            shipped,
        }
    }

    /// A sender for 4 blocks, begun.
    fn begun() -> EpochSender {
        let mut s = EpochSender::new("v", 5, me(), blocks(4));
        assert_eq!(
            s.start(),
            SendAction::Control(Message::BeginEpoch {
                volume: "v".into(),
                epoch: 5,
                writer: me()
            })
        );
        s
    }

    #[test]
    fn a_fresh_epoch_sends_everything_and_publishes() {
        let mut s = begun();
        assert_eq!(
            s.handle(staged(vec![], false, true)).unwrap(),
            Some(SendAction::Round(blocks(4)))
        );
        assert_eq!(
            s.handle(round_ok(&blocks(4))).unwrap(),
            Some(SendAction::Control(Message::EndEpoch))
        );
        let Some(SendAction::Published(shipped)) = s
            .handle(SendEvent::Control(Message::Committed { epoch: 5 }))
            .unwrap()
        else {
            panic!("not published")
        };
        assert_eq!((shipped.blocks, shipped.resumed_bytes), (4, 0));
        // Nothing after the end.
        assert!(s.handle(round_ok(&[])).is_err());
    }

    fn held(n: u64) -> Held {
        Held {
            ranges: blocks(n)
                .into_iter()
                .map(|(o, l)| o..o + u64::from(l))
                .collect(),
            here: true,
        }
    }

    #[test]
    fn a_later_round_skips_nothing_and_ends_staged() {
        let mut s = EpochSender::round("v", 5, me(), blocks(2), Finish::Round, Some(held(4)));
        s.start();
        // All staged (by earlier rounds; a leftover adoption mark is
        // theirs): every block of this round goes all the same.
        assert_eq!(
            s.handle(staged(vec![(0, 4 * u64::from(B))], true, true))
                .unwrap(),
            Some(SendAction::Round(blocks(2)))
        );
        assert_eq!(s.shipped().resumed_bytes, 0);
        assert_eq!(
            s.handle(round_ok(&blocks(2))).unwrap(),
            Some(SendAction::Control(Message::EndRound))
        );
        // Only RoundStaged ends a round.
        let mut wrong = s.clone();
        assert!(wrong
            .handle(SendEvent::Control(Message::Committed { epoch: 5 }))
            .is_err());
        assert!(matches!(
            s.handle(SendEvent::Control(Message::RoundStaged { epoch: 5 }))
                .unwrap(),
            Some(SendAction::RoundStaged(shipped)) if shipped.blocks == 2
        ));
        assert_eq!(s.finish(), Finish::Round);
    }

    #[test]
    fn what_the_server_lost_of_earlier_rounds_goes_again_and_the_cut_becomes_a_round() {
        let b = u64::from(B);
        let cut = || {
            EpochSender::round(
                "v",
                5,
                me(),
                vec![(2 * b, B)],
                Finish::Publish,
                Some(held(4)),
            )
        };
        // The cut changed block 2; earlier rounds sent blocks 0..4; the
        // server holds only block 0 (another server, a staging lost).
        let mut s = cut();
        s.start();
        assert_eq!(
            s.handle(staged(vec![(0, b)], false, true)).unwrap(),
            Some(SendAction::Round(vec![(b, B), (2 * b, B), (3 * b, B)]))
        );
        // Blocks 1 and 3 were read as the device is now, not at the cut:
        // this is not the end of the run.
        assert_eq!(s.finish(), Finish::Round);
        assert_eq!(
            s.handle(round_ok(&blocks(3))).unwrap(),
            Some(SendAction::Control(Message::EndRound))
        );
        // With nothing lost, the cut publishes.
        let mut s = cut();
        s.start();
        assert_eq!(
            s.handle(staged(vec![(0, 4 * b)], false, true)).unwrap(),
            Some(SendAction::Round(vec![(2 * b, B)]))
        );
        assert_eq!(
            s.handle(round_ok(&[(2 * b, B)])).unwrap(),
            Some(SendAction::Control(Message::EndEpoch))
        );
        assert!(matches!(
            s.handle(SendEvent::Control(Message::Committed { epoch: 5 }))
                .unwrap(),
            Some(SendAction::Published(_))
        ));
        // Earlier rounds staged on another server: this one's copies
        // (all four blocks staged) may be an older round's; all of them
        // go again, read now, and the cut is a round.
        let mut s = EpochSender::round(
            "v",
            5,
            me(),
            vec![(2 * b, B)],
            Finish::Publish,
            Some(Held {
                here: false,
                ..held(4)
            }),
        );
        s.start();
        assert_eq!(
            s.handle(staged(vec![(0, 4 * b)], false, true)).unwrap(),
            Some(SendAction::Round(blocks(4)))
        );
        assert_eq!(s.finish(), Finish::Round);
    }

    #[test]
    fn only_a_run_s_first_round_ends_staged_after_vouching_for_a_take_over() {
        let b = u64::from(B);
        // Taken over with bytes outside the blocks: a first round reads
        // them as the device is now and stays a round...
        let mut s = EpochSender::round("v", 5, me(), blocks(1), Finish::Publish, None);
        s.start();
        s.handle(staged(vec![(3 * b, b)], true, true)).unwrap();
        assert_eq!(s.finish(), Finish::Round);
        // ...an ordinary epoch sends them as it has them and publishes.
        let mut s = begun();
        assert_eq!(
            s.handle(staged(vec![(5 * b, b)], true, true)).unwrap(),
            Some(SendAction::Round(vec![
                (0, B),
                (b, B),
                (2 * b, B),
                (3 * b, B),
                (5 * b, B)
            ]))
        );
        assert_eq!(s.finish(), Finish::Publish);
    }

    #[test]
    fn a_resumed_epoch_sends_only_what_is_not_staged() {
        let mut s = begun();
        // Staged over two frames: block 0 whole, block 2 whole, half of 3.
        assert_eq!(
            s.handle(staged(vec![(0, u64::from(B))], false, false))
                .unwrap(),
            None
        );
        let next = s
            .handle(staged(
                vec![(2 * u64::from(B), u64::from(B) + 100)],
                false,
                true,
            ))
            .unwrap();
        assert_eq!(
            next,
            Some(SendAction::Round(vec![
                (u64::from(B), B),
                (3 * u64::from(B), B)
            ]))
        );
        assert_eq!(s.shipped().resumed_bytes, 2 * u64::from(B));
        // All staged: straight to the end.
        let mut s = begun();
        assert_eq!(
            s.handle(staged(vec![(0, 4 * u64::from(B))], false, true))
                .unwrap(),
            Some(SendAction::Control(Message::EndEpoch))
        );
    }

    #[test]
    fn blocks_go_in_the_order_given() {
        // The device may put what matters most first.
        let mut order = blocks(4);
        order.reverse();
        let mut s = EpochSender::new("v", 5, me(), order.clone());
        s.start();
        assert_eq!(
            s.handle(staged(vec![], false, true)).unwrap(),
            Some(SendAction::Round(order))
        );
    }

    #[test]
    fn a_taken_over_staging_is_vouched_for_block_by_block() {
        let mut s = begun();
        // Staged by an earlier epoch: blocks 1 and 2, and 10 bytes past
        // this epoch's blocks (at 6 × B), which this epoch must send too.
        let six = 6 * u64::from(B);
        let next = s
            .handle(staged(
                vec![(u64::from(B), 2 * u64::from(B)), (six, 10)],
                true,
                true,
            ))
            .unwrap();
        assert!(s.adopted());
        assert_eq!(
            next,
            Some(SendAction::Compare(vec![
                (u64::from(B), B),
                (2 * u64::from(B), B)
            ]))
        );
        // Block 1 is the same, block 2 differs.
        let next = s
            .handle(SendEvent::Compared {
                theirs: vec![[1; 32], [2; 32]],
                mine: vec![[1; 32], [3; 32]],
            })
            .unwrap();
        assert_eq!(
            next,
            Some(SendAction::Round(vec![
                (0, B),
                (2 * u64::from(B), B),
                (3 * u64::from(B), B),
                (six, 10)
            ]))
        );
        assert_eq!(s.shipped().resumed_bytes, u64::from(B));
    }

    #[test]
    fn compared_digests_must_match_the_batch() {
        let mut s = begun();
        s.handle(staged(vec![(0, u64::from(B))], true, true))
            .unwrap();
        let e = s
            .handle(SendEvent::Compared {
                theirs: vec![],
                mine: vec![[0; 32]],
            })
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Peer);
    }

    #[test]
    fn refused_blocks_are_resent_for_a_few_rounds_then_given_up() {
        let mut s = begun();
        s.handle(staged(vec![], false, true)).unwrap();
        let refused = vec![(0, B)];
        let refuse = || SendEvent::RoundDone {
            refused: refused.clone(),
            shipped: Shipped::default(),
        };
        for _ in 1..ROUNDS {
            assert_eq!(
                s.handle(refuse()).unwrap(),
                Some(SendAction::Round(refused.clone()))
            );
        }
        let e = s.handle(refuse()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Link, "{e}");
        // A resend that succeeds ends the epoch.
        let mut s = begun();
        s.handle(staged(vec![], false, true)).unwrap();
        s.handle(refuse()).unwrap();
        assert_eq!(
            s.handle(round_ok(&refused)).unwrap(),
            Some(SendAction::Control(Message::EndEpoch))
        );
    }

    #[test]
    fn refusals_and_surprises_end_the_attempt_with_their_kind() {
        let mut s = begun();
        let e = s
            .handle(SendEvent::Control(Message::Refused {
                reason: "quota".into(),
            }))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Refused);
        let mut s = begun();
        let e = s.handle(SendEvent::Control(Message::EndEpoch)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Peer);
        // Committed for another epoch is not this one's.
        let mut s = begun();
        s.handle(staged(vec![(0, 4 * u64::from(B))], false, true))
            .unwrap();
        let e = s
            .handle(SendEvent::Control(Message::Committed { epoch: 4 }))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Peer);
        // A staged range that overflows is the peer's fault.
        let mut s = begun();
        let e = s
            .handle(staged(vec![(u64::MAX, 2)], false, true))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Peer);
    }

    /// The whole exchange, as events; the link is lost before event `k`.
    fn script() -> Vec<SendEvent> {
        vec![
            staged(vec![(0, u64::from(B))], true, false),
            staged(vec![], true, true),
            SendEvent::Compared {
                theirs: vec![[1; 32]],
                mine: vec![[1; 32]],
            },
            SendEvent::RoundDone {
                refused: vec![(u64::from(B), B)],
                shipped: Shipped::default(),
            },
            round_ok(&blocks(3)),
            SendEvent::Control(Message::Committed { epoch: 5 }),
        ]
    }

    #[test]
    fn a_link_lost_at_any_step_fails_the_attempt_and_never_publishes() {
        let all = script();
        // The script itself publishes.
        let mut s = begun();
        let mut last = None;
        for e in all.clone() {
            last = s.handle(e).unwrap();
        }
        assert!(matches!(last, Some(SendAction::Published(_))));
        for k in 0..all.len() {
            let mut s = begun();
            for e in all[..k].iter().cloned() {
                s.handle(e).unwrap();
            }
            let e = s.handle(SendEvent::Lost("gone".into())).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Link);
            // Nothing more is taken from a failed attempt.
            for e in all[k..].iter().cloned() {
                assert!(s.handle(e).is_err());
            }
        }
    }

    #[test]
    fn data_streams_count_and_take_their_answer() {
        let (mut d, first) = DataSender::open("v", 5);
        assert_eq!(
            first,
            Message::EpochData {
                volume: "v".into(),
                epoch: 5
            }
        );
        d.sent(B, 0);
        d.sent(100, 50);
        assert_eq!(d.end(), Message::EndData { blocks: 2 });
        let (refused, shipped) = d
            .clone()
            .answer(Message::Resend {
                blocks: vec![(0, B)],
            })
            .unwrap();
        assert_eq!(refused, vec![(0, B)]);
        assert_eq!(
            (shipped.blocks, shipped.zero_bytes, shipped.wire_bytes),
            (2, u64::from(B), 50)
        );
        assert_eq!(
            d.clone()
                .answer(Message::Refused { reason: "x".into() })
                .unwrap_err()
                .kind(),
            ErrorKind::Refused
        );
        assert_eq!(
            d.answer(Message::EndEpoch).unwrap_err().kind(),
            ErrorKind::Peer
        );
        // An answer before the end is a surprise.
        let (early, _) = DataSender::open("v", 5);
        assert!(early.answer(Message::Resend { blocks: vec![] }).is_err());
    }
}
