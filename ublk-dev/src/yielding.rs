//! A pre-copy round gives way to the device's own I/O, the way DRBD's
//! resync controller does with `c-min-rate`.
//!
//! A first sync or a resync reads the whole device, and the mirror hashes
//! and compresses every byte of it (and the server, when it shares the
//! machine, checks and stores it). That costs the CPU the device's queue
//! threads need: in the VM test that writes during a first sync, random
//! writes ran at a third to a half of their idle rate while the sync
//! read at full speed. A pre-copy round holds nothing for copy-on-write
//! (see [`crate::replicator`]), so it can go slower without the device
//! paying anything for it: only the mirror's first version comes later.
//!
//! So while the device is busy, the blocks of a pre-copy round are read at
//! most at the *minimum rate* (`--mirror-min-rate`, [`DEFAULT_MIN_RATE`]);
//! while it is quiet, at full speed (after a first window at the minimum
//! rate: a round does not know yet, when it starts, whether the device is
//! quiet). "Busy" is at least
//! [`BUSY_REQUESTS_PER_SECOND`] requests of any kind served per second,
//! measured over windows of [`WINDOW`], and it lasts [`HOLD`] after the
//! last busy window, so a writer that pauses for a moment does not let
//! the sync rush in. A file system's periodic commit is a handful of
//! requests: it does not count. The rate is a floor as in DRBD: a device
//! that is always busy still gets its first version, at that rate; 0 turns
//! the yielding off.
//!
//! Ordinary epochs and the cut that ends a pre-copy run are never slowed:
//! their blocks are kept for copy-on-write until read, and reading them
//! later would make the device wait longer, not shorter. (An epoch
//! demoted to a round is read as one: it keeps nothing either.)
//!
//! Readers sleep on blocking threads in slices of at most 50 ms: when
//! their link goes or the daemon stops, [`Yielder::call_off`] ends their
//! sleep and their reads, so neither waits for a sleeping reader.
//!
//! [`Yield`] is the decision alone, sans I/O: the caller passes the time
//! and the device's request count, and sleeps for what it answers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The rate a pre-copy round reads at while the device is busy, by
/// default: well under 1 % of a laptop's core for sha256 and zstd (DRBD's
/// `c-min-rate` is 250 KiB/s). A device busy day and night would still
/// send 86 GB a day; one quiet for a moment sends at full speed then.
/// In the VM test under TCG (CPUs emulated some 30 times slower than
/// real ones), random writes during a first sync ran at 0.38 of their
/// idle rate without yielding, 0.81 at 4 MiB/s, 0.90 at 1 MiB/s.
pub const DEFAULT_MIN_RATE: u64 = 1 << 20;

/// The least minimum rate that may be set (other than 0). A data stream
/// reads a batch of 32 blocks of 64 KiB before it sends, and four streams
/// share the rate: at 256 KiB/s a batch takes 32 s, well inside the
/// server's two minutes of patience with a silent stream.
pub const MIN_MIN_RATE: u64 = 256 << 10;

/// The device is busy when it serves at least this many requests a second.
pub const BUSY_REQUESTS_PER_SECOND: f64 = 100.0;

/// How often busyness is measured.
pub const WINDOW: Duration = Duration::from_millis(100);

/// How long the device counts as busy after a busy window.
pub const HOLD: Duration = Duration::from_secs(1);

/// A window this old says nothing of the device now: the next read begins
/// a new one.
const STALE: Duration = Duration::from_secs(2);

/// The yielding of one pre-copy reader (shared by its streams).
#[derive(Debug, Clone)]
pub struct Yield {
    /// Bytes per second while the device is busy (0: no yielding).
    min_rate: u64,
    /// When the current window began, and the request count then.
    window: Option<(Instant, u64)>,
    /// The device was measured busy, and counts as busy until then.
    busy_until: Option<Instant>,
    /// A round that just began reads at the minimum rate until then, the
    /// device not measured yet.
    unknown_until: Option<Instant>,
    /// When the rate lets the next bytes be read.
    next_free: Option<Instant>,
    /// The last read asked about.
    last_read: Option<Instant>,
    /// Reading time the rate stretched reads over, the device measured
    /// busy, so far.
    held: Duration,
}

impl Yield {
    /// Yielding at `min_rate` bytes per second (0: never).
    pub fn new(min_rate: u64) -> Yield {
        Yield {
            min_rate,
            window: None,
            busy_until: None,
            unknown_until: None,
            next_free: None,
            last_read: None,
            held: Duration::ZERO,
        }
    }

    /// `bytes` are about to be read at `now`, and the device has served
    /// `requests` requests so far (a counter that only grows): how long to
    /// wait before reading them.
    pub fn delay(&mut self, now: Instant, requests: u64, bytes: u64) -> Duration {
        if self.min_rate == 0 {
            return Duration::ZERO;
        }
        self.last_read = Some(now);
        match self.window {
            // A first read, or one after a long pause (between rounds): the
            // device is taken as busy until a window says otherwise, so a
            // round does not read at full speed into a busy device first.
            None => self.begin(now, requests),
            Some((start, _)) if now.saturating_duration_since(start) > STALE => {
                self.begin(now, requests)
            }
            Some((start, before)) => {
                let span = now.saturating_duration_since(start);
                if span >= WINDOW {
                    let rate = requests.saturating_sub(before) as f64 / span.as_secs_f64();
                    if rate >= BUSY_REQUESTS_PER_SECOND {
                        self.busy_until = Some(now + HOLD);
                    }
                    self.window = Some((now, requests));
                }
            }
        }
        let busy = self.busy_until.is_some_and(|until| now < until);
        let unknown = self.unknown_until.is_some_and(|until| now < until);
        if !busy && !unknown {
            // Quiet: full speed, and no debt carried into the next busy
            // spell.
            self.busy_until = None;
            self.unknown_until = None;
            self.next_free = None;
            return Duration::ZERO;
        }
        let start = self.next_free.map_or(now, |n| n.max(now));
        let next = start + Duration::from_secs_f64(bytes as f64 / self.min_rate as f64);
        self.next_free = Some(next);
        if busy {
            self.held += next - start;
        }
        start.saturating_duration_since(now)
    }

    fn begin(&mut self, now: Instant, requests: u64) {
        self.window = Some((now, requests));
        self.unknown_until = Some(now + WINDOW);
    }

    /// Whether reads are held back at `now` because the device was
    /// measured busy, and a round is being read (a read in the last
    /// [`WINDOW`]s of a [`HOLD`]).
    pub fn busy(&self, now: Instant) -> bool {
        self.busy_until.is_some_and(|until| now < until)
            && self
                .last_read
                .is_some_and(|t| now.saturating_duration_since(t) < HOLD)
    }

    /// Forget the reservations of reads that will not happen (their
    /// readers were called off): the next reads do not wait for them.
    pub fn forget_reserved(&mut self) {
        self.next_free = None;
    }

    /// How long reads were held to the minimum rate so far: the time the
    /// bytes read while the device was busy take at that rate.
    pub fn held(&self) -> Duration {
        self.held
    }
}

/// Counts the requests the device has served so far (reads, writes,
/// flushes, discards): what [`Yield`] measures busyness with.
#[derive(Clone)]
pub struct Activity(Arc<dyn Fn() -> u64 + Send + Sync>);

impl Activity {
    /// The count as `count` tells it.
    pub fn new(count: impl Fn() -> u64 + Send + Sync + 'static) -> Activity {
        Activity(Arc::new(count))
    }

    /// Requests served so far.
    pub fn requests(&self) -> u64 {
        (self.0)()
    }
}

impl std::fmt::Debug for Activity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Activity").field(&self.requests()).finish()
    }
}

/// A [`Yield`] and the device it watches, shared by the threads that read
/// a pre-copy round: each reader holds a [`Ticket`], whose
/// [`Ticket::before_read`] sleeps it.
#[derive(Debug, Clone)]
pub struct Yielder {
    state: Arc<Mutex<Yield>>,
    activity: Activity,
    /// Bumped by [`Yielder::call_off`]: tickets of an older generation
    /// read no more.
    generation: Arc<AtomicU64>,
}

/// The longest a reader sleeps before it looks whether it was called off.
const SLICE: Duration = Duration::from_millis(50);

/// A reader's right to read, until [`Yielder::call_off`].
#[derive(Debug, Clone)]
pub struct Ticket {
    yielder: Yielder,
    generation: u64,
}

impl Ticket {
    fn called_off(&self) -> bool {
        self.yielder.generation.load(Ordering::SeqCst) != self.generation
    }

    /// Wait, on this (blocking) thread, until `bytes` may be read. False
    /// when the reader was called off meanwhile (the read must not happen:
    /// its link is gone, or the daemon stops).
    pub fn before_read(&self, bytes: u64) -> bool {
        if self.called_off() {
            return false;
        }
        let requests = self.yielder.activity.requests();
        let wait = self
            .yielder
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .delay(Instant::now(), requests, bytes);
        let until = Instant::now() + wait;
        loop {
            if self.called_off() {
                return false;
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return true;
            }
            std::thread::sleep(left.min(SLICE));
        }
    }
}

impl Yielder {
    /// Yielding at `min_rate` bytes per second to the device `activity`
    /// counts.
    pub fn new(min_rate: u64, activity: Activity) -> Yielder {
        Yielder {
            state: Arc::new(Mutex::new(Yield::new(min_rate))),
            activity,
            generation: Arc::new(AtomicU64::new(0)),
        }
    }

    #[cfg(test)]
    fn ticket_of_generation(self, generation: u64) -> Ticket {
        Ticket {
            yielder: self,
            generation,
        }
    }

    /// A ticket for the readers of a round.
    pub fn ticket(&self) -> Ticket {
        Ticket {
            yielder: self.clone(),
            generation: self.generation.load(Ordering::SeqCst),
        }
    }

    /// Call off every reader holding a ticket (their link is gone, or the
    /// daemon stops): they stop sleeping within `SLICE` and read no
    /// more, and what they had reserved of the rate is forgotten.
    pub fn call_off(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .forget_reserved();
    }

    /// Whether reads are held to the minimum rate now.
    pub fn busy(&self) -> bool {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .busy(Instant::now())
    }

    /// How long reads were held to the minimum rate so far.
    pub fn held(&self) -> Duration {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).held()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Reads of `bytes` every `every`, the device serving `iops`, for
    /// `span`: the bytes read.
    fn run(y: &mut Yield, t0: Instant, span: Duration, iops: u64, bytes: u64) -> u64 {
        let mut now = t0;
        let mut read = 0;
        while now < t0 + span {
            let requests = (now - t0).as_millis() as u64 * iops / 1000;
            let wait = y.delay(now, requests, bytes);
            now += wait;
            read += bytes;
            // The read itself takes a little.
            now += MS;
        }
        read
    }

    #[test]
    fn a_quiet_device_lets_the_round_read_at_full_speed() {
        let mut y = Yield::new(4 << 20);
        let t0 = Instant::now();
        // 5 requests a second: a file system's commits, not a workload.
        let read = run(&mut y, t0, Duration::from_secs(2), 5, 64 << 10);
        // The first window is read at the minimum rate (the device is not
        // known to be quiet yet), then every read goes at once.
        assert!(
            read >= 1800 * (64 << 10),
            "read only {read} bytes in 2 s from a quiet device"
        );
        assert!(!y.busy(t0 + Duration::from_secs(2)));
        // Held back only while unmeasured: not counted as yielding.
        assert_eq!(y.held(), Duration::ZERO);
    }

    #[test]
    fn a_busy_device_holds_the_round_to_the_minimum_rate() {
        let mut y = Yield::new(1 << 20);
        let t0 = Instant::now();
        let read = run(&mut y, t0, Duration::from_secs(10), 5000, 64 << 10);
        // 1 MiB a second from the first read on.
        let expected = 10 * (1 << 20);
        assert!(
            read >= expected * 9 / 10 && read <= expected * 11 / 10,
            "read {read} bytes in 10 s at 5000 IOPS, expected about {expected}"
        );
        assert!(y.busy(t0 + Duration::from_secs(10)));
        assert!(y.held() > Duration::from_secs(9), "held {:?}", y.held());
    }

    #[test]
    fn full_speed_comes_back_a_hold_after_the_device_went_quiet() {
        let mut y = Yield::new(1 << 20);
        let t0 = Instant::now();
        // Busy for a second...
        let mut now = t0;
        let mut requests = 0;
        while now < t0 + Duration::from_secs(1) {
            requests += 10;
            now += y.delay(now, requests, 64 << 10) + MS;
        }
        assert!(y.busy(now));
        // ...then quiet: slow for at most HOLD (and one window), then free.
        let quiet = now;
        loop {
            let wait = y.delay(now, requests, 64 << 10);
            if wait.is_zero() {
                break;
            }
            now += wait + MS;
        }
        let slow_for = now - quiet;
        assert!(
            slow_for <= HOLD + 3 * WINDOW,
            "still yielding {slow_for:?} after the device went quiet"
        );
        assert!(!y.busy(now));
        // No debt from the busy spell: the next reads go at once.
        for _ in 0..100 {
            assert_eq!(y.delay(now, requests, 64 << 10), Duration::ZERO);
            now += MS;
        }
    }

    #[test]
    fn a_round_after_a_pause_does_not_rush_into_a_busy_device() {
        let mut y = Yield::new(1 << 20);
        let t0 = Instant::now();
        run(&mut y, t0, Duration::from_secs(1), 0, 64 << 10);
        assert!(!y.busy(t0 + Duration::from_secs(1)));
        // A minute later, the device is busy: the next round's first read
        // waits for a window to tell, and the second one is held.
        let later = t0 + Duration::from_secs(60);
        assert_eq!(y.delay(later, 1000, 64 << 10), Duration::ZERO);
        assert!(y.delay(later + MS, 1010, 64 << 10) > Duration::from_millis(50));
        // Not measured busy yet: nothing is counted as held.
        assert!(!y.busy(later + MS));
        assert_eq!(y.held(), Duration::ZERO);
    }

    #[test]
    fn readers_called_off_stop_sleeping_and_read_no_more() {
        // A device always busy, and the lowest rate: a 64 KiB read waits a
        // quarter of a second, four of them a second.
        let count = Arc::new(AtomicU64::new(0));
        let requests = count.clone();
        let y = Yielder::new(
            MIN_MIN_RATE,
            Activity::new(move || requests.fetch_add(1000, Ordering::Relaxed)),
        );
        let ticket = y.ticket();
        let reader = std::thread::spawn(move || {
            let mut reads = 0;
            while ticket.before_read(64 << 10) {
                reads += 1;
                assert!(reads < 10_000, "never called off");
            }
            reads
        });
        std::thread::sleep(Duration::from_millis(600));
        y.call_off();
        let reads = reader.join().unwrap();
        assert!(reads < 100, "{reads} reads at the minimum rate in 0.6 s");
        // Called off for good; a new ticket reads again.
        assert!(!y.clone().ticket_of_generation(0).before_read(1));
        assert!(y.ticket().before_read(0));
    }

    #[test]
    fn a_zero_rate_never_yields() {
        let mut y = Yield::new(0);
        let t0 = Instant::now();
        let read = run(&mut y, t0, Duration::from_secs(1), 100_000, 64 << 10);
        assert_eq!(read, 1000 * (64 << 10));
        assert_eq!(y.held(), Duration::ZERO);
    }
}
