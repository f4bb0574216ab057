//! Stage 3 of the flow: record the request in the ledger and apply it, in one
//! transaction, retrying transient database failures in-process.
//!
//! The delivery stays unacked while we retry. We do not nack-requeue during an
//! outage: on a quorum queue every requeue counts toward the delivery limit, and a
//! long outage would dead-letter healthy messages.

use crate::decode::Request;
use crate::metrics::{Health, Metrics};
use crate::outcome::Verdict;
use crate::store::{self, StoreError};
use sqlx::PgPool;
use std::time::Duration;

const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Applies `request` and returns its verdict. Only permanent errors come back;
/// transient ones are retried with capped exponential backoff until they pass, so
/// callers that must give up (the channel is gone, the drain ran out) race this
/// future against their own signal.
pub async fn apply(
    pool: &PgPool,
    request: &Request,
    health: &Health,
    metrics: &Metrics,
) -> Result<Verdict, StoreError> {
    let mut backoff = FIRST_BACKOFF;
    loop {
        match store::adjust(pool, &[request]).await {
            Ok(mut answers) => {
                health.set_database(true);
                let answer = answers
                    .pop()
                    .expect("store::adjust answers once per request");
                return Ok(Verdict::for_request(
                    request,
                    answer.outcome,
                    answer.replayed,
                ));
            }
            Err(StoreError::Transient(error)) => {
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
