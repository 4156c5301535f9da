//! Reliability over lossy links, as pure state machines. Serial lines drop and corrupt frames
//! and MQTT sessions reconnect, so a sender keeps what it sent until the peer acks it, resends
//! after a timeout and gives up after a bounded number of attempts ([`Outbox`]), and a receiver
//! recognises a resend of something it already applied ([`Dedup`]). Time is passed in as
//! `now_ms` and nothing here does I/O, so the same code runs in firmware and in the hub and is
//! tested without clocks (the style of rumqttc's `state.rs`).
//!
//! Rules (SPEC.md, "Acks, retries, duplicates"): sequence numbers start at 1 at every boot
//! (with a new random boot id) and every envelope takes one; the receiver acks every envelope
//! whose [`crate::Body::needs_ack`], duplicates included, and applies only new ones.

use core::fmt;

use heapless::Vec;

/// Errors of the link layer: the [`Outbox`] window is full (its only failure). Wait for acks,
/// or for [`Outbox::poll`] to give up on the oldest, before sending more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowFull;

impl fmt::Display for WindowFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("send window full: every slot awaits an ack; retry after acks or timeouts")
    }
}

#[cfg(feature = "std")]
impl std::error::Error for WindowFull {}

/// Something [`Outbox::poll`] says is due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Due<T> {
    /// No ack within `retry_after_ms`: send `item` again (with the same seq). `attempt` counts
    /// transmissions including this one (the first send was attempt 1).
    Resend {
        /// Its sequence number.
        seq: u32,
        /// The item to send again.
        item: T,
        /// Which transmission this is: 2 for the first resend.
        attempt: u8,
    },
    /// Sent `max_attempts` times and never acked: removed from the outbox; report it.
    GaveUp {
        /// Its sequence number.
        seq: u32,
        /// The item given up on.
        item: T,
    },
}

#[derive(Debug, Clone)]
struct Pending<T> {
    seq: u32,
    item: T,
    attempts: u8,
    last_sent_ms: u64,
}

/// Reliable sending with a small window: remembers what was sent until acked, says what to
/// resend and when to give up.
///
/// Bound: at most `W` items in flight; [`Outbox::send`] refuses more with [`WindowFull`]
/// (the caller keeps the item, decides to wait or drop). An item is transmitted at most
/// `max_attempts` times, `retry_after_ms` apart; it is given up `retry_after_ms` after its last
/// transmission.
#[derive(Debug, Clone)]
pub struct Outbox<T: Clone, const W: usize> {
    pending: Vec<Pending<T>, W>,
    next_seq: u32,
    retry_after_ms: u64,
    max_attempts: u8,
}

impl<T: Clone, const W: usize> Outbox<T, W> {
    /// An empty outbox for a new boot: the first seq is 1. `max_attempts` counts the first
    /// transmission (0 is taken as 1: send once, never resend).
    pub fn new(retry_after_ms: u64, max_attempts: u8) -> Self {
        Outbox { pending: Vec::new(), next_seq: 1, retry_after_ms, max_attempts: max_attempts.max(1) }
    }

    /// The seq the next [`Outbox::send`] (or [`Outbox::take_seq`]) will use. Sequences start at
    /// 1 and are per boot; 0 is never used (after u32::MAX comes 1; a sender should start a new
    /// boot id long before).
    pub fn next_seq(&self) -> u32 {
        self.next_seq
    }

    /// Takes a seq for an envelope that is not tracked (an ack, a heartbeat, a HELLO): every
    /// envelope of a boot has its own seq.
    pub fn take_seq(&mut self) -> u32 {
        let seq = self.next_seq;
        self.next_seq = match seq.wrapping_add(1) {
            0 => 1,
            next => next,
        };
        seq
    }

    /// Records `item` as sent now and returns the seq assigned to it; refuses when `W` items
    /// are already in flight (no seq is used then).
    pub fn send(&mut self, item: T, now_ms: u64) -> Result<u32, WindowFull> {
        if self.pending.is_full() {
            return Err(WindowFull);
        }
        let seq = self.take_seq();
        // Cannot fail: checked above.
        let _ = self.pending.push(Pending { seq, item, attempts: 1, last_sent_ms: now_ms });
        Ok(seq)
    }

    /// The peer acked `seq`: removes and returns the item (None for an unknown or duplicate ack).
    pub fn ack(&mut self, seq: u32) -> Option<T> {
        let index = self.pending.iter().position(|p| p.seq == seq)?;
        Some(self.pending.remove(index).item)
    }

    /// Reports what is due at `now_ms`, oldest first: a [`Due::Resend`] for each item
    /// unacknowledged for `retry_after_ms` since its last transmission (counted as sent now),
    /// or a [`Due::GaveUp`] (and removal) once it was sent `max_attempts` times. Time that goes
    /// backwards makes nothing due.
    pub fn poll(&mut self, now_ms: u64, mut on: impl FnMut(Due<T>)) {
        let mut i = 0;
        while i < self.pending.len() {
            let p = &mut self.pending[i];
            if now_ms.saturating_sub(p.last_sent_ms) < self.retry_after_ms {
                i += 1;
                continue;
            }
            if p.attempts >= self.max_attempts {
                let p = self.pending.remove(i);
                on(Due::GaveUp { seq: p.seq, item: p.item });
                continue;
            }
            p.attempts += 1;
            p.last_sent_ms = now_ms;
            on(Due::Resend { seq: p.seq, item: p.item.clone(), attempt: p.attempts });
            i += 1;
        }
    }

    /// Items sent and not yet acked or given up.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Whether [`Outbox::send`] would refuse.
    pub fn is_full(&self) -> bool {
        self.pending.is_full()
    }

    /// The earliest time at which [`Outbox::poll`] will have something to say, if anything is in
    /// flight (for a sender that sleeps until then).
    pub fn next_due_ms(&self) -> Option<u64> {
        self.pending.iter().map(|p| p.last_sent_ms.saturating_add(self.retry_after_ms)).min()
    }
}

/// What [`Dedup::check`] concluded about an envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Seen {
    /// First time: apply it.
    New,
    /// Already seen in this boot: ack it again, do not apply it.
    Duplicate,
    /// First envelope of a new boot of the peer (or the first ever): the window was reset;
    /// apply it (it counts as new).
    NewBoot,
    /// Older than the window, or from the boot before the current one: ack it, do not apply it.
    Stale,
}

impl Seen {
    /// Whether the envelope should be applied ([`Seen::New`] or [`Seen::NewBoot`]).
    pub fn is_new(self) -> bool {
        matches!(self, Seen::New | Seen::NewBoot)
    }
}

/// Duplicate detection for one peer: a window of the [`Dedup::WINDOW`] most recent seqs of the
/// peer's current boot; a new boot id resets it. Fixed size (16 bytes).
///
/// A seq more than `WINDOW` below the highest seen is [`Seen::Stale`]: with a send window far
/// smaller than that, a resend can never be that old, so such an envelope is a very late
/// duplicate. An envelope from the boot just replaced is also stale (a device does not resend
/// across a reboot, its outbox is in RAM).
#[derive(Debug, Clone, Default)]
pub struct Dedup {
    current: Option<Boot>,
    previous_boot: Option<u32>,
}

#[derive(Debug, Clone, Copy)]
struct Boot {
    boot_id: u32,
    /// Highest seq seen in this boot.
    highest: u32,
    /// Bit i set: seq `highest - i` was seen.
    seen: u64,
}

impl Dedup {
    /// Seqs remembered per boot, counting down from the highest seen.
    pub const WINDOW: u32 = 64;

    /// Nothing seen yet: the first envelope is a [`Seen::NewBoot`].
    pub fn new() -> Dedup {
        Dedup::default()
    }

    /// Classifies the envelope `(boot_id, seq)` and records it.
    pub fn check(&mut self, boot_id: u32, seq: u32) -> Seen {
        let boot = match &mut self.current {
            Some(boot) if boot.boot_id == boot_id => boot,
            _ if self.previous_boot == Some(boot_id) => return Seen::Stale,
            current => {
                self.previous_boot = current.map(|b| b.boot_id);
                *current = Some(Boot { boot_id, highest: seq, seen: 1 });
                return Seen::NewBoot;
            }
        };
        if seq > boot.highest {
            let shift = seq - boot.highest;
            boot.seen = if shift >= Self::WINDOW { 0 } else { boot.seen << shift };
            boot.seen |= 1;
            boot.highest = seq;
            return Seen::New;
        }
        let age = boot.highest - seq;
        if age >= Self::WINDOW {
            return Seen::Stale;
        }
        let bit = 1u64 << age;
        if boot.seen & bit != 0 {
            Seen::Duplicate
        } else {
            boot.seen |= bit;
            Seen::New
        }
    }

    /// The peer's current boot id, once anything was seen.
    pub fn boot_id(&self) -> Option<u32> {
        self.current.map(|b| b.boot_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    fn poll<const W: usize>(outbox: &mut Outbox<&'static str, W>, now: u64) -> Vec<Due<&'static str>> {
        let mut due = Vec::new();
        outbox.poll(now, |d| due.push(d));
        due
    }

    #[test]
    fn sequences_start_at_one_and_every_envelope_takes_one() {
        let mut outbox: Outbox<&str, 4> = Outbox::new(100, 3);
        assert_eq!(outbox.next_seq(), 1);
        assert_eq!(outbox.send("a", 0), Ok(1));
        assert_eq!(outbox.take_seq(), 2);
        assert_eq!(outbox.send("b", 0), Ok(3));
        assert_eq!(outbox.next_seq(), 4);
    }

    #[test]
    fn a_full_window_refuses_until_an_ack_frees_a_slot() {
        let mut outbox: Outbox<&str, 2> = Outbox::new(100, 3);
        assert_eq!(outbox.send("a", 0), Ok(1));
        assert_eq!(outbox.send("b", 0), Ok(2));
        assert!(outbox.is_full());
        assert_eq!(outbox.send("c", 0), Err(WindowFull));
        assert_eq!(outbox.next_seq(), 3, "a refused send uses no seq");
        assert_eq!(outbox.ack(1), Some("a"));
        assert_eq!(outbox.send("c", 0), Ok(3));
        assert_eq!(outbox.in_flight(), 2);
    }

    #[test]
    fn resends_come_after_retry_after_ms_with_the_attempt_count() {
        let mut outbox: Outbox<&str, 4> = Outbox::new(100, 3);
        outbox.send("a", 1_000).unwrap();
        outbox.send("b", 1_050).unwrap();
        assert_eq!(outbox.next_due_ms(), Some(1_100));
        assert!(poll(&mut outbox, 1_099).is_empty());
        assert_eq!(poll(&mut outbox, 1_100), [Due::Resend { seq: 1, item: "a", attempt: 2 }]);
        // Counted as sent at 1_100: not due again before 1_200.
        assert_eq!(poll(&mut outbox, 1_150), [Due::Resend { seq: 2, item: "b", attempt: 2 }]);
        assert!(poll(&mut outbox, 1_199).is_empty());
        assert_eq!(
            poll(&mut outbox, 1_260),
            [Due::Resend { seq: 1, item: "a", attempt: 3 }, Due::Resend { seq: 2, item: "b", attempt: 3 },]
        );
        // Time going backwards makes nothing due.
        assert!(poll(&mut outbox, 0).is_empty());
        assert_eq!(outbox.in_flight(), 2);
    }

    #[test]
    fn it_gives_up_after_max_attempts_and_frees_the_slot() {
        let mut outbox: Outbox<&str, 1> = Outbox::new(100, 2);
        outbox.send("a", 0).unwrap();
        assert_eq!(poll(&mut outbox, 100), [Due::Resend { seq: 1, item: "a", attempt: 2 }]);
        assert!(poll(&mut outbox, 199).is_empty());
        assert_eq!(poll(&mut outbox, 200), [Due::GaveUp { seq: 1, item: "a" }]);
        assert_eq!(outbox.in_flight(), 0);
        assert_eq!(outbox.next_due_ms(), None);
        assert!(poll(&mut outbox, 10_000).is_empty());
        assert_eq!(outbox.send("b", 10_000), Ok(2));
        assert_eq!(outbox.ack(1), None, "an ack after giving up is unknown");
    }

    #[test]
    fn max_attempts_zero_means_send_once() {
        let mut outbox: Outbox<&str, 1> = Outbox::new(10, 0);
        outbox.send("a", 0).unwrap();
        assert_eq!(poll(&mut outbox, 10), [Due::GaveUp { seq: 1, item: "a" }]);
    }

    #[test]
    fn a_duplicate_or_unknown_ack_returns_nothing() {
        let mut outbox: Outbox<&str, 4> = Outbox::new(100, 3);
        outbox.send("a", 0).unwrap();
        outbox.send("b", 0).unwrap();
        assert_eq!(outbox.ack(2), Some("b"));
        assert_eq!(outbox.ack(2), None);
        assert_eq!(outbox.ack(99), None);
        assert_eq!(outbox.in_flight(), 1);
        assert_eq!(poll(&mut outbox, 100), [Due::Resend { seq: 1, item: "a", attempt: 2 }]);
    }

    #[test]
    fn seq_zero_is_skipped_on_wrap() {
        let mut outbox: Outbox<(), 1> = Outbox::new(1, 1);
        outbox.next_seq = u32::MAX;
        assert_eq!(outbox.take_seq(), u32::MAX);
        assert_eq!(outbox.take_seq(), 1);
    }

    #[test]
    fn dedup_first_contact_is_a_new_boot_then_duplicates_are_caught() {
        let mut dedup = Dedup::new();
        assert_eq!(dedup.check(7, 1), Seen::NewBoot);
        assert_eq!(dedup.check(7, 2), Seen::New);
        assert_eq!(dedup.check(7, 2), Seen::Duplicate);
        assert_eq!(dedup.check(7, 1), Seen::Duplicate);
        assert_eq!(dedup.boot_id(), Some(7));
    }

    #[test]
    fn dedup_accepts_out_of_order_seqs_inside_the_window_once() {
        let mut dedup = Dedup::new();
        dedup.check(1, 10);
        assert_eq!(dedup.check(1, 13), Seen::New);
        assert_eq!(dedup.check(1, 12), Seen::New);
        assert_eq!(dedup.check(1, 11), Seen::New);
        assert_eq!(dedup.check(1, 11), Seen::Duplicate);
        assert_eq!(dedup.check(1, 13), Seen::Duplicate);
    }

    #[test]
    fn dedup_a_new_boot_resets_the_window() {
        let mut dedup = Dedup::new();
        dedup.check(1, 1);
        dedup.check(1, 2);
        assert_eq!(dedup.check(2, 1), Seen::NewBoot);
        assert_eq!(dedup.check(2, 2), Seen::New);
        assert_eq!(dedup.check(2, 1), Seen::Duplicate);
        // A straggler from the boot just replaced is stale, and does not reset anything.
        assert_eq!(dedup.check(1, 3), Seen::Stale);
        assert_eq!(dedup.check(2, 2), Seen::Duplicate);
        // A third boot; the first one is forgotten by then.
        assert_eq!(dedup.check(3, 5), Seen::NewBoot);
        assert_eq!(dedup.check(2, 3), Seen::Stale);
        assert_eq!(dedup.check(1, 9), Seen::NewBoot);
    }

    #[test]
    fn dedup_seqs_older_than_the_window_are_stale() {
        let mut dedup = Dedup::new();
        dedup.check(1, 1);
        assert_eq!(dedup.check(1, 100), Seen::New);
        assert_eq!(dedup.check(1, 100 - Dedup::WINDOW), Seen::Stale);
        assert_eq!(dedup.check(1, 100 - Dedup::WINDOW + 1), Seen::New);
        assert_eq!(dedup.check(1, 1), Seen::Stale);
        // A jump of more than the window forgets everything below it.
        assert_eq!(dedup.check(1, 1_000), Seen::New);
        assert_eq!(dedup.check(1, 999), Seen::New);
        assert_eq!(dedup.check(1, 100), Seen::Stale);
        assert!(Seen::NewBoot.is_new() && Seen::New.is_new());
        assert!(!Seen::Duplicate.is_new() && !Seen::Stale.is_new());
    }
}
