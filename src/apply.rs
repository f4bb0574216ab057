//! Stage 3 of the flow: record each request in the ledger and apply it, many
//! requests to one transaction, retrying transient database failures in-process.
//!
//! Requests are submitted in delivery order to one batcher. It takes whatever has
//! queued up (at most `batch_max`) whenever one of its `concurrency` transaction
//! slots is free, so batches are large under load and size 1 when idle: there is
//! no linger to pay. Each request keeps its own semantics inside a batch (see the
//! `qty_adjust` function): it is applied in order, sees the effect of those before
//! it, and a refusal of one never aborts the others.
//!
//! The deliveries stay unacked while we retry. We do not nack-requeue during an
//! outage: on a quorum queue every requeue counts toward the delivery limit, and a
//! long outage would dead-letter healthy messages.

use crate::decode::Request;
use crate::metrics::{Health, Metrics};
use crate::outcome::Verdict;
use crate::store::{self, Adjusted, StoreError};
use sqlx::PgPool;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc, oneshot};

const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

type Answer = Result<Verdict, Arc<StoreError>>;

struct Submitted {
    request: Request,
    answer: oneshot::Sender<Answer>,
}

impl Submitted {
    /// Sends the request its verdict (or the error that stopped it).
    fn reply(self, adjusted: Result<Adjusted, Arc<StoreError>>) {
        let verdict = adjusted.map(|a| Verdict::for_request(&self.request, a.outcome, a.replayed));
        self.answer.send(verdict).ok();
    }
}

/// A handle to the batcher. Cloning it is cheap; the batcher stops when every
/// handle is gone.
#[derive(Clone)]
pub struct Applier {
    queue: mpsc::UnboundedSender<Submitted>,
}

/// A submitted request's verdict, to be awaited.
pub struct Pending {
    answer: oneshot::Receiver<Answer>,
}

impl Applier {
    /// Starts the batcher. `concurrency` transactions run at once, each carrying up
    /// to `batch_max` requests.
    pub fn start(
        pool: PgPool,
        concurrency: usize,
        batch_max: usize,
        health: Arc<Health>,
        metrics: Arc<Metrics>,
    ) -> Applier {
        let (queue, inbox) = mpsc::unbounded_channel();
        tokio::spawn(batch_loop(
            inbox,
            pool,
            concurrency.max(1),
            batch_max.max(1),
            health,
            metrics,
        ));
        Applier { queue }
    }

    /// Queues `request` behind those submitted before it. The queue is bounded by
    /// the prefetch: a request exists only for an unacked delivery.
    pub fn submit(&self, request: Request) -> Pending {
        let (answer, receiver) = oneshot::channel();
        // A send fails only once the batcher is gone, when the receiver below then
        // reports the request as unanswered.
        self.queue.send(Submitted { request, answer }).ok();
        Pending { answer: receiver }
    }
}

impl Pending {
    /// The verdict, once the request's transaction has committed. Transient
    /// failures never come back: they are retried until they pass.
    pub async fn verdict(self) -> Result<Verdict, Arc<StoreError>> {
        self.answer
            .await
            .unwrap_or_else(|_| Err(Arc::new(StoreError::Permanent(sqlx::Error::WorkerCrashed))))
    }
}

async fn batch_loop(
    mut inbox: mpsc::UnboundedReceiver<Submitted>,
    pool: PgPool,
    concurrency: usize,
    batch_max: usize,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
) {
    let slots = Arc::new(Semaphore::new(concurrency));
    loop {
        // Wait for a free slot first, so requests pile up into the next batch
        // while every transaction is busy.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = inbox.recv().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < batch_max {
            match inbox.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        // A request whose delivery was abandoned (its connection is gone) will
        // come again as a redelivery; skipping it keeps the queue bounded by the
        // prefetch even while the broker flaps during a database outage.
        batch.retain(|submitted| !submitted.answer.is_closed());
        if batch.is_empty() {
            continue;
        }
        metrics.batch_size.observe(batch.len() as f64);
        let (pool, health, metrics) = (pool.clone(), health.clone(), metrics.clone());
        tokio::spawn(async move {
            run_batch(&pool, batch, &health, &metrics).await;
            drop(slot);
        });
    }
}

/// Applies one batch and answers every request in it. A permanent error on a
/// batch of several is retried one request at a time, so only the request that
/// causes it is refused.
async fn run_batch(pool: &PgPool, batch: Vec<Submitted>, health: &Health, metrics: &Metrics) {
    let requests: Vec<&Request> = batch.iter().map(|s| &s.request).collect();
    match adjust_with_retries(pool, &requests, health, metrics).await {
        Ok(answers) => {
            for (submitted, answer) in batch.into_iter().zip(answers) {
                submitted.reply(Ok(answer));
            }
        }
        Err(error) if batch.len() == 1 => {
            let error = Arc::new(error);
            for submitted in batch {
                submitted.reply(Err(error.clone()));
            }
        }
        Err(error) => {
            tracing::warn!(%error, size = batch.len(), "batch failed; applying its requests one by one");
            for submitted in batch {
                let answer = adjust_with_retries(pool, &[&submitted.request], health, metrics)
                    .await
                    .map(|mut answers| answers.remove(0))
                    .map_err(Arc::new);
                submitted.reply(answer);
            }
        }
    }
}

/// Runs one transaction, retrying transient failures with capped exponential
/// backoff. A retry after a commit whose outcome was unknown finds the ledger
/// rows and replays them, so retrying is always safe.
async fn adjust_with_retries(
    pool: &PgPool,
    requests: &[&Request],
    health: &Health,
    metrics: &Metrics,
) -> Result<Vec<Adjusted>, StoreError> {
    let mut backoff = FIRST_BACKOFF;
    let mut failed = false;
    loop {
        match store::adjust(pool, requests).await {
            Ok(answers) => {
                health.set_database(true);
                if failed {
                    metrics.reconnected("database");
                }
                return Ok(answers);
            }
            Err(StoreError::Transient(error)) => {
                failed = true;
                health.set_database(false);
                metrics.dependency_error("database");
                tracing::warn!(%error, retry_in_ms = backoff.as_millis() as u64, "database unavailable; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            Err(permanent) => return Err(permanent),
        }
    }
}
