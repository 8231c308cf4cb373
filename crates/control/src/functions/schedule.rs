//! Schedules: a function whose version declares `schedule` (a cron pattern, in UTC, or a period such as `"1h"`)
//! runs on it with no input. Each run is a call in the deferred-call queue (origin `scheduled`), so it runs under
//! the function's policies, is retried like any call and is listed with its answer (`compute fn runs`).
//!
//! The next run of each function is reckoned from when the server first sees its version (a deploy or a start):
//! runs that fell while the server was down are not made up, and a run is skipped while the previous scheduled
//! run of the function has not finished, so a slow function does not pile up a backlog.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use compute_store::{CallOrigin, FunctionRecord};

use super::{now, Functions};
use crate::{ControlError, Principal};

/// How often the scheduler looks for runs that are due.
const TICK: Duration = Duration::from_millis(250);

/// When a scheduled function runs.
#[derive(Debug, Clone)]
pub enum Schedule {
    /// Every `period`, the first one `period` after the version is first seen.
    Every {
        /// The period.
        period: Duration,
        /// As declared.
        text: String,
    },
    /// At the times a cron pattern matches (UTC; five fields, or six with seconds first; `@hourly` and the like).
    Cron {
        /// The parsed pattern.
        cron: Box<croner::Cron>,
        /// As declared.
        text: String,
    },
}

impl PartialEq for Schedule {
    fn eq(&self, other: &Self) -> bool {
        self.text() == other.text()
    }
}

impl Schedule {
    /// Reads a schedule: a cron pattern (it has spaces, or starts with `@`) or a period of whole units
    /// (`30s`, `5m`, `1h30m`, `1d`; at least a second). The error says what is allowed.
    pub fn parse(text: &str) -> Result<Schedule, String> {
        let text = text.trim();
        if text.contains(char::is_whitespace) || text.starts_with('@') {
            let cron = croner::Cron::new(text).with_seconds_optional().parse().map_err(|e| {
                format!(
                    "{text:?} is not a cron pattern ({e}): use five fields (or six, seconds first), e.g. \
                         \"0 * * * *\", or a period such as \"30s\" or \"1h\""
                )
            })?;
            return Ok(Schedule::Cron { cron: Box::new(cron), text: text.to_string() });
        }
        let period = parse_period(text).ok_or_else(|| {
            format!(
                "{text:?} is neither a cron pattern (e.g. \"0 * * * *\") nor a period of whole units (e.g. \"30s\", \
                 \"5m\", \"1h30m\", \"1d\")"
            )
        })?;
        if period < Duration::from_secs(1) {
            return Err(format!("{text:?} is shorter than a second, the shortest period"));
        }
        Ok(Schedule::Every { period, text: text.to_string() })
    }

    /// As declared.
    pub fn text(&self) -> &str {
        match self {
            Schedule::Every { text, .. } | Schedule::Cron { text, .. } => text,
        }
    }

    /// The first run strictly after `at` (ms since the epoch); `None` if the pattern never matches again.
    pub fn next_after(&self, at: i64) -> Option<i64> {
        match self {
            Schedule::Every { period, .. } => Some(at.saturating_add(period.as_millis() as i64)),
            Schedule::Cron { cron, .. } => {
                let t: DateTime<Utc> = DateTime::from_timestamp_millis(at)?;
                cron.find_next_occurrence(&t, false).ok().map(|n| n.timestamp_millis())
            }
        }
    }
}

fn parse_period(text: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut digits = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let n: u64 = digits.parse().ok()?;
        digits.clear();
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return None,
        };
        total = total.checked_add(Duration::from_secs(n.checked_mul(unit)?))?;
    }
    // A number with no unit after it (or nothing at all) is not a period.
    (!text.is_empty() && digits.is_empty()).then_some(total)
}

impl Functions {
    /// Runs scheduled functions when they are due (part of the queue worker).
    pub(super) async fn run_schedules(self: Arc<Self>) {
        let mut next: HashMap<(String, String), i64> = HashMap::new();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = self.fire_due(&mut next) {
                tracing::warn!(error = %e, "could not run the function schedules");
            }
        }
    }

    /// Enqueues a run of each scheduled function that is due; `next` holds each (function, version)'s next run.
    fn fire_due(&self, next: &mut HashMap<(String, String), i64>) -> Result<(), ControlError> {
        let at = now();
        let mut seen = HashSet::new();
        for f in self.store.read(|r| r.functions().live())? {
            let Some(schedule) = self.schedule_of(&f) else { continue };
            let key = (f.id.clone(), f.version_id.clone().unwrap_or_default());
            seen.insert(key.clone());
            let due = *next.entry(key.clone()).or_insert_with(|| schedule.next_after(at).unwrap_or(i64::MAX));
            if at < due {
                continue;
            }
            next.insert(key, schedule.next_after(at).unwrap_or(i64::MAX));
            let waiting = self.store.read(|r| r.function_calls().unfinished_of(&f.id, CallOrigin::Scheduled))?;
            if waiting > 0 {
                tracing::info!(function = %f.name, "scheduled run skipped: the previous one has not finished");
                continue;
            }
            let who = Principal {
                client_id: f.created_by.clone(),
                environment_id: f.environment_id.clone(),
                expires_at: i64::MAX,
            };
            let request = (self.codec.scheduled_request)(&f.name);
            match self.enqueue_from(&who, &f.name, request, CallOrigin::Scheduled) {
                Ok(id) => tracing::debug!(function = %f.name, call = %id, "scheduled run enqueued"),
                Err(e) => tracing::warn!(function = %f.name, error = %e, "scheduled run not enqueued"),
            }
        }
        next.retain(|k, _| seen.contains(k));
        Ok(())
    }

    fn schedule_of(&self, f: &FunctionRecord) -> Option<Schedule> {
        self.current_policy(f).ok()?.schedule.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_and_cron_patterns_are_read_and_anything_else_is_refused_saying_what_is_allowed() {
        for (text, secs) in [("30s", 30), ("5m", 300), ("1h30m", 5400), ("1d", 86_400), ("2h", 7200)] {
            match Schedule::parse(text).unwrap() {
                Schedule::Every { period, .. } => assert_eq!(period, Duration::from_secs(secs), "{text}"),
                other => panic!("{text} read as {other:?}"),
            }
        }
        assert!(matches!(Schedule::parse("0 * * * *").unwrap(), Schedule::Cron { .. }));
        assert!(matches!(Schedule::parse("*/5 * * * * *").unwrap(), Schedule::Cron { .. }));
        assert!(matches!(Schedule::parse("@hourly").unwrap(), Schedule::Cron { .. }));
        for bad in ["", "h", "10", "5x", "1.5h", "0s", "61 * * * *", "every hour"] {
            let e = Schedule::parse(bad).unwrap_err();
            assert!(e.contains("cron") || e.contains("second"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn the_next_run_follows_the_period_or_the_pattern_in_utc() {
        let every = Schedule::parse("90s").unwrap();
        assert_eq!(every.next_after(1_000), Some(91_000));
        let hourly = Schedule::parse("0 * * * *").unwrap();
        // 2026-12-04T10:20:00Z → 11:00:00Z.
        let at = DateTime::parse_from_rfc3339("2026-12-04T10:20:00Z").unwrap().timestamp_millis();
        let want = DateTime::parse_from_rfc3339("2026-12-04T11:00:00Z").unwrap().timestamp_millis();
        assert_eq!(hourly.next_after(at), Some(want));
        // Strictly after: at the hour, the next is the one after.
        assert_eq!(hourly.next_after(want), Some(want + 3_600_000));
    }
}
