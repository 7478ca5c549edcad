//! The replication protocol's decisions as sans-IO state machines, in the
//! manner of `quinn-proto`: a machine takes events (a message received, a
//! piece of work finished, the link lost, the time now) and answers with
//! what to do next (a message to send, blocks to compare or ship, bytes to
//! write). It never touches a socket, a file or the clock; the async code
//! that owns those (`crate::client`, the server's session handlers, the
//! device's restore) is a driver that does what it is told and reports
//! back, so every step can be tested one at a time, with fake time.
//!
//! - [`send::EpochSender`] and [`send::DataSender`]: the client's side of
//!   an epoch (resume, take-over vouching, resend rounds).
//! - [`receive::EpochReceiver`] and [`receive::DataReceiver`]: the
//!   server's side of the same.
//! - [`restore::RestoreReader`]: the client's side of a restore (batches
//!   asked a window ahead, blocks checked before they are written).
//! - [`Pacer`]: a bandwidth limit, with time as a value.
//!
//! The frames themselves are [`crate::proto`]'s, and a block's bytes are
//! [`crate::block`]'s.

use std::time::{Duration, Instant};

use crate::proto::Message;
use crate::Error;

pub mod receive;
pub mod restore;
pub mod send;

/// Bytes on the wire for one epoch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Shipped {
    /// Blocks sent (resent ones included).
    pub blocks: u64,
    /// Block bytes before encoding.
    pub bytes: u64,
    /// Block bytes on the wire (after zstd; zero blocks cost none).
    pub wire_bytes: u64,
    /// Bytes of blocks that travelled as holes (all zeroes).
    pub zero_bytes: u64,
    /// Bytes the server held already from an interrupted attempt.
    pub resumed_bytes: u64,
    /// Bytes of blocks the server held already as chunks of this client's
    /// volumes: sent as their digest only ([`crate::proto::Encoding::Known`]).
    pub known_bytes: u64,
}

impl Shipped {
    /// Count one block of `len` bytes sent as `wire` bytes of payload.
    pub fn count(&mut self, len: u32, wire: usize) {
        self.blocks += 1;
        self.bytes += u64::from(len);
        self.wire_bytes += wire as u64;
        if wire == 0 {
            self.zero_bytes += u64::from(len);
        }
    }

    /// Count one block of `len` bytes the server held already (sent as
    /// its digest only).
    pub fn count_known(&mut self, len: u32) {
        self.blocks += 1;
        self.bytes += u64::from(len);
        self.known_bytes += u64::from(len);
    }

    /// Add what another stream shipped.
    pub fn add(&mut self, other: &Shipped) {
        self.blocks += other.blocks;
        self.bytes += other.bytes;
        self.wire_bytes += other.wire_bytes;
        self.zero_bytes += other.zero_bytes;
        self.resumed_bytes += other.resumed_bytes;
        self.known_bytes += other.known_bytes;
    }
}

/// Keeps block data under a bandwidth limit, across streams: each call
/// says how long to wait before `bytes` more may go.
#[derive(Debug, Clone)]
pub struct Pacer {
    /// Bytes per second, if limited.
    rate: Option<u64>,
    /// When the limit lets the next bytes go.
    next_free: Option<Instant>,
}

/// Bytes that may go at once, as a burst, expressed in time at the rate.
pub const BURST: Duration = Duration::from_millis(100);

impl Pacer {
    /// A pacer for `bytes_per_second` (`None` or 0: no limit).
    pub fn new(bytes_per_second: Option<u64>) -> Pacer {
        Pacer {
            rate: bytes_per_second.filter(|&b| b > 0),
            next_free: None,
        }
    }

    /// `bytes` are about to go at `now`: how long to wait first. Up to
    /// [`BURST`] worth goes at once.
    pub fn delay(&mut self, now: Instant, bytes: u64) -> Duration {
        let Some(rate) = self.rate else {
            return Duration::ZERO;
        };
        let start = self.next_free.map_or(now, |n| n.max(now));
        let next = start + Duration::from_secs_f64(bytes as f64 / rate as f64);
        self.next_free = Some(next);
        next.saturating_duration_since(now).saturating_sub(BURST)
    }
}

/// The peer sent `m` where the protocol allows something else.
pub fn unexpected(m: &Message, when: &str) -> Error {
    Error::Peer(format!("unexpected {} {when}", variant(m)))
}

/// A message's variant name, for logs (never its content).
pub fn variant(m: &Message) -> String {
    let name = format!("{m:?}");
    name.split([' ', '{', '('])
        .next()
        .unwrap_or("message")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pacer_holds_the_rate_after_a_burst() {
        let t0 = Instant::now();
        let mut p = Pacer::new(Some(1_000_000));
        // 50 ms worth: inside the burst.
        assert_eq!(p.delay(t0, 50_000), Duration::ZERO);
        // 100 ms more: 150 ms of credit used, 50 ms to wait.
        assert_eq!(p.delay(t0, 100_000), Duration::from_millis(50));
        // Later, the debt is paid: a burst again.
        let later = t0 + Duration::from_secs(1);
        assert_eq!(p.delay(later, 100_000), Duration::ZERO);
        assert_eq!(Pacer::new(None).delay(later, 1 << 40), Duration::ZERO);
        assert_eq!(Pacer::new(Some(0)).delay(t0, 1 << 40), Duration::ZERO);
    }

    #[test]
    fn shipped_counts_holes_apart() {
        let mut s = Shipped::default();
        s.count(65536, 0);
        s.count(4096, 100);
        assert_eq!(
            s,
            Shipped {
                blocks: 2,
                bytes: 69632,
                wire_bytes: 100,
                zero_bytes: 65536,
                resumed_bytes: 0,
                known_bytes: 0,
            }
        );
        assert_eq!(variant(&Message::EndEpoch), "EndEpoch");
    }
}
