//! The operator commands' queries. They open an existing, migrated database and
//! never create or migrate one: a typo in `DATABASE_URL` must not leave a new
//! database behind.

use super::target::{Target, describe};
use sqlx::postgres::{PgPool, PgPoolOptions};
use uuid::Uuid;

/// Opens the database of `url` for an operator command. Refuses, with a message
/// that says what to do, a database that does not exist or is not migrated.
pub async fn open_existing(url: &str) -> anyhow::Result<PgPool> {
    let target = Target::parse(url)?;
    let connection = target.locate(None).await.map_err(|error| {
        anyhow::anyhow!(
            "cannot open the database {}: {} (check DATABASE_URL; `qty-worker migrate` creates a new one)",
            target.shown,
            error.0
        )
    })?;
    drop(connection);
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect_with(target.options())
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot open the database at {}: {}",
                target.shown,
                describe(&e)
            )
        })?;
    let migrated: bool = sqlx::query_scalar("select to_regclass('public.adjustments') is not null")
        .fetch_one(&pool)
        .await?;
    anyhow::ensure!(
        migrated,
        "database {:?} has no qty-worker schema (run `qty-worker migrate` first, or check DATABASE_URL)",
        target.database()
    );
    Ok(pool)
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

pub async fn find_item(pool: &PgPool, id: Uuid) -> Result<Option<Item>, sqlx::Error> {
    sqlx::query_as("select id, qty from items where id = $1")
        .bind(id)
        .fetch_optional(pool)
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
    /// The request's validated `user_id`; `None` when it had none.
    pub publisher: Option<String>,
    pub recorded_at: String,
}

/// An item's recorded adjustments, newest first.
pub async fn item_history(
    pool: &PgPool,
    item: Uuid,
    limit: i64,
) -> Result<Vec<LedgerEntry>, sqlx::Error> {
    sqlx::query_as(
        "select message_id, delta, outcome, reason, qty_after, publisher,
                to_char(recorded_at at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') as recorded_at
           from adjustments where item_id = $1 order by recorded_at desc limit $2",
    )
    .bind(item)
    .bind(limit)
    .fetch_all(pool)
    .await
}
