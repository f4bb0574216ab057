//! Stage 5 of the flow: settle the delivery on the channel that delivered it.
//!
//! A delivery is acked only after its reply is confirmed. One that failed for a
//! reason other than its content is handed back (nack with requeue): on a quorum
//! queue each hand-back counts toward `x-delivery-limit`, after which the broker
//! dead-letters it, so a poison message cannot block the queue for ever.

use lapin::Acker;
use lapin::options::{BasicAckOptions, BasicNackOptions};

/// Acks the delivery. `false` means its channel is gone: the broker will deliver
/// it again and the ledger will answer the duplicate.
pub async fn ack(acker: &Acker) -> bool {
    match acker.ack(BasicAckOptions::default()).await {
        Ok(done) => done,
        Err(error) => {
            tracing::warn!(%error, "cannot ack; the delivery will come again");
            false
        }
    }
}

/// Hands the delivery back to the queue, counting toward its delivery limit.
pub async fn requeue(acker: &Acker) -> bool {
    let options = BasicNackOptions {
        multiple: false,
        requeue: true,
    };
    match acker.nack(options).await {
        Ok(done) => done,
        Err(error) => {
            tracing::warn!(%error, "cannot requeue; the delivery will come again");
            false
        }
    }
}
