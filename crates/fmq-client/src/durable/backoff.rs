//! [`Backoff`]: how long a durable connection waits between rounds of
//! reconnect attempts.

use std::time::Duration;

/// Capped, jittered exponential back-off between reconnect rounds.
///
/// A *round* tries every server of the list once. When a round ends without
/// a connection, the connection waits [`delay`](Self::delay)`(n)` before the
/// next one, `n` counting the failed rounds since the last connection
/// (from 0). The base delay is `initial × multiplierⁿ`, capped at `max`; the
/// actual delay is drawn uniformly from `[base × (1 − jitter), base]`, so
/// clients that lost the same server do not come back in lock-step, and the
/// delay never exceeds `max`.
///
/// The first reconnect round after a connection drops starts at once, with
/// no delay: a failover to the other server of a pair should not wait.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Base delay after the first failed round. Default 100 ms.
    pub initial: Duration,
    /// Longest delay. Default 5 s.
    pub max: Duration,
    /// Growth factor per failed round (at least 1). Default 2.
    pub multiplier: f64,
    /// Fraction of the base delay that is random, from 0 (none) to 1 (the
    /// delay is anywhere between 0 and the base). Default 0.5.
    pub jitter: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(5),
            multiplier: 2.0,
            jitter: 0.5,
        }
    }
}

impl Backoff {
    /// The delay before round `attempt + 1` without jitter: `initial ×
    /// multiplier^attempt`, capped at `max`.
    pub fn base(&self, attempt: u32) -> Duration {
        let multiplier = if self.multiplier.is_finite() {
            self.multiplier.max(1.0)
        } else {
            1.0
        };
        let max = self.max.as_secs_f64();
        let exp = i32::try_from(attempt).unwrap_or(i32::MAX);
        let base = self.initial.as_secs_f64() * multiplier.powi(exp);
        if !base.is_finite() || base >= max {
            self.max
        } else {
            Duration::from_secs_f64(base.max(0.0))
        }
    }

    /// The delay before round `attempt + 1`, with random jitter.
    pub fn delay(&self, attempt: u32) -> Duration {
        self.delay_with(attempt, rand::random::<f64>())
    }

    /// The delay for a given random draw `unit` in `[0, 1)`: `base × (1 −
    /// jitter × unit)`. [`delay`](Self::delay) draws `unit` itself; this
    /// form makes the bounds testable.
    pub fn delay_with(&self, attempt: u32, unit: f64) -> Duration {
        let jitter = if self.jitter.is_finite() {
            self.jitter.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self.base(attempt).mul_f64(1.0 - jitter * unit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn base_grows_exponentially_up_to_the_cap() {
        let b = Backoff {
            initial: ms(100),
            max: ms(1000),
            multiplier: 2.0,
            jitter: 0.0,
        };
        let bases: Vec<_> = (0..6).map(|n| b.base(n)).collect();
        assert_eq!(
            bases,
            [ms(100), ms(200), ms(400), ms(800), ms(1000), ms(1000)]
        );
        // Far past the cap, even where the power overflows to infinity.
        assert_eq!(b.base(10_000), ms(1000));
        assert_eq!(b.base(u32::MAX), ms(1000));
    }

    #[test]
    fn jitter_stays_within_its_bounds() {
        let b = Backoff {
            initial: ms(100),
            max: ms(5000),
            multiplier: 2.0,
            jitter: 0.5,
        };
        for attempt in 0..12 {
            let base = b.base(attempt);
            assert_eq!(b.delay_with(attempt, 0.0), base);
            let low = b.delay_with(attempt, 1.0);
            assert_eq!(low, base.mul_f64(0.5));
            for _ in 0..200 {
                let d = b.delay(attempt);
                assert!(
                    d <= base && d >= low,
                    "attempt {attempt}: {d:?} not in [{low:?}, {base:?}]"
                );
                assert!(d <= b.max);
            }
        }
    }

    #[test]
    fn jitter_spreads_the_delays() {
        let b = Backoff::default();
        let draws: std::collections::HashSet<_> = (0..50).map(|_| b.delay(3)).collect();
        assert!(draws.len() > 10, "{draws:?}");
    }

    #[test]
    fn odd_settings_are_tamed() {
        let b = Backoff {
            initial: ms(100),
            max: ms(300),
            multiplier: 0.5, // treated as 1: never shrinks
            jitter: 7.0,     // treated as 1
        };
        assert_eq!(b.base(5), ms(100));
        assert_eq!(b.delay_with(5, 1.0), Duration::ZERO);
        let b = Backoff {
            multiplier: f64::NAN,
            jitter: f64::NAN,
            ..b
        };
        assert_eq!(b.base(3), ms(100));
        assert_eq!(b.delay_with(3, 0.9), ms(100));
        // Initial above the cap: the cap wins.
        let b = Backoff {
            initial: ms(900),
            ..b
        };
        assert_eq!(b.base(0), ms(300));
    }
}
