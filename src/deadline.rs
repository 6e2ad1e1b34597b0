//! When a job must be done by, and what follows from it: the one place that does deadline
//! arithmetic for the story in [`crate::runner`].
//!
//! A job's deadline is the earliest of everything that joined it: a Spot interruption time, the
//! lifecycle hook's global timeout. Before it the archive stops taking data (the *partial stop*),
//! keeping a reserve to close the archive, upload the last parts and store the manifest; the
//! completion call gets until a small margin before the end.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

/// The least reserve kept after the partial stop (shorter only when the whole budget is).
pub const MIN_RESERVE: Duration = Duration::from_secs(20);
/// The most reserve kept: a long job's tail needs minutes, not hours.
pub const MAX_RESERVE: Duration = Duration::from_secs(300);
/// Time kept before the deadline for the completion call itself.
pub const COMPLETE_MARGIN: Duration = Duration::from_secs(5);

/// The end of a job's time, if it has one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Deadline {
    end: Option<Instant>,
}

impl Deadline {
    /// No deadline: a manual backup runs as long as it needs.
    pub const NONE: Deadline = Deadline { end: None };

    /// A deadline at `end`.
    pub fn at(end: Instant) -> Self {
        Self { end: Some(end) }
    }

    /// A deadline at a wall-clock time (a Spot notice's `time`); one in the past is now.
    pub fn at_system(t: SystemTime) -> Self {
        let ahead = t.duration_since(SystemTime::now()).unwrap_or_default();
        Self::at(Instant::now() + ahead)
    }

    /// The earlier of the two.
    pub fn earliest(self, other: Deadline) -> Deadline {
        match (self.end, other.end) {
            (Some(a), Some(b)) => Deadline::at(a.min(b)),
            (a, b) => Deadline { end: a.or(b) },
        }
    }

    /// The end, if any.
    pub fn end(self) -> Option<Instant> {
        self.end
    }

    /// The end, or `fallback` when there is none.
    pub fn or(self, fallback: Instant) -> Instant {
        self.end.unwrap_or(fallback)
    }

    /// Time left from now (`None`: unbounded).
    pub fn remaining(self) -> Option<Duration> {
        self.end
            .map(|e| e.saturating_duration_since(Instant::now()))
    }

    /// The reserve kept after the partial stop for a job that started at `start`: a quarter of
    /// its whole time, at least [`MIN_RESERVE`] (or half the time, when that is shorter), at most
    /// [`MAX_RESERVE`].
    pub fn reserve(self, start: Instant) -> Option<Duration> {
        let total = self.end?.saturating_duration_since(start);
        Some((total / 4).clamp(MIN_RESERVE.min(total / 2), MAX_RESERVE))
    }

    /// When the archive must stop taking data so that what remains fits in the reserve.
    pub fn stop_at(self, start: Instant) -> Option<Instant> {
        let end = self.end?;
        let reserve = self.reserve(start)?;
        Some(end.checked_sub(reserve).unwrap_or(end).max(start))
    }

    /// Until when completion may keep retrying: [`COMPLETE_MARGIN`] before the end, or
    /// `fallback` without a deadline.
    pub fn complete_by(self, fallback: Instant) -> Instant {
        match self.end {
            Some(end) => end.checked_sub(COMPLETE_MARGIN).unwrap_or(end),
            None => fallback,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_earliest_deadline_binds() {
        let now = Instant::now();
        let hook = Deadline::at(now + Duration::from_secs(3000));
        let spot = Deadline::at(now + Duration::from_secs(120));
        assert_eq!(hook.earliest(spot), spot);
        assert_eq!(spot.earliest(hook), spot);
        assert_eq!(Deadline::NONE.earliest(hook), hook);
        assert_eq!(hook.earliest(Deadline::NONE), hook);
        assert_eq!(Deadline::NONE.earliest(Deadline::NONE), Deadline::NONE);
    }

    #[tokio::test(start_paused = true)]
    async fn the_partial_stop_keeps_a_bounded_reserve() {
        let start = Instant::now();
        let at = |secs| Deadline::at(start + Duration::from_secs(secs));
        // Spot's two minutes: a quarter is 30 s.
        assert_eq!(
            at(120).stop_at(start),
            Some(start + Duration::from_secs(90))
        );
        // A short budget keeps at least 20 s, or half of it.
        assert_eq!(at(60).stop_at(start), Some(start + Duration::from_secs(40)));
        assert_eq!(at(20).stop_at(start), Some(start + Duration::from_secs(10)));
        // A long hook keeps at most five minutes.
        assert_eq!(
            at(30_000).stop_at(start),
            Some(start + Duration::from_secs(30_000 - 300))
        );
        assert_eq!(Deadline::NONE.stop_at(start), None);
        // A deadline already past stops at once.
        tokio::time::advance(Duration::from_secs(100)).await;
        assert_eq!(
            at(30).stop_at(start + Duration::from_secs(100)),
            Some(start + Duration::from_secs(100))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn completion_keeps_its_margin() {
        let now = Instant::now();
        let fallback = now + Duration::from_secs(600);
        assert_eq!(
            Deadline::at(now + Duration::from_secs(120)).complete_by(fallback),
            now + Duration::from_secs(115)
        );
        assert_eq!(Deadline::NONE.complete_by(fallback), fallback);
    }

    #[tokio::test(start_paused = true)]
    async fn a_spot_time_in_the_past_is_now() {
        let d = Deadline::at_system(SystemTime::now() - Duration::from_secs(5));
        assert_eq!(d.remaining(), Some(Duration::ZERO));
    }
}
