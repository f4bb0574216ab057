//! All of the worker's SQL, and the line between transient and permanent database
//! errors. The guard and the idempotency are decided inside PostgreSQL (see the
//! `qty_adjust` function in `migrations/`); nothing here reads a quantity to compute
//! a new one.

use crate::decode::Request;
use crate::outcome::{Outcome, Reason};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};
use std::str::FromStr;
use std::time::Duration;
use uuid::Uuid;

/// A database failure, split by what the caller should do about it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Worth retrying: the server, the network or the pool is having a moment
    /// (connection loss, shutdown, serialization failure, deadlock, timeouts).
    #[error("database unavailable: {0}")]
    Transient(#[source] sqlx::Error),
    /// Retrying will not help: a bug, a schema mismatch, a broken invariant.
    #[error("database error: {0}")]
    Permanent(#[source] sqlx::Error),
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        if is_transient(&error) {
            StoreError::Transient(error)
        } else {
            StoreError::Permanent(error)
        }
    }
}

/// SQLSTATE classes 08 (connection) and 53 (resources), admin shutdown (57P01),
/// crash shutdown (57P02), cannot connect now (57P03), statement timeout or cancel
/// (57014), serialization failure (40001), deadlock (40P01), lock timeout (55P03);
/// and every failure below SQL: I/O, TLS, protocol, pool timeouts.
fn is_transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08")
                || code.starts_with("53")
                || matches!(
                    code.as_ref(),
                    "57P01" | "57P02" | "57P03" | "57014" | "40001" | "40P01" | "55P03"
                )
        }),
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        _ => false,
    }
}

/// Opens a pool on `database_url`, creating the database first if it is missing.
pub async fn connect(database_url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    use anyhow::Context as _;
    let options = PgConnectOptions::from_str(database_url)
        .context("DATABASE_URL is not a valid PostgreSQL URL")?;
    let unreachable = |error: &dyn std::fmt::Display| {
        anyhow::anyhow!(
            "cannot reach PostgreSQL at {}: {error} (is it running? set DATABASE_URL)",
            crate::settings::redact(database_url)
        )
    };
    create_database_if_missing(&options)
        .await
        .map_err(|e| unreachable(&format!("{e:#}")))?;
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options)
        .await
        .map_err(|e| unreachable(&e))
}

async fn create_database_if_missing(options: &PgConnectOptions) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let name = options.get_database().unwrap_or("postgres").to_owned();
    let mut admin: PgConnection = options.clone().database("postgres").connect().await?;
    let exists: bool =
        sqlx::query_scalar("select exists (select 1 from pg_database where datname = $1)")
            .bind(&name)
            .fetch_one(&mut admin)
            .await?;
    if !exists {
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        let created = sqlx::query(sqlx::AssertSqlSafe(format!("create database {quoted}")))
            .execute(&mut admin)
            .await;
        match created {
            // Another worker created it first: that is just as good.
            Err(sqlx::Error::Database(e))
                if matches!(e.code().as_deref(), Some("42P04" | "23505")) => {}
            other => {
                other.with_context(|| format!("cannot create database {quoted}"))?;
            }
        }
    }
    admin.close().await.ok();
    Ok(())
}

/// Applies the embedded migrations; safe to run from several workers at once.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    use anyhow::Context as _;
    sqlx::migrate!()
        .run(pool)
        .await
        .context("cannot apply database migrations")
}

/// The database's answer for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adjusted {
    pub outcome: Outcome,
    pub replayed: bool,
}

#[derive(sqlx::FromRow)]
struct AdjustRow {
    pos: i32,
    outcome: String,
    reason: Option<String>,
    qty_after: Option<i64>,
    replayed: bool,
}

/// Records and applies `requests` in order, in one transaction, one answer each.
pub async fn adjust(pool: &PgPool, requests: &[&Request]) -> Result<Vec<Adjusted>, StoreError> {
    let message_ids: Vec<&str> = requests.iter().map(|r| r.message_id.as_str()).collect();
    let item_ids: Vec<Uuid> = requests.iter().map(|r| r.item_id).collect();
    let deltas: Vec<i64> = requests.iter().map(|r| r.delta).collect();
    let rows: Vec<AdjustRow> = sqlx::query_as(
        "select pos, outcome, reason, qty_after, replayed from qty_adjust($1, $2, $3) order by pos",
    )
    .bind(&message_ids)
    .bind(&item_ids)
    .bind(&deltas)
    .fetch_all(pool)
    .await?;
    if rows.len() != requests.len()
        || rows
            .iter()
            .enumerate()
            .any(|(i, r)| r.pos as usize != i + 1)
    {
        return Err(StoreError::Permanent(sqlx::Error::Protocol(format!(
            "qty_adjust answered {} rows for {} requests",
            rows.len(),
            requests.len()
        ))));
    }
    rows.into_iter().map(AdjustRow::into_adjusted).collect()
}

impl AdjustRow {
    fn into_adjusted(self) -> Result<Adjusted, StoreError> {
        let outcome = match (
            self.outcome.as_str(),
            self.reason.as_deref(),
            self.qty_after,
        ) {
            ("applied", None, Some(qty)) => Some(Outcome::Applied { qty }),
            ("not_found", None, None) => Some(Outcome::NotFound),
            ("rejected", Some(code), None) => Reason::from_code(code).map(Outcome::Rejected),
            _ => None,
        };
        let outcome = outcome.ok_or_else(|| {
            StoreError::Permanent(sqlx::Error::Protocol(format!(
                "qty_adjust answered an impossible outcome {:?}/{:?}/{:?}",
                self.outcome, self.reason, self.qty_after
            )))
        })?;
        Ok(Adjusted {
            outcome,
            replayed: self.replayed,
        })
    }
}

/// Whether the database answers a trivial query within `within`.
pub async fn ping(pool: &PgPool, within: Duration) -> bool {
    let query = sqlx::query("select 1").execute(pool);
    matches!(tokio::time::timeout(within, query).await, Ok(Ok(_)))
}

/// An item as the operator CLI shows it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, serde::Serialize)]
pub struct Item {
    pub id: Uuid,
    pub qty: i64,
}

pub async fn create_item(pool: &PgPool, id: Uuid, qty: i64) -> Result<Item, sqlx::Error> {
    sqlx::query_as("insert into items (id, qty) values ($1, $2) returning id, qty")
        .bind(id)
        .bind(qty)
        .fetch_one(pool)
        .await
}

pub async fn list_items(pool: &PgPool, limit: i64) -> Result<Vec<Item>, sqlx::Error> {
    sqlx::query_as("select id, qty from items order by created_at, id limit $1")
        .bind(limit)
        .fetch_all(pool)
        .await
}

/// One ledger row, for `qty-worker ledger`.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct LedgerEntry {
    pub message_id: String,
    pub delta: i64,
    pub outcome: String,
    pub reason: Option<String>,
    pub qty_after: Option<i64>,
    pub recorded_at: String,
}

/// An item's recorded adjustments, newest first.
pub async fn item_history(
    pool: &PgPool,
    item: Uuid,
    limit: i64,
) -> Result<Vec<LedgerEntry>, sqlx::Error> {
    sqlx::query_as(
        "select message_id, delta, outcome, reason, qty_after,
                to_char(recorded_at at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') as recorded_at
           from adjustments where item_id = $1 order by recorded_at desc limit $2",
    )
    .bind(item)
    .bind(limit)
    .fetch_all(pool)
    .await
}

pub async fn find_item(pool: &PgPool, id: Uuid) -> Result<Option<Item>, sqlx::Error> {
    sqlx::query_as("select id, qty from items where id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
}
