//! How many replicas a group wants, from the requests in flight through the ingress.
//!
//! Scaling up follows the load of the last `window` at once; scaling down waits until the load has been lower
//! for the whole `shutdown_delay`, so a short lull does not stop replicas that the next burst needs. A group with
//! `min_replicas = 0` goes to zero after `shutdown_delay` without a request, and back to one as soon as a request
//! arrives.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The autoscaler's view of one group.
#[derive(Debug, Default)]
pub(crate) struct Autoscaler {
    /// (when, requests in flight) samples, oldest first, covering the longer of the two windows.
    samples: VecDeque<(Instant, usize)>,
    last_request: Option<Instant>,
    last_served: u64,
}

/// A group's scaling bounds and windows.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bounds {
    pub min: u32,
    pub max: u32,
    /// Requests in flight one replica is meant to carry.
    pub target_concurrency: u32,
    /// Load is averaged over this long when scaling up.
    pub window: Duration,
    /// Load must stay lower for this long before replicas are stopped.
    pub shutdown_delay: Duration,
}

impl Autoscaler {
    /// Records a sample and returns the replica count the group wants now.
    pub(crate) fn desired(&mut self, now: Instant, in_flight: usize, served: u64, starved: u64, bounds: Bounds) -> u32 {
        if in_flight > 0 || starved > 0 || served != self.last_served {
            self.last_request = Some(now);
        }
        self.last_served = served;
        self.samples.push_back((now, in_flight));
        let keep = bounds.window.max(bounds.shutdown_delay);
        while self.samples.front().is_some_and(|(t, _)| now.duration_since(*t) > keep) {
            self.samples.pop_front();
        }
        let target = bounds.target_concurrency.max(1) as f64;
        let recent: Vec<usize> =
            self.samples.iter().filter(|(t, _)| now.duration_since(*t) <= bounds.window).map(|(_, n)| *n).collect();
        let average = recent.iter().sum::<usize>() as f64 / recent.len().max(1) as f64;
        // Never fewer than the load right now needs.
        let up = (average.max(in_flight as f64) / target).ceil() as u32;
        // The busiest moment within the shutdown delay keeps its replicas until the delay has passed.
        let held = self
            .samples
            .iter()
            .filter(|(t, _)| now.duration_since(*t) <= bounds.shutdown_delay)
            .map(|(_, n)| *n)
            .max()
            .unwrap_or(0);
        let held = (held as f64 / target).ceil() as u32;
        let recently_used = self.last_request.is_some_and(|t| now.duration_since(t) <= bounds.shutdown_delay);
        let wanted = up.max(held).max(u32::from(recently_used));
        wanted.clamp(bounds.min, bounds.max.max(bounds.min))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds(min: u32, max: u32) -> Bounds {
        Bounds {
            min,
            max,
            target_concurrency: 4,
            window: Duration::from_secs(2),
            shutdown_delay: Duration::from_secs(10),
        }
    }

    #[test]
    fn scales_up_at_once_and_down_only_after_the_delay() {
        let mut a = Autoscaler::default();
        let t0 = Instant::now();
        let b = bounds(1, 5);
        assert_eq!(a.desired(t0, 0, 0, 0, b), 1, "the minimum when idle");
        assert_eq!(a.desired(t0 + Duration::from_millis(200), 12, 0, 0, b), 3, "12 in flight at 4 each");
        assert_eq!(a.desired(t0 + Duration::from_millis(400), 40, 0, 0, b), 5, "capped at the maximum");
        // The load drops: replicas stay for the shutdown delay.
        assert_eq!(a.desired(t0 + Duration::from_secs(5), 0, 52, 0, b), 5);
        assert_eq!(a.desired(t0 + Duration::from_secs(9), 0, 52, 0, b), 5);
        assert_eq!(a.desired(t0 + Duration::from_secs(11), 0, 52, 0, b), 1, "back to the minimum");
    }

    #[test]
    fn scales_to_zero_after_a_quiet_delay_and_back_on_demand() {
        let mut a = Autoscaler::default();
        let t0 = Instant::now();
        let b = bounds(0, 2);
        assert_eq!(a.desired(t0, 0, 0, 0, b), 0, "never used: zero");
        assert_eq!(a.desired(t0 + Duration::from_secs(1), 0, 0, 1, b), 1, "a request waits: one");
        assert_eq!(a.desired(t0 + Duration::from_secs(2), 1, 0, 0, b), 1);
        assert_eq!(a.desired(t0 + Duration::from_secs(3), 0, 1, 0, b), 1, "just served");
        assert_eq!(a.desired(t0 + Duration::from_secs(12), 0, 1, 0, b), 1, "within the delay");
        assert_eq!(a.desired(t0 + Duration::from_secs(14), 0, 1, 0, b), 0, "quiet for the whole delay");
    }
}
