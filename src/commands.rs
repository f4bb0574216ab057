//! The operator commands: `migrate`, `item create|show` and `adjust`.
//!
//! Exit codes: 0 success (for `adjust`: applied), 1 error, 2 usage (from clap),
//! 3 not found (`adjust`: not_found, `item show`: no such item), 4 rejected.

use crate::broker::{self, REQUEST_ROUTING_KEY, short};
use crate::cli::{AdjustArgs, ItemCommand};
use crate::settings::{Connections, redact};
use crate::store;
use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use lapin::BasicProperties;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use sqlx::PgPool;
use std::process::ExitCode;
use std::time::Duration;
use uuid::Uuid;

pub const EXIT_NOT_FOUND: u8 = 3;
pub const EXIT_REJECTED: u8 = 4;

/// The broker's direct reply-to pseudo-queue: replies come straight to this channel.
const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

async fn database(connections: &Connections) -> anyhow::Result<PgPool> {
    let pool = store::connect(&connections.database_url, 2)
        .await
        .with_context(|| {
            format!(
                "database {} (is PostgreSQL running? set DATABASE_URL)",
                redact(&connections.database_url)
            )
        })?;
    store::migrate(&pool).await?;
    Ok(pool)
}

pub async fn migrate(connections: &Connections) -> anyhow::Result<ExitCode> {
    database(connections).await?;
    eprintln!("database is migrated");
    Ok(ExitCode::SUCCESS)
}

pub async fn item(connections: &Connections, command: ItemCommand) -> anyhow::Result<ExitCode> {
    let pool = database(connections).await?;
    let item = match command {
        ItemCommand::Create { id, qty } => {
            let id = id.unwrap_or_else(Uuid::new_v4);
            store::create_item(&pool, id, qty)
                .await
                .with_context(|| format!("cannot create item {id}"))?
        }
        ItemCommand::Show { id } => match store::find_item(&pool, id).await? {
            Some(item) => item,
            None => {
                eprintln!("item {id} not found");
                return Ok(ExitCode::from(EXIT_NOT_FOUND));
            }
        },
    };
    println!("{}", serde_json::to_string(&item)?);
    Ok(ExitCode::SUCCESS)
}

/// Publishes one request, waits for its reply on direct reply-to, prints it.
pub async fn adjust(connections: &Connections, args: AdjustArgs) -> anyhow::Result<ExitCode> {
    let connection = broker::connect(&connections.amqp_url, "qty-worker adjust")
        .await
        .context("is RabbitMQ running? set AMQP_URL")?;
    let channel = connection.create_channel().await?;
    // Direct reply-to requires consuming (no-ack) before publishing.
    let mut replies = channel
        .basic_consume(
            DIRECT_REPLY_TO.into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
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
        .with_delivery_mode(2);
    let confirm = channel
        .basic_publish(
            short(&connections.exchange),
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
                connections.exchange
            )
        })?;
    if confirm.take_message().is_some() {
        bail!(
            "no queue is bound to exchange {:?} with routing key {REQUEST_ROUTING_KEY:?} (is the worker running?)",
            connections.exchange
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
    println!("{text}");
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

/// Runs `bench` and prints its report; exits 1 when an invariant is broken.
pub async fn bench(
    connections: &Connections,
    args: crate::bench::BenchArgs,
) -> anyhow::Result<ExitCode> {
    let json = args.json;
    let report = crate::bench::run(connections, args).await?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{report}");
    }
    Ok(if report.invariants_hold {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
