//! The RabbitMQ side of start-up: connecting (with a heartbeat, so a dead link is
//! noticed) and declaring the topology of contract section 1, idempotently.

use crate::settings::Connections;
use anyhow::Context as _;
use lapin::options::{
    BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::AMQPUri;
use lapin::{
    Channel, Connection, ConnectionProperties, Consumer, DefaultConnectionBuilder, ExchangeKind,
};
use std::str::FromStr;

/// The routing key requests are bound with; replies go out as `qty.adjust.<outcome>`.
pub const REQUEST_ROUTING_KEY: &str = "qty.adjust";

/// Seconds between heartbeats unless the URL sets `?heartbeat=`.
const DEFAULT_HEARTBEAT_SECS: u16 = 10;

/// The names the worker uses, all derived from the exchange and queue settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub exchange: String,
    pub queue: String,
    /// How often a delivery may be handed out before the queue dead-letters it.
    pub delivery_limit: u32,
}

impl Topology {
    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.exchange)
    }

    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dead", self.queue)
    }

    /// Declares the exchange, the dead-letter exchange and queue, the request queue
    /// and its binding. Re-declaring what exists is a no-op; declaring it with other
    /// arguments fails loudly rather than running on a queue without a DLX.
    pub async fn declare(&self, channel: &Channel) -> anyhow::Result<()> {
        let durable_exchange = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let durable_queue = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .exchange_declare(
                self.exchange.as_str().into(),
                ExchangeKind::Topic,
                durable_exchange,
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("cannot declare exchange {:?}", self.exchange))?;
        channel
            .exchange_declare(
                self.dead_letter_exchange().into(),
                ExchangeKind::Direct,
                durable_exchange,
                FieldTable::default(),
            )
            .await
            .with_context(|| {
                format!("cannot declare exchange {:?}", self.dead_letter_exchange())
            })?;

        let mut quorum = FieldTable::default();
        quorum.insert("x-queue-type".into(), long_string("quorum"));
        channel
            .queue_declare(
                self.dead_letter_queue().into(),
                durable_queue,
                quorum.clone(),
            )
            .await
            .with_context(|| format!("cannot declare queue {:?}", self.dead_letter_queue()))?;
        channel
            .queue_bind(
                self.dead_letter_queue().into(),
                self.dead_letter_exchange().into(),
                self.queue.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .context("cannot bind the dead-letter queue")?;

        let mut arguments = quorum;
        arguments.insert(
            "x-dead-letter-exchange".into(),
            long_string(&self.dead_letter_exchange()),
        );
        arguments.insert("x-dead-letter-routing-key".into(), long_string(&self.queue));
        arguments.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongInt(self.delivery_limit as i32),
        );
        // At-least-once dead-lettering keeps a poison message until the dead-letter
        // queue has confirmed it; the broker requires reject-publish overflow for it.
        arguments.insert(
            "x-dead-letter-strategy".into(),
            long_string("at-least-once"),
        );
        arguments.insert("x-overflow".into(), long_string("reject-publish"));
        channel
            .queue_declare(self.queue.as_str().into(), durable_queue, arguments)
            .await
            .with_context(|| format!("cannot declare queue {:?}", self.queue))?;
        channel
            .queue_bind(
                self.queue.as_str().into(),
                self.exchange.as_str().into(),
                REQUEST_ROUTING_KEY.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .context("cannot bind the request queue")?;
        Ok(())
    }
}

fn long_string(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.as_bytes().to_vec()))
}

/// Connects to RabbitMQ, adding a heartbeat when the URL does not set one. For
/// `amqps://`, the system's roots are trusted, plus the CAs in `--amqp-ca-file`.
pub async fn connect(
    connections: &Connections,
    connection_name: &str,
) -> anyhow::Result<Connection> {
    let amqp_url = connections.amqp_url.as_str();
    let mut uri = AMQPUri::from_str(amqp_url)
        .map_err(|e| anyhow::anyhow!("AMQP_URL is not a valid AMQP URL: {e}"))?;
    uri.query.heartbeat.get_or_insert(DEFAULT_HEARTBEAT_SECS);
    let properties = ConnectionProperties::default()
        .with_connection_name(LongString::from(connection_name.as_bytes().to_vec()));
    let mut builder = DefaultConnectionBuilder::new()?
        .with_uri(uri)
        .with_properties(properties);
    if let Some(ca_file) = &connections.amqp_ca_file {
        let pem = std::fs::read_to_string(ca_file)
            .with_context(|| format!("cannot read AMQP_CA_FILE {}", ca_file.display()))?;
        builder = builder.with_tls_config(OwnedTLSConfig {
            identity: None,
            cert_chain: Some(pem),
        });
    }
    builder.connect().await.map_err(|error| {
        anyhow::anyhow!(
            "cannot reach RabbitMQ at {}: {error} (is it running? set AMQP_URL)",
            crate::settings::redact(amqp_url)
        )
    })
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

/// A short string from text that came from the broker or from validated settings.
pub fn short(value: &str) -> ShortString {
    ShortString::from(value)
}
