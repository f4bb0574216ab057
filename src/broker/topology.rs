//! The names the worker uses and their declaration (contract §1): the topic
//! exchange, its dead-letter exchange, the quorum request queue with its binding,
//! and the dead-letter queue. They have one owner, [`Topology::new`], which the
//! worker, `bench` and `dead-letters` all use.
//!
//! Declaring is idempotent. While the worker runs, [`Topology::keep`] checks every
//! few seconds that everything still exists and declares again what someone
//! deleted, whatever route the replies take.

use crate::health::Health;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, ExchangeKind};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The routing key requests are bound with; replies go out as `qty.adjust.<outcome>`.
pub const REQUEST_ROUTING_KEY: &str = "qty.adjust";

/// How often the running worker checks its topology: anything deleted is back
/// within twice this.
pub const CHECK_EVERY: Duration = Duration::from_secs(5);

/// The names the worker uses, all derived from the exchange and queue settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub exchange: String,
    pub queue: String,
    pub dead_letter_exchange: String,
    pub dead_letter_queue: String,
    /// How often a delivery may be handed out before the queue dead-letters it.
    pub delivery_limit: u32,
}

/// Why a declare failed.
#[derive(Debug, thiserror::Error)]
pub enum DeclareError {
    /// What exists has other arguments (PRECONDITION_FAILED): an operator must
    /// settle it; the worker reports it and keeps retrying.
    #[error("configuration conflict: {0}")]
    Conflict(String),
    #[error("cannot declare {what}: {error}")]
    Broker { what: String, error: lapin::Error },
}

impl Topology {
    pub fn new(exchange: &str, queue: &str, delivery_limit: u32) -> Topology {
        Topology {
            exchange: exchange.to_owned(),
            queue: queue.to_owned(),
            dead_letter_exchange: format!("{exchange}.dlx"),
            dead_letter_queue: Topology::dead_letter_queue_of(queue),
            delivery_limit,
        }
    }

    /// `<queue>.dead`, where the request queue `queue` dead-letters to.
    pub fn dead_letter_queue_of(queue: &str) -> String {
        format!("{queue}.dead")
    }

    /// Declares the exchange, the dead-letter exchange and queue, the request queue
    /// and the bindings. Re-declaring what exists is a no-op; declaring it with
    /// other arguments is a [`DeclareError::Conflict`], rather than running on a
    /// queue without a dead-letter exchange.
    pub async fn declare(&self, channel: &Channel) -> Result<(), DeclareError> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let durable_queue = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let what = |kind: &str, name: &str| format!("{kind} {name:?}");
        channel
            .exchange_declare(
                self.exchange.as_str().into(),
                ExchangeKind::Topic,
                durable,
                FieldTable::default(),
            )
            .await
            .map_err(|e| failed(what("exchange", &self.exchange), e))?;
        channel
            .exchange_declare(
                self.dead_letter_exchange.as_str().into(),
                ExchangeKind::Direct,
                durable,
                FieldTable::default(),
            )
            .await
            .map_err(|e| failed(what("exchange", &self.dead_letter_exchange), e))?;
        let mut quorum = FieldTable::default();
        quorum.insert("x-queue-type".into(), long_string("quorum"));
        channel
            .queue_declare(
                self.dead_letter_queue.as_str().into(),
                durable_queue,
                quorum.clone(),
            )
            .await
            .map_err(|e| failed(what("queue", &self.dead_letter_queue), e))?;
        let mut arguments = quorum;
        arguments.insert(
            "x-dead-letter-exchange".into(),
            long_string(&self.dead_letter_exchange),
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
            .map_err(|e| failed(what("queue", &self.queue), e))?;
        self.bind(channel).await
    }

    async fn bind(&self, channel: &Channel) -> Result<(), DeclareError> {
        channel
            .queue_bind(
                self.dead_letter_queue.as_str().into(),
                self.dead_letter_exchange.as_str().into(),
                self.queue.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| failed("the dead-letter binding".into(), e))?;
        channel
            .queue_bind(
                self.queue.as_str().into(),
                self.exchange.as_str().into(),
                REQUEST_ROUTING_KEY.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| failed("the request binding".into(), e))
    }

    /// The first of the worker's exchanges and queues that does not exist, if
    /// any. A passive declare of a missing one closes the channel, so each check
    /// runs on a channel of its own.
    async fn missing(&self, connection: &Connection) -> lapin::Result<Option<String>> {
        let passive_exchange = ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let passive_queue = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let channel = connection.create_channel().await?;
        for (exchange, kind) in [
            (&self.exchange, ExchangeKind::Topic),
            (&self.dead_letter_exchange, ExchangeKind::Direct),
        ] {
            let checked = channel
                .exchange_declare(
                    exchange.as_str().into(),
                    kind,
                    passive_exchange,
                    FieldTable::default(),
                )
                .await;
            if let Err(error) = checked {
                return not_found(error).map(|()| Some(format!("exchange {exchange:?}")));
            }
        }
        for queue in [&self.queue, &self.dead_letter_queue] {
            let checked = channel
                .queue_declare(queue.as_str().into(), passive_queue, FieldTable::default())
                .await;
            if let Err(error) = checked {
                return not_found(error).map(|()| Some(format!("queue {queue:?}")));
            }
        }
        // Bindings cannot be checked passively; binding again is a no-op.
        let bound = self.bind(&channel).await;
        channel.close(200, "checked".into()).await.ok();
        match bound {
            Err(DeclareError::Broker { error, .. }) => Err(error),
            _ => Ok(None),
        }
    }

    /// Every [`CHECK_EVERY`] until `stop`, declares again whatever was deleted,
    /// and reports it in `/readyz` meanwhile. A failed check is left to the next
    /// one: a lost connection is the worker loop's to notice.
    pub async fn keep(&self, connection: &Connection, health: &Health, stop: &CancellationToken) {
        loop {
            if stop
                .run_until_cancelled(tokio::time::sleep(CHECK_EVERY))
                .await
                .is_none()
            {
                return;
            }
            let Ok(Some(missing)) = self.missing(connection).await else {
                continue;
            };
            tracing::warn!(%missing, "topology: {missing} was deleted; declaring it again");
            health.set_topology_missing(Some(missing));
            let declared = match connection.create_channel().await {
                Ok(channel) => {
                    let declared = self.declare(&channel).await;
                    channel.close(200, "declared".into()).await.ok();
                    declared
                }
                Err(error) => Err(failed("a channel".into(), error)),
            };
            match declared {
                Ok(()) => {
                    health.set_topology_missing(None);
                    tracing::info!("topology declared again");
                }
                Err(error) => tracing::warn!(%error, "topology: cannot declare it again yet"),
            }
        }
    }
}

/// Passes a 404 (what the passive check looks for) and returns anything else.
fn not_found(error: lapin::Error) -> lapin::Result<()> {
    match amqp_code(&error) {
        Some(404) => Ok(()),
        _ => Err(error),
    }
}

fn failed(what: String, error: lapin::Error) -> DeclareError {
    match (amqp_code(&error), error.kind()) {
        (Some(406), lapin::ErrorKind::ProtocolError(amqp)) => {
            DeclareError::Conflict(format!("{what}: {}", amqp.get_message()))
        }
        _ => DeclareError::Broker { what, error },
    }
}

/// The AMQP reply code of a protocol error (404 not found, 406 precondition failed…).
pub fn amqp_code(error: &lapin::Error) -> Option<u16> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => Some(amqp.get_id()),
        _ => None,
    }
}

fn long_string(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.as_bytes().to_vec()))
}
