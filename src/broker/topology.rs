//! The names the worker uses and their declaration (contract §1): the topic
//! exchange, its dead-letter exchange, the quorum request queue with its binding,
//! and the dead-letter queue. They have one owner, [`Topology::new`], which the
//! worker, `bench` and `dead-letters` all use.
//!
//! Partitioned ([`Topology::partitioned`], `QTY_PARTITIONS=P`), the one request
//! queue gives way to P quorum queues `<queue>.0` … `<queue>.<P-1>`, each with
//! single active consumer and the same dead-lettering, fed by a consistent-hash
//! exchange `<exchange>.by-item` that hashes the `item_id` header and is bound to
//! the exchange with `qty.adjust`. The plugin that provides that exchange type
//! missing is [`DeclareError::PluginMissing`]. Partition queues are declared with
//! `x-queue-leader-locator: balanced`, so that a cluster spreads their leaders
//! over its nodes instead of placing them all on the node the declaring worker
//! is connected to. A partition queue an older version declared without that
//! argument is kept as it is: every supported RabbitMQ refuses a re-declare that
//! adds an argument (PRECONDITION_FAILED), so the worker then declares it in its
//! old form, which still checks every other argument.
//!
//! Declaring is idempotent. While the worker runs, [`Topology::keep`] checks every
//! few seconds that everything still exists and declares again what someone
//! deleted, whatever route the replies take.

use crate::health::Health;
use lapin::options::{
    ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
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
    /// `QTY_PARTITIONS`: how many partition queues, when partitioned.
    pub partitions: Option<u16>,
    /// `<exchange>.by-item`, the consistent-hash exchange (used when partitioned).
    pub by_item_exchange: String,
}

/// The header the consistent-hash exchange hashes (contract §2).
pub const ITEM_HEADER: &str = "item_id";

/// The plugin that provides the `x-consistent-hash` exchange type.
pub const HASH_PLUGIN: &str = "rabbitmq_consistent_hash_exchange";

/// Why a declare failed.
#[derive(Debug, thiserror::Error)]
pub enum DeclareError {
    /// What exists has other arguments (PRECONDITION_FAILED): an operator must
    /// settle it; the worker reports it and keeps retrying.
    #[error("configuration conflict: {0}")]
    Conflict(String),
    #[error("cannot declare {what}: {error}")]
    Broker { what: String, error: lapin::Error },
    /// The broker does not know the `x-consistent-hash` exchange type: a
    /// configuration problem an operator fixes by enabling the plugin.
    #[error("plugin {HASH_PLUGIN} is not enabled")]
    PluginMissing,
}

impl Topology {
    pub fn new(exchange: &str, queue: &str, delivery_limit: u32) -> Topology {
        Topology {
            exchange: exchange.to_owned(),
            queue: queue.to_owned(),
            dead_letter_exchange: format!("{exchange}.dlx"),
            dead_letter_queue: Topology::dead_letter_queue_of(queue),
            delivery_limit,
            partitions: None,
            by_item_exchange: format!("{exchange}.by-item"),
        }
    }

    /// The same names, with the request queue split into `partitions` queues.
    pub fn partitioned(self, partitions: Option<u16>) -> Topology {
        Topology { partitions, ..self }
    }

    /// `<queue>.<index>`, partition `index`'s queue.
    pub fn partition_queue(&self, index: u16) -> String {
        format!("{}.{index}", self.queue)
    }

    /// Every partition queue, in order (none when unpartitioned).
    pub fn partition_queues(&self) -> Vec<String> {
        (0..self.partitions.unwrap_or(0))
            .map(|index| self.partition_queue(index))
            .collect()
    }

    /// `<queue>.dead`, where the request queue `queue` dead-letters to.
    pub fn dead_letter_queue_of(queue: &str) -> String {
        format!("{queue}.dead")
    }

    /// Declares the exchange, the dead-letter exchange and queue, the request queue
    /// and the bindings, on channels of its own. Re-declaring what exists is a
    /// no-op; declaring it with other arguments is a [`DeclareError::Conflict`],
    /// rather than running on a queue without a dead-letter exchange.
    pub async fn declare(&self, connection: &Connection) -> Result<(), DeclareError> {
        let mut channel = open_channel(connection).await?;
        let declared = self.declare_on(connection, &mut channel).await;
        channel.close(200, "declared".into()).await.ok();
        declared
    }

    /// Declares on `channel`, which a refused declare replaces with a fresh one.
    async fn declare_on(
        &self,
        connection: &Connection,
        channel: &mut Channel,
    ) -> Result<(), DeclareError> {
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
        if self.partitions.is_none() {
            channel
                .queue_declare(self.queue.as_str().into(), durable_queue, arguments)
                .await
                .map_err(|e| failed(what("queue", &self.queue), e))?;
            return self.bind(channel).await;
        }
        let mut by_item = FieldTable::default();
        by_item.insert("hash-header".into(), long_string(ITEM_HEADER));
        channel
            .exchange_declare(
                self.by_item_exchange.as_str().into(),
                ExchangeKind::Custom("x-consistent-hash".into()),
                durable,
                by_item,
            )
            .await
            .map_err(|e| {
                if is_unknown_exchange_type(&e) {
                    DeclareError::PluginMissing
                } else {
                    failed(what("exchange", &self.by_item_exchange), e)
                }
            })?;
        // One partition's requests, one active consumer: the broker's guard that
        // two workers never consume a partition at once.
        arguments.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        let mut balanced = arguments.clone();
        balanced.insert("x-queue-leader-locator".into(), long_string("balanced"));
        for queue in self.partition_queues() {
            let declared = channel
                .queue_declare(queue.as_str().into(), durable_queue, balanced.clone())
                .await;
            match declared {
                Ok(_) => {}
                Err(error) if is_locator_conflict(&error) => {
                    // Declared by a version that did not set the locator. The
                    // refusal closed the channel; the old form goes on another.
                    *channel = open_channel(connection).await?;
                    channel
                        .queue_declare(queue.as_str().into(), durable_queue, arguments.clone())
                        .await
                        .map_err(|e| failed(what("queue", &queue), e))?;
                    tracing::debug!(%queue, "partition queue kept as an older version declared it (no leader locator)");
                }
                Err(error) => return Err(failed(what("queue", &queue), error)),
            }
        }
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
        if self.partitions.is_none() {
            return channel
                .queue_bind(
                    self.queue.as_str().into(),
                    self.exchange.as_str().into(),
                    REQUEST_ROUTING_KEY.into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| failed("the request binding".into(), e));
        }
        channel
            .exchange_bind(
                self.by_item_exchange.as_str().into(),
                self.exchange.as_str().into(),
                REQUEST_ROUTING_KEY.into(),
                ExchangeBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| failed("the request binding".into(), e))?;
        for queue in self.partition_queues() {
            // The binding key is the partition's weight on the hash ring.
            channel
                .queue_bind(
                    queue.as_str().into(),
                    self.by_item_exchange.as_str().into(),
                    "1".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| failed(format!("the binding of {queue:?}"), e))?;
        }
        Ok(())
    }

    /// The queues requests wait in: the request queue, or every partition queue.
    fn request_queues(&self) -> Vec<String> {
        match self.partitions {
            None => vec![self.queue.clone()],
            Some(_) => self.partition_queues(),
        }
    }

    /// The first of the worker's exchanges and queues that does not exist, if
    /// any. A passive declare of a missing one closes the channel, so each check
    /// runs on a channel of its own.
    ///
    /// Unpartitioned, it also counts the request queue's consumers into
    /// `consumers` (the worker's own included).
    async fn missing(
        &self,
        connection: &Connection,
        consumers: &mut u32,
    ) -> lapin::Result<Option<String>> {
        let passive_exchange = ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let passive_queue = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let channel = connection.create_channel().await?;
        let mut exchanges = vec![
            (&self.exchange, ExchangeKind::Topic),
            (&self.dead_letter_exchange, ExchangeKind::Direct),
        ];
        if self.partitions.is_some() {
            exchanges.push((
                &self.by_item_exchange,
                ExchangeKind::Custom("x-consistent-hash".into()),
            ));
        }
        for (exchange, kind) in exchanges {
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
        let mut queues = self.request_queues();
        queues.push(self.dead_letter_queue.clone());
        for queue in &queues {
            let checked = channel
                .queue_declare(queue.as_str().into(), passive_queue, FieldTable::default())
                .await;
            match checked {
                Err(error) => {
                    return not_found(error).map(|()| Some(format!("queue {queue:?}")));
                }
                Ok(declared) if *queue == self.queue => *consumers = declared.consumer_count(),
                Ok(_) => {}
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
            let mut consumers = 0;
            let checked = self.missing(connection, &mut consumers).await;
            if self.partitions.is_none() && consumers > 1 {
                health.set_competing_consumers(consumers);
            }
            let Ok(Some(missing)) = checked else {
                continue;
            };
            tracing::warn!(%missing, "topology: {missing} was deleted; declaring it again");
            health.set_topology_missing(Some(missing));
            match self.declare(connection).await {
                Ok(()) => {
                    health.set_topology_missing(None);
                    tracing::info!("topology declared again");
                }
                Err(error) => tracing::warn!(%error, "topology: cannot declare it again yet"),
            }
        }
    }
}

async fn open_channel(connection: &Connection) -> Result<Channel, DeclareError> {
    connection
        .create_channel()
        .await
        .map_err(|e| failed("a channel".into(), e))
}

/// Whether an exchange declare was refused for its type: the plugin that
/// provides `x-consistent-hash` is not enabled. RabbitMQ 3.10 says so with
/// COMMAND_INVALID (503), 4.0 and later with PRECONDITION_FAILED (406), both
/// "unknown exchange type".
fn is_unknown_exchange_type(error: &lapin::Error) -> bool {
    amqp_code(error) == Some(503) || refused(error, 406, "unknown exchange type")
}

/// Whether a declare was refused only because the queue exists without
/// `x-queue-leader-locator` (declared by an older version).
fn is_locator_conflict(error: &lapin::Error) -> bool {
    refused(error, 406, "x-queue-leader-locator")
}

/// Whether the broker refused with `code` and a message that mentions `text`.
fn refused(error: &lapin::Error, code: u16, text: &str) -> bool {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => {
            amqp.get_id() == code && amqp.get_message().as_str().contains(text)
        }
        _ => false,
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
