//! All of the worker's SQL, one job a module:
//!
//! - [`adjust`](mod@adjust): the hot path, one `qty_adjust` call per batch;
//! - [`database`]: the pool, start-up (create, migrate), following a failover,
//!   and the writability probe behind `/readyz`;
//! - [`target`]: `DATABASE_URL` in libpq's multi-host form;
//! - [`errors`]: transient versus permanent, by SQLSTATE;
//! - [`operator`]: the operator commands' queries.
//!
//! The guard and the idempotency are decided inside PostgreSQL (the `qty_adjust`
//! function in `migrations/`); nothing here reads a quantity to compute a new one.

pub mod adjust;
pub mod database;
pub mod errors;
pub mod literal;
pub mod operator;
pub mod target;

pub use adjust::{Adjusted, Answer, adjust};
pub use database::{Database, PrepareError, Writability, open_prepared};
pub use errors::StoreError;
pub use operator::{
    Item, LedgerEntry, create_item, find_item, item_history, list_items, open_existing,
};
pub use target::{SessionAttrs, Target};

/// Applies the embedded migrations on `connection`, then closes it; safe to run
/// from several workers at once.
///
/// Everything happens in one transaction that holds a transaction-level advisory
/// lock: a second worker waits for the first to commit, and a migration that
/// fails rolls back all of it and releases the lock with it. (sqlx's own lock is
/// a session lock, which stays held on a pooled connection after a failure, and
/// which PgBouncer's transaction pooling would take and release on two different
/// server sessions.) The statements sqlx prepares on the way are deallocated
/// before the commit and the connection is closed, so none is left behind on a
/// server session that PgBouncer lends to someone else.
pub async fn migrate(mut connection: sqlx::PgConnection) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use sqlx::Connection as _;
    let mut migrator = sqlx::migrate!();
    migrator.set_locking(false);
    let mut tx = connection.begin().await?;
    sqlx::raw_sql(
        "select pg_advisory_xact_lock(hashtextextended('qty-worker migrations ' || current_database(), 0))",
    )
    .execute(&mut *tx)
    .await
    .context("cannot take the migration lock")?;
    // `run_direct` rather than `run`: `run` goes through `Acquire`, whose future
    // is not `Send` for every lifetime, which the spawned worker needs.
    migrator
        .run_direct(None, &mut *tx, false)
        .await
        .context("cannot apply database migrations")?;
    sqlx::raw_sql("deallocate all").execute(&mut *tx).await?;
    tx.commit().await?;
    connection.close().await.ok();
    Ok(())
}
