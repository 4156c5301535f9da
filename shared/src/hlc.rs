//! Hybrid logical clock: orders every replicated write even when store PCs boot with a dead RTC
//! or jump when NTP arrives. The clock never issues a stamp below one it issued before (the
//! caller persists `last()` and resumes from it), and a remote stamp too far ahead of local wall
//! time is refused instead of dragging every later local stamp into the future.

use core::fmt;
use serde::{Deserialize, Serialize};

use crate::ids::ActorId;

/// A point in the chain-wide write order: wall milliseconds, a logical counter for writes in
/// the same millisecond (or while the wall clock lags), and the writing actor as tie-break.
/// Field order is the comparison order.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct HlcStamp {
    pub wall_ms: u64,
    pub logical: u32,
    pub actor: ActorId,
}

impl fmt::Debug for HlcStamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}@{}", self.wall_ms, self.logical, self.actor)
    }
}
impl fmt::Display for HlcStamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A remote stamp refused because it is further ahead of our wall clock than the fence allows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("HLC stamp {stamp} from {actor} is {ahead_ms} ms ahead of local time; the skew fence is {max_skew_ms} ms (check the clock of {actor})")]
pub struct SkewError {
    pub stamp: String,
    pub actor: ActorId,
    pub ahead_ms: u64,
    pub max_skew_ms: u64,
}

/// A wall-clock jump observed while stamping, worth a log line and a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockJump {
    /// Wall time is this far behind the last issued stamp (RTC lost, NTP stepped back).
    Backwards { by_ms: u64 },
    /// Wall time moved this far ahead since the last stamp (NTP arrived after a 1970 boot).
    Forwards { by_ms: u64 },
}

#[derive(Debug, Clone)]
pub struct Hlc {
    actor: ActorId,
    wall_ms: u64,
    logical: u32,
    max_skew_ms: u64,
    jump_threshold_ms: u64,
}

impl Hlc {
    /// A fresh clock for `actor`, refusing remote stamps more than `max_skew_ms` ahead.
    pub fn new(actor: ActorId, max_skew_ms: u64) -> Hlc {
        Hlc { actor, wall_ms: 0, logical: 0, max_skew_ms, jump_threshold_ms: 60_000 }
    }

    /// Resumes after a restart from the last stamp persisted, so no stamp is ever reissued.
    pub fn resume(actor: ActorId, max_skew_ms: u64, last_wall_ms: u64, last_logical: u32) -> Hlc {
        Hlc { wall_ms: last_wall_ms, logical: last_logical, ..Hlc::new(actor, max_skew_ms) }
    }

    /// Jumps of wall time larger than this are reported by [`Hlc::stamp`]. Default one minute.
    pub fn with_jump_threshold(mut self, ms: u64) -> Hlc {
        self.jump_threshold_ms = ms;
        self
    }

    pub fn actor(&self) -> &ActorId {
        &self.actor
    }

    pub fn max_skew_ms(&self) -> u64 {
        self.max_skew_ms
    }

    /// The last stamp issued or adopted, as `(wall_ms, logical)`: persist it with each write.
    pub fn last(&self) -> (u64, u32) {
        (self.wall_ms, self.logical)
    }

    /// Issues a new stamp strictly above every stamp issued or observed so far.
    pub fn stamp(&mut self, now_wall_ms: u64) -> (HlcStamp, Option<ClockJump>) {
        let jump = if self.wall_ms != 0 && now_wall_ms.saturating_add(self.jump_threshold_ms) < self.wall_ms {
            Some(ClockJump::Backwards { by_ms: self.wall_ms - now_wall_ms })
        } else if self.wall_ms != 0 && now_wall_ms > self.wall_ms.saturating_add(self.jump_threshold_ms) {
            Some(ClockJump::Forwards { by_ms: now_wall_ms - self.wall_ms })
        } else {
            None
        };
        if now_wall_ms > self.wall_ms {
            self.wall_ms = now_wall_ms;
            self.logical = 0;
        } else {
            self.bump_logical();
        }
        (self.current(), jump)
    }

    /// Takes a remote stamp into account (so our next stamp orders after it), unless it is
    /// beyond the skew fence, in which case it is refused and the clock is unchanged.
    pub fn observe(&mut self, remote: &HlcStamp, now_wall_ms: u64) -> Result<(), SkewError> {
        self.check_skew(remote, now_wall_ms)?;
        if (remote.wall_ms, remote.logical) > (self.wall_ms, self.logical) {
            self.wall_ms = remote.wall_ms;
            self.logical = remote.logical;
        }
        Ok(())
    }

    /// The fence alone, for validating a batch of remote rows before applying any of them.
    pub fn check_skew(&self, remote: &HlcStamp, now_wall_ms: u64) -> Result<(), SkewError> {
        let fence = now_wall_ms.saturating_add(self.max_skew_ms);
        if remote.wall_ms > fence {
            return Err(SkewError {
                stamp: remote.to_string(),
                actor: remote.actor.clone(),
                ahead_ms: remote.wall_ms - now_wall_ms,
                max_skew_ms: self.max_skew_ms,
            });
        }
        Ok(())
    }

    fn bump_logical(&mut self) {
        match self.logical.checked_add(1) {
            Some(l) => self.logical = l,
            None => {
                // 4 billion stamps in one millisecond: borrow the next millisecond.
                self.wall_ms = self.wall_ms.saturating_add(1);
                self.logical = 0;
            }
        }
    }

    fn current(&self) -> HlcStamp {
        HlcStamp { wall_ms: self.wall_ms, logical: self.logical, actor: self.actor.clone() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn actor(s: &str) -> ActorId {
        ActorId::new(s).unwrap()
    }

    #[test]
    fn never_goes_backwards_when_the_rtc_is_lost() {
        let mut clock = Hlc::new(actor("store:a"), 5_000);
        let (a, _) = clock.stamp(1_700_000_000_000);
        // Reboot with a dead RTC: wall clock reads 1970 + 3 s.
        let mut clock = Hlc::resume(actor("store:a"), 5_000, clock.last().0, clock.last().1);
        let (b, jump) = clock.stamp(3_000);
        assert!(b > a);
        assert_eq!(jump, Some(ClockJump::Backwards { by_ms: 1_700_000_000_000 - 3_000 }));
        let (c, jump) = clock.stamp(1_700_000_500_000);
        assert!(c > b);
        assert_eq!(jump, Some(ClockJump::Forwards { by_ms: 500_000 }));
    }

    #[test]
    fn refuses_remote_stamps_beyond_the_fence_and_names_the_skew() {
        let mut clock = Hlc::new(actor("cloud"), 5_000);
        let far = HlcStamp { wall_ms: 1_000_000 + 60_000, logical: 0, actor: actor("store:b") };
        let err = clock.observe(&far, 1_000_000).unwrap_err();
        assert_eq!(err.ahead_ms, 60_000);
        assert!(err.to_string().contains("60000 ms ahead") && err.to_string().contains("store:b"), "{err}");
        assert_eq!(clock.last(), (0, 0), "a refused stamp is not adopted");
        let near = HlcStamp { wall_ms: 1_004_000, logical: 7, actor: actor("store:b") };
        clock.observe(&near, 1_000_000).unwrap();
        let (next, _) = clock.stamp(1_000_000);
        assert!(next > near);
    }

    proptest! {
        #[test]
        fn stamps_strictly_increase(walls in proptest::collection::vec(0u64..10_000, 1..200)) {
            let mut clock = Hlc::new(actor("store:x"), 1_000);
            let mut prev: Option<HlcStamp> = None;
            for w in walls {
                let (s, _) = clock.stamp(w);
                if let Some(p) = &prev { prop_assert!(s > *p); }
                prev = Some(s);
            }
        }
    }
}
