//! Stage 4 of the flow: publish the reply and wait for the broker's confirm. Only
//! a confirmed reply lets the delivery be acked (contract §3).
//!
//! Replies are published `mandatory`: one the broker cannot route (a `reply_to`
//! naming no queue) comes back to us. It is counted and logged, and the request
//! is still acked: its outcome is in the ledger, and a retry with the same
//! `message_id` gets the same reply. A reply the broker refuses (a nack) is
//! tried a few times within about a second and then given up the same way.

use crate::backoff::Backoff;
use crate::broker::{self, short};
use crate::direct_replies::{self, DirectReplies};
use crate::log_budget::LogBudget;
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
    let confirm = broker::publish(
        channel,
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

/// A reply the broker refuses (a nack: a `reply_to` queue at its length limit
/// with `x-overflow: reject-publish`, say) is tried again this often, waiting
/// 50, 100, 200 and 400 ms between tries, then given up: one client that cannot
/// take its replies must not keep a delivery slot for ever (contract §4).
const REFUSED_TRIES: u32 = 5;
const REFUSED_BACKOFF: Backoff =
    Backoff::new(Duration::from_millis(50), Duration::from_millis(400));
/// Any other failure to publish on a live channel is the broker's, not one
/// client's: it is retried until it passes or the session is lost.
const FAILED_BACKOFF: Backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));

/// How a reply ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    /// Confirmed by the broker: routed, returned as unroutable, or refused
    /// REFUSED_TRIES times and given up. Either way the request may be acked:
    /// its outcome is recorded, and a retry gets the stored reply.
    Settled,
    /// The session was lost first: the delivery will come again.
    Lost,
}

/// What the reply loop reports to and logs through.
pub struct Reporting<'a> {
    pub metrics: &'a Metrics,
    /// Warnings about replies given up, so a stalled client cannot flood the log.
    pub refused_log: &'a LogBudget,
}

/// Where replies go out: the session's confirm channel, and the connection of
/// their own that replies to direct reply-to names use (see `direct_replies`).
pub struct Channels<'a> {
    pub session: &'a Channel,
    pub direct: &'a DirectReplies,
}

/// Publishes the reply until the broker settles it (see [`Delivered`]).
pub async fn send_until_confirmed(
    channels: &Channels<'_>,
    exchange: &str,
    route: &ReplyRoute,
    verdict: &Verdict,
    lost: &CancellationToken,
    reporting: &Reporting<'_>,
) -> Delivered {
    let direct = direct_replies::is_direct(route.reply_to.as_deref());
    let mut refused = 0;
    let mut direct_closed = 0;
    let mut refused_backoff = REFUSED_BACKOFF;
    let mut failed_backoff = FAILED_BACKOFF;
    loop {
        let channel = if direct {
            match lost.run_until_cancelled(channels.direct.channel()).await {
                None => return Delivered::Lost,
                Some(Ok(channel)) => channel,
                Some(Err(error)) => {
                    reporting.metrics.dependency_error("broker");
                    tracing::warn!(%error, "cannot open the direct-reply connection");
                    let wait = failed_backoff.fail();
                    if lost
                        .run_until_cancelled(tokio::time::sleep(wait))
                        .await
                        .is_none()
                    {
                        return Delivered::Lost;
                    }
                    continue;
                }
            }
        } else {
            channels.session.clone()
        };
        // Boxed: nested in the per-delivery future, this future's state would be
        // copied at each level and make that future several kilobytes, past the
        // allocator's fast path for small blocks.
        let sent = lost
            .run_until_cancelled(Box::pin(send(&channel, exchange, route, verdict)))
            .await;
        let wait = match sent {
            None => return Delivered::Lost,
            Some(Ok(Sent::Routed)) => return Delivered::Settled,
            Some(Ok(Sent::Unroutable)) => {
                reporting.metrics.replies_unroutable.inc();
                match &route.reply_to {
                    Some(reply_to) => tracing::warn!(
                        reply_to,
                        "reply unroutable: no queue named by reply_to; the request is acked and its outcome stays in the ledger"
                    ),
                    // Events nobody listens to are a deployment's choice, not a fault.
                    None => tracing::debug!("reply event unroutable: no queue bound for it"),
                }
                return Delivered::Settled;
            }
            Some(Err(ReplyError::Nacked)) => {
                refused += 1;
                if refused == REFUSED_TRIES {
                    reporting.metrics.replies_refused.inc();
                    let (log, suppressed) = reporting.refused_log.take(std::time::Instant::now());
                    if log {
                        tracing::warn!(
                            reply_to = route.reply_to.as_deref(),
                            tries = REFUSED_TRIES,
                            suppressed_before = suppressed,
                            "reply refused by the broker (a full reply_to queue?); given up, the request is acked and its outcome stays in the ledger"
                        );
                    }
                    return Delivered::Settled;
                }
                refused_backoff.fail()
            }
            Some(Err(error)) if direct && !channel.status().connected() => {
                // Closed under this reply, or under another one that shared the
                // connection: once more on a fresh connection tells them apart.
                direct_closed += 1;
                if direct_closed < 2 {
                    continue;
                }
                reporting.metrics.replies_unroutable.inc();
                tracing::warn!(
                    reply_to = route.reply_to.as_deref(),
                    %error,
                    "the broker closed the connection rather than take this direct reply-to (its requester has gone?); given up, the request is acked and its outcome stays in the ledger"
                );
                return Delivered::Settled;
            }
            Some(Err(error)) => {
                reporting.metrics.dependency_error("broker");
                tracing::warn!(%error, "reply not confirmed");
                if !channel.status().connected() {
                    // The broker closed the reply channel (say, the exchange was
                    // deleted under us). Give up the whole session: the worker
                    // reconnects and re-declares, and this delivery comes again.
                    lost.cancel();
                    return Delivered::Lost;
                }
                failed_backoff.fail()
            }
        };
        if lost
            .run_until_cancelled(tokio::time::sleep(wait))
            .await
            .is_none()
        {
            return Delivered::Lost;
        }
    }
}
