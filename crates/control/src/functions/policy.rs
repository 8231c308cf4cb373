//! The call policies a function declares, enforced by the server for all of its callers together: how many calls
//! run at once, how many start per window of time, and how failed calls are retried.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::lock;

/// What a function's version declares about its calls.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CallPolicy {
    /// At most this many calls run at once; the others wait their turn.
    pub concurrency: Option<ConcurrencyLimit>,
    /// At most `rate` calls start in any window of `per`; the others wait.
    pub rate_limit: Option<RateLimit>,
    /// Failed calls are tried again.
    pub retry: Option<RetryPolicy>,
    /// How deferred calls (`.defer()`) queue and how long their answers are kept.
    pub queue: QueuePolicy,
    /// When the function runs by itself, with no input.
    pub schedule: Option<super::Schedule>,
}

/// `queue_policy`: bounds on the durable queue of deferred calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuePolicy {
    /// Calls not yet finished, at most; an enqueue beyond it is refused (RESOURCE_EXHAUSTED).
    pub max_items: u64,
    /// Functions naming the same key share one queue (and its bound).
    pub key: Option<String>,
    /// How long a finished call's answer (or error) is kept for `.poll()`.
    pub result_ttl: Duration,
}

impl Default for QueuePolicy {
    /// The documented defaults: 500,000 pending items, answers kept a day.
    fn default() -> Self {
        Self { max_items: 500_000, key: None, result_ttl: Duration::from_secs(86_400) }
    }
}

/// `concurrency`: an in-flight cap, shared by every function that names the same `key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConcurrencyLimit {
    /// Calls in flight at most.
    pub max: u32,
    /// Functions naming the same key share the cap (else the function has its own).
    pub key: Option<String>,
}

/// `rate_limit`: calls started per window, shared by `key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimit {
    /// Calls per window.
    pub rate: u32,
    /// The window: a second, a minute or an hour.
    pub per: Duration,
    /// Functions naming the same key share the limit.
    pub key: Option<String>,
}

/// `retries`: how often and how patiently a failed call is tried again.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts after the first.
    pub max_retries: u32,
    /// Wait before the first retry.
    pub initial_backoff: Duration,
    /// Each further wait is this many times the one before.
    pub multiplier: f64,
    /// No wait is longer than this.
    pub max_backoff: Duration,
}

impl RetryPolicy {
    /// The wait before retry number `retry` (1 for the first).
    pub fn backoff(&self, retry: u32) -> Duration {
        let factor = self.multiplier.max(1.0).powi(retry.saturating_sub(1).min(64) as i32);
        let ms = (self.initial_backoff.as_millis() as f64 * factor).min(self.max_backoff.as_millis() as f64);
        Duration::from_millis(ms.max(0.0) as u64)
    }
}

/// A sliding-window limiter: a call may start when fewer than `rate` calls started in the last `per`. Waiters are
/// served in arrival order. (An exact window rather than a token bucket: a bucket that allows a burst of `rate`
/// lets up to twice `rate` start within one window, which is not what "5 per second" promises.)
#[derive(Debug)]
pub struct Window {
    rate: u32,
    per: Duration,
    starts: Mutex<VecDeque<Instant>>,
    turn: tokio::sync::Mutex<()>,
}

impl Window {
    fn new(rate: u32, per: Duration) -> Self {
        Self { rate: rate.max(1), per, starts: Mutex::default(), turn: tokio::sync::Mutex::new(()) }
    }

    /// Waits until a call may start (and counts it), or returns false when it could not before `deadline`.
    pub async fn admit(&self, deadline: Option<Instant>) -> bool {
        let _turn = match deadline {
            Some(d) => match tokio::time::timeout_at(d, self.turn.lock()).await {
                Ok(t) => t,
                Err(_) => return false,
            },
            None => self.turn.lock().await,
        };
        loop {
            let wait_until = {
                let mut starts = lock(&self.starts);
                let now = Instant::now();
                while starts.front().is_some_and(|t| now.duration_since(*t) >= self.per) {
                    starts.pop_front();
                }
                if (starts.len() as u32) < self.rate {
                    starts.push_back(now);
                    return true;
                }
                *starts.front().expect("a full window has a first start") + self.per
            };
            if deadline.is_some_and(|d| wait_until > d) {
                return false;
            }
            tokio::time::sleep_until(wait_until).await;
        }
    }
}

/// The shared state behind the policies: one semaphore per concurrency key, one window per rate-limit key.
#[derive(Debug, Default)]
pub struct Limiters {
    gates: Mutex<HashMap<String, (u32, Arc<Semaphore>)>>,
    windows: Mutex<HashMap<String, Arc<Window>>>,
}

impl Limiters {
    /// The semaphore of `key` with `max` permits (a new one when the declared cap changed: calls holding the old
    /// one finish under it).
    pub fn gate(&self, key: &str, max: u32) -> Arc<Semaphore> {
        let mut gates = lock(&self.gates);
        match gates.get(key) {
            Some((m, s)) if *m == max => s.clone(),
            _ => {
                let s = Arc::new(Semaphore::new(max.max(1) as usize));
                gates.insert(key.to_string(), (max, s.clone()));
                s
            }
        }
    }

    /// The window of `key` for `rate` per `per` (a new one when the declared limit changed).
    pub fn window(&self, key: &str, rate: u32, per: Duration) -> Arc<Window> {
        let mut windows = lock(&self.windows);
        match windows.get(key) {
            Some(w) if w.rate == rate.max(1) && w.per == per => w.clone(),
            _ => {
                let w = Arc::new(Window::new(rate, per));
                windows.insert(key.to_string(), w.clone());
                w
            }
        }
    }
}

/// Waits for a permit, or gives up at `deadline`.
pub async fn acquire(gate: Arc<Semaphore>, deadline: Option<Instant>) -> Option<OwnedSemaphorePermit> {
    match deadline {
        Some(d) => tokio::time::timeout_at(d, gate.acquire_owned()).await.ok()?.ok(),
        None => gate.acquire_owned().await.ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn no_more_than_rate_calls_start_in_any_window() {
        let w = Arc::new(Window::new(5, Duration::from_secs(1)));
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..23 {
            let w = w.clone();
            tasks.push(tokio::spawn(async move {
                assert!(w.admit(None).await);
                Instant::now()
            }));
        }
        let mut starts = Vec::new();
        for t in tasks {
            starts.push(t.await.unwrap().duration_since(t0));
        }
        starts.sort();
        for (i, s) in starts.iter().enumerate() {
            let in_window = starts[i..].iter().filter(|t| **t < *s + Duration::from_secs(1)).count();
            assert!(in_window <= 5, "{in_window} calls started within a second of {s:?}");
        }
        // 23 calls at 5 per second take four windows after the first.
        assert_eq!(starts.last().unwrap().as_secs(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_that_cannot_start_before_its_deadline_is_refused() {
        let w = Window::new(1, Duration::from_secs(60));
        assert!(w.admit(None).await);
        assert!(!w.admit(Some(Instant::now() + Duration::from_secs(1))).await);
    }

    #[test]
    fn backoff_grows_by_the_multiplier_up_to_the_cap() {
        let p = RetryPolicy {
            max_retries: 5,
            initial_backoff: Duration::from_millis(100),
            multiplier: 2.0,
            max_backoff: Duration::from_millis(500),
        };
        let waits: Vec<u128> = (1..=5).map(|r| p.backoff(r).as_millis()).collect();
        assert_eq!(waits, vec![100, 200, 400, 500, 500]);
    }

    #[test]
    fn a_changed_cap_gets_a_new_gate_and_an_unchanged_one_is_shared() {
        let l = Limiters::default();
        let a = l.gate("k", 2);
        assert!(Arc::ptr_eq(&a, &l.gate("k", 2)));
        assert!(!Arc::ptr_eq(&a, &l.gate("k", 3)));
        assert_eq!(l.gate("k", 3).available_permits(), 3);
    }
}
