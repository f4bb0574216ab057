//! The broker side of a partitioned session: one connection (kept cuttable,
//! see `broker::Cut`), the topology declared, and what every owned partition's
//! channel shares (the reply channels, the keeper of the topology, the watch on
//! a blocked connection).

use super::partition::Shared;
use crate::broker::open::{self, OpenError};
use crate::broker::{Cut, blocked};
use crate::consume::Consuming;
use crate::delivery::Context;
use crate::direct_replies::DirectReplies;
use lapin::{Channel, Connection};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// One broker connection, with what every partition's channel shares.
pub(super) struct Session {
    pub(super) connection: Arc<Connection>,
    pub(super) address: usize,
    pub(super) cut: Cut,
    pub(super) shared: Arc<Shared>,
    pub(super) lost: CancellationToken,
    keeper: tokio::task::JoinHandle<()>,
    _blocked: blocked::Watch,
}

impl Session {
    pub(super) async fn open(worker: &Consuming) -> Result<Session, OpenError> {
        let settings = &worker.settings.worker;
        let (connection, address, cut) = worker.addresses.connect_with_cut("qty-worker").await?;
        open::show_version(&worker.addresses, address, &worker.ctx.metrics);
        let connection = Arc::new(connection);
        worker.topology.declare(&connection).await?;
        let replies = open::reply_channel(&connection).await?;
        let ctx: &Arc<Context> = &worker.ctx;
        let blocked = blocked::watch(
            &connection,
            "consuming",
            ctx.health.clone(),
            ctx.metrics.clone(),
        );
        let lost = CancellationToken::new();
        let keeper = {
            let (topology, connection) = (worker.topology.clone(), connection.clone());
            let (health, stop) = (ctx.health.clone(), lost.clone());
            tokio::spawn(async move { topology.keep(&connection, &health, &stop).await })
        };
        let shared = Arc::new(Shared {
            ctx: ctx.clone(),
            replies,
            direct: Arc::new(DirectReplies::new(
                worker.addresses.clone(),
                ctx.health.clone(),
                ctx.metrics.clone(),
            )),
            lost: lost.clone(),
            // Each partition its own full window: split over the partitions, a
            // lone worker owning all of them drained 15% slower (bench/fleet.sh).
            prefetch: settings.prefetch,
            drain: Duration::from_secs(settings.drain_secs),
        });
        tracing::info!(
            node = worker.addresses.shown(address),
            "connected; claiming partitions"
        );
        Ok(Session {
            connection,
            address,
            cut,
            shared,
            lost,
            keeper,
            _blocked: blocked,
        })
    }

    /// Closes what is left: the reply channels and the connection.
    pub(super) async fn close(&self) {
        self.keeper.abort();
        self.lost.cancel();
        let limit = Duration::from_secs(2);
        tokio::time::timeout(limit, self.shared.direct.close())
            .await
            .ok();
        let replies: &Channel = &self.shared.replies;
        tokio::time::timeout(limit, async {
            replies.close(200, "worker stopping".into()).await.ok();
            self.connection
                .close(200, "worker stopping".into())
                .await
                .ok();
        })
        .await
        .ok();
    }
}
