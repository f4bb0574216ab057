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
pub mod operator;
pub mod target;

pub use adjust::{Adjusted, Answer, adjust};
pub use database::{Database, PrepareError, Writability, open_prepared};
pub use errors::StoreError;
pub use operator::{
    Item, LedgerEntry, create_item, find_item, item_history, list_items, open_existing,
};
pub use target::{SessionAttrs, Target};

/// Applies the embedded migrations; safe to run from several workers at once.
pub async fn migrate(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    use anyhow::Context as _;
    sqlx::migrate!()
        .run(pool)
        .await
        .context("cannot apply database migrations")
}
