//! The publisher's and listener's side of the broker, raw: connecting, a reply
//! queue of one's own, publishing with confirms.

use lapin::options::{BasicPublishOptions, QueueBindOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use uuid::Uuid;

/// A well-formed request body.
pub fn request_body(item: Uuid, delta: i64) -> String {
    serde_json::json!({ "item_id": item, "delta": delta }).to_string()
}

/// Connects to the first broker of a comma-separated list that answers.
pub async fn connect_any(urls: &str) -> Option<Connection> {
    for url in urls.split(',') {
        if let Ok(connection) = Connection::connect(url, ConnectionProperties::default()).await {
            return Some(connection);
        }
    }
    None
}

/// Declares a server-named exclusive queue, optionally bound to `exchange` with
/// `binding`, and consumes it without acks.
pub async fn listen(channel: &Channel, binding: Option<(&str, &str)>) -> (String, Consumer) {
    let name = qty_worker::broker::declare_private_queue(channel)
        .await
        .expect("declare listener queue");
    if let Some((exchange, key)) = binding {
        channel
            .queue_bind(
                name.as_str().into(),
                exchange.into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind listener queue");
    }
    let consumer = qty_worker::broker::consume_without_acks(channel, &name)
        .await
        .expect("consume listener queue");
    (name, consumer)
}

pub async fn publish(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    properties: BasicProperties,
    body: &[u8],
) {
    let confirm = channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            body,
            properties,
        )
        .await
        .expect("publish request")
        .await
        .expect("request confirmed");
    assert!(confirm.is_ack(), "the broker refused the request");
}
