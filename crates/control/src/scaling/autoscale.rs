//! How many replicas a group wants, from the requests in flight through the ingress and, when the spec sets a
//! CPU target, from its replicas' CPU use (as Kubernetes' HPA: `ceil(ready × utilisation / target)`).
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
    /// (when, requests in flight, replicas the CPU target wants) samples, oldest first, covering the longer of the
    /// two windows.
    samples: VecDeque<(Instant, usize, u32)>,
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
    /// Records a sample and returns the replica count the group wants now. `cpu_wants` is what the CPU target
    /// wants (see [`by_cpu`]), `None` without one.
    pub(crate) fn desired(
        &mut self,
        now: Instant,
        in_flight: usize,
        served: u64,
        starved: u64,
        cpu_wants: Option<u32>,
        bounds: Bounds,
    ) -> u32 {
        if in_flight > 0 || starved > 0 || served != self.last_served {
            self.last_request = Some(now);
        }
        self.last_served = served;
        let target = bounds.target_concurrency.max(1) as f64;
        let cpu_wants = cpu_wants.unwrap_or(0);
        self.samples.push_back((now, in_flight, cpu_wants));
        let keep = bounds.window.max(bounds.shutdown_delay);
        while self.samples.front().is_some_and(|(t, _, _)| now.duration_since(*t) > keep) {
            self.samples.pop_front();
        }
        let recent: Vec<usize> = self
            .samples
            .iter()
            .filter(|(t, _, _)| now.duration_since(*t) <= bounds.window)
            .map(|(_, n, _)| *n)
            .collect();
        let average = recent.iter().sum::<usize>() as f64 / recent.len().max(1) as f64;
        // Never fewer than the load right now needs.
        let up = ((average.max(in_flight as f64) / target).ceil() as u32).max(cpu_wants);
        // The busiest moment within the shutdown delay keeps its replicas until the delay has passed.
        let held = self
            .samples
            .iter()
            .filter(|(t, _, _)| now.duration_since(*t) <= bounds.shutdown_delay)
            .map(|(_, n, cpu)| ((*n as f64 / target).ceil() as u32).max(*cpu))
            .max()
            .unwrap_or(0);
        let recently_used = self.last_request.is_some_and(|t| now.duration_since(t) <= bounds.shutdown_delay);
        let wanted = up.max(held).max(u32::from(recently_used));
        wanted.clamp(bounds.min, bounds.max.max(bounds.min))
    }
}

/// The replicas a CPU target wants: `ceil(ready × average utilisation / target)`, or `ready` while the
/// utilisation is within 10 % of the target (so the count does not flap around it).
pub(crate) fn by_cpu(ready: u32, utilisation: f64, target: f64) -> u32 {
    if ready == 0 || target <= 0.0 {
        return 0;
    }
    let ratio = utilisation / target;
    if (ratio - 1.0).abs() <= 0.1 {
        return ready;
    }
    (ready as f64 * ratio).ceil() as u32
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
        assert_eq!(a.desired(t0, 0, 0, 0, None, b), 1, "the minimum when idle");
        assert_eq!(a.desired(t0 + Duration::from_millis(200), 12, 0, 0, None, b), 3, "12 in flight at 4 each");
        assert_eq!(a.desired(t0 + Duration::from_millis(400), 40, 0, 0, None, b), 5, "capped at the maximum");
        // The load drops: replicas stay for the shutdown delay.
        assert_eq!(a.desired(t0 + Duration::from_secs(5), 0, 52, 0, None, b), 5);
        assert_eq!(a.desired(t0 + Duration::from_secs(9), 0, 52, 0, None, b), 5);
        assert_eq!(a.desired(t0 + Duration::from_secs(11), 0, 52, 0, None, b), 1, "back to the minimum");
    }

    #[test]
    fn the_cpu_target_scales_like_kubernetes_and_holds_for_the_delay() {
        assert_eq!(by_cpu(1, 1.0, 0.5), 2, "one replica at 100 % for a 50 % target wants two");
        assert_eq!(by_cpu(3, 0.1, 0.5), 1);
        assert_eq!(by_cpu(2, 0.52, 0.5), 2, "within 10 % of the target: no change");
        assert_eq!(by_cpu(0, 1.0, 0.5), 0);
        let mut a = Autoscaler::default();
        let t0 = Instant::now();
        let b = bounds(1, 4);
        assert_eq!(a.desired(t0, 1, 0, 0, Some(3), b), 3, "CPU wants more than concurrency");
        assert_eq!(a.desired(t0 + Duration::from_secs(5), 0, 1, 0, Some(1), b), 3, "held for the delay");
        assert_eq!(a.desired(t0 + Duration::from_secs(11), 0, 1, 0, Some(1), b), 1);
    }

    #[test]
    fn scales_to_zero_after_a_quiet_delay_and_back_on_demand() {
        let mut a = Autoscaler::default();
        let t0 = Instant::now();
        let b = bounds(0, 2);
        assert_eq!(a.desired(t0, 0, 0, 0, None, b), 0, "never used: zero");
        assert_eq!(a.desired(t0 + Duration::from_secs(1), 0, 0, 1, None, b), 1, "a request waits: one");
        assert_eq!(a.desired(t0 + Duration::from_secs(2), 1, 0, 0, None, b), 1);
        assert_eq!(a.desired(t0 + Duration::from_secs(3), 0, 1, 0, None, b), 1, "just served");
        assert_eq!(a.desired(t0 + Duration::from_secs(12), 0, 1, 0, None, b), 1, "within the delay");
        assert_eq!(a.desired(t0 + Duration::from_secs(14), 0, 1, 0, None, b), 0, "quiet for the whole delay");
    }
}
