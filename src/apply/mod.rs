//! Stage 3 of the flow: record each request in the ledger and apply it, many
//! requests to one transaction, retrying transient database failures in-process.
//!
//! Requests go to lanes by item: every request for one item goes to the same lane,
//! and a lane runs one transaction at a time, in delivery order. So one worker
//! applies an item's requests in the order they were delivered (contract §3), and
//! its own transactions never wait on each other for a row. Each lane takes
//! whatever has queued up (at most `batch_max`) when its previous transaction
//! ends, so batches are large under load and size 1 when idle: there is no linger
//! to pay.
//!
//! A lock held by someone else is waited for only briefly (`lock_wait`). A request
//! whose item stays locked is set aside in its lane (see [`lane`]): it holds no
//! connection, the lane goes on with other items, and it is retried with backoff,
//! with every later request for the item behind it.
//!
//! The deliveries stay unacked while a request waits or is retried. We do not
//! nack-requeue during an outage: on a quorum queue every requeue counts toward
//! the delivery limit, and a long outage would dead-letter healthy messages.

mod lane;
mod retry;
pub mod set_aside;

use crate::decode::Request;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::outcome::Verdict;
use crate::store::{Adjusted, Database, StoreError};
use set_aside::SetAside;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

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

    /// Whether the delivery was given up (its connection is gone): it will come
    /// again as a redelivery, so it need not be applied now.
    fn abandoned(&self) -> bool {
        self.answer.is_closed()
    }
}

/// What every lane shares.
struct Shared {
    db: Database,
    batch_max: usize,
    lock_wait: Duration,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    set_aside: Arc<SetAside>,
}

/// A handle to the lanes. Cloning it is cheap; the lanes stop when every handle
/// is gone.
#[derive(Clone)]
pub struct Applier {
    lanes: Arc<[mpsc::UnboundedSender<Submitted>]>,
}

/// A submitted request's verdict, to be awaited.
pub struct Pending {
    answer: oneshot::Receiver<Answer>,
}

impl Applier {
    /// Starts `lanes` lanes (one transaction each at a time), each carrying up to
    /// `batch_max` requests per transaction.
    pub fn start(
        db: Database,
        lanes: usize,
        batch_max: usize,
        lock_wait: Duration,
        health: Arc<Health>,
        metrics: Arc<Metrics>,
        set_aside: Arc<SetAside>,
    ) -> Applier {
        let shared = Arc::new(Shared {
            db,
            batch_max: batch_max.max(1),
            lock_wait,
            health,
            metrics,
            set_aside,
        });
        let lanes = (0..lanes.max(1))
            .map(|_| {
                let (queue, inbox) = mpsc::unbounded_channel();
                tokio::spawn(lane::run(inbox, shared.clone()));
                queue
            })
            .collect();
        Applier { lanes }
    }

    /// Queues `request` in its item's lane, behind those submitted before it. The
    /// queues are bounded by the prefetch: a request exists only for an unacked
    /// delivery.
    pub fn submit(&self, request: Request) -> Pending {
        let (answer, receiver) = oneshot::channel();
        let lane = lane_of(&request, self.lanes.len());
        // A send fails only once the lane is gone, when the receiver below then
        // reports the request as unanswered.
        self.lanes[lane].send(Submitted { request, answer }).ok();
        Pending { answer: receiver }
    }
}

/// The lane of the request's item: the same for every request of one item.
fn lane_of(request: &Request, lanes: usize) -> usize {
    let (high, low) = request.item_id.as_u64_pair();
    ((high ^ low) % lanes as u64) as usize
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
