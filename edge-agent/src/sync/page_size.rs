//! How many rows a sync page carries: the configured size until the cloud refuses a page as too
//! large (HTTP 413), then half as many each time until pages fit, and the configured size again
//! after a while (the operator may have raised the cloud's limit). Pure, so it is tested without
//! a cloud.

use std::time::{Duration, Instant};

/// How long smaller pages are kept before full-size pages are tried again.
pub const RETRY_FULL_PAGES_AFTER: Duration = Duration::from_secs(3_600);

#[derive(Debug)]
pub struct PageSize {
    configured: u32,
    current: u32,
    /// When pages were last made smaller.
    shrunk_at: Option<Instant>,
}

impl PageSize {
    /// `configured` is clamped to at least one row.
    pub fn new(configured: u32) -> PageSize {
        let configured = configured.max(1);
        PageSize { configured, current: configured, shrunk_at: None }
    }

    /// Rows for the next page as of `now`: back to the configured size once smaller pages have
    /// been in use for [`RETRY_FULL_PAGES_AFTER`].
    pub fn rows(&mut self, now: Instant) -> u32 {
        if self.shrunk_at.is_some_and(|at| now.saturating_duration_since(at) >= RETRY_FULL_PAGES_AFTER) {
            self.shrunk_at = None;
            self.current = self.configured;
        }
        self.current
    }

    /// A page of `rows` was refused as too large: the size for the retry, or `None` when a
    /// single row is already too large (nothing smaller to try).
    pub fn refused(&mut self, rows: u32, now: Instant) -> Option<u32> {
        if rows <= 1 {
            return None;
        }
        self.current = self.current.min(rows / 2);
        self.shrunk_at = Some(now);
        Some(self.current)
    }

    /// The size now, without moving the clock (for reports).
    pub fn current(&self) -> u32 {
        self.current
    }

    /// The configured size (`[cloud] page_rows`, at least one row).
    pub fn configured(&self) -> u32 {
        self.configured
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves_on_each_refusal_down_to_one_row() {
        let t0 = Instant::now();
        let mut size = PageSize::new(1_000);
        assert_eq!(size.rows(t0), 1_000);
        assert_eq!(size.refused(1_000, t0), Some(500));
        assert_eq!(size.refused(500, t0), Some(250));
        assert_eq!(size.rows(t0), 250);
        let mut rows = 250;
        while let Some(next) = size.refused(rows, t0) {
            assert!(next < rows && next >= 1);
            rows = next;
        }
        assert_eq!(rows, 1, "stops at one row");
        assert_eq!(size.refused(1, t0), None);
    }

    #[test]
    fn keeps_the_smaller_size_for_an_hour_then_tries_the_configured_one() {
        let t0 = Instant::now();
        let mut size = PageSize::new(2_000);
        size.refused(2_000, t0);
        assert_eq!(size.rows(t0 + RETRY_FULL_PAGES_AFTER - Duration::from_secs(1)), 1_000);
        assert_eq!(size.rows(t0 + RETRY_FULL_PAGES_AFTER), 2_000);
        // A refusal of an older, larger page never makes the size grow.
        let t1 = t0 + RETRY_FULL_PAGES_AFTER;
        size.refused(2_000, t1);
        size.refused(1_000, t1);
        assert_eq!(size.refused(2_000, t1), Some(500));
    }

    #[test]
    fn a_zero_configuration_means_one_row() {
        assert_eq!(PageSize::new(0).rows(Instant::now()), 1);
    }
}
