//! The broker's own limit for the worker's traffic, with no database: consume the
//! request queue with the worker's prefetch, publish a confirmed reply to each
//! request's `reply_to`, and ack once the reply is confirmed, a whole run of
//! confirmed deliveries at a time (`multiple`), as the worker does.
//!
//! `bench/ceiling.sh` and `bench/record.sh` run it in place of the worker, so
//! what they measure is what RabbitMQ and lapin alone can do on the machine,
//! beside the worker's:
//!
//! ```sh
//! cargo build --release --example broker_ceiling
//! WORKER_CMD=target/release/examples/broker_ceiling bench/drain.sh 1 "" --messages 50000 --items 1000
//! ```
//!
//! Its replies say `applied` without applying anything, so the bench reports the
//! invariants as broken: that is expected, and only the rate and CPU count.
//! Settings come from the worker's variables: `AMQP_URL`, `QTY_QUEUE`, `QTY_PREFETCH`,
//! and `QTY_PARTITIONS`, with which it consumes every partition queue
//! `<queue>.N`, each on a channel of its own with that prefetch (as the worker
//! does), to show what one queue caps (`bench/fleet.sh`).

use futures::StreamExt as _;
use futures::stream::FuturesOrdered;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};

/// Confirmed deliveries acked together at most; fewer when the queue runs dry.
const ACK_EVERY: usize = 100;

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let queue = std::env::var("QTY_QUEUE").map_err(|_| "QTY_QUEUE is not set")?;
    let prefetch: u16 = std::env::var("QTY_PREFETCH").map_or(Ok(1000), |p| p.parse())?;
    let queues: Vec<String> = match std::env::var("QTY_PARTITIONS") {
        Ok(partitions) => (0..partitions.parse::<u16>()?)
            .map(|n| format!("{queue}.{n}"))
            .collect(),
        Err(_) => vec![queue.clone()],
    };

    let connection = Connection::connect(&url, ConnectionProperties::default()).await?;
    let replies = connection.create_channel().await?;
    replies
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut serving = Vec::new();
    for queue in &queues {
        let deliveries = connection.create_channel().await?;
        deliveries
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let consumer = deliveries
            .basic_consume(
                queue.as_str().into(),
                "broker-ceiling".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        serving.push(tokio::spawn(serve(deliveries, consumer, replies.clone())));
    }
    // Scripts wait for this line before they publish at a fixed rate.
    eprintln!("consuming {queue}");
    for task in serving {
        task.await??;
    }
    Ok(())
}

/// Serves `consumer` (on `deliveries`), replying on `replies`, until it ends.
async fn serve(
    deliveries: lapin::Channel,
    mut consumer: lapin::Consumer,
    replies: lapin::Channel,
) -> Result<(), lapin::Error> {
    // Confirms arrive in publish order, so the newest confirmed tag acks every
    // delivery before it.
    let mut confirming = FuturesOrdered::new();
    let mut unacked = 0;
    loop {
        tokio::select! {
            delivery = consumer.next() => {
                let Some(delivery) = delivery else { break };
                let delivery = delivery?;
                let properties = &delivery.properties;
                let body = reply_body(properties.message_id().as_ref().map_or("", |s| s.as_str()));
                let reply_to = properties.reply_to().clone().unwrap_or_default();
                let (replies, tag) = (replies.clone(), delivery.delivery_tag);
                // Not awaited here: lapin resolves a publish once its I/O thread
                // has written it, and the next delivery need not wait for that.
                confirming.push_back(async move {
                    replies
                        .basic_publish(
                            "".into(),
                            reply_to,
                            BasicPublishOptions::default(),
                            body.as_bytes(),
                            BasicProperties::default()
                                .with_content_type("application/json".into())
                                .with_delivery_mode(2),
                        )
                        .await?
                        .await?;
                    Ok::<_, lapin::Error>(tag)
                });
            }
            Some(confirmed) = confirming.next() => {
                let tag = confirmed?;
                unacked += 1;
                if unacked >= ACK_EVERY || confirming.is_empty() {
                    deliveries
                        .basic_ack(tag, BasicAckOptions { multiple: true })
                        .await?;
                    unacked = 0;
                }
            }
        }
    }
    Ok(())
}

/// A reply of the worker's size and shape.
fn reply_body(message_id: &str) -> String {
    serde_json::json!({
        "message_id": message_id,
        "outcome": "applied",
        "item_id": "00000000-0000-0000-0000-000000000000",
        "delta": 0,
        "qty": 0,
    })
    .to_string()
}
