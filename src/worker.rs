//! The worker's main loop: connect, declare, consume, hand each delivery to its
//! own task, and start over when the broker connection is lost.
//!
//! Deliveries in flight when a connection dies are abandoned, never acked on
//! another channel: the broker redelivers them and the ledger answers the
//! duplicates. On shutdown the consumer is cancelled first, then whatever is in
//! flight is finished (replied and acked) within the drain time.

use crate::ack::{self, Acks};
use crate::apply::Applier;
use crate::delivery::{self, Context, Link};
use crate::metrics::{Health, Metrics};
use crate::settings::Settings;
use crate::{broker, http, store};
use anyhow::Context as _;
use futures::StreamExt as _;
use lapin::message::Delivery;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// A worker that has its database ready and its HTTP listener bound.
pub struct Worker {
    settings: Settings,
    ctx: Arc<Context>,
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
    /// Creates and migrates the database, and binds the HTTP listener.
    pub async fn build(settings: Settings) -> anyhow::Result<Worker> {
        let pool =
            store::connect(&settings.connections.database_url, settings.worker.db_pool).await?;
        store::migrate(&pool).await?;
        let health = Arc::new(Health::default());
        health.set_database(true);
        let metrics = Arc::new(Metrics::new());
        let (http_addr, http) = http::serve(
            settings.worker.http_addr,
            health.clone(),
            metrics.clone(),
            pool.clone(),
        )
        .await?;
        tracing::info!(%http_addr, "metrics and health listening");
        let applier = Applier::start(
            pool,
            settings.worker.db_pool as usize,
            settings.worker.batch_max as usize,
            health.clone(),
            metrics.clone(),
        );
        let ctx = Arc::new(Context {
            applier,
            exchange: settings.connections.exchange.clone(),
            health,
            metrics,
        });
        Ok(Worker {
            settings,
            ctx,
            http_addr,
            http,
        })
    }

    /// Where `/metrics`, `/healthz` and `/readyz` answer.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Consumes until `shutdown` completes, reconnecting whenever the broker is lost.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let mut shutdown = pin!(shutdown);
        let mut in_flight = JoinSet::new();
        let mut backoff = FIRST_BACKOFF;
        let mut lost_before = false;
        loop {
            let session = tokio::select! {
                biased;
                () = &mut shutdown => break,
                session = Session::open(&self.settings) => session,
            };
            let mut session = match session {
                Ok(session) => session,
                Err(error) => {
                    self.ctx.metrics.dependency_error("broker");
                    tracing::warn!(
                        error = format!("{error:#}"),
                        retry_in_ms = backoff.as_millis() as u64,
                        "broker unavailable"
                    );
                    tokio::select! {
                        () = &mut shutdown => break,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            backoff = FIRST_BACKOFF;
            if lost_before {
                self.ctx.metrics.reconnected("broker");
            }
            self.ctx.health.set_consuming(true);
            tracing::info!(queue = %self.settings.connections.queue, prefetch = self.settings.worker.prefetch, "consuming");

            let stopped = self
                .consume(&mut session, &mut in_flight, &mut shutdown)
                .await;
            self.ctx.health.set_consuming(false);
            if stopped {
                session.drain(&self, &mut in_flight).await;
                session.close().await;
                break;
            }
            // The session is given up: its deliveries can no longer be settled.
            // Close what may still be open, so no consumer lingers on it.
            session.link.lost.cancel();
            session.close().await;
            lost_before = true;
            self.ctx.metrics.dependency_error("broker");
            tracing::warn!("broker connection lost; reconnecting");
        }
        self.http.abort();
        tracing::info!("stopped");
        Ok(())
    }

    /// Spawns a handler per delivery until the consumer fails (returns `false`) or
    /// `shutdown` completes (returns `true`).
    async fn consume(
        &self,
        session: &mut Session,
        in_flight: &mut JoinSet<()>,
        shutdown: &mut (impl Future<Output = ()> + Unpin),
    ) -> bool {
        loop {
            tokio::select! {
                biased;
                () = &mut *shutdown => return true,
                () = session.link.lost.cancelled() => {
                    tracing::warn!("reply channel closed by the broker");
                    return false;
                }
                Some(_) = in_flight.join_next() => {}
                next = session.consumer.next() => match next {
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
            }
        }
    }
}

/// One broker connection with its consuming and reply channels.
struct Session {
    connection: Connection,
    deliveries: Channel,
    consumer: Consumer,
    /// What the handlers of this session's deliveries share.
    link: Arc<Link>,
    /// Sends the acks `link.acks` decides on.
    settling: ack::Sender,
}

impl Session {
    async fn open(settings: &Settings) -> anyhow::Result<Session> {
        let connection = broker::connect(&settings.connections, "qty-worker").await?;
        let deliveries = connection.create_channel().await?;
        settings.topology().declare(&deliveries).await?;
        let replies = connection.create_channel().await?;
        replies
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        deliveries
            .basic_qos(settings.worker.prefetch, BasicQosOptions::default())
            .await?;
        let consumer = deliveries
            .basic_consume(
                settings.connections.queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .context("cannot start consuming")?;
        let lost = CancellationToken::new();
        // Half the prefetch may wait behind a slow delivery for a joint ack.
        let hold = usize::from(settings.worker.prefetch).div_ceil(2);
        let (acks, settling) = Acks::start(deliveries.clone(), hold, lost.clone());
        Ok(Session {
            connection,
            deliveries,
            consumer,
            link: Arc::new(Link {
                replies,
                acks,
                lost,
            }),
            settling,
        })
    }

    fn spawn(&self, ctx: &Arc<Context>, in_flight: &mut JoinSet<()>, delivery: Delivery) {
        in_flight.spawn(delivery::receive(ctx, delivery, &self.link));
    }

    /// Stops taking deliveries, then finishes those already received, up to the
    /// drain time. Deliveries the broker pushed before the cancel took effect are
    /// handled too rather than bounced back, so none is redelivered needlessly.
    async fn drain(&mut self, worker: &Worker, in_flight: &mut JoinSet<()>) {
        let drain_for = Duration::from_secs(worker.settings.worker.drain_secs);
        tracing::info!(
            in_flight = in_flight.len(),
            "stopping: cancelling the consumer and finishing what is in flight"
        );
        let cancelled = self
            .deliveries
            .basic_cancel(self.consumer.tag(), BasicCancelOptions::default())
            .await;
        let finish = async {
            if cancelled.is_ok() {
                while let Some(Ok(delivery)) = self.consumer.next().await {
                    self.spawn(&worker.ctx, in_flight, delivery);
                }
            }
            while in_flight.join_next().await.is_some() {}
        };
        if tokio::time::timeout(drain_for, finish).await.is_err() {
            tracing::warn!(
                left = in_flight.len(),
                "drain time is up; unfinished deliveries go back to the queue"
            );
            self.link.lost.cancel();
            in_flight.shutdown().await;
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
        } = self;
        drop(consumer);
        let replies = link.replies.clone();
        drop(link);
        let limit = Duration::from_secs(2);
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
