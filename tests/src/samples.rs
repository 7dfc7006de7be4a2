//! HA state samples: each server's `ha.state` polled every 50 ms on a
//! thread of its own, and what the tests read from them (how long both
//! served at once, when a state was first seen).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};

/// One status poll of an HA server: when, and its `ha.state` (`None`: no
/// answer, e.g. while the process is stopped).
pub type Sample = (Duration, Option<String>);

/// Polls `poll` every 50 ms on a thread until `stop`, recording each answer.
pub fn sample_states(
    poll: impl Fn() -> Option<String> + Send + 'static,
    t0: Instant,
    stop: Arc<AtomicBool>,
) -> JoinHandle<Vec<Sample>> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            v.push((t0.elapsed(), poll()));
            std::thread::sleep(Duration::from_millis(50));
        }
        v
    })
}

/// The longest time both servers' latest answers said ACTIVE.
pub fn longest_double_active(a: &[Sample], b: &[Sample]) -> Duration {
    let active = |s: Option<&str>| s == Some("ACTIVE");
    spans(a, b, |x, y| active(x) && active(y))
        .into_iter()
        .map(|(_, length)| length)
        .max()
        .unwrap_or_default()
}

/// The spans (start, length) during which the latest samples of `a` and `b`
/// satisfy `both` (a span still open at the end lasts until the later of
/// the two last samples).
pub fn spans(
    a: &[Sample],
    b: &[Sample],
    both: impl Fn(Option<&str>, Option<&str>) -> bool,
) -> Vec<(Duration, Duration)> {
    let mut events: Vec<(Duration, usize, Option<&str>)> = a
        .iter()
        .map(|(t, s)| (*t, 0, s.as_deref()))
        .chain(b.iter().map(|(t, s)| (*t, 1, s.as_deref())))
        .collect();
    events.sort_by_key(|e| e.0);
    let mut cur: [Option<&str>; 2] = [None, None];
    let mut since: Option<Duration> = None;
    let mut out = Vec::new();
    for (t, who, state) in events {
        cur[who] = state;
        match (both(cur[0], cur[1]), since) {
            (true, None) => since = Some(t),
            (false, Some(s)) => {
                out.push((s, t - s));
                since = None;
            }
            _ => {}
        }
    }
    if let (Some(s), Some(end)) = (since, a.last().zip(b.last()).map(|(x, y)| x.0.max(y.0))) {
        out.push((s, end - s));
    }
    out
}

/// One status poll, with the time the request was sent (`from`) and the
/// time its answer came or it gave up (`to`): the server's state was
/// `state` at some instant between the two.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimedSample {
    /// When the request was sent, since the samplers' start.
    pub from: Duration,
    /// When it was answered (or timed out).
    pub to: Duration,
    /// The `ha.state` answered, `None` without an answer.
    pub state: Option<String>,
}

/// State samplers of some servers, one thread each, polling every 50 ms.
/// Dropping them stops and joins them, so a sampler declared after the
/// processes and networks it polls is gone before they are.
#[derive(Debug)]
pub struct Samplers {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<Vec<TimedSample>>>,
}

impl Samplers {
    /// One sampler per `poll` (each answers a server's `ha.state`), with
    /// times measured from `t0`.
    pub fn start<F>(polls: impl IntoIterator<Item = F>, t0: Instant) -> Samplers
    where
        F: Fn() -> Option<String> + Send + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let handles = polls
            .into_iter()
            .map(|poll| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut v = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let from = t0.elapsed();
                        let state = poll();
                        v.push(TimedSample {
                            from,
                            to: t0.elapsed(),
                            state,
                        });
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    v
                })
            })
            .collect();
        Samplers { stop, handles }
    }

    /// Stops them; the samples of each server, in the order given, each
    /// timed by when its request was sent.
    pub fn finish(self) -> Result<Vec<Vec<Sample>>> {
        Ok(self
            .finish_timed()?
            .into_iter()
            .map(|v| points(&v))
            .collect())
    }

    /// Stops them; the samples of each server, in the order given.
    pub fn finish_timed(mut self) -> Result<Vec<Vec<TimedSample>>> {
        self.stop.store(true, Ordering::Relaxed);
        std::mem::take(&mut self.handles)
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow!("sampler panicked")))
            .collect()
    }
}

impl Drop for Samplers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// Timed samples as [`Sample`]s, timed by when each request was sent.
pub fn points(v: &[TimedSample]) -> Vec<Sample> {
    v.iter().map(|s| (s.from, s.state.clone())).collect()
}

/// States in which a replicated-mode server serves clients.
pub fn serving(s: &str) -> bool {
    matches!(s, "ACTIVE" | "ACTIVE_SYNC" | "STANDALONE")
}

/// The samples with every serving state as "ACTIVE", for
/// [`longest_double_active`].
pub fn as_serving(v: &[Sample]) -> Vec<Sample> {
    v.iter()
        .map(|(t, s)| {
            let s = s
                .as_deref()
                .map(|s| if serving(s) { "ACTIVE" } else { s }.to_owned());
            (*t, s)
        })
        .collect()
}

/// The pairs of samples, one of each server, that both show a serving
/// state and whose request times overlap: each is a moment at which both
/// servers may have served at once.
pub fn overlapping_serving(
    a: &[TimedSample],
    b: &[TimedSample],
) -> Vec<(TimedSample, TimedSample)> {
    let is_serving = |s: &TimedSample| s.state.as_deref().is_some_and(serving);
    let bs: Vec<&TimedSample> = b.iter().filter(|s| is_serving(s)).collect();
    let mut out = Vec::new();
    for x in a.iter().filter(|s| is_serving(s)) {
        for y in &bs {
            if x.from <= y.to && y.from <= x.to {
                out.push((x.clone(), (*y).clone()));
            }
        }
    }
    out
}

/// The state changes of a sample series, for messages.
pub fn show(v: &[Sample]) -> String {
    let mut out = String::new();
    let mut last: Option<&Option<String>> = None;
    for (t, s) in v {
        if last != Some(s) {
            out += &format!(" {}ms:{}", t.as_millis(), s.as_deref().unwrap_or("-"));
            last = Some(s);
        }
    }
    out
}

/// The first sample at or after `from` with state `state`.
pub fn first_at(v: &[Sample], from: Duration, state: &str) -> Option<Duration> {
    v.iter()
        .find(|(t, s)| *t >= from && s.as_deref() == Some(state))
        .map(|(t, _)| *t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn double_active_is_measured_from_overlapping_samples() {
        let ms = Duration::from_millis;
        let a: Vec<Sample> = vec![
            (ms(0), Some("ACTIVE".into())),
            (ms(100), Some("ACTIVE".into())),
            (ms(300), Some("PASSIVE".into())),
        ];
        let b: Vec<Sample> = vec![
            (ms(50), Some("PASSIVE".into())),
            (ms(150), Some("ACTIVE".into())),
            (ms(350), Some("ACTIVE".into())),
        ];
        assert_eq!(longest_double_active(&a, &b), ms(150));
        assert_eq!(longest_double_active(&a, &[]), Duration::ZERO);
        let passive_and_active = |x: Option<&str>, y: Option<&str>| {
            x == Some("PASSIVE") && y == Some("ACTIVE")
                || x == Some("ACTIVE") && y == Some("PASSIVE")
        };
        assert_eq!(
            spans(&a, &b, passive_and_active),
            vec![(ms(50), ms(100)), (ms(300), ms(50))]
        );
    }

    #[test]
    fn serving_samples_overlap_only_when_their_requests_do() {
        let ms = Duration::from_millis;
        let at = |from, to, s: &str| TimedSample {
            from: ms(from),
            to: ms(to),
            state: Some(s.to_owned()),
        };
        let a = vec![
            at(0, 10, "ACTIVE"),
            at(60, 70, "WAITING"),
            at(120, 400, "STANDALONE"),
        ];
        let b = vec![
            at(5, 8, "PASSIVE"),
            at(65, 90, "STANDALONE"),
            at(390, 395, "ACTIVE_SYNC"),
        ];
        let hits = overlapping_serving(&a, &b);
        assert_eq!(hits, vec![(a[2].clone(), b[2].clone())]);
        assert!(overlapping_serving(&a[..2], &b).is_empty());
    }
}
