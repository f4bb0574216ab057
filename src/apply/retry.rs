//! One transaction, retried through transient failures with capped exponential
//! backoff. A retry after a commit whose outcome was unknown finds the ledger rows
//! and replays them, so retrying is always safe.

use super::Shared;
use crate::backoff::Backoff;
use crate::health::DatabaseState;
use crate::store::target::describe;
use crate::store::{self, Answer, Incoming, StoreError};
use std::time::Duration;

/// Capped short, so a database back from a restart or failover is used within a
/// second; the warnings thin out instead (see `worth_logging`).
const BACKOFF: Backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));

/// Runs `qty_adjust` on `requests` until it passes or fails for good. While the
/// database refuses writes or cannot be reached, the next host of `DATABASE_URL`
/// is looked for before each retry.
pub(super) async fn adjust(
    shared: &Shared,
    requests: &[&Incoming],
    lock_wait: Duration,
) -> Result<Vec<Answer>, StoreError> {
    let mut backoff = BACKOFF;
    let mut failed = false;
    let mut attempt: u32 = 0;
    loop {
        attempt += 1;
        match store::adjust(&shared.db, requests, lock_wait).await {
            Ok(answers) => {
                // Only after a failure: `/readyz` probes for itself, and the hot
                // path need not take the health lock for every batch.
                if failed {
                    shared.health.set_database(DatabaseState::Writable);
                    shared.metrics.reconnected("database");
                }
                return Ok(answers);
            }
            Err(error) if error.is_transient() => {
                failed = true;
                shared.metrics.dependency_error("database");
                match &error {
                    StoreError::ReadOnly(_) => shared.health.set_database(DatabaseState::ReadOnly),
                    StoreError::Unavailable(_) => shared.health.set_database(DatabaseState::Down),
                    StoreError::PermissionDenied(denied) => {
                        shared
                            .health
                            .set_database(DatabaseState::Misconfigured(format!(
                                "permission denied: {}",
                                describe(denied)
                            )))
                    }
                    StoreError::Contention(_) | StoreError::Permanent(_) => {}
                }
                let log = worth_logging(attempt);
                let retry_in_ms = backoff.peek().as_millis() as u64;
                match &error {
                    StoreError::PermissionDenied(denied) if log => tracing::error!(
                        error = describe(denied),
                        attempt,
                        retry_in_ms,
                        "database: a privilege is missing; retrying until it is granted"
                    ),
                    _ if log => {
                        tracing::warn!(%error, attempt, retry_in_ms, "database unavailable; retrying")
                    }
                    _ => {}
                }
                tokio::time::sleep(backoff.fail()).await;
                if error.spoils_connection()
                    && let Err(none) = shared.db.relocate().await
                    && log
                {
                    tracing::warn!(error = %none, "no database host accepts writes yet");
                }
            }
            Err(permanent) => return Err(permanent),
        }
    }
}

/// Attempts 1, 2, 4, 8, …: an outage of a minute logs about seven lines per
/// lane, not sixty.
fn worth_logging(attempt: u32) -> bool {
    attempt.is_power_of_two()
}
