//! Stage 4 of the flow: publish the reply and wait for the broker's confirm. Only
//! a confirmed reply lets the delivery be acked (contract section 3).

use crate::broker::short;
use crate::outcome::Verdict;
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};

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

/// Publishes the reply for `verdict` on `channel` (which has confirms on) and
/// returns once the broker has confirmed it.
pub async fn send(
    channel: &Channel,
    exchange: &str,
    route: &ReplyRoute,
    verdict: &Verdict,
) -> Result<(), ReplyError> {
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
    let confirm = channel
        .basic_publish(
            short(exchange),
            short(&routing_key),
            BasicPublishOptions::default(),
            &body,
            properties,
        )
        .await?
        .await?;
    if confirm.is_nack() {
        return Err(ReplyError::Nacked);
    }
    Ok(())
}
