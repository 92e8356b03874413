//! The claim → create → ack protocol for one pulled batch of one event type. A slip here
//! loses or duplicates events, so it reads top to bottom in [`process`].
//!
//! Invariants:
//! 1. **Ack late.** A message is acked only when its event is in a Job that exists, is already
//!    running or finished, or has been dead-lettered with its record written.
//! 2. **Claim before create.** Before a Job is created, each of its events is claimed for that
//!    Job name in its state record (compare-and-set), so a crash after the create is recognised
//!    on redelivery however the events are regrouped.
//! 3. **A claim is exclusive.** A record naming another Job is never overwritten while that Job
//!    may exist: only when the backend says the Job does not hold the event *and* the claim is
//!    older than [`Backend::claim_settle`] (the longest a create sent before it could still
//!    land). Until then the message is handed back with a delay.
//! 4. **In hand, kept alive.** While the batch is worked on, its messages get a progress ack
//!    every third of the ack wait, so JetStream never hands them to anyone else.
//! 5. **Backpressure, not loss.** A transient failure (API unreachable, throttled, slow, a
//!    resource that cannot run events yet) keeps the messages and retries with capped backoff
//!    for as long as it lasts, while the consumer stops pulling ([`Gate`]). Only a permanent
//!    failure dead-letters.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{AckKind, Message};
use jobico_common::{EventRecord, EventState};
use jobico_model::Job as JobicoJob;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::backend::{Backend, Batch, DispatchError, Dispatched};
use crate::consumer::Dispatcher;
use crate::dead_letter::{ack, dead_letter, dead_letter_raw};
use crate::state::{self, Advanced, Claim};

/// How long an event whose state cannot be read or claimed (NATS trouble) waits before it is
/// handed out again.
const STATE_RETRY: Duration = Duration::from_secs(2);

/// Whether a consumer may pull: closed while one of its batches is failing transiently, so an
/// outage holds the messages already in hand instead of pulling (and failing) more.
#[derive(Debug, Clone)]
pub struct Gate(Arc<watch::Sender<bool>>);

impl Default for Gate {
    fn default() -> Self {
        Self(Arc::new(watch::Sender::new(true)))
    }
}

impl Gate {
    /// Stops pulling.
    pub fn close(&self) {
        self.0
            .send_if_modified(|open| std::mem::replace(open, false));
    }

    /// Resumes pulling.
    pub fn open(&self) {
        self.0
            .send_if_modified(|open| !std::mem::replace(open, true));
    }

    /// Whether pulling is allowed now.
    pub fn is_open(&self) -> bool {
        *self.0.borrow()
    }

    /// Waits until pulling is allowed.
    pub async fn wait_open(&self) {
        let mut open = self.0.subscribe();
        // The sender lives as long as `self`, so this only ends when the gate opens.
        let _ = open.wait_for(|open| *open).await;
    }
}

/// The messages of a batch in hand, kept alive by progress acks until released.
struct KeepAlive {
    held: Arc<Mutex<Vec<(String, Message)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl KeepAlive {
    fn start(events: &[(Message, EventRecord)], ack_wait: Duration) -> Self {
        let held: Arc<Mutex<Vec<(String, Message)>>> = Arc::new(Mutex::new(
            events
                .iter()
                .map(|(m, r)| (r.id.to_string(), m.clone()))
                .collect(),
        ));
        // A third of the ack wait leaves two chances before the server gives up on us.
        let every = (ack_wait / 3).max(Duration::from_millis(100));
        let task = tokio::spawn({
            let held = held.clone();
            async move {
                loop {
                    tokio::time::sleep(every).await;
                    let messages: Vec<Message> = held
                        .lock()
                        .expect("keep-alive lock")
                        .iter()
                        .map(|(_, m)| m.clone())
                        .collect();
                    for message in messages {
                        let _ = message.ack_with(AckKind::Progress).await;
                    }
                }
            }
        });
        Self { held, task }
    }

    /// Stops keeping event `id`'s message alive (it is about to be acked or handed back).
    fn release(&self, id: &str) {
        self.held
            .lock()
            .expect("keep-alive lock")
            .retain(|(held, _)| held != id);
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One batch being dispatched: its context, and the messages in hand.
struct Work<'a, B> {
    ctx: &'a Dispatcher<B>,
    owner: Arc<JobicoJob>,
    namespace: String,
    event: String,
    alive: KeepAlive,
}

impl<B: Backend> Work<'_, B> {
    fn owner_name(&self) -> &str {
        self.owner.metadata.name.as_deref().unwrap_or_default()
    }

    fn batch(&self, events: &[(Message, EventRecord)]) -> Batch {
        Batch {
            owner: self.owner.clone(),
            event: self.event.clone(),
            events: events.iter().map(|(_, r)| r.clone()).collect(),
        }
    }

    async fn ack(&self, message: &Message, record: &EventRecord) {
        self.alive.release(record.id.as_str());
        ack(message).await;
    }

    /// Hands `message` back to JetStream, to be delivered again after `delay`.
    async fn defer(&self, message: &Message, record: &EventRecord, delay: Duration) {
        self.alive.release(record.id.as_str());
        let _ = message.ack_with(AckKind::Nak(Some(delay))).await;
    }

    async fn defer_all(&self, events: &[(Message, EventRecord)], delay: Option<Duration>) {
        for (message, record) in events {
            self.alive.release(record.id.as_str());
            let _ = message.ack_with(AckKind::Nak(delay)).await;
        }
    }

    async fn dead_letter(&self, events: Vec<(Message, EventRecord)>, reason: &str) {
        for (_, record) in &events {
            self.alive.release(record.id.as_str());
        }
        dead_letter(
            self.ctx,
            &self.namespace,
            &self.event,
            self.owner_name(),
            events,
            reason,
        )
        .await;
    }
}

/// Dispatches one pulled batch: read, check the resource can run it, claim, create, ack.
#[tracing::instrument(level = "debug", skip_all, fields(messages = messages.len()))]
pub async fn process<B: Backend>(
    ctx: &Dispatcher<B>,
    owner: Arc<JobicoJob>,
    event: String,
    messages: Vec<Message>,
    gate: &Gate,
    shutdown: &CancellationToken,
) {
    let namespace = owner.metadata.namespace.clone().unwrap_or_default();

    // 1. Read the records; a message that is not one is dead-lettered as it is.
    let events = read(ctx, &namespace, &event, messages).await;
    if events.is_empty() {
        return;
    }
    let work = Work {
        ctx,
        alive: KeepAlive::start(&events, ctx.ack_wait),
        owner,
        namespace,
        event,
    };

    // 2. Can the resource run events at all (module present, template valid)? If not, the
    //    events are held: recorded as such, kept in hand, retried until it can.
    let Some(events) = wait_until_ready(&work, events, gate, shutdown).await else {
        return;
    };

    // 3. Claim and create until every event is in a Job, finished, deferred or dead-lettered.
    let mut pending = events;
    let mut attempt = 0;
    let mut own_claims: HashMap<String, u64> = HashMap::new();
    while !pending.is_empty() {
        pending = claim(&work, pending, &mut own_claims).await;
        if pending.is_empty() {
            break;
        }
        let batch = work.batch(&pending);
        let started = Instant::now();
        match ctx.backend.dispatch(&batch).await {
            Ok(dispatched) => {
                ctx.metrics
                    .dispatch_seconds
                    .observe(started.elapsed().as_secs_f64());
                if dispatched.created {
                    ctx.metrics.jobs_created.inc();
                }
                finish(&work, std::mem::take(&mut pending), &dispatched).await;
            }
            Err(DispatchError::Taken { job, ids }) => {
                // Events in `ids` are in that Job already; the rest need another Job name.
                let (inside, outside): (Vec<_>, Vec<_>) = std::mem::take(&mut pending)
                    .into_iter()
                    .partition(|(_, r)| ids.iter().any(|id| id == r.id.as_str()));
                let dispatched = Dispatched {
                    job: job.clone(),
                    created: false,
                };
                if inside.is_empty() {
                    // The name of the first event's Job is held by a Job of other events: it
                    // can never be used for this event.
                    let mut outside = outside.into_iter();
                    let first = outside.next().into_iter().collect();
                    let reason = format!("job name {job} is taken by a Job with other events");
                    work.dead_letter(first, &reason).await;
                    pending = outside.collect();
                } else {
                    tracing::info!(
                        job,
                        moved = inside.len(),
                        left = outside.len(),
                        "part of the batch is in an existing Job"
                    );
                    finish(&work, inside, &dispatched).await;
                    pending = outside;
                }
            }
            Err(DispatchError::Permanent { reason }) => {
                let reason = format!("dispatch failed: {reason}");
                work.dead_letter(std::mem::take(&mut pending), &reason)
                    .await;
            }
            Err(error @ (DispatchError::Retryable { .. } | DispatchError::Held { .. })) => {
                attempt += 1;
                ctx.metrics.dispatch_retries.inc();
                let delay = ctx.retry.delay(attempt, error.retry_after());
                tracing::warn!(job = batch.job_name(), attempt, ?delay, %error, "dispatch failed, keeping the events and retrying");
                gate.close();
                if !pause(delay, shutdown).await {
                    // Draining: hand the events back for the next leader rather than wait.
                    work.defer_all(&pending, None).await;
                    return;
                }
            }
        }
    }
    gate.open();
}

/// Parses each message; dead-letters those that are not event records, and acks extra copies
/// of an event already in the batch (a duplicate publish outside the dedupe window).
async fn read<B: Backend>(
    ctx: &Dispatcher<B>,
    namespace: &str,
    event: &str,
    messages: Vec<Message>,
) -> Vec<(Message, EventRecord)> {
    let mut events: Vec<(Message, EventRecord)> = Vec::with_capacity(messages.len());
    let mut seen: HashMap<String, Option<u64>> = HashMap::new();
    for message in messages {
        let record: EventRecord = match serde_json::from_slice(&message.payload) {
            Ok(record) => record,
            Err(error) => {
                let reason = format!("unreadable event message: {error}");
                dead_letter_raw(ctx, namespace, event, &message, &reason).await;
                continue;
            }
        };
        let sequence = message.info().ok().map(|i| i.stream_sequence);
        match seen.get(record.id.as_str()) {
            // The same stream message delivered twice: keep one copy in hand.
            Some(first) if *first == sequence => continue,
            // Another message with the same event: the copy in hand stands for both.
            Some(_) => {
                ack(&message).await;
                continue;
            }
            None => {}
        }
        seen.insert(record.id.to_string(), sequence);
        events.push((message, record));
    }
    events
}

/// Waits until the backend can run the events ([`Backend::ready`]); while it cannot, they are
/// recorded as `held` (with the reason) and kept in hand. `None` when they were handed back
/// (shutdown) or dead-lettered.
async fn wait_until_ready<B: Backend>(
    work: &Work<'_, B>,
    events: Vec<(Message, EventRecord)>,
    gate: &Gate,
    shutdown: &CancellationToken,
) -> Option<Vec<(Message, EventRecord)>> {
    let ctx = work.ctx;
    let mut attempt = 0;
    let mut recorded: HashSet<String> = HashSet::new();
    loop {
        let error = match ctx.backend.ready(&work.batch(&events)).await {
            Ok(()) => return Some(events),
            Err(error) => error,
        };
        match &error {
            DispatchError::Held { reason } => {
                if recorded.insert(reason.clone()) {
                    tracing::warn!(
                        reason,
                        events = events.len(),
                        "resource cannot run events yet, holding them"
                    );
                    hold(work, &events, reason).await;
                }
            }
            DispatchError::Retryable { .. } => {
                tracing::warn!(%error, "cannot check the resource, retrying");
            }
            DispatchError::Permanent { reason } => {
                let reason = format!("dispatch failed: {reason}");
                work.dead_letter(events, &reason).await;
                return None;
            }
            DispatchError::Taken { .. } => unreachable!("ready never reports a taken name"),
        }
        attempt += 1;
        gate.close();
        if !pause(ctx.retry.delay(attempt, error.retry_after()), shutdown).await {
            work.defer_all(&events, None).await;
            return None;
        }
    }
}

/// Records `held` with `reason` for events that have no later state.
async fn hold<B: Backend>(work: &Work<'_, B>, events: &[(Message, EventRecord)], reason: &str) {
    for (_, record) in events {
        let mut status = state::status(
            &work.namespace,
            &work.event,
            record.id.as_str(),
            EventState::Held,
        );
        status.reason = Some(reason.to_owned());
        match work.ctx.states.advance(status).await {
            Ok(Advanced::Moved | Advanced::Amended) => {
                work.ctx.metrics.state_updates.inc();
            }
            Ok(Advanced::Skipped) => {}
            Err(error) => tracing::warn!(%error, "cannot record the held state"),
        }
    }
}

/// Claims every pending event for the Job name of the batch they form, until that name is
/// stable (dropping an event may change the first one, and so the name). Returns the events
/// claimed for `batch.job_name()`; the others were acked (already in a Job or finished) or
/// deferred (another Job's claim that may still land, or NATS trouble).
async fn claim<B: Backend>(
    work: &Work<'_, B>,
    mut pending: Vec<(Message, EventRecord)>,
    own_claims: &mut HashMap<String, u64>,
) -> Vec<(Message, EventRecord)> {
    let ctx = work.ctx;
    loop {
        let Some((_, first)) = pending.first() else {
            return pending;
        };
        let first = first.id.clone();
        let name = crate::backend::job_name(&work.event, first.as_str());
        let claims = pending.iter().map(|(_, record)| {
            claim_one(
                work,
                record,
                &name,
                own_claims.get(record.id.as_str()).copied(),
            )
        });
        let claims = futures::future::join_all(claims).await;
        let mut kept = Vec::with_capacity(pending.len());
        for ((message, record), claim) in pending.into_iter().zip(claims) {
            match claim {
                Claimed::Yes(revision) => {
                    own_claims.insert(record.id.to_string(), revision);
                    kept.push((message, record));
                }
                Claimed::Done => {
                    tracing::debug!(id = %record.id, "already in a Job or finished, acking");
                    ctx.metrics.events_skipped.inc();
                    work.ack(&message, &record).await;
                }
                Claimed::Later(delay) => work.defer(&message, &record, delay).await,
            }
        }
        pending = kept;
        // Stable when the first event (the seed of the Job name) is still the first.
        if pending.first().is_none_or(|(_, r)| r.id == first) {
            return pending;
        }
    }
}

/// The fate of one event's claim.
enum Claimed {
    /// Claimed for the Job name, at this record revision.
    Yes(u64),
    /// Already in an existing Job, running or finished: ack it.
    Done,
    /// Not claimable now: hand it back for this long.
    Later(Duration),
}

async fn claim_one<B: Backend>(
    work: &Work<'_, B>,
    record: &EventRecord,
    job: &str,
    own_revision: Option<u64>,
) -> Claimed {
    let ctx = work.ctx;
    let (namespace, event, id) = (&work.namespace, &work.event, record.id.as_str());
    let claim = match ctx.states.claim(namespace, event, id, job).await {
        Ok(claim) => claim,
        Err(error) => {
            tracing::warn!(%error, "cannot claim the event, handing it back");
            return Claimed::Later(STATE_RETRY);
        }
    };
    let (current, revision) = match claim {
        Claim::Claimed { revision } => return Claimed::Yes(revision),
        Claim::Done(_) => return Claimed::Done,
        Claim::Elsewhere { current, revision } => (current, revision),
    };
    // Our own claim, for a Job name this batch no longer uses: ours to move.
    let free = if own_revision == Some(revision) {
        true
    } else {
        let other = current.job.as_deref().unwrap_or_default();
        match ctx.backend.holds(namespace, other, id).await {
            Ok(true) => return Claimed::Done,
            Ok(false) => {
                let settle = ctx.backend.claim_settle();
                let age = state::age(&current);
                if age < settle {
                    tracing::debug!(
                        id,
                        other,
                        "claimed for a Job that may still be created, retrying later"
                    );
                    return Claimed::Later(settle - age);
                }
                true
            }
            Err(error) => {
                tracing::warn!(%error, other, "cannot check the claimed Job, retrying the event later");
                return Claimed::Later(STATE_RETRY);
            }
        }
    };
    debug_assert!(free);
    match ctx
        .states
        .take_over(namespace, event, id, job, (&current, revision))
        .await
    {
        Ok(Claim::Claimed { revision }) => Claimed::Yes(revision),
        Ok(Claim::Done(_)) => Claimed::Done,
        // Someone claimed it in between: decide again on its redelivery.
        Ok(Claim::Elsewhere { .. }) => Claimed::Later(STATE_RETRY),
        Err(error) => {
            tracing::warn!(%error, "cannot claim the event, handing it back");
            Claimed::Later(STATE_RETRY)
        }
    }
}

/// Acks the events of a dispatched batch (their `dispatched` state was written by the claim).
async fn finish<B: Backend>(
    work: &Work<'_, B>,
    events: Vec<(Message, EventRecord)>,
    dispatched: &Dispatched,
) {
    let ctx = work.ctx;
    ctx.counters.add_many(
        &work.namespace,
        work.owner_name(),
        EventState::Dispatched,
        events.len() as u64,
    );
    let acks = events
        .iter()
        .map(|(message, record)| work.ack(message, record));
    futures::future::join_all(acks).await;
    ctx.metrics.events_dispatched.inc_by(events.len() as u64);
    tracing::debug!(
        job = dispatched.job,
        events = events.len(),
        created = dispatched.created,
        "dispatched"
    );
}

/// Sleeps for `delay`; false when `shutdown` came first.
async fn pause(delay: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}
