//! Scaling triggers beyond requests in flight and CPU: a function's queue depth (`function_queue_depth_trigger`,
//! what `target_queue_depth` sets) and replica floors over cron windows (`cron_scaling_trigger`).

use std::sync::Arc;

use chrono::{DateTime, FixedOffset, Utc};

/// `function_queue_depth_trigger`: one replica per `target` calls of `function` queued or running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueDepthTrigger {
    /// The function whose deferred-call queue drives the group (in the group's environment).
    pub function: String,
    /// Calls one replica is meant to carry.
    pub target: u32,
}

impl QueueDepthTrigger {
    /// Replicas `depth` queued calls want.
    pub fn wants(&self, depth: u64) -> u32 {
        depth.div_ceil(u64::from(self.target.max(1))).min(u64::from(u32::MAX)) as u32
    }
}

/// `cron_scaling_trigger`: while a window is open (after its `start` and before its `end`, in the trigger's time
/// zone), the group keeps at least its replicas.
#[derive(Debug, Clone)]
pub struct CronWindows {
    zone: Zone,
    windows: Vec<Window>,
}

#[derive(Debug, Clone)]
struct Window {
    start: croner::Cron,
    end: croner::Cron,
    replicas: u32,
}

#[derive(Debug, Clone)]
enum Zone {
    Utc,
    /// An IANA zone read from the system's zoneinfo.
    Named(Arc<tz::TimeZone>),
}

impl CronWindows {
    /// Reads a trigger: `timezone` (an IANA name such as `America/New_York`, or `UTC` / empty) and the windows as
    /// (start, end, replicas). The error names the window's field (`windows[i].start`…) and says what is wrong.
    pub fn parse(timezone: &str, windows: &[(String, String, i32)]) -> Result<CronWindows, String> {
        let zone = match timezone.trim() {
            "" | "UTC" | "Etc/UTC" | "Z" => Zone::Utc,
            name => Zone::Named(Arc::new(tz::TimeZone::from_posix_tz(name).map_err(|e| {
                format!("timezone {name:?} is not a time zone this machine knows ({e}): use an IANA name such as \"Europe/Berlin\", or UTC")
            })?)),
        };
        if windows.is_empty() {
            return Err("windows is empty: give at least one window (start, end, desired_replicas)".into());
        }
        let cron = |i: usize, field: &str, s: &str| {
            croner::Cron::new(s).parse().map_err(|e| {
                format!("windows[{i}].{field} {s:?} is not a five-field cron pattern ({e}), e.g. \"0 8 * * 1-5\"")
            })
        };
        let windows = windows
            .iter()
            .enumerate()
            .map(|(i, (start, end, replicas))| {
                if *replicas < 0 {
                    return Err(format!("windows[{i}].desired_replicas {replicas} must be 0 or more"));
                }
                Ok(Window { start: cron(i, "start", start)?, end: cron(i, "end", end)?, replicas: *replicas as u32 })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(CronWindows { zone, windows })
    }

    /// The floor at `at`: the most replicas any open window asks for (0 when none is open).
    pub fn floor_at(&self, at: DateTime<Utc>) -> u32 {
        let offset = match &self.zone {
            Zone::Utc => 0,
            Zone::Named(z) => z.find_local_time_type(at.timestamp()).map(|t| t.ut_offset()).unwrap_or(0),
        };
        let Some(offset) = FixedOffset::east_opt(offset) else { return 0 };
        let local = at.with_timezone(&offset);
        self.windows
            .iter()
            .filter(|w| {
                // Open when the window's end comes before its next start.
                match (w.start.find_next_occurrence(&local, false), w.end.find_next_occurrence(&local, false)) {
                    (Ok(next_start), Ok(next_end)) => next_end < next_start,
                    (Err(_), Ok(_)) => true,
                    _ => false,
                }
            })
            .map(|w| w.replicas)
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn weekdays_9_to_17(zone: &str) -> CronWindows {
        CronWindows::parse(zone, &[("0 9 * * 1-5".into(), "0 17 * * 1-5".into(), 3)]).unwrap()
    }

    #[test]
    fn a_window_holds_its_floor_between_start_and_end_and_not_outside() {
        let w = weekdays_9_to_17("UTC");
        // Friday 2026-12-04.
        assert_eq!(w.floor_at(at("2026-12-04T08:59:00Z")), 0);
        assert_eq!(w.floor_at(at("2026-12-04T09:00:00Z")), 3);
        assert_eq!(w.floor_at(at("2026-12-04T16:59:59Z")), 3);
        assert_eq!(w.floor_at(at("2026-12-04T17:00:00Z")), 0);
        // Saturday.
        assert_eq!(w.floor_at(at("2026-12-05T12:00:00Z")), 0);
    }

    #[test]
    fn a_named_zone_shifts_the_window_and_overlapping_windows_take_the_larger_floor() {
        let berlin = weekdays_9_to_17("Europe/Berlin");
        // 09:00 in Berlin is 08:00 UTC in December.
        assert_eq!(berlin.floor_at(at("2026-12-04T08:30:00Z")), 3);
        assert_eq!(berlin.floor_at(at("2026-12-04T16:30:00Z")), 0);
        let both = CronWindows::parse(
            "UTC",
            &[("0 9 * * *".into(), "0 17 * * *".into(), 2), ("0 12 * * *".into(), "0 13 * * *".into(), 5)],
        )
        .unwrap();
        assert_eq!(both.floor_at(at("2026-12-04T12:30:00Z")), 5);
        assert_eq!(both.floor_at(at("2026-12-04T14:00:00Z")), 2);
    }

    #[test]
    fn bad_triggers_name_what_is_wrong() {
        let e = CronWindows::parse("Mars/Olympus", &[("0 9 * * *".into(), "0 17 * * *".into(), 1)]).unwrap_err();
        assert!(e.contains("Mars/Olympus"), "{e}");
        let e = CronWindows::parse("UTC", &[("0 9 * * *".into(), "soon".into(), 1)]).unwrap_err();
        assert!(e.contains("windows[0].end"), "{e}");
        let e = CronWindows::parse("UTC", &[("0 9 * * *".into(), "0 17 * * *".into(), -1)]).unwrap_err();
        assert!(e.contains("windows[0].desired_replicas"), "{e}");
        assert!(CronWindows::parse("UTC", &[]).unwrap_err().contains("windows is empty"));
        assert_eq!(QueueDepthTrigger { function: "f".into(), target: 4 }.wants(9), 3);
        assert_eq!(QueueDepthTrigger { function: "f".into(), target: 4 }.wants(0), 0);
    }
}
