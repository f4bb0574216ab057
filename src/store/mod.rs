//! All of the worker's SQL, one job a module:
//!
//! - [`adjust`](mod@adjust): the hot path, one `qty_adjust` call per batch;
//! - [`database`]: the pool, start-up (create, migrate), following a failover,
//!   and the writability probe behind `/readyz`;
//! - [`target`]: `DATABASE_URL` in libpq's multi-host form;
//! - [`schema`]: migrations applied (owner) or checked (runtime role), and the
//!   runtime role's grants;
//! - [`literal`]: values escaped into SQL, for PgBouncer-safe simple queries;
//! - [`errors`]: transient versus permanent, by SQLSTATE;
//! - [`fleet`]: membership and partition leases of a partitioned fleet;
//! - [`parked`]: requests parked for a locked item: judged, retired, listed;
//! - [`operator`]: the operator commands' queries.
//!
//! The guard and the idempotency are decided inside PostgreSQL (the `qty_adjust`
//! function in `migrations/`); nothing here reads a quantity to compute a new one.

pub mod adjust;
pub mod database;
pub mod errors;
pub mod fleet;
pub mod literal;
pub mod operator;
pub mod parked;
pub mod schema;
pub mod target;

pub use adjust::{Adjusted, Answer, Incoming, Parking, adjust};
pub use database::{Database, PrepareError, open_prepared};
pub use errors::StoreError;
pub use operator::{
    Item, LedgerEntry, create_item, find_item, item_history, list_items, open_existing,
};
pub use schema::SchemaError;
pub use target::{SessionAttrs, Target};
