//! One owned partition queue: its channel, its consumer and the deliveries it
//! holds, from the moment its lease is claimed until it is handed over.
//!
//! Each partition has a channel of its own, so its deliveries can be settled,
//! counted and given back apart from the other partitions'. Handing over keeps
//! the partition's order because nobody else subscribes while this worker holds
//! the lease: the consumer is cancelled (nothing new comes), the deliveries in
//! hand are finished within the drain time, what is left is handed back one
//! nack at a time in delivery order (with no other consumer waiting, the queue
//! serves them first, in that order), the channel is closed, and only then is
//! the lease released. Only deliveries in flight are held: a request waiting
//! for a locked item is parked and acked, and its new owner judges it.

use crate::ack::{self, Acks};
use crate::delivery::{self, Context, Link};
use crate::direct_replies::DirectReplies;
use futures::StreamExt as _;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What a partition's task is told while it runs.
pub struct Control {
    /// Hand the partition over: stop taking, finish or put back, close.
    pub hand_over: CancellationToken,
}

/// How a partition's task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Handed over: nothing of it is held any more; its lease may be released.
    HandedOver,
    /// Its channel or consumer failed: the session must be dropped.
    Failed,
}

/// An owned partition being consumed.
pub struct Partition {
    pub index: u16,
    channel: Channel,
    consumer: Consumer,
    link: Arc<Link>,
    settling: ack::Sender,
    in_flight: TaskTracker,
}

/// What every partition of a session shares.
pub struct Shared {
    pub ctx: Arc<Context>,
    pub replies: Channel,
    pub direct: Arc<DirectReplies>,
    /// Cancelled when the session is given up.
    pub lost: CancellationToken,
    pub prefetch: u16,
    pub drain: Duration,
}

impl Partition {
    /// Opens a channel and subscribes to `queue`. Call only while holding its
    /// lease: a consumer of another worker must never be waiting behind ours.
    pub async fn subscribe(
        connection: &Connection,
        index: u16,
        queue: String,
        shared: &Shared,
    ) -> lapin::Result<Partition> {
        let channel = connection.create_channel().await?;
        channel
            .basic_qos(shared.prefetch, BasicQosOptions::default())
            .await?;
        let consumer = consume(&channel, &queue).await?;
        let lost = shared.lost.child_token();
        let hold = usize::from(shared.prefetch).div_ceil(2);
        let (acks, settling) = Acks::start(channel.clone(), hold, lost.clone());
        let source = queue.as_str().into();
        Ok(Partition {
            index,
            channel,
            consumer,
            link: Arc::new(Link {
                replies: shared.replies.clone(),
                direct: shared.direct.clone(),
                acks,
                lost,
                source,
            }),
            settling,
            in_flight: TaskTracker::new(),
        })
    }

    /// Consumes until told to hand over (and then hands over) or until the
    /// channel fails.
    pub async fn run(mut self, shared: Arc<Shared>, control: Control) -> Ended {
        loop {
            tokio::select! {
                biased;
                () = control.hand_over.cancelled() => return self.hand_over(&shared).await,
                () = self.link.lost.cancelled() => return Ended::Failed,
                next = self.consumer.next() => match next {
                    Some(Ok(delivery)) => self.spawn(&shared.ctx, delivery),
                    // Cancelled by the broker (the queue deleted) or failed.
                    _ => return Ended::Failed,
                },
            }
        }
    }

    fn spawn(&self, ctx: &Arc<Context>, delivery: lapin::message::Delivery) {
        self.in_flight
            .spawn(delivery::receive(ctx, delivery, &self.link));
    }

    /// Stops taking deliveries, finishes those in hand within the drain time,
    /// and closes the channel, which puts back in their place any not finished.
    async fn hand_over(mut self, shared: &Shared) -> Ended {
        let cancelled = self
            .channel
            .basic_cancel(self.consumer.tag(), BasicCancelOptions::default())
            .await;
        self.in_flight.close();
        let finish = async {
            if cancelled.is_ok() {
                while let Some(Ok(delivery)) = self.consumer.next().await {
                    self.spawn(&shared.ctx, delivery);
                }
            }
            self.in_flight.wait().await;
        };
        let finished = tokio::time::timeout(shared.drain, finish).await.is_ok();
        if !finished {
            let handed = self.link.acks.hand_back_unfinished();
            tracing::warn!(
                partition = self.index,
                handed,
                "hand-over: drain time is up; unfinished deliveries go back to the partition in their place"
            );
            self.link.lost.cancel();
            tokio::time::timeout(Duration::from_secs(2), self.in_flight.wait())
                .await
                .ok();
        }
        let Partition {
            channel,
            link,
            settling,
            ..
        } = self;
        drop(link);
        let limit = Duration::from_secs(2);
        tokio::time::timeout(limit, settling.finish()).await.ok();
        let closed = tokio::time::timeout(limit, channel.close(200, "handed over".into())).await;
        match (cancelled, closed) {
            (Ok(()), Ok(Ok(()))) => Ended::HandedOver,
            _ => Ended::Failed,
        }
    }
}

async fn consume(channel: &Channel, queue: &str) -> lapin::Result<Consumer> {
    channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
}
