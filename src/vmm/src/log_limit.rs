//! Rate limits for the log lines a guest can set off at will.
//!
//! Some of husk's warnings follow from what a guest does: a status write
//! the virtio-mmio transport refuses, a used-ring entry it cannot take, a
//! host I/O error on a request it can repeat. Logged each time, a guest
//! that repeats the act in a loop writes a host log line per attempt and
//! fills the host's disk through husk's log. Each such line goes through a
//! [`LogLimiter`] (the [`limited!`](crate::limited) macro): the first few of
//! every interval are logged, the rest only counted, and the next line that
//! is logged carries the count of those left out as `suppressed = N`.

use std::time::{Duration, Instant};

/// Lines logged per interval by [`LogLimiter::default`].
pub const GUEST_BURST: u32 = 5;
/// The interval of [`LogLimiter::default`].
pub const GUEST_INTERVAL: Duration = Duration::from_secs(60);

/// Admits the first `burst` events of every `interval` and counts the rest.
#[derive(Debug, Clone)]
pub struct LogLimiter {
    burst: u32,
    interval: Duration,
    /// When the current interval began (its first event).
    window: Option<Instant>,
    admitted: u32,
    suppressed: u64,
}

impl Default for LogLimiter {
    /// [`GUEST_BURST`] lines per [`GUEST_INTERVAL`].
    fn default() -> Self {
        LogLimiter::new(GUEST_BURST, GUEST_INTERVAL)
    }
}

impl LogLimiter {
    /// `burst` events admitted per `interval`.
    pub const fn new(burst: u32, interval: Duration) -> Self {
        LogLimiter {
            burst,
            interval,
            window: None,
            admitted: 0,
            suppressed: 0,
        }
    }

    /// Whether an event happening now may be logged: `Some(n)` with the
    /// number of events left out since the last one logged, `None` to
    /// leave this one out (it is counted).
    pub fn admit(&mut self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    /// [`LogLimiter::admit`] for an event at `now`.
    pub fn admit_at(&mut self, now: Instant) -> Option<u64> {
        let new_window = self
            .window
            .is_none_or(|start| now.saturating_duration_since(start) >= self.interval);
        if new_window {
            self.window = Some(now);
            self.admitted = 0;
        }
        if self.admitted < self.burst {
            self.admitted += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed = self.suppressed.saturating_add(1);
            None
        }
    }

    /// Events left out since the last one logged.
    pub fn suppressed(&self) -> u64 {
        self.suppressed
    }
}

/// Logs a `tracing` event through a [`LogLimiter`]:
/// `limited!(self.guest_log, warn, error = %e, "message")`. A line that
/// follows left-out ones gets a `suppressed` field with their count.
#[macro_export]
macro_rules! limited {
    ($limiter:expr, $level:ident, $($arg:tt)+) => {
        match $limiter.admit() {
            Some(0) => ::tracing::$level!($($arg)+),
            Some(suppressed) => ::tracing::$level!(suppressed, $($arg)+),
            None => {}
        }
    };
}

/// Counting what is logged, for tests of the lines a guest can set off.
#[cfg(test)]
pub(crate) mod test_support {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// A subscriber that only counts warnings and errors (it stands in for
    /// husk's logger, whose default level is warn).
    struct Count(Arc<AtomicUsize>);

    impl tracing::Subscriber for Count {
        fn enabled(&self, m: &tracing::Metadata<'_>) -> bool {
            *m.level() <= tracing::Level::WARN
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, _: &tracing::Event<'_>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    /// Warnings and errors logged on this thread while `f` runs.
    pub(crate) fn warnings_during(f: impl FnOnce()) -> usize {
        let n = Arc::new(AtomicUsize::new(0));
        tracing::subscriber::with_default(Count(n.clone()), f);
        n.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::warnings_during;
    use super::*;

    #[test]
    fn the_first_few_per_interval_pass_and_the_next_one_counts_the_rest() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut l = LogLimiter::new(3, s(60));
        assert_eq!(l.admit_at(t0), Some(0));
        assert_eq!(l.admit_at(t0), Some(0));
        assert_eq!(l.admit_at(t0 + s(1)), Some(0));
        // A flood within the interval: counted, not logged.
        for _ in 0..1000 {
            assert_eq!(l.admit_at(t0 + s(2)), None);
        }
        assert_eq!(l.admit_at(t0 + s(59)), None);
        assert_eq!(l.suppressed(), 1001);
        // The next interval: its first line says how many were left out.
        assert_eq!(l.admit_at(t0 + s(60)), Some(1001));
        assert_eq!(l.admit_at(t0 + s(61)), Some(0));
        assert_eq!(l.admit_at(t0 + s(62)), Some(0));
        assert_eq!(l.admit_at(t0 + s(63)), None);
        // A quiet spell: the interval starts again at the next event.
        assert_eq!(l.admit_at(t0 + s(1000)), Some(1));
        assert_eq!(l.suppressed(), 0);
    }

    #[test]
    fn the_default_admits_a_burst_per_minute() {
        let t0 = Instant::now();
        let mut l = LogLimiter::default();
        let logged = (0..100).filter(|_| l.admit_at(t0).is_some()).count();
        assert_eq!(logged, GUEST_BURST as usize);
        assert_eq!(
            l.admit_at(t0 + GUEST_INTERVAL),
            Some(100 - u64::from(GUEST_BURST))
        );
    }

    #[test]
    fn the_macro_logs_only_what_is_admitted() {
        let mut l = LogLimiter::new(2, Duration::from_secs(3600));
        let logged = warnings_during(|| {
            for i in 0..100 {
                crate::limited!(l, warn, i, "a guest-triggered warning");
            }
        });
        assert_eq!(logged, 2);
        assert_eq!(l.suppressed(), 98);
    }
}
