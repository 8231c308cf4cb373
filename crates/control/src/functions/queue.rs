//! Deferred calls (`.defer()`): enqueued into the store's durable queue, run by a worker under the function's
//! policies (the same path as a `.remote()` call through the API), and polled for their answer.
//!
//! A call is claimed (pending → running) before it runs and finished after; a server that stops with calls running
//! puts them back to pending when it starts again, so every enqueued call runs at least once. A call that finds no
//! replica serving its function (scaling up, or from zero) waits for one rather than failing.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use compute_store::{CallAnswer, CallOrigin, CallRecord, CallState};
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;

use super::{now, Functions};
use crate::{ids, lock, ControlError, Principal};

/// Deferred calls that run at once on this server.
const RUNNING_AT_ONCE: usize = 256;
/// Deferred calls of one function that run at once when it sets no concurrency limit (the rest stay pending, so
/// one function's flood leaves room for the others and a purge still finds them).
const IN_FLIGHT_PER_FUNCTION: usize = 64;
/// How long a deferred call may run.
const RUN_LIMIT: Duration = Duration::from_secs(3600);
/// How long a deferred call waits for a replica to serve its function before it fails.
const WAIT_FOR_REPLICA: Duration = Duration::from_secs(600);
/// How often finished calls whose answers expired are dropped.
const EXPIRE_EVERY: Duration = Duration::from_secs(60);

/// The queue's wake-ups and capacity (part of [`Functions`]).
pub(super) struct QueueState {
    /// Wakes the worker: a call was enqueued or a slot freed.
    work: Notify,
    /// Wakes pollers: some call changed state.
    pub(super) changed: Notify,
    slots: Arc<Semaphore>,
    /// Calls running per function id.
    in_flight: Mutex<HashMap<String, usize>>,
}

impl Default for QueueState {
    fn default() -> Self {
        Self {
            work: Notify::new(),
            changed: Notify::new(),
            slots: Arc::new(Semaphore::new(RUNNING_AT_ONCE)),
            in_flight: Mutex::default(),
        }
    }
}

/// A claimed call's place in its function's in-flight count, given back however the call ends.
struct InFlight<'a> {
    counts: &'a Mutex<HashMap<String, usize>>,
    function_id: String,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut counts = lock(self.counts);
        if let Some(n) = counts.get_mut(&self.function_id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.function_id);
            }
        }
    }
}

/// What a poll of a deferred call answers.
#[derive(Debug, Clone)]
pub struct DeferredCall {
    /// The call's id.
    pub id: String,
    /// Where it is; [`Polled::Expired`] once its answer is past its retention.
    pub state: Polled,
    /// The answer's messages (encoded `CallFunctionResponse`s) after the poll's cursor.
    pub results: Vec<Bytes>,
    /// The cursor to poll from next: how many messages have been handed out.
    pub cursor: u64,
    /// A failed call's error: `{"exc_type": kind, "message": payload}`, the payload being the runtime's own error
    /// (with the traceback) when user code raised.
    pub error: Option<String>,
}

/// A deferred call's state as a poll reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Polled {
    /// Waiting for a worker.
    Pending,
    /// Running.
    Running,
    /// Answered.
    Completed,
    /// Failed.
    Failed,
    /// Its answer was kept as long as `queue_policy.result_ttl_seconds` says and is gone.
    Expired,
}

impl Functions {
    /// Enqueues a call to function `name` with `request` (an encoded `CallFunctionRequest`); returns its id. A
    /// queue already holding `queue_policy.max_items` unfinished calls refuses it with RESOURCE_EXHAUSTED.
    pub fn enqueue(&self, who: &Principal, name: &str, request: Vec<u8>) -> Result<String, ControlError> {
        self.enqueue_from(who, name, request, CallOrigin::Deferred)
    }

    pub(super) fn enqueue_from(
        &self,
        who: &Principal,
        name: &str,
        request: Vec<u8>,
        origin: CallOrigin,
    ) -> Result<String, ControlError> {
        let view = self.get(who, None, Some(name), None, false)?;
        let policy = self.policy(&view.version)?;
        let queue_key = format!("{}/{}", who.environment_id, policy.queue.key.as_deref().unwrap_or(name));
        let call = CallRecord {
            id: format!("call-{}", ids::random_token(20)),
            environment_id: who.environment_id.clone(),
            function_id: view.function.id.clone(),
            queue_key: queue_key.clone(),
            state: CallState::Pending,
            request,
            results: None,
            error: None,
            attempts: 0,
            created_by: who.client_id.clone(),
            created_at: now(),
            started_at: None,
            finished_at: None,
            expires_at: None,
            origin,
        };
        let max = policy.queue.max_items;
        let taken = self.store.write(|r| {
            let calls = r.function_calls();
            let waiting = calls.unfinished(&queue_key)?;
            if waiting >= max {
                return Ok(Some(waiting));
            }
            calls.insert(&call)?;
            Ok(None)
        })?;
        if let Some(waiting) = taken {
            return Err(ControlError::ResourceExhausted(format!(
                "function {name:?}'s queue holds {waiting} unfinished calls, its queue_policy.max_items: wait for \
                 some to finish, purge it, or raise max_items"
            )));
        }
        self.queue.work.notify_one();
        tracing::debug!(function = name, call = %call.id, "call enqueued");
        Ok(call.id)
    }

    /// A deferred call's state and the answer's messages after `cursor`. A call not yet finished is waited on for
    /// up to `wait`, so a poll answers as soon as the call does.
    pub async fn poll(
        &self,
        who: &Principal,
        call_id: &str,
        cursor: u64,
        wait: Duration,
    ) -> Result<DeferredCall, ControlError> {
        let until = Instant::now() + wait;
        loop {
            let changed = self.queue.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let call = self.store.read(|r| r.function_calls().get(&who.environment_id, call_id))?.ok_or_else(|| {
                ControlError::NotFound(format!(
                    "no deferred call {call_id:?} in this environment (its answer may have expired, or its function \
                     was purged or deleted)"
                ))
            })?;
            if call.state.is_finished() || Instant::now() >= until {
                return polled(call, cursor);
            }
            let _ = tokio::time::timeout_at(until, changed).await;
        }
    }

    /// Drops the calls not yet started of function `name` (every function's when `None`); returns how many per
    /// function.
    pub fn purge(&self, who: &Principal, name: Option<&str>) -> Result<BTreeMap<String, u64>, ControlError> {
        let functions = match name {
            Some(name) => vec![self.find(who, None, Some(name), false)?],
            None => self.store.read(|r| r.functions().list(&who.environment_id, "", false, u32::MAX, 0))?,
        };
        let mut dropped = BTreeMap::new();
        for f in functions {
            let n = self.store.write(|r| r.function_calls().drop_pending(&f.id))?;
            dropped.insert(f.name, n as u64);
        }
        self.queue.changed.notify_waiters();
        Ok(dropped)
    }

    /// A function's deferred and scheduled calls still kept, newest first, from `offset` (`compute fn runs`).
    pub fn runs(&self, who: &Principal, name: &str, limit: u32, offset: u32) -> Result<Vec<CallRecord>, ControlError> {
        let f = self.find(who, None, Some(name), true)?;
        Ok(self.store.read(|r| r.function_calls().of_function(&f.id, limit, offset))?)
    }

    /// How many of a function's calls are queued or running (its queue depth).
    pub fn queued(&self, who: &Principal, name: &str) -> Result<u64, ControlError> {
        let f = self.find(who, None, Some(name), true)?;
        self.store
            .read(|r| {
                let calls = r.function_calls();
                Ok(calls.unfinished_of(&f.id, CallOrigin::Deferred)?
                    + calls.unfinished_of(&f.id, CallOrigin::Scheduled)?)
            })
            .map_err(ControlError::from)
    }

    /// Starts the worker that runs deferred calls, and the schedules; calls left running by a server that stopped
    /// run again.
    pub fn start_queue(self: &Arc<Self>) -> Result<tokio::task::JoinHandle<()>, ControlError> {
        let requeued = self.store.write(|r| r.function_calls().requeue_running())?;
        if requeued > 0 {
            tracing::info!(requeued, "deferred calls left running by the last server run again");
        }
        let (worker, scheduler) = (self.clone(), self.clone());
        Ok(tokio::spawn(async move {
            tokio::join!(worker.work(), scheduler.run_schedules());
        }))
    }

    async fn work(self: Arc<Self>) {
        let mut expired_at = Instant::now();
        loop {
            if expired_at.elapsed() >= EXPIRE_EVERY {
                expired_at = Instant::now();
                match self.store.write(|r| r.function_calls().expire(now())) {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(dropped = n, "expired deferred-call answers dropped"),
                    Err(e) => tracing::warn!(error = %e, "could not drop expired deferred-call answers"),
                }
            }
            let claimed = self.claim_batch();
            if claimed.is_empty() {
                let _ = tokio::time::timeout(Duration::from_secs(1), self.queue.work.notified()).await;
                continue;
            }
            self.queue.changed.notify_waiters();
            for call in claimed {
                let Ok(slot) = self.queue.slots.clone().acquire_owned().await else { return };
                let me = self.clone();
                tokio::spawn(async move {
                    let counted = InFlight { counts: &me.queue.in_flight, function_id: call.function_id.clone() };
                    me.run_deferred(call).await;
                    drop((counted, slot));
                    me.queue.work.notify_one();
                });
            }
        }
    }

    /// Claims what may start now: per function (oldest waiting first), up to its concurrency limit (or
    /// [`IN_FLIGHT_PER_FUNCTION`]) less what it has running, within the server's free slots.
    fn claim_batch(&self) -> Vec<CallRecord> {
        let mut free = self.queue.slots.available_permits();
        let pending = match self.store.read(|r| r.function_calls().pending_by_function()) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "could not read the deferred-call queue");
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        for (environment_id, function_id, waiting) in pending {
            if free == 0 {
                break;
            }
            let running = lock(&self.queue.in_flight).get(&function_id).copied().unwrap_or(0);
            let n = self.in_flight_cap(&environment_id, &function_id).saturating_sub(running).min(free);
            let n = n.min(waiting as usize);
            if n == 0 {
                continue;
            }
            match self.store.write(|r| r.function_calls().claim(&function_id, n as u32, now())) {
                Ok(calls) => {
                    *lock(&self.queue.in_flight).entry(function_id).or_default() += calls.len();
                    free -= calls.len();
                    out.extend(calls);
                }
                Err(e) => tracing::warn!(error = %e, "could not claim deferred calls"),
            }
        }
        out
    }

    fn in_flight_cap(&self, environment_id: &str, function_id: &str) -> usize {
        let policy = self.record_by_id(environment_id, function_id).ok().flatten().map(|f| self.current_policy(&f));
        policy
            .and_then(Result::ok)
            .and_then(|p| p.concurrency.as_ref().map(|c| c.max as usize))
            .unwrap_or(IN_FLIGHT_PER_FUNCTION)
    }

    async fn run_deferred(&self, call: CallRecord) {
        let who = Principal {
            client_id: call.created_by.clone(),
            environment_id: call.environment_id.clone(),
            expires_at: i64::MAX,
        };
        let outcome = self.run_once_served(&who, &call).await;
        let (ttl, name) = match self.record_by_id(&call.environment_id, &call.function_id) {
            Ok(Some(f)) => (self.current_policy(&f).map(|p| p.queue.result_ttl).unwrap_or(DEFAULT_TTL), f.name),
            _ => (DEFAULT_TTL, call.function_id.clone()),
        };
        let at = now();
        let expires = at + ttl.as_millis() as i64;
        let written = match outcome {
            Ok(messages) => {
                let framed = frame(&messages);
                self.store.write(|r| r.function_calls().finish(&call.id, CallAnswer::Completed(&framed), at, expires))
            }
            Err(e) => {
                tracing::debug!(function = %name, call = %call.id, error = %e, "deferred call failed");
                let error = envelope(&e);
                self.store.write(|r| r.function_calls().finish(&call.id, CallAnswer::Failed(&error), at, expires))
            }
        };
        if let Err(e) = written {
            tracing::warn!(call = %call.id, error = %e, "could not record a deferred call's answer");
        }
        self.queue.changed.notify_waiters();
    }

    /// Runs the call once a replica serves its function (waiting up to [`WAIT_FOR_REPLICA`] for one).
    async fn run_once_served(&self, who: &Principal, call: &CallRecord) -> Result<Vec<Bytes>, ControlError> {
        let f = self
            .record_by_id(&who.environment_id, &call.function_id)?
            .filter(|f| f.deleted_at.is_none())
            .ok_or_else(|| ControlError::NotFound("the function was deleted before the call ran".into()))?;
        let started = Instant::now();
        let mut backoff = Duration::from_millis(100);
        let request = vec![Bytes::from(call.request.clone())];
        loop {
            let headers = http::HeaderMap::new();
            match self.call(who, &f.name, None, request.clone(), &headers, Some(RUN_LIMIT)).await {
                Err(ControlError::Unavailable(m)) if started.elapsed() < WAIT_FOR_REPLICA => {
                    tracing::debug!(function = %f.name, reason = %m, "deferred call waits for a replica");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                outcome => return outcome,
            }
        }
    }
}

const DEFAULT_TTL: Duration = Duration::from_secs(86_400);

/// One line on how a call went: waiting, running (which attempt), its run time, or its error's kind and message.
pub fn call_summary(call: &CallRecord) -> String {
    let how = state_summary(call);
    match call.origin {
        CallOrigin::Scheduled => format!("scheduled, {how}"),
        CallOrigin::Deferred => how,
    }
}

fn state_summary(call: &CallRecord) -> String {
    match call.state {
        CallState::Pending if call.attempts > 0 => format!("waiting to run again (tried {} times)", call.attempts),
        CallState::Pending => "waiting".to_string(),
        CallState::Running => format!("running (attempt {})", call.attempts),
        CallState::Completed => {
            let ms = call.finished_at.unwrap_or(0) - call.started_at.unwrap_or(0);
            format!("completed in {ms} ms")
        }
        CallState::Failed => {
            let error = call.error.as_deref().unwrap_or_default();
            let v: serde_json::Value = serde_json::from_str(error).unwrap_or(serde_json::Value::Null);
            let kind = v["exc_type"].as_str().unwrap_or("error");
            let message = v["message"].as_str().unwrap_or(error);
            // The runtime's own error is JSON again: its exception's message is the line worth showing.
            let inner: serde_json::Value = serde_json::from_str(message).unwrap_or(serde_json::Value::Null);
            let message = inner.pointer("/exception/message").and_then(|m| m.as_str()).unwrap_or(message);
            let line: String = message.lines().next().unwrap_or_default().chars().take(200).collect();
            format!("failed: {kind}: {line}")
        }
    }
}

impl Polled {
    /// Where a recorded call is now: its state, or Expired once its answer is past its retention.
    pub fn of(call: &CallRecord) -> Polled {
        match call.state {
            _ if call.expires_at.is_some_and(|e| e <= now()) => Polled::Expired,
            CallState::Pending => Polled::Pending,
            CallState::Running => Polled::Running,
            CallState::Completed => Polled::Completed,
            CallState::Failed => Polled::Failed,
        }
    }
}

fn polled(call: CallRecord, cursor: u64) -> Result<DeferredCall, ControlError> {
    let state = Polled::of(&call);
    let all = match (&call.results, state) {
        (Some(framed), Polled::Completed) => unframe(framed)
            .ok_or_else(|| ControlError::Internal(format!("deferred call {:?}'s stored answer is corrupt", call.id)))?,
        _ => Vec::new(),
    };
    let total = all.len() as u64;
    if cursor > total {
        return Err(ControlError::InvalidArgument(format!(
            "cursor {cursor} is past the {total} result messages of call {:?}: poll with the cursor the last poll \
             returned",
            call.id
        )));
    }
    Ok(DeferredCall {
        id: call.id,
        state,
        results: all.into_iter().skip(cursor as usize).collect(),
        cursor: total,
        error: if state == Polled::Failed { call.error } else { None },
    })
}

/// What a failed deferred call tells the caller: the SDK reads `exc_type` (`ProxyError` is an infrastructure
/// failure it may resubmit) and decodes `message` as the runtime's error when user code raised.
fn envelope(e: &ControlError) -> String {
    let (kind, message) = match e {
        ControlError::FunctionFailed(s) => {
            let kind = serde_json::from_str::<serde_json::Value>(&s.message)
                .ok()
                .and_then(|v| v.pointer("/exception/kind").and_then(|k| k.as_str()).map(str::to_string))
                .unwrap_or_else(|| "FunctionError".to_string());
            (kind, s.message.clone())
        }
        ControlError::Unavailable(m) => ("ProxyError".to_string(), m.clone()),
        ControlError::DeadlineExceeded(m) => ("DeadlineExceeded".to_string(), m.clone()),
        ControlError::NotFound(m) => ("FunctionNotFound".to_string(), m.clone()),
        other => ("InternalError".to_string(), other.to_string()),
    };
    serde_json::json!({ "exc_type": kind, "message": message }).to_string()
}

/// Messages as one blob: each a length (u32, big-endian) and its bytes.
fn frame(messages: &[Bytes]) -> Vec<u8> {
    let mut out = Vec::with_capacity(messages.iter().map(|m| m.len() + 4).sum());
    for m in messages {
        out.extend_from_slice(&(m.len() as u32).to_be_bytes());
        out.extend_from_slice(m);
    }
    out
}

fn unframe(mut blob: &[u8]) -> Option<Vec<Bytes>> {
    let mut out = Vec::new();
    while !blob.is_empty() {
        let (len, rest) = blob.split_first_chunk::<4>()?;
        let len = u32::from_be_bytes(*len) as usize;
        if rest.len() < len {
            return None;
        }
        out.push(Bytes::copy_from_slice(&rest[..len]));
        blob = &rest[len..];
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framed_messages_come_back_as_they_went_in() {
        let messages = vec![Bytes::from_static(b"one"), Bytes::new(), Bytes::from(vec![7u8; 70_000])];
        assert_eq!(unframe(&frame(&messages)).unwrap(), messages);
        assert_eq!(unframe(&[]).unwrap(), Vec::<Bytes>::new());
    }

    #[test]
    fn a_truncated_answer_is_refused_rather_than_read_short() {
        let blob = frame(&[Bytes::from_static(b"hello")]);
        assert!(unframe(&blob[..blob.len() - 1]).is_none());
        assert!(unframe(&blob[..2]).is_none());
    }

    #[test]
    fn a_user_error_keeps_the_runtime_payload_and_names_its_kind() {
        let payload = r#"{"chalk_remote_error":1,"exception":{"kind":"ValueError","message":"bad"}}"#;
        let e = ControlError::FunctionFailed(compute_ingress::GrpcStatus {
            code: 2,
            message: payload.into(),
            details: None,
        });
        let v: serde_json::Value = serde_json::from_str(&envelope(&e)).unwrap();
        assert_eq!(v["exc_type"], "ValueError");
        assert_eq!(v["message"], payload);
        let v: serde_json::Value =
            serde_json::from_str(&envelope(&ControlError::Unavailable("no replica".into()))).unwrap();
        assert_eq!(v["exc_type"], "ProxyError");
    }

    #[test]
    fn a_poll_past_the_answer_is_invalid_and_an_expired_answer_reads_expired() {
        let mut call = CallRecord {
            id: "call-1".into(),
            environment_id: "env".into(),
            function_id: "fn".into(),
            queue_key: "env/f".into(),
            state: CallState::Completed,
            request: Vec::new(),
            results: Some(frame(&[Bytes::from_static(b"a"), Bytes::from_static(b"b")])),
            error: None,
            attempts: 1,
            created_by: "c".into(),
            created_at: 0,
            started_at: Some(0),
            finished_at: Some(0),
            expires_at: Some(now() + 60_000),
            origin: CallOrigin::Deferred,
        };
        let p = polled(call.clone(), 1).unwrap();
        assert_eq!((p.state, p.results.len(), p.cursor), (Polled::Completed, 1, 2));
        assert!(matches!(polled(call.clone(), 3), Err(ControlError::InvalidArgument(_))));
        call.expires_at = Some(now() - 1);
        let p = polled(call, 0).unwrap();
        assert_eq!((p.state, p.results.len()), (Polled::Expired, 0));
    }
}
