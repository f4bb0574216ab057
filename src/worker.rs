//! The worker's main loop: connect, declare, consume, hand each delivery to its
//! own task, and start over when the broker connection is lost.
//!
//! Deliveries in flight when a connection dies are abandoned, never acked on
//! another channel: the broker redelivers them and the ledger answers the
//! duplicates. On shutdown the consumer is cancelled first, then whatever is in
//! flight is finished (replied and acked) within the drain time.

use crate::ack::{self, Acks};
use crate::admit::Publishers;
use crate::apply::Applier;
use crate::apply::set_aside::SetAside;
use crate::backoff::Backoff;
use crate::broker::open::{self, OpenError, next_of};
use crate::broker::{Addresses, Topology, blocked};
use crate::delivery::{self, Context, Link};
use crate::direct_replies::DirectReplies;
use crate::health::{BrokerState, DatabaseState, Health};
use crate::http;
use crate::log_budget::LogBudget;
use crate::metrics::Metrics;
use crate::settings::Settings;
use crate::store::{Database, PrepareError, SchemaError, Target};
use crate::window::{Widen, Window};
use futures::StreamExt as _;
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Waits between attempts to reach a dependency at start and after a loss.
const BACKOFF: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));

/// Invalid requests (and, apart, replies given up) logged at warn per minute; the
/// rest are counted in the next warning (and always in the metrics).
const INVALID_WARNINGS_PER_MINUTE: u32 = 20;

/// A worker with its settings checked and its HTTP listener bound. It has not
/// touched either dependency yet: [`Worker::run_until_stopped`] waits for them.
pub struct Worker {
    pub(crate) settings: Settings,
    pub(crate) ctx: Arc<Context>,
    pub(crate) db: Database,
    pub(crate) addresses: Arc<Addresses>,
    pub(crate) topology: Arc<Topology>,
    /// Requests set aside for locked items, across the lanes.
    pub(crate) set_aside: Arc<SetAside>,
    http_addr: SocketAddr,
    http: tokio::task::JoinHandle<()>,
}

/// Builds a worker and runs it until `shutdown` completes.
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    Worker::build(settings)
        .await?
        .run_until_stopped(shutdown)
        .await
}

impl Worker {
    /// Checks the settings (a [`crate::settings::SettingError`] for one that can
    /// never work) and binds the HTTP listener. Connects to nothing.
    pub async fn build(settings: Settings) -> anyhow::Result<Worker> {
        let connections = &settings.connections;
        let target = Target::parse(connections.database_url())?;
        let addresses = Arc::new(Addresses::parse(&connections.broker)?);
        let topology = Arc::new(
            Topology::new(
                connections.exchange(),
                connections.queue(),
                settings.worker.delivery_limit,
            )
            .partitioned(settings.worker.partitions),
        );
        let db = Database::new(target, settings.worker.db_pool);
        let health = Arc::new(Health::default());
        let metrics = Arc::new(Metrics::new());
        let set_aside = Arc::new(SetAside::default());
        let (http_addr, http) = http::serve(
            settings.worker.http_addr,
            health.clone(),
            metrics.clone(),
            db.clone(),
            set_aside.clone(),
        )
        .await?;
        tracing::info!(%http_addr, "metrics and health listening");
        let applier = Applier::start(
            db.clone(),
            settings.worker.db_pool as usize,
            settings.worker.batch_max as usize,
            Duration::from_millis(settings.worker.lock_wait_ms),
            health.clone(),
            metrics.clone(),
            set_aside.clone(),
        );
        let publishers = Publishers::from_setting(settings.worker.publishers.as_deref());
        if publishers.restricted() {
            tracing::info!(
                publishers = settings.worker.publishers.as_deref(),
                "only these publishers may adjust"
            );
        }
        let ctx = Arc::new(Context {
            publishers,
            applier,
            exchange: settings.connections.exchange().to_owned(),
            health,
            metrics,
            invalid_log: LogBudget::new(INVALID_WARNINGS_PER_MINUTE, Duration::from_secs(60)),
            refused_log: LogBudget::new(INVALID_WARNINGS_PER_MINUTE, Duration::from_secs(60)),
            partitioned: settings.worker.partitions.is_some(),
            keyless_log: LogBudget::new(INVALID_WARNINGS_PER_MINUTE, Duration::from_secs(60)),
        });
        Ok(Worker {
            settings,
            ctx,
            db,
            addresses,
            topology,
            set_aside,
            http_addr,
            http,
        })
    }

    /// Where `/metrics`, `/healthz` and `/readyz` answer.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Consumes until `shutdown` completes, reconnecting whenever the broker is lost.
    /// Waits for the database first: without it no delivery could be answered.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let mut shutdown = pin!(shutdown);
        tokio::select! {
            biased;
            () = &mut shutdown => {
                self.http.abort();
                tracing::info!("stopped before the database was ready");
                return Ok(());
            }
            () = self.wait_for_database() => {}
        }
        if let Some(partitions) = self.settings.worker.partitions {
            crate::partitions::run(&self, partitions, &mut shutdown).await;
            self.http.abort();
            tracing::info!("stopped");
            return Ok(());
        }
        // A tracker rather than a JoinSet: nothing needs a handler's result, and a
        // JoinSet woke this loop once per finished delivery to collect it.
        let in_flight = TaskTracker::new();
        let mut backoff = BACKOFF;
        let mut lost_before = false;
        loop {
            let session = tokio::select! {
                biased;
                () = &mut shutdown => break,
                session = Session::open(&self) => session,
            };
            let mut session = match session {
                Ok(session) => session,
                Err(error) => {
                    self.ctx.metrics.dependency_error("broker");
                    open::report(&error, &self.ctx.health, backoff.peek());
                    tokio::select! {
                        () = &mut shutdown => break,
                        () = tokio::time::sleep(backoff.fail()) => {}
                    }
                    continue;
                }
            };
            backoff.reset();
            if lost_before {
                self.ctx.metrics.reconnected("broker");
            }
            self.ctx.health.set_broker(BrokerState::Consuming);
            tracing::info!(
                queue = %self.topology.queue,
                prefetch = self.settings.worker.prefetch,
                node = self.addresses.shown(session.address),
                "consuming"
            );

            let stopped = self.consume(&mut session, &in_flight, &mut shutdown).await;
            self.ctx.health.set_broker(BrokerState::Down);
            if stopped {
                session.drain(&self, &in_flight).await;
                session.close().await;
                break;
            }
            // The session is given up: its deliveries can no longer be settled.
            // Close what may still be open, so no consumer lingers on it.
            session.link.lost.cancel();
            self.addresses.lost(session.address);
            session.close().await;
            lost_before = true;
            self.ctx.metrics.dependency_error("broker");
            tracing::warn!("broker connection lost; reconnecting");
        }
        self.http.abort();
        tracing::info!("stopped");
        Ok(())
    }

    /// Finds a usable database host and readies the schema (`QTY_MIGRATE`: apply
    /// the migrations, or check that they are there), retrying with capped
    /// backoff and one log line per attempt. A schema behind the binary or a
    /// missing privilege is a configuration problem, not an outage: `/readyz`
    /// names it, and a migration or a grant ends the wait without a restart.
    async fn wait_for_database(&self) {
        let mut backoff = BACKOFF;
        let mode = self.settings.worker.migrate;
        loop {
            let error = match self.db.prepare(mode).await {
                Ok(()) => {
                    self.ctx.health.set_prepared();
                    tracing::info!(host = self.db.target.current_host(), "database ready");
                    return;
                }
                Err(error) => error,
            };
            self.ctx.metrics.dependency_error("database");
            let retry_in_ms = backoff.peek().as_millis() as u64;
            match &error {
                PrepareError::Schema(schema @ SchemaError::PermissionDenied(_)) => {
                    self.ctx
                        .health
                        .set_database(DatabaseState::Misconfigured(schema.to_string()));
                    tracing::error!(error = %schema, url = %self.db.target.shown, retry_in_ms, "database: a privilege is missing; grant it (docs/security.md)");
                }
                PrepareError::Schema(schema @ SchemaError::Behind(_)) => {
                    self.ctx
                        .health
                        .set_database(DatabaseState::Misconfigured(schema.to_string()));
                    tracing::warn!(error = %schema, url = %self.db.target.shown, retry_in_ms, "database: waiting for `qty-worker migrate`");
                }
                other => {
                    self.ctx.health.set_database(DatabaseState::Down);
                    tracing::warn!(error = %other, url = %self.db.target.shown, retry_in_ms, "database unavailable; waiting for it");
                }
            }
            tokio::time::sleep(backoff.fail()).await;
        }
    }

    /// Spawns a handler per delivery until the consumer fails (returns `false`) or
    /// `shutdown` completes (returns `true`).
    async fn consume(
        &self,
        session: &mut Session,
        in_flight: &TaskTracker,
        shutdown: &mut (impl Future<Output = ()> + Unpin),
    ) -> bool {
        let mut window = Window::new(
            self.settings.worker.prefetch,
            self.settings.worker.set_aside_max,
        );
        loop {
            tokio::select! {
                biased;
                () = &mut *shutdown => return true,
                () = session.link.lost.cancelled() => {
                    tracing::warn!("reply channel closed by the broker");
                    return false;
                }
                // A cancelled consumer's last deliveries come before any of its
                // successor's, so deliveries are registered in tag order.
                next = next_of(&mut session.draining), if !session.draining.is_empty() => match next {
                    Some(Ok(delivery)) => session.spawn(&self.ctx, in_flight, delivery),
                    Some(Err(error)) => {
                        tracing::warn!(%error, "consumer failed");
                        return false;
                    }
                    None => {
                        session.draining.pop_front();
                    }
                },
                next = session.consumer.next(), if session.draining.is_empty() => match next {
                    Some(Ok(delivery)) => session.spawn(&self.ctx, in_flight, delivery),
                    Some(Err(error)) => {
                        tracing::warn!(%error, "consumer failed");
                        return false;
                    }
                    None => {
                        tracing::warn!("consumer cancelled by the broker");
                        return false;
                    }
                },
                () = self.set_aside.grown() => {
                    let waiting = self.ctx.metrics.set_aside.get().max(0) as usize;
                    match window.check(waiting) {
                        Widen::No => {}
                        Widen::AtCeiling => tracing::warn!(
                            set_aside = waiting,
                            ceiling = self.settings.worker.set_aside_max,
                            "set-aside ceiling reached: requests for locked items hold delivery slots again until they drain (QTY_SET_ASIDE_MAX)"
                        ),
                        Widen::Now => {
                            if let Err(error) = session.fresh_consumer(&self.topology).await {
                                tracing::warn!(%error, "cannot start a fresh consumer");
                                return false;
                            }
                            tracing::info!(set_aside = waiting, "requests set aside for locked items no longer hold delivery slots: consuming afresh");
                        }
                    }
                }
            }
        }
    }
}

/// One broker connection with its consuming and reply channels.
struct Session {
    connection: Arc<Connection>,
    /// Which of the `AMQP_URL` addresses it is connected to.
    address: usize,
    deliveries: Channel,
    consumer: Consumer,
    /// Consumers cancelled to widen the window, oldest first, until their last
    /// deliveries are in.
    draining: VecDeque<Consumer>,
    /// What the handlers of this session's deliveries share.
    link: Arc<Link>,
    /// Sends the acks `link.acks` decides on.
    settling: ack::Sender,
    /// Declares again whatever part of the topology someone deletes.
    keeper: tokio::task::JoinHandle<()>,
    /// Shows the broker blocking this connection's publishes.
    _blocked: blocked::Watch,
}

impl Session {
    async fn open(worker: &Worker) -> Result<Session, OpenError> {
        let settings = &worker.settings;
        let (connection, address) = worker.addresses.connect("qty-worker").await?;
        open::show_version(&worker.addresses, address, &worker.ctx.metrics);
        let connection = Arc::new(connection);
        let broker = |what| move |error| OpenError::Broker(what, error);
        let deliveries = connection
            .create_channel()
            .await
            .map_err(broker("cannot open a channel"))?;
        worker.topology.declare(&connection).await?;
        let replies = open::reply_channel(&connection).await?;
        deliveries
            .basic_qos(settings.worker.prefetch, BasicQosOptions::default())
            .await
            .map_err(broker("cannot set the prefetch"))?;
        let consumer = deliveries
            .basic_consume(
                worker.topology.queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(broker("cannot start consuming"))?;
        let blocked = blocked::watch(
            &connection,
            "consuming",
            worker.ctx.health.clone(),
            worker.ctx.metrics.clone(),
        );
        let lost = CancellationToken::new();
        // Half the prefetch may wait behind a slow delivery for a joint ack.
        let hold = usize::from(settings.worker.prefetch).div_ceil(2);
        let (acks, settling) = Acks::start(deliveries.clone(), hold, lost.clone());
        let keeper = {
            let (topology, connection) = (worker.topology.clone(), connection.clone());
            let (health, stop) = (worker.ctx.health.clone(), lost.clone());
            tokio::spawn(async move { topology.keep(&connection, &health, &stop).await })
        };
        Ok(Session {
            connection,
            address,
            deliveries,
            consumer,
            draining: VecDeque::new(),
            link: Arc::new(Link {
                replies,
                direct: Arc::new(DirectReplies::new(
                    worker.addresses.clone(),
                    worker.ctx.health.clone(),
                    worker.ctx.metrics.clone(),
                )),
                acks,
                lost,
            }),
            settling,
            keeper,
            _blocked: blocked,
        })
    }

    /// Cancels the consumer and starts another on the same channel (see
    /// `window`): the deliveries already received stay unacked on the channel,
    /// and the new consumer's window starts empty.
    async fn fresh_consumer(&mut self, topology: &Topology) -> lapin::Result<()> {
        self.deliveries
            .basic_cancel(self.consumer.tag(), BasicCancelOptions::default())
            .await?;
        let fresh = self
            .deliveries
            .basic_consume(
                topology.queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        // Behind any consumer still draining from an earlier widening: their
        // deliveries come first.
        self.draining
            .push_back(std::mem::replace(&mut self.consumer, fresh));
        Ok(())
    }

    fn spawn(&self, ctx: &Arc<Context>, in_flight: &TaskTracker, delivery: Delivery) {
        in_flight.spawn(delivery::receive(ctx, delivery, &self.link));
    }

    /// Stops taking deliveries, then finishes those already received, up to the
    /// drain time. Deliveries the broker pushed before the cancel took effect are
    /// handled too rather than bounced back, so none is redelivered needlessly.
    async fn drain(&mut self, worker: &Worker, in_flight: &TaskTracker) {
        let drain_for = Duration::from_secs(worker.settings.worker.drain_secs);
        tracing::info!(
            in_flight = in_flight.len(),
            "stopping: cancelling the consumer and finishing what is in flight"
        );
        let cancelled = self
            .deliveries
            .basic_cancel(self.consumer.tag(), BasicCancelOptions::default())
            .await;
        // Closed now so `wait` can end; handlers spawned below are still tracked.
        in_flight.close();
        let finish = async {
            if cancelled.is_ok() {
                // Oldest first, as while consuming, so tags register in order.
                let consumers: Vec<Consumer> = self.draining.drain(..).collect();
                for mut consumer in consumers {
                    while let Some(Ok(delivery)) = consumer.next().await {
                        self.spawn(&worker.ctx, in_flight, delivery);
                    }
                }
                while let Some(Ok(delivery)) = self.consumer.next().await {
                    self.spawn(&worker.ctx, in_flight, delivery);
                }
            }
            in_flight.wait().await;
        };
        if tokio::time::timeout(drain_for, finish).await.is_err() {
            // One nack each, in delivery order: closing the channel would return
            // them consumer by consumer, out of order when the window was widened.
            let handed = self.link.acks.hand_back_unfinished();
            tracing::warn!(
                left = in_flight.len(),
                handed,
                "drain time is up; unfinished deliveries go back to the queue"
            );
            // Every handler stops waiting once the session is given up; its
            // delivery is left unacked for the broker to hand out again.
            self.link.lost.cancel();
            tokio::time::timeout(Duration::from_secs(2), in_flight.wait())
                .await
                .ok();
        }
    }

    /// Sends the acks still queued, then closes the channels and the connection.
    /// Handlers still running on a lost session give up at once, so the wait for
    /// their acks is short; it is bounded all the same.
    async fn close(self) {
        let Session {
            connection,
            deliveries,
            consumer,
            link,
            settling,
            keeper,
            ..
        } = self;
        keeper.abort();
        drop(consumer);
        let limit = Duration::from_secs(2);
        tokio::time::timeout(limit, link.direct.close()).await.ok();
        let replies = link.replies.clone();
        drop(link);
        tokio::time::timeout(limit, settling.finish()).await.ok();
        tokio::time::timeout(limit, async {
            replies.close(200, "worker stopping".into()).await.ok();
            deliveries.close(200, "worker stopping".into()).await.ok();
            connection.close(200, "worker stopping".into()).await.ok();
        })
        .await
        .ok();
    }
}
