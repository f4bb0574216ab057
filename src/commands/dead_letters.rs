//! `qty-worker dead-letters list|replay`: inspect the dead-letter queue, and move
//! dead-lettered requests back to the request queue once their cause is fixed.
//! Replaying is safe: the ledger answers any request that was in fact applied.

use super::{EXIT_NOT_FOUND, Output};
use crate::broker::{self, Topology, short};
use crate::settings::BrokerArgs;
use anyhow::Context as _;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use serde::Serialize;
use std::process::ExitCode;

/// A dead-lettered request as the listing shows it.
#[derive(Debug, Serialize)]
pub struct DeadLetter {
    pub message_id: Option<String>,
    pub reason: Option<String>,
    pub body: String,
}

pub async fn list(broker: &BrokerArgs, queue: &str, output: Output) -> anyhow::Result<ExitCode> {
    let (connection, channel) = open(broker).await?;
    let dead_letter_queue = Topology::dead_letter_queue_of(queue);
    let taken = take_all(&channel, &dead_letter_queue).await?;
    let letters: Vec<DeadLetter> = taken.iter().map(describe).collect();
    // Closing without acks hands every message back to the dead-letter queue.
    channel.close(200, "listed".into()).await.ok();
    connection.close(200, "done".into()).await.ok();
    output.print_rows(&letters, |letters| {
        let mut text = format!(
            "{} dead-lettered request(s) in {dead_letter_queue}",
            letters.len()
        );
        for letter in letters {
            text.push_str(&format!(
                "\n{:<40}  {:<16}  {}",
                letter.message_id.as_deref().unwrap_or("(no message_id)"),
                letter.reason.as_deref().unwrap_or("-"),
                letter.body
            ));
        }
        text
    });
    Ok(ExitCode::SUCCESS)
}

/// Replays every dead letter (`all`) or those whose message_id is in `ids`.
pub async fn replay(
    broker: &BrokerArgs,
    queue: &str,
    all: bool,
    ids: &[String],
    output: Output,
) -> anyhow::Result<ExitCode> {
    let (connection, channel) = open(broker).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let taken = take_all(&channel, &Topology::dead_letter_queue_of(queue)).await?;
    let mut replayed: Vec<Replayed> = Vec::new();
    for message in &taken {
        let id = message
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string());
        if !all && !id.as_ref().is_some_and(|id| ids.contains(id)) {
            continue;
        }
        let confirm = channel
            .basic_publish(
                "".into(),
                short(queue),
                BasicPublishOptions::default(),
                &message.data,
                without_death_headers(&message.properties),
            )
            .await?
            .await
            .context("the broker did not confirm a replayed request")?;
        anyhow::ensure!(confirm.is_ack(), "the broker refused a replayed request");
        message.acker.ack(BasicAckOptions::default()).await?;
        replayed.push(Replayed {
            message_id: id.unwrap_or_default(),
        });
    }
    channel.close(200, "replayed".into()).await.ok();
    connection.close(200, "done".into()).await.ok();
    let missing: Vec<&String> = ids
        .iter()
        .filter(|id| !replayed.iter().any(|r| &r.message_id == *id))
        .collect();
    output.print_rows(&replayed, |replayed| {
        format!("replayed {} request(s) to {queue}", replayed.len())
    });
    if !missing.is_empty() {
        eprintln!(
            "not in the dead-letter queue: {}",
            missing
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        return Ok(ExitCode::from(EXIT_NOT_FOUND));
    }
    Ok(ExitCode::SUCCESS)
}

/// A request put back in the request queue.
#[derive(Debug, Serialize)]
struct Replayed {
    message_id: String,
}

async fn open(broker_args: &BrokerArgs) -> anyhow::Result<(Connection, Channel)> {
    let connection = broker::connect(broker_args, "qty-worker dead-letters").await?;
    let channel = connection.create_channel().await?;
    Ok((connection, channel))
}

/// Takes every message from `queue` without acking: each stays ours until acked
/// or until the channel closes, which returns it.
async fn take_all(channel: &Channel, queue: &str) -> anyhow::Result<Vec<lapin::message::Delivery>> {
    let mut taken = Vec::new();
    while let Some(message) = channel
        .basic_get(short(queue), BasicGetOptions { no_ack: false })
        .await
        .with_context(|| format!("cannot read {queue:?} (has the worker declared it?)"))?
    {
        taken.push(message.delivery);
    }
    Ok(taken)
}

fn describe(message: &lapin::message::Delivery) -> DeadLetter {
    let reason = crate::broker::header_text(&message.properties, "x-first-death-reason");
    let mut body = String::from_utf8_lossy(&message.data).into_owned();
    if body.len() > 200 {
        body.truncate(body.floor_char_boundary(200));
        body.push('…');
    }
    DeadLetter {
        message_id: message
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string()),
        reason,
        body,
    }
}

/// The original properties, minus the broker's dead-lettering bookkeeping.
fn without_death_headers(properties: &BasicProperties) -> BasicProperties {
    let mut headers = FieldTable::default();
    for (key, value) in properties.headers().clone().unwrap_or_default().inner() {
        let bookkeeping = key.as_str().starts_with("x-death")
            || key.as_str().starts_with("x-first-death")
            || key.as_str().starts_with("x-last-death")
            || key.as_str() == "x-delivery-count";
        if !bookkeeping {
            headers.insert(key.clone(), value.clone());
        }
    }
    properties.clone().with_headers(headers)
}
