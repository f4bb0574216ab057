//! `qty-worker adjust ITEM DELTA`: publish one request, wait for its reply on
//! direct reply-to, print it, and exit by outcome.

use super::{EXIT_NOT_FOUND, EXIT_REJECTED, Output};
use crate::broker::{self, REQUEST_ROUTING_KEY, short};
use crate::cli::AdjustArgs;
use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use std::process::ExitCode;
use std::time::Duration;
use uuid::Uuid;

/// The broker's direct reply-to pseudo-queue: replies come straight to this channel.
const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// Publishes one request, waits for its reply on direct reply-to, prints it.
pub async fn run(args: AdjustArgs, output: Output) -> anyhow::Result<ExitCode> {
    // The request names its publisher (`user_id`), as every publisher should:
    // a worker with QTY_PUBLISHERS serves only listed ones.
    let (connection, user) = broker::connect_as(&args.broker, "qty-worker adjust").await?;
    let exchange = &args.exchange.exchange;
    let channel = connection.create_channel().await?;
    // Direct reply-to requires consuming (no-ack) before publishing.
    let mut replies = broker::consume_without_acks(&channel, DIRECT_REPLY_TO).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;

    let message_id = args
        .message_id
        .unwrap_or_else(|| Uuid::new_v4().to_string());
    let body = serde_json::json!({ "item_id": args.item_id, "delta": args.delta }).to_string();
    let properties = BasicProperties::default()
        .with_message_id(short(&message_id))
        .with_correlation_id(short(&message_id))
        .with_reply_to(short(DIRECT_REPLY_TO))
        .with_content_type(short("application/json"))
        .with_user_id(short(&user))
        .with_headers(broker::item_headers(args.item_id))
        .with_delivery_mode(2);
    let confirm = channel
        .basic_publish(
            short(exchange),
            short(REQUEST_ROUTING_KEY),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body.as_bytes(),
            properties,
        )
        .await?
        .await
        .with_context(|| {
            format!(
                "cannot publish to exchange {:?} (is the worker running? it declares it)",
                exchange
            )
        })?;
    if confirm.take_message().is_some() {
        bail!(
            "no queue is bound to exchange {:?} with routing key {REQUEST_ROUTING_KEY:?} (is the worker running?)",
            exchange
        );
    }

    let wait = Duration::from_secs(args.timeout);
    let reply = loop {
        let delivery = tokio::time::timeout(wait, replies.next())
            .await
            .with_context(|| format!("no reply within {}s (is the worker running?)", args.timeout))?
            .context("the reply consumer ended")??;
        let correlates = delivery
            .properties
            .correlation_id()
            .as_ref()
            .map(|s| s.as_str())
            == Some(message_id.as_str());
        if correlates {
            break delivery;
        }
    };
    let text = String::from_utf8_lossy(&reply.data).into_owned();
    output.reply(&text);
    connection.close(200, "done".into()).await.ok();
    let outcome = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|value| {
            value
                .get("outcome")
                .and_then(|o| o.as_str())
                .map(str::to_owned)
        });
    Ok(match outcome.as_deref() {
        Some("applied") => ExitCode::SUCCESS,
        Some("not_found") => ExitCode::from(EXIT_NOT_FOUND),
        Some("rejected") => ExitCode::from(EXIT_REJECTED),
        _ => bail!("unexpected reply: {text}"),
    })
}
