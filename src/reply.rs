//! Stage 4 of the flow: publish the reply and wait for the broker's confirm. Only
//! a confirmed reply lets the delivery be acked (contract §3).
//!
//! Replies are published `mandatory`: one the broker cannot route (a `reply_to`
//! naming no queue) comes back to us. It is counted and logged, and the request
//! is still acked: its outcome is in the ledger, and a retry with the same
//! `message_id` gets the same reply.

use crate::broker::short;
use crate::metrics::Metrics;
use crate::outcome::Verdict;
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Where a reply goes and what it correlates with, taken from the request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplyRoute {
    pub reply_to: Option<String>,
    pub correlation_id: Option<String>,
    /// W3C `traceparent` to send on, when the request joined a trace.
    pub traceparent: Option<String>,
}

/// Why a reply was not confirmed.
#[derive(Debug, thiserror::Error)]
pub enum ReplyError {
    #[error("cannot publish the reply: {0}")]
    Broker(#[from] lapin::Error),
    #[error("the broker refused the reply (basic.nack)")]
    Nacked,
}

/// What became of a reply the broker confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    Routed,
    /// Returned: no queue matched its routing key.
    Unroutable,
}

/// Publishes the reply for `verdict` on `channel` (which has confirms on) and
/// returns once the broker has confirmed it.
pub async fn send(
    channel: &Channel,
    exchange: &str,
    route: &ReplyRoute,
    verdict: &Verdict,
) -> Result<Sent, ReplyError> {
    let body = verdict.body();
    let event_type = verdict.event_type();
    let mut properties = BasicProperties::default()
        .with_content_type(short("application/json"))
        .with_type(short(&event_type))
        .with_delivery_mode(2)
        .with_message_id(short(&verdict.reply_message_id(&body)));
    if let Some(correlation_id) = route
        .correlation_id
        .as_deref()
        .or(verdict.message_id.as_deref())
    {
        properties = properties.with_correlation_id(short(correlation_id));
    }
    if let Some(traceparent) = &route.traceparent {
        let mut headers = FieldTable::default();
        headers.insert(
            short("traceparent"),
            AMQPValue::LongString(traceparent.as_bytes().to_vec().into()),
        );
        properties = properties.with_headers(headers);
    }
    let (exchange, routing_key) = match &route.reply_to {
        Some(reply_to) => ("", reply_to.clone()),
        None => (exchange, event_type),
    };
    let mandatory = BasicPublishOptions {
        mandatory: true,
        ..Default::default()
    };
    let confirm = channel
        .basic_publish(
            short(exchange),
            short(&routing_key),
            mandatory,
            &body,
            properties,
        )
        .await?
        .await?;
    match confirm {
        Confirmation::Nack(_) => Err(ReplyError::Nacked),
        Confirmation::Ack(Some(_returned)) => Ok(Sent::Unroutable),
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(Sent::Routed),
    }
}

/// Publishes the reply until it is confirmed, and returns false if the session
/// was lost first. A refused publish on a live channel is retried: giving up would
/// leave the delivery unacked on a channel that may live for days.
pub async fn send_until_confirmed(
    channel: &Channel,
    exchange: &str,
    route: &ReplyRoute,
    verdict: &Verdict,
    lost: &CancellationToken,
    metrics: &Metrics,
) -> bool {
    let mut backoff = Duration::from_millis(50);
    loop {
        // Boxed: nested in the per-delivery future, this future's state would be
        // copied at each level and make that future several kilobytes, past the
        // allocator's fast path for small blocks.
        let sent = lost
            .run_until_cancelled(Box::pin(send(channel, exchange, route, verdict)))
            .await;
        match sent {
            None => return false,
            Some(Ok(Sent::Routed)) => return true,
            Some(Ok(Sent::Unroutable)) => {
                metrics.replies_unroutable.inc();
                match &route.reply_to {
                    Some(reply_to) => tracing::warn!(
                        reply_to,
                        "reply unroutable: no queue named by reply_to; the request is acked and its outcome stays in the ledger"
                    ),
                    // Events nobody listens to are a deployment's choice, not a fault.
                    None => tracing::debug!("reply event unroutable: no queue bound for it"),
                }
                return true;
            }
            Some(Err(error)) => {
                metrics.dependency_error("broker");
                tracing::warn!(%error, "reply not confirmed");
                if !channel.status().connected() {
                    // The broker closed the reply channel (say, the exchange was
                    // deleted under us). Give up the whole session: the worker
                    // reconnects and re-declares, and this delivery comes again.
                    lost.cancel();
                    return false;
                }
                if lost
                    .run_until_cancelled(tokio::time::sleep(backoff))
                    .await
                    .is_none()
                {
                    return false;
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}
