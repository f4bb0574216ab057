//! Parked requests (contract §3 and §5): a request whose item is locked
//! elsewhere is parked in the database and its delivery acked (`apply`). This
//! is the other half: judging them once the lock is gone, and answering them.
//!
//! Each worker runs one judge. It asks the database to judge the parked rows
//! of the queues it consumes (partitioned: its partitions; unpartitioned: the
//! request queue, which every worker of it shares, one judge at a time per
//! item); the database judges each item's rows in their order, and the apply
//! and the rows' retirement are one transaction. Then the judge publishes the
//! replies, waits for the broker's confirms, and only then retires the rows. A
//! crash in between leaves the rows owed, and a judge sends their replies again
//! once `REPLY_WITHIN` has passed: the obligation to answer is in the database.
//!
//! The judge looks when a request was just parked here, while the database
//! says requests wait, and otherwise every `LOOK_EVERY`, which is also how
//! often the gauges and `/readyz` learn what waits.

use crate::backoff::Backoff;
use crate::broker::Addresses;
use crate::broker::{blocked, open};
use crate::delivery::Context;
use crate::direct_replies::DirectReplies;
use crate::outcome::Verdict;
use crate::reply::{self, Delivered};
use crate::store::parked::{self, Judged, Sources, Summary};
use crate::store::{Database, StoreError};
use futures::future::join_all;
use lapin::{Channel, Connection};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// How often the judge looks when nothing was parked here, and refreshes what
/// waits.
const LOOK_EVERY: Duration = Duration::from_secs(2);
/// While requests wait for a lock: soon at first, then every 250 ms, so that
/// they are judged within a quarter of a second of the lock's end (a look is
/// one small query).
const LOCKED: Backoff = Backoff::new(Duration::from_millis(50), Duration::from_millis(250));
/// Through a database or broker outage.
const FAILING: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
/// Retiring answered rows is retried while its backoff is below this; past it,
/// they stay owed and are answered again.
const FAILING_FOR: Duration = Duration::from_secs(5);
/// Rows judged per transaction, at most.
const MOST: u32 = 1_000;
/// How long a judge has to confirm its replies before another sends them.
pub const REPLY_WITHIN: Duration = Duration::from_secs(10);
/// The items `/readyz` names.
const ITEMS_SHOWN: u32 = 5;

/// What waits, as last read, for the gauges and `/readyz`.
#[derive(Debug, Default)]
pub struct Waiting(Mutex<Option<(Summary, Instant)>>);

impl Waiting {
    fn set(&self, summary: Summary) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some((summary, Instant::now()));
    }

    /// The requests, the items, and the oldest one's wait as of `now`.
    pub fn gauges(&self, now: Instant) -> (u64, u64, Duration) {
        match &*self.0.lock().unwrap_or_else(|p| p.into_inner()) {
            Some((s, at)) if s.requests > 0 => (
                s.requests,
                s.items,
                s.oldest + now.saturating_duration_since(*at),
            ),
            _ => (0, 0, Duration::ZERO),
        }
    }

    /// The items most waited on, when any request waits: what `/readyz` names.
    pub fn items(&self) -> Option<(u64, Vec<(Uuid, u64)>)> {
        match &*self.0.lock().unwrap_or_else(|p| p.into_inner()) {
            Some((s, _)) if s.requests > 0 => Some((s.requests, s.top.clone())),
            _ => None,
        }
    }
}

/// What the judge needs.
pub struct Judge {
    pub db: Database,
    pub addresses: Arc<Addresses>,
    pub ctx: Arc<Context>,
    /// Which rows are this worker's, as the consuming loop changes them.
    pub sources: watch::Receiver<Sources>,
    /// Woken when a request is parked here.
    pub parked: Arc<Notify>,
    pub waiting: Arc<Waiting>,
}

/// The judge's own broker connection, for replies, opened when first needed.
struct Replies {
    connection: Connection,
    channel: Channel,
    direct: DirectReplies,
    lost: CancellationToken,
    /// Shows the broker blocking these replies (a memory or disk alarm).
    _blocked: blocked::Watch,
}

impl Judge {
    /// Judges and answers until `stop` fires. A stop does not cut a round short:
    /// its replies are owed.
    pub async fn run(mut self, stop: CancellationToken) {
        let mut replies: Option<Replies> = None;
        let mut locked = LOCKED;
        let mut failing = FAILING;
        // Looked long enough ago that the first round looks at once.
        let mut looked = Instant::now()
            .checked_sub(LOOK_EVERY)
            .unwrap_or_else(Instant::now);
        let mut due = true;
        // Whether the last look found anything parked or owed.
        let mut anything = true;
        while !stop.is_cancelled() {
            if looked.elapsed() >= LOOK_EVERY {
                looked = Instant::now();
                let fleet = self.sources.borrow().name.clone();
                match parked::summary(&self.db, &fleet, ITEMS_SHOWN).await {
                    Ok(summary) => {
                        anything = summary.requests > 0 || summary.owed > 0;
                        due |= anything;
                        self.waiting.set(summary);
                    }
                    Err(error) => tracing::debug!(%error, "cannot read what is parked"),
                }
            }
            // Whether to look again when the wait is over, rather than only at
            // the next LOOK_EVERY.
            let mut again = false;
            let mut wait = LOOK_EVERY.saturating_sub(looked.elapsed());
            if due {
                match self.pass(&mut replies).await {
                    // Nothing free to judge: while something waits (for a
                    // lock, or in another worker's queue), look again soon.
                    Ok(0) if anything => {
                        again = true;
                        wait = wait.min(locked.fail());
                    }
                    Ok(0) => {}
                    Ok(_) => {
                        locked.reset();
                        failing.reset();
                        // More may wait behind them: look again at once.
                        continue;
                    }
                    Err(error) => {
                        self.ctx.metrics.dependency_error(match error {
                            PassError::Database(_) => "database",
                            PassError::Broker(_) => "broker",
                        });
                        tracing::warn!(%error, "cannot judge parked requests; trying again");
                        again = true;
                        wait = failing.fail();
                    }
                }
            }
            tokio::select! {
                () = stop.cancelled() => break,
                // While requests wait for a lock, more parked behind them
                // change nothing: the next look is the backoff's.
                () = self.parked.notified(), if !again => {
                    due = true;
                    anything = true;
                }
                changed = self.sources.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    due = true;
                }
                () = tokio::time::sleep(wait) => due = again,
            }
        }
        if let Some(replies) = replies {
            replies.close().await;
        }
    }

    /// One round: judge what is free, answer it, retire it. Returns how many
    /// rows were answered.
    async fn pass(&self, replies: &mut Option<Replies>) -> Result<usize, PassError> {
        let sources = self.sources.borrow().clone();
        let judged = parked::judge(&self.db, &sources, MOST, REPLY_WITHIN).await?;
        if judged.is_empty() {
            return Ok(0);
        }
        fault_after_judging();
        for row in judged.iter().filter(|row| !row.resent) {
            self.ctx.metrics.record(&verdict(row));
        }
        let open = match replies {
            Some(open) if open.connection.status().connected() && !open.lost.is_cancelled() => open,
            _ => {
                if let Some(old) = replies.take() {
                    old.close().await;
                }
                replies.insert(Replies::open(&self.addresses, &self.ctx).await?)
            }
        };
        let channels = reply::Channels {
            session: &open.channel,
            direct: &open.direct,
        };
        let reporting = reply::Reporting {
            metrics: &self.ctx.metrics,
            refused_log: &self.ctx.refused_log,
        };
        let sent = join_all(judged.iter().map(|row| {
            let verdict = verdict(row);
            let (channels, reporting, lost) = (&channels, &reporting, &open.lost);
            async move {
                let delivered = reply::send_until_confirmed(
                    channels,
                    &self.ctx.exchange,
                    &row.route,
                    &verdict,
                    lost,
                    reporting,
                )
                .await;
                (row.seq, delivered)
            }
        }))
        .await;
        let confirmed: Vec<i64> = sent
            .iter()
            .filter(|(_, delivered)| *delivered == Delivered::Settled)
            .map(|(seq, _)| *seq)
            .collect();
        if !confirmed.is_empty() {
            self.retire(&confirmed).await?;
        }
        tracing::debug!(
            judged = judged.len(),
            replied = confirmed.len(),
            "parked requests judged and answered"
        );
        if confirmed.len() < judged.len() {
            // The rest stay owed and are sent again after REPLY_WITHIN.
            return Err(PassError::Broker(format!(
                "{} of {} replies not confirmed",
                judged.len() - confirmed.len(),
                judged.len()
            )));
        }
        Ok(judged.len())
    }
}

impl Judge {
    /// Retires rows whose replies are confirmed, through transient database
    /// failures: left owed, they would be answered twice.
    async fn retire(&self, seqs: &[i64]) -> Result<(), StoreError> {
        let mut backoff = FAILING;
        loop {
            match parked::replied(&self.db, seqs).await {
                Ok(()) => return Ok(()),
                Err(error) if error.is_transient() && backoff.peek() < FAILING_FOR => {
                    tracing::warn!(%error, "cannot retire answered parked requests; trying again");
                    tokio::time::sleep(backoff.fail()).await;
                }
                Err(error) => return Err(error),
            }
        }
    }
}

/// The reply a judged row gets: the same body a delivery answered at once gets.
fn verdict(row: &Judged) -> Verdict {
    Verdict {
        message_id: Some(row.message_id.clone()),
        item_id: Some(row.item_id),
        delta: Some(row.delta),
        outcome: row.outcome.clone(),
        replayed: row.replayed,
    }
}

#[derive(Debug, thiserror::Error)]
enum PassError {
    #[error("database: {0}")]
    Database(#[from] StoreError),
    #[error("broker: {0}")]
    Broker(String),
}

impl From<open::OpenError> for PassError {
    fn from(error: open::OpenError) -> PassError {
        PassError::Broker(error.to_string())
    }
}

impl Replies {
    async fn open(addresses: &Arc<Addresses>, ctx: &Context) -> Result<Replies, open::OpenError> {
        let (connection, _) = addresses
            .connect("qty-worker parked replies")
            .await
            .map_err(open::OpenError::from)?;
        let channel = open::reply_channel(&connection).await?;
        let lost = CancellationToken::new();
        let blocked = blocked::watch(
            &connection,
            "parked replies",
            ctx.health.clone(),
            ctx.metrics.clone(),
        );
        Ok(Replies {
            _blocked: blocked,
            connection,
            channel,
            direct: DirectReplies::new(addresses.clone(), ctx.health.clone(), ctx.metrics.clone()),
            lost,
        })
    }

    async fn close(self) {
        let limit = Duration::from_secs(2);
        tokio::time::timeout(limit, self.direct.close()).await.ok();
        tokio::time::timeout(limit, self.connection.close(200, "worker stopping".into()))
            .await
            .ok();
    }
}

/// With the `fault-injection` feature and `QTY_FAULT_ABORT_AFTER_JUDGING` set,
/// the process dies right after a judgement commits and before its replies go
/// out: the crash the outbox is for, on demand for the fault tests.
fn fault_after_judging() {
    #[cfg(feature = "fault-injection")]
    if std::env::var_os("QTY_FAULT_ABORT_AFTER_JUDGING").is_some() {
        tracing::error!("fault injection: dying between judging and replying");
        std::process::abort();
    }
}
