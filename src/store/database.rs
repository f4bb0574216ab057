//! The worker's handle on PostgreSQL: a pool whose new connections go to the
//! host [`Target`] last found usable, the start-up work (create, migrate), and
//! the writability probe behind `/readyz`.
//!
//! Nothing here connects at construction: the worker starts, serves `/readyz`
//! (503) and waits with backoff while the database is not there yet.

use super::schema::{self, SchemaError};
use super::target::{NoHost, Target, describe};
use super::{StoreError, literal};
use crate::health::DatabaseState;
use crate::settings::MigrateMode;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Connection as _, PgConnection};
use std::sync::Arc;
use std::time::Duration;

/// How long a transaction may wait for a pool connection before the wait counts
/// as the database being unavailable.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// A pool on the usable host of `DATABASE_URL`.
#[derive(Clone, Debug)]
pub struct Database {
    pub pool: PgPool,
    pub target: Arc<Target>,
}

/// Why the start-up work failed; it is retried.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error(transparent)]
    NoHost(#[from] NoHost),
    #[error("cannot create database {database:?}: {message}")]
    Create { database: String, message: String },
    #[error(transparent)]
    Schema(#[from] SchemaError),
}

impl Database {
    /// A pool that connects on first use, with at most `max_connections`.
    pub fn new(target: Target, max_connections: u32) -> Database {
        Database::on(Arc::new(target), max_connections)
    }

    /// Another pool on the same target (which hosts it has found included), so
    /// that work that must not queue behind the lanes' transactions (the
    /// fleet's leases) has connections of its own.
    pub fn sibling(&self, max_connections: u32) -> Database {
        Database::on(self.target.clone(), max_connections)
    }

    fn on(target: Arc<Target>, max_connections: u32) -> Database {
        let check = target.clone();
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            // No ping before every transaction: it cost a round trip (and two
            // wake-ups) each time, and a dead connection is found by the
            // transaction anyway, which closes it and retries (apply::retry).
            .test_before_acquire(false)
            // Keep only a connection that satisfies target_session_attrs: a host
            // can turn standby between two connections.
            .after_connect(move |connection, _| {
                let check = check.clone();
                Box::pin(async move {
                    if check.satisfied_by(connection).await? {
                        Ok(())
                    } else {
                        Err(sqlx::Error::Configuration(
                            "the host no longer satisfies target_session_attrs".into(),
                        ))
                    }
                })
            })
            .connect_lazy_with(target.options());
        Database { pool, target }
    }

    /// Finds the usable host and readies the schema there: `Apply` creates the
    /// database if it is missing and applies the migrations (only `run` and
    /// `migrate` do this); `Check` changes nothing and fails until the schema
    /// holds every migration and the role may use it.
    pub async fn prepare(&self, mode: MigrateMode) -> Result<(), PrepareError> {
        match mode {
            MigrateMode::Apply => {
                let admin = self.target.locate(Some("postgres")).await?;
                create_database_if_missing(admin, &self.target.database()).await?;
                schema::apply(self.target.locate(None).await?).await?;
            }
            MigrateMode::Check => {
                let mut connection = self.target.locate(None).await?;
                let checked = schema::check(&mut connection).await;
                connection.close().await.ok();
                checked?;
            }
        }
        self.pool.set_connect_options(self.target.options());
        Ok(())
    }

    /// Looks for the usable host again after the current one failed, and points
    /// new connections at it. Connections already open stay until they fail.
    pub async fn relocate(&self) -> Result<(), NoHost> {
        if !self.target.can_move() {
            return Ok(());
        }
        let before = self.target.current_host().to_owned();
        let found = self.target.locate(None).await?;
        found.close().await.ok();
        self.pool.set_connect_options(self.target.options());
        let now = self.target.current_host();
        if now != before {
            tracing::warn!(from = %before, to = %now, "database: new connections go to another host");
        }
        Ok(())
    }

    /// Whether the database accepts the worker's writes now, asked within
    /// `within`: writable, and `qty_adjust` executable by this role. A session
    /// found read-only is closed, so the next probe (and transaction) opens a
    /// fresh one: sessions keep the read-only default they started with.
    pub async fn writability(&self, within: Duration) -> DatabaseState {
        use sqlx::Row as _;
        let probe = async {
            let mut connection = self.pool.acquire().await?;
            let row = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "select current_setting('transaction_read_only') = 'off', \
                        coalesce(has_function_privilege(to_regprocedure({}), 'execute'), false)",
                literal::text(schema::ADJUST_FUNCTION)
            )))
            .fetch_one(&mut *connection)
            .await?;
            let (writable, executable): (bool, bool) = (row.try_get(0)?, row.try_get(1)?);
            if !writable {
                connection.close_on_drop();
            }
            Ok::<_, sqlx::Error>((writable, executable))
        };
        match tokio::time::timeout(within, probe).await {
            Ok(Ok((false, _))) => DatabaseState::ReadOnly,
            Ok(Ok((true, false))) => DatabaseState::Misconfigured(format!(
                "permission denied: EXECUTE on function {}",
                schema::ADJUST_FUNCTION
            )),
            Ok(Ok((true, true))) => DatabaseState::Writable,
            Ok(Err(error)) => match StoreError::from(error) {
                StoreError::ReadOnly(_) => DatabaseState::ReadOnly,
                _ => DatabaseState::Down,
            },
            Err(_) => DatabaseState::Down,
        }
    }
}

async fn create_database_if_missing(
    mut admin: PgConnection,
    name: &str,
) -> Result<(), PrepareError> {
    let failed = |error: sqlx::Error| PrepareError::Create {
        database: name.to_owned(),
        message: describe(&error),
    };
    let exists: bool = literal::scalar(
        &mut admin,
        &format!(
            "select exists (select 1 from pg_database where datname = {})",
            literal::text(name)
        ),
    )
    .await
    .map_err(failed)?;
    if !exists {
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        let created = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("create database {quoted}")))
            .execute(&mut admin)
            .await;
        match created {
            // Another worker created it first: that is just as good.
            Err(sqlx::Error::Database(e))
                if matches!(e.code().as_deref(), Some("42P04" | "23505")) => {}
            Err(error) => return Err(failed(error)),
            Ok(_) => tracing::info!(database = name, "created the database"),
        }
    }
    admin.close().await.ok();
    Ok(())
}

/// For `migrate` and tests: opens `url`, creates and migrates the
/// database once, without the worker's retries.
pub async fn open_prepared(url: &str, max_connections: u32) -> anyhow::Result<Database> {
    let database = Database::new(Target::parse(url)?, max_connections);
    database
        .prepare(MigrateMode::Apply)
        .await
        .map_err(|error| anyhow::anyhow!("{} ({})", error, database.target.shown))?;
    Ok(database)
}
