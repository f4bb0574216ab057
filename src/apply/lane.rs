//! One lane: the requests of the items hashed to it, applied one transaction at a
//! time in delivery order.
//!
//! A request whose item stays locked elsewhere comes back parked (the database
//! parked it, and parks every later request of its item behind it until they
//! are judged), so a lane never holds a request back itself: it goes on with
//! the next batch at once.

use super::{Judged, Shared, Submitted, retry};
use crate::outcome::Verdict;
use crate::store::{Answer, Parking};
use std::sync::Arc;
use tokio::sync::mpsc;

pub(super) async fn run(mut inbox: mpsc::UnboundedReceiver<Submitted>, shared: Arc<Shared>) {
    let mut batch = Vec::with_capacity(shared.batch_max);
    // `None`: every handle is gone, and with them the deliveries of whatever
    // was queued: the broker hands those out again.
    while inbox.recv_many(&mut batch, shared.batch_max).await > 0 {
        batch.retain(|submitted: &Submitted| !submitted.abandoned());
        if !batch.is_empty() {
            apply(&shared, std::mem::take(&mut batch)).await;
        }
        batch.clear();
    }
}

/// Applies one batch and answers every request in it. A permanent error on a
/// batch of several is retried one request at a time, so only the request that
/// causes it is refused.
async fn apply(shared: &Shared, batch: Vec<Submitted>) {
    shared.metrics.batch_size.observe(batch.len() as f64);
    let requests: Vec<_> = batch.iter().map(|s| &s.incoming).collect();
    match retry::adjust(shared, &requests, shared.lock_wait).await {
        Ok(answers) => {
            for (submitted, answer) in batch.into_iter().zip(answers) {
                settle(shared, submitted, answer);
            }
        }
        Err(error) if batch.len() == 1 => {
            let error = Arc::new(error);
            for submitted in batch {
                submitted.answer.send(Err(error.clone())).ok();
            }
        }
        Err(error) => {
            tracing::warn!(%error, size = batch.len(), "batch failed; applying its requests one by one");
            for submitted in batch {
                match retry::adjust(shared, &[&submitted.incoming], shared.lock_wait).await {
                    Ok(mut answers) => settle(shared, submitted, answers.remove(0)),
                    Err(error) => {
                        submitted.answer.send(Err(Arc::new(error))).ok();
                    }
                }
            }
        }
    }
}

fn settle(shared: &Shared, submitted: Submitted, answer: Answer) {
    let judged = match answer {
        Answer::Done(adjusted) => Judged::Now(Verdict::for_request(
            &submitted.incoming.request,
            adjusted.outcome,
            adjusted.replayed,
        )),
        Answer::Parked(why) => {
            if why == Parking::Locked {
                shared.metrics.lock_waits_timed_out.inc();
            }
            shared.parked.notify_one();
            Judged::Parked(why)
        }
    };
    submitted.answer.send(Ok(judged)).ok();
}
