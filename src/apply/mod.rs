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
//! whose item stays locked is parked in the database, in the same transaction
//! (see `migrations/0007_parked_requests.sql`), and so is every later request
//! for its item until the parked ones are judged (`parked`): its delivery is
//! acked, and nothing of it is held here.
//!
//! The deliveries stay unacked while a request is retried through an outage. We
//! do not nack-requeue then: on a quorum queue a requeue may count toward the
//! delivery limit, and a long outage would dead-letter healthy messages.

mod lane;
mod retry;

use crate::health::Health;
use crate::metrics::Metrics;
use crate::outcome::Verdict;
use crate::store::{Database, Incoming, Parking, StoreError};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, mpsc, oneshot};

/// What the database made of a request.
#[derive(Debug)]
pub enum Judged {
    /// Its final outcome, to be replied now.
    Now(Verdict),
    /// Parked: to be acked now; the reply follows when it is judged.
    Parked(Parking),
}

type Answer = Result<Judged, Arc<StoreError>>;

struct Submitted {
    incoming: Incoming,
    answer: oneshot::Sender<Answer>,
}

impl Submitted {
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
    /// Woken whenever a request is parked, so its judge looks soon.
    parked: Arc<Notify>,
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

/// How the lanes run.
pub struct Lanes {
    pub lanes: usize,
    /// Requests per transaction, at most.
    pub batch_max: usize,
    /// How long a lock held elsewhere is waited for before parking.
    pub lock_wait: Duration,
}

impl Applier {
    /// Starts the lanes (one transaction each at a time). `parked` is woken
    /// whenever a request is parked.
    pub fn start(
        db: Database,
        lanes: Lanes,
        health: Arc<Health>,
        metrics: Arc<Metrics>,
        parked: Arc<Notify>,
    ) -> Applier {
        let shared = Arc::new(Shared {
            db,
            batch_max: lanes.batch_max.max(1),
            lock_wait: lanes.lock_wait,
            health,
            metrics,
            parked,
        });
        let lanes = (0..lanes.lanes.max(1))
            .map(|_| {
                let (queue, inbox) = mpsc::unbounded_channel();
                tokio::spawn(lane::run(inbox, shared.clone()));
                queue
            })
            .collect();
        Applier { lanes }
    }

    /// Queues the request in its item's lane, behind those submitted before it.
    /// The queues are bounded by the prefetch: a request exists only for an
    /// unacked delivery.
    pub fn submit(&self, incoming: Incoming) -> Pending {
        let (answer, receiver) = oneshot::channel();
        let lane = lane_of(&incoming, self.lanes.len());
        // A send fails only once the lane is gone, when the receiver below then
        // reports the request as unanswered.
        self.lanes[lane].send(Submitted { incoming, answer }).ok();
        Pending { answer: receiver }
    }
}

/// The lane of the request's item: the same for every request of one item.
fn lane_of(incoming: &Incoming, lanes: usize) -> usize {
    let (high, low) = incoming.request.item_id.as_u64_pair();
    ((high ^ low) % lanes as u64) as usize
}

impl Pending {
    /// What the database made of the request, once its transaction has
    /// committed. Transient failures never come back: they are retried until
    /// they pass.
    pub async fn judged(self) -> Result<Judged, Arc<StoreError>> {
        self.answer
            .await
            .unwrap_or_else(|_| Err(Arc::new(StoreError::Permanent(sqlx::Error::WorkerCrashed))))
    }
}
