//! The RabbitMQ side: connecting to one of the listed nodes (with a heartbeat, so
//! a dead link is noticed) and the topology of contract §1.

mod addresses;
pub mod blocked;
pub mod open;
pub mod permissions;
mod publish;
mod topology;
pub mod version;

pub use addresses::{Addresses, Cut, Unreachable};
pub use permissions::Permissions;
pub use publish::publish;
pub use topology::{
    CHECK_EVERY, DeclareError, HASH_PLUGIN, ITEM_HEADER, REQUEST_ROUTING_KEY, Topology, amqp_code,
};

use crate::settings::BrokerArgs;
use lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection, Consumer};

/// Connects to the first node of `AMQP_URL` that answers: for the operator
/// commands, which connect once.
pub async fn connect(broker: &BrokerArgs, name: &str) -> anyhow::Result<Connection> {
    let addresses = Addresses::parse(broker)?;
    let (connection, _) = addresses.connect(name).await?;
    Ok(connection)
}

/// Connects like [`connect`], and says as which user: the only `user_id` a
/// publisher on this connection may set (RabbitMQ validates it).
pub async fn connect_as(broker: &BrokerArgs, name: &str) -> anyhow::Result<(Connection, String)> {
    let addresses = Addresses::parse(broker)?;
    let (connection, index) = addresses.connect(name).await?;
    Ok((connection, addresses.username(index).to_owned()))
}

/// Declares a server-named queue that lives as long as this connection, for
/// replies to come back to; returns its name.
pub async fn declare_private_queue(channel: &Channel) -> lapin::Result<String> {
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(queue.name().to_string())
}

/// Consumes `queue` in no-ack mode: for reply listeners, which lose nothing
/// that matters if they go away (the ledger answers a retried request).
pub async fn consume_without_acks(channel: &Channel, queue: &str) -> lapin::Result<Consumer> {
    channel
        .basic_consume(
            short(queue),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
}

/// A text header of a message (short or long string), lossily as UTF-8.
pub fn header_text(properties: &lapin::BasicProperties, name: &str) -> Option<String> {
    match properties.headers().as_ref()?.inner().get(name)? {
        lapin::types::AMQPValue::LongString(text) => {
            Some(String::from_utf8_lossy(text.as_bytes()).into_owned())
        }
        lapin::types::AMQPValue::ShortString(text) => Some(text.to_string()),
        _ => None,
    }
}

/// The headers of a request about `item`: its `item_id`, which partitioned
/// workers' exchange routes by (contract §2).
pub fn item_headers(item: uuid::Uuid) -> FieldTable {
    let mut headers = FieldTable::default();
    headers.insert(
        ITEM_HEADER.into(),
        lapin::types::AMQPValue::LongString(item.to_string().into()),
    );
    headers
}

/// A short string from text that came from the broker or from validated settings.
pub fn short(value: &str) -> ShortString {
    ShortString::from(value)
}
