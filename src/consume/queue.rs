//! The loop of a worker on the one request queue: connect, declare, consume,
//! hand each delivery to its own task, and start over when the broker
//! connection is lost.
//!
//! Deliveries in flight when a connection dies are abandoned, never acked on
//! another channel: the broker redelivers them and the ledger answers the
//! duplicates. On shutdown the consumer is cancelled first, then whatever is in
//! flight is finished (replied and acked) within the drain time. Nothing else
//! is held: a request waiting for a locked item is parked and acked already.

use super::Consuming;
use crate::ack::{self, Acks};
use crate::backoff::Backoff;
use crate::broker::blocked;
use crate::broker::open::{self, OpenError};
use crate::delivery::{self, Context, Link};
use crate::direct_replies::DirectReplies;
use crate::health::BrokerState;
use futures::StreamExt as _;
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Waits between attempts to reach a dependency at start and after a loss.
const BACKOFF: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));

/// Consumes the request queue until `shutdown` completes, reconnecting
/// whenever the broker is lost.
pub async fn run(worker: &Consuming, shutdown: &mut (impl Future<Output = ()> + Unpin)) {
    // A tracker rather than a JoinSet: nothing needs a handler's result, and a
    // JoinSet woke this loop once per finished delivery to collect it.
    let in_flight = TaskTracker::new();
    let mut backoff = BACKOFF;
    let mut lost_before = false;
    loop {
        let session = tokio::select! {
            biased;
            () = &mut *shutdown => break,
            session = Session::open(worker) => session,
        };
        let mut session = match session {
            Ok(session) => session,
            Err(error) => {
                worker.ctx.metrics.dependency_error("broker");
                open::report(&error, &worker.ctx.health, backoff.peek());
                tokio::select! {
                    () = &mut *shutdown => break,
                    () = tokio::time::sleep(backoff.fail()) => {}
                }
                continue;
            }
        };
        backoff.reset();
        if lost_before {
            worker.ctx.metrics.reconnected("broker");
        }
        worker.ctx.health.set_broker(BrokerState::Consuming);
        tracing::info!(
            queue = %worker.topology.queue,
            prefetch = worker.settings.worker.prefetch,
            node = worker.addresses.shown(session.address),
            "consuming"
        );

        let stopped = consume(worker, &mut session, &in_flight, shutdown).await;
        worker.ctx.health.set_broker(BrokerState::Down);
        if stopped {
            session.drain(worker, &in_flight).await;
            session.close().await;
            break;
        }
        // The session is given up: its deliveries can no longer be settled.
        // Close what may still be open, so no consumer lingers on it.
        session.link.lost.cancel();
        worker.addresses.lost(session.address);
        session.close().await;
        lost_before = true;
        worker.ctx.metrics.dependency_error("broker");
        tracing::warn!("broker connection lost; reconnecting");
    }
}

/// Spawns a handler per delivery until the consumer fails (returns `false`) or
/// `shutdown` completes (returns `true`).
async fn consume(
    worker: &Consuming,
    session: &mut Session,
    in_flight: &TaskTracker,
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
            next = session.consumer.next() => match next {
                Some(Ok(delivery)) => session.spawn(&worker.ctx, in_flight, delivery),
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

/// One broker connection with its consuming and reply channels.
struct Session {
    connection: Arc<Connection>,
    /// Which of the `AMQP_URL` addresses it is connected to.
    address: usize,
    deliveries: Channel,
    consumer: Consumer,
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
    async fn open(worker: &Consuming) -> Result<Session, OpenError> {
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
            link: Arc::new(Link {
                replies,
                direct: Arc::new(DirectReplies::new(
                    worker.addresses.clone(),
                    worker.ctx.health.clone(),
                    worker.ctx.metrics.clone(),
                )),
                acks,
                lost,
                source: worker.topology.queue.as_str().into(),
            }),
            settling,
            keeper,
            _blocked: blocked,
        })
    }

    fn spawn(&self, ctx: &Arc<Context>, in_flight: &TaskTracker, delivery: Delivery) {
        in_flight.spawn(delivery::receive(ctx, delivery, &self.link));
    }

    /// Stops taking deliveries, then finishes those already received, up to the
    /// drain time. Deliveries the broker pushed before the cancel took effect are
    /// handled too rather than bounced back, so none is redelivered needlessly.
    async fn drain(&mut self, worker: &Consuming, in_flight: &TaskTracker) {
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
                while let Some(Ok(delivery)) = self.consumer.next().await {
                    self.spawn(&worker.ctx, in_flight, delivery);
                }
            }
            in_flight.wait().await;
        };
        if tokio::time::timeout(drain_for, finish).await.is_err() {
            // One nack each, in delivery order: the current RabbitMQ release
            // does not charge a nack to the delivery limit, while a close is
            // charged on every release.
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
