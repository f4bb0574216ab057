//! A publisher that keeps going through broker faults: each request is
//! republished until the broker confirms it (duplicates are the ledger's job).

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Connection};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use uuid::Uuid;

use crate::app::connect_any;

/// One request the publisher sent (perhaps more than once).
#[derive(Clone, Debug)]
pub struct Sent {
    pub message_id: String,
    pub item: Uuid,
    pub delta: i64,
    /// Whether it carries the `item_id` header (partitioned workers route by it).
    pub keyed: bool,
}

/// Publishes each request until confirmed, reconnecting as often as it takes.
/// Returns how many publishes were retried.
pub async fn publish_through_faults(
    amqp_urls: &str,
    exchange: &str,
    reply_queue: &str,
    requests: &[Sent],
    per_second: u64,
) -> usize {
    let retries = AtomicUsize::new(0);
    let started = Instant::now();
    let mut link: Option<(Connection, lapin::Channel)> = None;
    for (n, request) in requests.iter().enumerate() {
        if per_second > 0 {
            let due = started + Duration::from_secs_f64(n as f64 / per_second as f64);
            tokio::time::sleep_until(due.into()).await;
        }
        let body =
            serde_json::json!({ "item_id": request.item, "delta": request.delta }).to_string();
        loop {
            if link.is_none() {
                link = connect_publisher(amqp_urls).await;
                if link.is_none() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            }
            let (_, channel) = link.as_ref().expect("connected");
            let mut properties = BasicProperties::default()
                .with_message_id(request.message_id.as_str().into())
                .with_reply_to(reply_queue.into())
                .with_content_type("application/json".into())
                .with_delivery_mode(2);
            if request.keyed {
                let mut headers = lapin::types::FieldTable::default();
                headers.insert(
                    "item_id".into(),
                    lapin::types::AMQPValue::LongString(request.item.to_string().into()),
                );
                properties = properties.with_headers(headers);
            }
            let confirmed = match channel
                .basic_publish(
                    exchange.into(),
                    "qty.adjust".into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    properties,
                )
                .await
            {
                Ok(confirm) => confirm.await.map(|c| c.is_ack()).unwrap_or(false),
                Err(_) => false,
            };
            if confirmed {
                break;
            }
            retries.fetch_add(1, Ordering::Relaxed);
            link = None;
        }
    }
    if let Some((connection, _)) = link {
        connection.close(200, "done".into()).await.ok();
    }
    retries.into_inner()
}

async fn connect_publisher(amqp_urls: &str) -> Option<(Connection, lapin::Channel)> {
    let connection = connect_any(amqp_urls).await?;
    let channel = connection.create_channel().await.ok()?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .ok()?;
    Some((connection, channel))
}
