//! Stage 1 of the flow, and the thread through the rest: one delivery goes
//! admit → decode → apply → reply → ack, inside one tracing span.
//!
//! Content problems are answered (`rejected` / `invalid_message`) and acked: a
//! requeue would only bring the same bytes back. A request the database parked
//! for a locked item is acked without a reply: its reply is the judge's
//! (`parked`). Failures that are not the
//! content's fault (a permanent database error, a panic) hand the delivery back
//! to the queue, whose delivery limit dead-letters it if it keeps failing.

use crate::ack::Acks;
use crate::admit::Publishers;
use crate::apply::{Applier, Judged, Pending};
use crate::broker::header_text;
use crate::decode::{Invalid, ItemHeader, RequestProps, decode};
use crate::direct_replies::DirectReplies;
use crate::health::Health;
use crate::log_budget::LogBudget;
use crate::metrics::Metrics;
use crate::outcome::Verdict;
use crate::reply::{self, ReplyRoute};
use crate::store::Incoming;
use crate::trace::{TraceParent, join_exported_trace, new_span_id};
use futures::FutureExt as _;
use futures::future::BoxFuture;
use lapin::message::Delivery;
use lapin::{BasicProperties, Channel};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, Span};

/// What every delivery handler shares.
pub struct Context {
    /// Who may adjust (`QTY_PUBLISHERS`).
    pub publishers: Publishers,
    pub applier: Applier,
    pub exchange: String,
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
    /// Warnings about invalid requests, so a flood of them cannot flood the log.
    pub invalid_log: LogBudget,
    /// Warnings about replies given up, likewise.
    pub refused_log: LogBudget,
    /// Whether requests reach the worker through partitions (`QTY_PARTITIONS`),
    /// where one without the `item_id` header is worth a warning.
    pub partitioned: bool,
    /// Warnings about requests without the `item_id` header, likewise.
    pub keyless_log: LogBudget,
}

/// The broker session a delivery came in on.
pub struct Link {
    /// A confirm-mode channel on the same connection, for replies.
    pub replies: Channel,
    /// The connection replies to direct reply-to names go out on.
    pub direct: Arc<DirectReplies>,
    /// Settles deliveries on the channel that delivered them.
    pub acks: Acks,
    /// Fires when the connection is given up, at which point the delivery can no
    /// longer be acked and is left for the broker to redeliver.
    pub lost: CancellationToken,
    /// The queue the deliveries come from: a parked request's source, whose
    /// consumer judges it.
    pub source: Arc<str>,
}

/// Takes one delivery: registers it for settling, decodes it and, when valid,
/// submits it to the applier right away, so requests reach the database in
/// delivery order. Returns the rest of its handling as a future to spawn.
pub fn receive(ctx: &Arc<Context>, delivery: Delivery, link: &Arc<Link>) -> BoxFuture<'static, ()> {
    let started = Instant::now();
    link.acks.received(delivery.delivery_tag);
    let trace = request_traceparent(&delivery.properties);
    let span = delivery_span(&delivery.properties, trace.as_ref());
    ctx.metrics.in_flight.inc();
    if delivery.redelivered {
        ctx.metrics.redelivered.inc();
    }
    let route = ReplyRoute {
        reply_to: short_property(delivery.properties.reply_to()),
        correlation_id: short_property(delivery.properties.correlation_id()),
        // Our own span id as the new parent: the exported span's when spans are
        // exported, so the caller's trace shows it, else a fresh one.
        traceparent: trace.map(|caller| {
            join_exported_trace(&span, &caller)
                .unwrap_or_else(|| caller.child(new_span_id()))
                .to_string()
        }),
    };
    // Decoding is pure and should never panic; if it ever does, the delivery is
    // handed back like any other failure rather than taking the consumer down.
    let decoded = std::panic::catch_unwind(AssertUnwindSafe(|| {
        inject_fault(&delivery);
        let props = request_props(&delivery.properties);
        if props.item_header == ItemHeader::Absent {
            keyless(ctx);
        }
        let admitted = ctx.publishers.admit(props.user_id.as_deref());
        match (admitted, decode(&props, &delivery.data)) {
            (Ok(()), Ok(request)) => Ok(ctx.applier.submit(Incoming {
                request,
                route: route.clone(),
                source: link.source.clone(),
            })),
            (Ok(()), Err(invalid)) => Err(Refused::Invalid(invalid)),
            // Forbidden wins over invalid, and nothing of it reaches the database.
            (Err(forbidden), decoded) => Err(Refused::Forbidden {
                verdict: Box::new(Verdict::for_forbidden(&forbidden, &decoded)),
                user_id: props.user_id,
            }),
        }
    }));
    // Boxed once, here: the handling future is over a kilobyte, and moving it
    // by value through `instrument` and `spawn` showed up as a tenth of the
    // worker's CPU (memmove) in a profile.
    let received = Received {
        tag: delivery.delivery_tag,
        redelivered: delivery.redelivered,
        // Kept only to log a rejected body at debug.
        body: match decoded {
            Ok(Ok(_)) => Vec::new(),
            _ => delivery.data,
        },
    };
    let handling = finish(ctx.clone(), received, decoded, route, link.clone(), started);
    Box::pin(handling.instrument(span))
}

/// Counts a request without the `item_id` header. Partitioned, all of them hash
/// to one partition (served in order, by one worker at a time), so the
/// publishers that send them should be told: a warning within a budget.
fn keyless(ctx: &Context) {
    ctx.metrics.without_item_header.inc();
    if ctx.partitioned {
        let (log, suppressed) = ctx.keyless_log.take(Instant::now());
        if log {
            tracing::warn!(
                suppressed_before = suppressed,
                "request without the item_id header: every such request goes to one partition; have its publisher set the header to the body's item_id"
            );
        }
    }
}

/// With the `fault-injection` feature, a delivery whose message_id starts with
/// `fault:panic` panics before anything is applied: the stand-in for a poison
/// message in the fault tests.
fn inject_fault(_delivery: &Delivery) {
    #[cfg(feature = "fault-injection")]
    if _delivery
        .properties
        .message_id()
        .as_ref()
        .is_some_and(|id| id.as_str().starts_with("fault:panic"))
    {
        panic!("fault injection: this delivery always fails");
    }
}

/// What `receive` made of the delivery: a pending verdict, a refusal, or a panic.
type Decoded = std::thread::Result<Result<Pending, Refused>>;

/// A request answered without the database.
enum Refused {
    /// It breaks the contract (`invalid_message`).
    Invalid(Box<Invalid>),
    /// Its publisher may not adjust (`forbidden`).
    Forbidden {
        verdict: Box<Verdict>,
        user_id: Option<String>,
    },
}

/// What the rest of the handling needs of the delivery. Its properties are in the
/// span and the reply route by now; the rest is not carried along, which keeps
/// the per-delivery future small.
struct Received {
    tag: u64,
    redelivered: bool,
    /// The body of a request that was not decoded; empty otherwise.
    body: Vec<u8>,
}

async fn finish(
    ctx: Arc<Context>,
    received: Received,
    decoded: Decoded,
    route: ReplyRoute,
    link: Arc<Link>,
    started: Instant,
) {
    let tag = received.tag;
    let outcome = match decoded {
        Ok(decoded) => {
            AssertUnwindSafe(process(&ctx, received, decoded, &route, &link))
                .catch_unwind()
                .await
        }
        Err(panic) => Err(panic),
    };
    match outcome {
        Ok(Settled::Replied) => {
            link.acks.replied(tag);
            ctx.metrics
                .processing_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        Ok(Settled::Requeue) => requeue(&ctx, &link, tag),
        Ok(Settled::Abandoned) => {}
        Err(_panic) => {
            tracing::error!("handling the delivery panicked; handing it back to the queue");
            requeue(&ctx, &link, tag);
        }
    }
    ctx.metrics.in_flight.dec();
}

fn requeue(ctx: &Context, link: &Link, tag: u64) {
    link.acks.failed(tag);
    ctx.metrics.requeued.inc();
}

/// How a delivery left `process`.
enum Settled {
    /// The reply is confirmed: the delivery is to be acked.
    Replied,
    /// Not the content's fault and not transient: let the delivery limit judge.
    Requeue,
    /// The channel is gone; the broker will redeliver.
    Abandoned,
}

async fn process(
    ctx: &Context,
    received: Received,
    decoded: Result<Pending, Refused>,
    route: &ReplyRoute,
    link: &Link,
) -> Settled {
    let verdict = match decoded {
        Ok(pending) => match link.lost.run_until_cancelled(pending.judged()).await {
            Some(Ok(Judged::Now(verdict))) => verdict,
            Some(Ok(Judged::Parked(why))) => {
                // Parked with everything its judge needs: the delivery is done.
                ctx.metrics.parked.inc();
                tracing::debug!(
                    why = why.code(),
                    redelivered = received.redelivered,
                    "request parked: its item is locked elsewhere; the reply follows when it is judged"
                );
                return Settled::Replied;
            }
            Some(Err(error)) => {
                tracing::error!(%error, "cannot apply the request");
                return Settled::Requeue;
            }
            None => return Settled::Abandoned,
        },
        Err(Refused::Invalid(invalid)) => {
            // A publisher is sending something wrong: an operator should see
            // which (the span carries message_id and correlation_id).
            let (log, suppressed) = ctx.invalid_log.take(Instant::now());
            if log {
                tracing::warn!(error = %invalid.error, suppressed_before = suppressed, "invalid request rejected");
            }
            tracing::debug!(body = %String::from_utf8_lossy(&received.body), "invalid request body");
            Verdict::for_invalid(&invalid)
        }
        Err(Refused::Forbidden { verdict, user_id }) => {
            // Someone not listed in QTY_PUBLISHERS can publish to the queue: an
            // operator should see who (within the same budget as invalid ones).
            let (log, suppressed) = ctx.invalid_log.take(Instant::now());
            if log {
                tracing::warn!(
                    user_id = user_id.as_deref(),
                    error = verdict.outcome.error(),
                    suppressed_before = suppressed,
                    "request forbidden: its publisher may not adjust"
                );
            }
            *verdict
        }
    };
    ctx.metrics.record(&verdict);

    let reporting = reply::Reporting {
        metrics: &ctx.metrics,
        refused_log: &ctx.refused_log,
    };
    let channels = reply::Channels {
        session: &link.replies,
        direct: &link.direct,
    };
    let delivered = reply::send_until_confirmed(
        &channels,
        &ctx.exchange,
        route,
        &verdict,
        &link.lost,
        &reporting,
    )
    .await;
    if delivered == reply::Delivered::Lost {
        return Settled::Abandoned;
    }
    // Per request, so debug: at thousands a second an info line each costs ~10%.
    tracing::debug!(
        outcome = verdict.outcome.name(),
        reason = verdict.outcome.reason(),
        replayed = verdict.replayed,
        redelivered = received.redelivered,
        "request answered"
    );
    Settled::Replied
}

/// One span per delivery, with what an operator needs to find the request: its
/// `message_id`, `correlation_id` and, when it joined a trace, `trace_id`. Its
/// fields are rendered once, when it is made (with JSON logs, recording one later
/// re-renders them all), so the outcome goes on the events instead.
fn delivery_span(properties: &BasicProperties, trace: Option<&TraceParent>) -> Span {
    tracing::info_span!(
        "delivery",
        message_id = properties.message_id().as_ref().map(|s| s.as_str()),
        correlation_id = properties.correlation_id().as_ref().map(|s| s.as_str()),
        trace_id = trace.map(TraceParent::trace_id_hex).as_deref(),
    )
}

/// The request's W3C `traceparent` header, when it has a valid one.
fn request_traceparent(properties: &BasicProperties) -> Option<TraceParent> {
    TraceParent::parse(&header_text(properties, "traceparent")?)
}

fn short_property(value: &Option<lapin::types::ShortString>) -> Option<String> {
    value.as_ref().map(|s| s.to_string())
}

/// Copies the properties decoding judges out of the broker's types.
pub fn request_props(properties: &BasicProperties) -> RequestProps {
    RequestProps {
        message_id: short_property(properties.message_id()),
        content_type: short_property(properties.content_type()),
        content_encoding: short_property(properties.content_encoding()),
        user_id: short_property(properties.user_id()),
        item_header: item_header(properties),
    }
}

/// The `item_id` header, as decoding judges it.
fn item_header(properties: &BasicProperties) -> ItemHeader {
    use lapin::types::AMQPValue;
    let Some(value) = properties
        .headers()
        .as_ref()
        .and_then(|headers| headers.inner().get("item_id"))
    else {
        return ItemHeader::Absent;
    };
    match value {
        AMQPValue::LongString(text) => {
            ItemHeader::Text(String::from_utf8_lossy(text.as_bytes()).into_owned())
        }
        AMQPValue::ShortString(text) => ItemHeader::Text(text.to_string()),
        AMQPValue::Boolean(_) => ItemHeader::NotText("boolean"),
        AMQPValue::Float(_) | AMQPValue::Double(_) | AMQPValue::DecimalValue(_) => {
            ItemHeader::NotText("a number")
        }
        AMQPValue::FieldArray(_) => ItemHeader::NotText("an array"),
        AMQPValue::FieldTable(_) => ItemHeader::NotText("a table"),
        AMQPValue::ByteArray(_) => ItemHeader::NotText("bytes"),
        AMQPValue::Timestamp(_) => ItemHeader::NotText("a timestamp"),
        AMQPValue::Void => ItemHeader::NotText("void"),
        _ => ItemHeader::NotText("an integer"),
    }
}
