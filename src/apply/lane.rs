//! One lane: the requests of the items hashed to it, applied one transaction at a
//! time in delivery order, with locked items set aside.
//!
//! A request the database answers `Busy` (its item stayed locked by someone else
//! for the whole lock wait) is parked with every later request for its item, and
//! retried after a backoff that doubles while the item stays locked. Parked
//! requests hold no connection; the lane goes on with other items at once.
//! Requests for a parked item that arrive meanwhile queue behind it, so an item's
//! requests are applied in the order they were delivered.
//!
//! A retry runs in a batch of its own and does not wait for the lock again: the
//! item was locked a moment ago, and waiting the full lock wait on every retry
//! would stall the lane's other items each time. Only the first encounter waits.

use super::{Shared, Submitted, retry};
use crate::backoff::Backoff;
use crate::store::Answer;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use uuid::Uuid;

/// Retries of a locked item: soon at first, then at most every 2 s.
const RETRY: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
/// A retry only takes a lock that is free (the shortest wait PostgreSQL has).
const RETRY_LOCK_WAIT: Duration = Duration::from_millis(1);

/// An item whose lock could not be had, and its requests, in delivery order.
struct Parked {
    waiting: VecDeque<Submitted>,
    retry_at: Instant,
}

struct Lane {
    shared: Arc<Shared>,
    /// Requests to apply, in delivery order; none of them for a parked item.
    ready: VecDeque<Submitted>,
    /// Requests of items whose retry is due, applied before `ready`.
    retry: VecDeque<Submitted>,
    parked: HashMap<Uuid, Parked>,
    /// The retry delay of items found locked lately; forgotten once applied.
    backoff: HashMap<Uuid, Backoff>,
}

pub(super) async fn run(mut inbox: mpsc::UnboundedReceiver<Submitted>, shared: Arc<Shared>) {
    let mut lane = Lane {
        shared,
        ready: VecDeque::new(),
        retry: VecDeque::new(),
        parked: HashMap::new(),
        backoff: HashMap::new(),
    };
    loop {
        while let Ok(submitted) = inbox.try_recv() {
            lane.accept(submitted);
        }
        lane.unpark_due(Instant::now());
        if lane.ready.is_empty() && lane.retry.is_empty() {
            let next_retry = lane.parked.values().map(|p| p.retry_at).min();
            tokio::select! {
                received = inbox.recv() => match received {
                    Some(submitted) => lane.accept(submitted),
                    // Every handle is gone, and with them the deliveries of any
                    // parked request: the broker hands those out again.
                    None => return,
                },
                () = sleep_until(next_retry) => {}
            }
            continue;
        }
        let (batch, lock_wait) = lane.take_batch();
        if !batch.is_empty() {
            lane.apply(batch, lock_wait).await;
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Lane {
    fn accept(&mut self, submitted: Submitted) {
        match self.parked.get_mut(&submitted.request.item_id) {
            Some(parked) => {
                let item = submitted.request.item_id;
                parked.waiting.push_back(submitted);
                self.shared.metrics.set_aside.inc();
                self.shared.set_aside.waiting(
                    item,
                    parked.waiting.len(),
                    std::time::Instant::now(),
                );
            }
            None => self.ready.push_back(submitted),
        }
    }

    /// Moves the requests of items whose retry is due to the retry queue.
    fn unpark_due(&mut self, now: Instant) {
        let due: Vec<Uuid> = self
            .parked
            .iter()
            .filter(|(_, parked)| parked.retry_at <= now)
            .map(|(item, _)| *item)
            .collect();
        for item in due {
            if let Some(parked) = self.parked.remove(&item) {
                self.shared
                    .metrics
                    .set_aside
                    .dec_by(parked.waiting.len() as i64);
                self.retry.extend(parked.waiting);
            }
        }
    }

    /// Up to `batch_max` requests, retries first, leaving out those whose
    /// delivery was abandoned; and how long the batch may wait for a lock.
    fn take_batch(&mut self) -> (Vec<Submitted>, Duration) {
        let (queue, lock_wait) = if self.retry.is_empty() {
            (&mut self.ready, self.shared.lock_wait)
        } else {
            (&mut self.retry, RETRY_LOCK_WAIT)
        };
        let mut batch = Vec::with_capacity(queue.len().min(self.shared.batch_max));
        while batch.len() < self.shared.batch_max {
            match queue.pop_front() {
                Some(submitted) if submitted.abandoned() => {}
                Some(submitted) => batch.push(submitted),
                None => break,
            }
        }
        (batch, lock_wait)
    }

    /// Applies one batch and answers every request in it, parking the busy ones.
    /// A permanent error on a batch of several is retried one request at a time,
    /// so only the request that causes it is refused.
    async fn apply(&mut self, batch: Vec<Submitted>, lock_wait: Duration) {
        let shared = self.shared.clone();
        self.shared.metrics.batch_size.observe(batch.len() as f64);
        let requests: Vec<_> = batch.iter().map(|s| &s.request).collect();
        match retry::adjust(&shared, &requests, lock_wait).await {
            Ok(answers) => self.settle(batch.into_iter().zip(answers)),
            Err(error) if batch.len() == 1 => {
                let error = Arc::new(error);
                for submitted in batch {
                    submitted.reply(Err(error.clone()));
                }
            }
            Err(error) => {
                tracing::warn!(%error, size = batch.len(), "batch failed; applying its requests one by one");
                for submitted in batch {
                    if self.parked.contains_key(&submitted.request.item_id) {
                        self.accept(submitted);
                        continue;
                    }
                    match retry::adjust(&shared, &[&submitted.request], lock_wait).await {
                        Ok(mut answers) => self.settle([(submitted, answers.remove(0))]),
                        Err(error) => submitted.reply(Err(Arc::new(error))),
                    }
                }
            }
        }
    }

    fn settle(&mut self, answered: impl IntoIterator<Item = (Submitted, Answer)>) {
        let mut busy: Vec<(Uuid, Vec<Submitted>)> = Vec::new();
        for (submitted, answer) in answered {
            match answer {
                Answer::Done(adjusted) => {
                    if !self.backoff.is_empty()
                        && self.backoff.remove(&submitted.request.item_id).is_some()
                    {
                        self.shared.set_aside.applied(&submitted.request.item_id);
                    }
                    submitted.reply(Ok(adjusted));
                }
                Answer::Busy => {
                    let item = submitted.request.item_id;
                    match busy.iter_mut().find(|(i, _)| *i == item) {
                        Some((_, requests)) => requests.push(submitted),
                        None => busy.push((item, vec![submitted])),
                    }
                }
            }
        }
        if !busy.is_empty() {
            self.shared
                .metrics
                .lock_waits_timed_out
                .inc_by(busy.len() as u64);
        }
        for (item, requests) in busy {
            self.park(item, requests);
        }
    }

    /// Sets `first` aside, with every later request for the item behind it.
    fn park(&mut self, item: Uuid, first: Vec<Submitted>) {
        let mut waiting: VecDeque<Submitted> = first.into();
        for queue in [&mut self.retry, &mut self.ready] {
            let (later, others): (VecDeque<_>, VecDeque<_>) = std::mem::take(queue)
                .into_iter()
                .partition(|s| s.request.item_id == item);
            *queue = others;
            waiting.extend(later);
        }
        let delay = self.backoff.entry(item).or_insert(RETRY).fail();
        self.shared.metrics.set_aside.inc_by(waiting.len() as i64);
        tracing::debug!(%item, requests = waiting.len(), retry_in_ms = delay.as_millis() as u64, "item locked elsewhere; set aside");
        let now = std::time::Instant::now();
        if let Some(parked) = self.parked.get_mut(&item) {
            // Parked again during a one-by-one retry: it already holds later ones.
            let behind = std::mem::take(&mut parked.waiting);
            waiting.extend(behind);
            parked.waiting = waiting;
            self.shared
                .set_aside
                .waiting(item, parked.waiting.len(), now);
        } else {
            self.shared.set_aside.waiting(item, waiting.len(), now);
            self.parked.insert(
                item,
                Parked {
                    waiting,
                    retry_at: Instant::now() + delay,
                },
            );
        }
    }
}
