//! The worker's loop when partitioned (`QTY_PARTITIONS`, contract §1 and §3):
//! connect, declare, and every [`TICK`](crate::ownership::TICK) read the fleet
//! and act on the plan: claim a free partition and subscribe to it, hand over
//! one beyond this worker's share. Each owned partition runs on its own channel
//! (`partition`); the flow of each delivery is the same as unpartitioned
//! (`delivery`).
//!
//! When a lease can no longer be trusted (renewals failing towards its margin,
//! or another worker has claimed it), the broker connection is dropped without
//! the closing handshake (`broker::Cut`): the broker then puts every delivery
//! this worker held back in its place before any other consumer gets one. The
//! loop connects again and claims its share anew.

mod legacy;
mod partition;
mod session;

use super::Consuming;
use crate::backoff::Backoff;
use crate::broker::open;
use crate::health::BrokerState;
use crate::ownership::{self, LEASE_TTL, Leases, MEMBER_TTL, TICK, plan};
use crate::store::fleet::Fleet;
use legacy::LEGACY;
use partition::{Control, Ended, Partition};
use session::Session;
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Waits between attempts to reach the broker.
const BACKOFF: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));

/// How one session ended.
enum SessionEnd {
    /// Stopped (SIGTERM): every partition handed over.
    Stopped,
    /// Stopped, but a partition could not be handed over gracefully: its
    /// deliveries go back by dropping the connection.
    StoppedCut,
    /// The connection was lost or dropped: connect again.
    Lost,
}

/// A partition being consumed, as the loop sees it.
struct Running {
    hand_over: CancellationToken,
}

/// Consumes the partitions this worker owns until `shutdown` completes.
pub async fn run(
    worker: &Consuming,
    partitions: u16,
    shutdown: &mut (impl Future<Output = ()> + Unpin),
) {
    let member = format!("{}-{}", hostname(), uuid::Uuid::new_v4().simple());
    let fleet = Fleet::new(worker.db.sibling(2), &worker.topology.queue, &member);
    let leases = Arc::new(Leases::default());
    let (lost_tx, mut lost_rx) = mpsc::unbounded_channel();
    let renewer = tokio::spawn(ownership::renew(fleet.clone(), leases.clone(), lost_tx));
    worker.ctx.health.set_partitions(Vec::new());
    tracing::info!(%member, partitions, "partitioned: sharing the partition queues with the fleet");
    let mut backoff = BACKOFF;
    loop {
        let opened = tokio::select! {
            biased;
            () = &mut *shutdown => break,
            opened = Session::open(worker) => opened,
        };
        let session = match opened {
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
        worker.ctx.health.set_broker(BrokerState::Consuming);
        let (ended_tx, ended_rx) = mpsc::unbounded_channel();
        let mut serving = Serving {
            worker,
            fleet: &fleet,
            leases: &leases,
            partitions,
            session,
            running: BTreeMap::new(),
            releasing: BTreeSet::new(),
            legacy_pending: true,
            legacy_unbound: false,
            ended_tx,
            ended_rx,
        };
        let ended = serving.serve(shutdown, &mut lost_rx).await;
        worker.ctx.health.set_broker(BrokerState::Down);
        worker.ctx.health.set_partitions(Vec::new());
        worker.consumes(Vec::new());
        worker.ctx.metrics.partitions_owned.set(0);
        match ended {
            SessionEnd::Stopped => {
                serving.session.close().await;
                break;
            }
            SessionEnd::StoppedCut => {
                serving.session.cut.now();
                serving.session.close().await;
                break;
            }
            SessionEnd::Lost => {
                serving.session.cut.now();
                serving.session.close().await;
                leases.clear();
                worker.ctx.metrics.dependency_error("broker");
                worker.addresses.lost(serving.session.address);
                tracing::warn!(
                    "broker connection dropped; connecting again and claiming this worker's share anew"
                );
            }
        }
    }
    renewer.abort();
    if let Err(error) = fleet.leave().await {
        tracing::warn!(%error, "cannot leave the fleet; the others notice when its membership expires");
    }
}

/// What serving one session needs.
struct Serving<'a> {
    worker: &'a Consuming,
    fleet: &'a Fleet,
    leases: &'a Arc<Leases>,
    partitions: u16,
    session: Session,
    running: BTreeMap<u16, Running>,
    /// Partitions being handed over (still running, still leased).
    releasing: BTreeSet<u16>,
    /// Until the unpartitioned queue is found gone: no partition is claimed
    /// before its requests are served (see `legacy`).
    legacy_pending: bool,
    /// Whether this session unbound the unpartitioned queue already.
    legacy_unbound: bool,
    /// Where each partition's task says how it ended.
    ended_tx: mpsc::UnboundedSender<(u16, Ended)>,
    ended_rx: mpsc::UnboundedReceiver<(u16, Ended)>,
}

impl Serving<'_> {
    async fn serve(
        &mut self,
        shutdown: &mut (impl Future<Output = ()> + Unpin),
        lost: &mut mpsc::UnboundedReceiver<u16>,
    ) -> SessionEnd {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = &mut *shutdown => return self.hand_over_all().await,
                () = self.session.lost.cancelled() => return SessionEnd::Lost,
                Some(partition) = lost.recv() => {
                    if self.running.contains_key(&partition) {
                        tracing::warn!(partition, "partition claimed by another worker while this one held it (its lease lapsed): dropping the broker connection, so its deliveries go back in order");
                        return SessionEnd::Lost;
                    }
                }
                Some((partition, ended)) = self.ended_rx.recv() => match ended {
                    Ended::HandedOver => self.released(partition).await,
                    Ended::Failed => {
                        tracing::warn!(partition, "partition consumer failed");
                        return SessionEnd::Lost;
                    }
                },
                _ = tick.tick() => {
                    if let Some(partition) = self.leases.lapsing(Instant::now()) {
                        tracing::warn!(partition, "partition lease not renewed in time: dropping the broker connection, so its deliveries go back in order before another worker takes it");
                        return SessionEnd::Lost;
                    }
                    if !self.session.connection.status().connected() {
                        return SessionEnd::Lost;
                    }
                    if let Err(error) = self.act().await {
                        return error;
                    }
                }
            }
        }
    }

    /// Reads the fleet and acts on the plan.
    async fn act(&mut self) -> Result<(), SessionEnd> {
        let view = match tokio::time::timeout(
            TICK * 2,
            self.fleet.tick(self.partitions, MEMBER_TTL),
        )
        .await
        {
            Ok(Ok(view)) => view,
            Ok(Err(error)) => {
                self.worker.ctx.metrics.dependency_error("database");
                tracing::warn!(%error, "cannot read the fleet's partitions; trying again");
                return Ok(());
            }
            Err(_) => {
                tracing::warn!(
                    "cannot read the fleet's partitions: no answer in time; trying again"
                );
                return Ok(());
            }
        };
        if self.legacy_pending {
            self.drain_legacy().await?;
            if self.legacy_pending {
                return Ok(());
            }
        }
        let me = self.fleet.member();
        let held = self.leases.held();
        let plan = plan::plan(&view.members, me, &view.owners, &held, &self.releasing);
        for partition in plan.release {
            if let Some(running) = self.running.get(&partition) {
                tracing::info!(
                    partition,
                    members = view.members.len(),
                    share = plan::share(&view.members, me, self.partitions),
                    "giving partition up: rebalancing across the fleet"
                );
                self.releasing.insert(partition);
                running.hand_over.cancel();
            }
        }
        for partition in plan.claim {
            let sent = Instant::now();
            let epoch = match self.fleet.claim(partition, LEASE_TTL).await {
                Ok(Some(epoch)) => epoch,
                Ok(None) => continue,
                Err(error) => {
                    tracing::warn!(%error, partition, "cannot claim the partition; trying again");
                    continue;
                }
            };
            self.leases.claimed(partition, epoch, sent);
            let why = if view.lapsed[usize::from(partition)] {
                "its owner stopped renewing its lease"
            } else {
                "it was free"
            };
            if let Err(error) = self.subscribe(partition).await {
                tracing::warn!(%error, partition, "cannot subscribe to the partition");
                return Err(SessionEnd::Lost);
            }
            tracing::info!(partition, epoch, why, "took partition");
        }
        self.show();
        Ok(())
    }

    /// While the unpartitioned queue exists: unbind it, and drain it under the
    /// [`LEGACY`] lease (one worker at a time), then let partitions start.
    async fn drain_legacy(&mut self) -> Result<(), SessionEnd> {
        let topology = &self.worker.topology;
        let connection = self.session.connection.clone();
        let ready = match legacy::ready(&connection, topology).await {
            Ok(Some(ready)) => ready,
            Ok(None) => {
                self.legacy_pending = false;
                return Ok(());
            }
            Err(error) => {
                tracing::warn!(%error, queue = %topology.queue, "cannot look at the unpartitioned queue; trying again");
                return Ok(());
            }
        };
        if !self.legacy_unbound {
            match legacy::unbind(&connection, topology).await {
                Ok(()) => {
                    self.legacy_unbound = true;
                    tracing::info!(queue = %topology.queue, ready, "unbound the unpartitioned queue: new requests wait in the partitions until its requests are served");
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot unbind the unpartitioned queue; trying again")
                }
            }
        }
        if let Some(running) = self.running.get(&LEGACY) {
            if ready == 0 && self.releasing.insert(LEGACY) {
                running.hand_over.cancel();
            }
            return Ok(());
        }
        let sent = Instant::now();
        if let Ok(Some(epoch)) = self.fleet.claim(LEGACY, LEASE_TTL).await {
            self.leases.claimed(LEGACY, epoch, sent);
            if let Err(error) = self.subscribe(LEGACY).await {
                tracing::warn!(%error, "cannot subscribe to the unpartitioned queue");
                return Err(SessionEnd::Lost);
            }
            tracing::info!(queue = %topology.queue, ready, "serving the unpartitioned queue's requests before any partition's");
        }
        Ok(())
    }

    async fn subscribe(&mut self, index: u16) -> lapin::Result<()> {
        let queue = match index {
            LEGACY => self.worker.topology.queue.clone(),
            _ => self.worker.topology.partition_queue(index),
        };
        let partition =
            Partition::subscribe(&self.session.connection, index, queue, &self.session.shared)
                .await?;
        let hand_over = CancellationToken::new();
        let control = Control {
            hand_over: hand_over.clone(),
        };
        let shared = self.session.shared.clone();
        let ended = self.ended_tx.clone();
        tokio::spawn(async move {
            let how = partition.run(shared, control).await;
            ended.send((index, how)).ok();
        });
        self.running.insert(index, Running { hand_over });
        Ok(())
    }

    /// A partition was handed over: release its lease, so that another worker
    /// may take it at once.
    async fn released(&mut self, partition: u16) {
        self.running.remove(&partition);
        self.releasing.remove(&partition);
        if partition == LEGACY {
            match legacy::delete_if_empty(&self.session.connection, &self.worker.topology).await {
                Ok(true) => {
                    self.legacy_pending = false;
                    tracing::info!(queue = %self.worker.topology.queue, "the unpartitioned queue is served and deleted: partitions start");
                }
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(%error, "cannot delete the unpartitioned queue; trying again")
                }
            }
        }
        if let Some(lease) = self.leases.remove(partition) {
            match self.fleet.release(partition, lease.epoch).await {
                Ok(_) => tracing::info!(partition, "gave partition up"),
                // It lapses by itself; nobody subscribes before then.
                Err(error) => {
                    tracing::warn!(%error, partition, "handed the partition over but cannot release its lease; it lapses by itself")
                }
            }
        }
        self.show();
    }

    /// Shows the owned partitions in `/readyz` and the gauge.
    fn show(&self) {
        let owned: Vec<u16> = self
            .running
            .keys()
            .copied()
            .filter(|&p| p != LEGACY)
            .collect();
        self.worker
            .ctx
            .metrics
            .partitions_owned
            .set(owned.len() as i64);
        // The parked requests of the queues consumed now are this worker's to judge.
        let topology = &self.worker.topology;
        let queue = |&p: &u16| match p {
            LEGACY => topology.queue.clone(),
            _ => topology.partition_queue(p),
        };
        self.worker
            .consumes(self.running.keys().map(queue).collect());
        self.worker.ctx.health.set_partitions(owned);
    }

    /// A stop: every partition is handed over (within the drain time) and its
    /// lease released.
    async fn hand_over_all(&mut self) -> SessionEnd {
        tracing::info!(
            partitions = ?self.running.keys().collect::<Vec<_>>(),
            "stopping: handing every partition over"
        );
        for running in self.running.values() {
            running.hand_over.cancel();
        }
        while !self.running.is_empty() {
            match self.ended_rx.recv().await {
                Some((partition, Ended::HandedOver)) => self.released(partition).await,
                Some((partition, Ended::Failed)) => {
                    tracing::warn!(
                        partition,
                        "partition failed while handing over: dropping the connection so its deliveries go back in order"
                    );
                    return SessionEnd::StoppedCut;
                }
                None => break,
            }
        }
        SessionEnd::Stopped
    }
}

/// This machine's name, to tell fleet members apart in the tables and logs.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "worker".to_owned())
}
