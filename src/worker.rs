//! The worker: its settings checked, its HTTP listener, the lanes, and the
//! judge of parked requests; it waits for the database, then runs one of the
//! two consuming loops (`consume`) until it is stopped.

use crate::admit::Publishers;
use crate::apply::{Applier, Lanes};
use crate::backoff::Backoff;
use crate::broker::{Addresses, Topology};
use crate::consume::{self, Consuming};
use crate::delivery::Context;
use crate::health::{DatabaseState, Health};
use crate::http;
use crate::log_budget::LogBudget;
use crate::metrics::Metrics;
use crate::parked::{Judge, Waiting};
use crate::settings::Settings;
use crate::store::parked::Sources;
use crate::store::{Database, PrepareError, SchemaError, Target};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

/// Waits between attempts to reach a dependency at start and after a loss.
const BACKOFF: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));

/// Invalid requests (and, apart, replies given up) logged at warn per minute; the
/// rest are counted in the next warning (and always in the metrics).
const INVALID_WARNINGS_PER_MINUTE: u32 = 20;

/// A worker with its settings checked and its HTTP listener bound. It has not
/// touched either dependency yet: [`Worker::run_until_stopped`] waits for them.
pub struct Worker {
    consuming: Consuming,
    /// What waits parked, for the gauges and `/readyz`.
    waiting: Arc<Waiting>,
    /// Woken whenever a request is parked.
    parked: Arc<Notify>,
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
        let waiting = Arc::new(Waiting::default());
        let (http_addr, http) = http::serve(
            settings.worker.http_addr,
            health.clone(),
            metrics.clone(),
            db.clone(),
            waiting.clone(),
        )
        .await?;
        tracing::info!(%http_addr, "metrics and health listening");
        let parked = Arc::new(Notify::new());
        let applier = Applier::start(
            db.clone(),
            Lanes {
                lanes: settings.worker.db_pool as usize,
                batch_max: settings.worker.batch_max as usize,
                lock_wait: Duration::from_millis(settings.worker.lock_wait_ms),
            },
            health.clone(),
            metrics.clone(),
            parked.clone(),
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
        let queue = topology.queue.clone();
        let sources = Sources {
            fleet: match settings.worker.partitions {
                Some(_) => topology.partition_queues(),
                None => vec![queue.clone()],
            },
            mine: match settings.worker.partitions {
                Some(_) => Vec::new(),
                None => vec![queue.clone()],
            },
            name: queue,
        };
        Ok(Worker {
            consuming: Consuming {
                settings,
                ctx,
                db,
                addresses,
                topology,
                sources: watch::Sender::new(sources),
            },
            waiting,
            parked,
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
        let consuming = &self.consuming;
        let stop_judging = CancellationToken::new();
        let judge = tokio::spawn(
            Judge {
                db: consuming.db.sibling(1),
                addresses: consuming.addresses.clone(),
                ctx: consuming.ctx.clone(),
                sources: consuming.sources.subscribe(),
                parked: self.parked.clone(),
                waiting: self.waiting.clone(),
            }
            .run(stop_judging.clone()),
        );
        match consuming.settings.worker.partitions {
            Some(partitions) => {
                consume::partitions::run(consuming, partitions, &mut shutdown).await
            }
            None => consume::queue::run(consuming, &mut shutdown).await,
        }
        stop_judging.cancel();
        let drain = Duration::from_secs(consuming.settings.worker.drain_secs);
        if tokio::time::timeout(drain, judge).await.is_err() {
            tracing::warn!(
                "drain time is up while answering parked requests; their replies are sent again by the next judge"
            );
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
        let mode = self.consuming.settings.worker.migrate;
        loop {
            let error = match self.consuming.db.prepare(mode).await {
                Ok(()) => {
                    self.consuming.ctx.health.set_prepared();
                    tracing::info!(
                        host = self.consuming.db.target.current_host(),
                        "database ready"
                    );
                    return;
                }
                Err(error) => error,
            };
            self.consuming.ctx.metrics.dependency_error("database");
            let retry_in_ms = backoff.peek().as_millis() as u64;
            match &error {
                PrepareError::Schema(schema @ SchemaError::PermissionDenied(_)) => {
                    self.consuming
                        .ctx
                        .health
                        .set_database(DatabaseState::Misconfigured(schema.to_string()));
                    tracing::error!(error = %schema, url = %self.consuming.db.target.shown, retry_in_ms, "database: a privilege is missing; grant it (docs/security.md)");
                }
                PrepareError::Schema(schema @ SchemaError::Behind(_)) => {
                    self.consuming
                        .ctx
                        .health
                        .set_database(DatabaseState::Misconfigured(schema.to_string()));
                    tracing::warn!(error = %schema, url = %self.consuming.db.target.shown, retry_in_ms, "database: waiting for `qty-worker migrate`");
                }
                other => {
                    self.consuming.ctx.health.set_database(DatabaseState::Down);
                    tracing::warn!(error = %other, url = %self.consuming.db.target.shown, retry_in_ms, "database unavailable; waiting for it");
                }
            }
            tokio::time::sleep(backoff.fail()).await;
        }
    }
}
