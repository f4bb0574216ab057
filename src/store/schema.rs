//! The schema: applying the embedded migrations (as the owner), checking that a
//! database holds every one of them (what a runtime role with no DDL rights does
//! at start, `QTY_MIGRATE=check`), and granting a runtime role exactly what `run`
//! needs in that mode (contract §6). Every statement is a simple query, as
//! PgBouncer's transaction pooling requires (see `literal`).

use super::literal;
use super::target::describe;
use sqlx::migrate::MigrateError;
use sqlx::{Connection as _, PgConnection, Row as _};

/// The one function `run` calls on the hot path.
pub const ADJUST_FUNCTION: &str =
    "qty_adjust(text[], uuid[], bigint[], text[], text[], text[], text[], text[], integer)";

/// The functions that judge parked requests, retire them and say what waits
/// (`store::parked`).
pub const PARKED_FUNCTIONS: [&str; 3] = [
    "qty_judge_parked(text[], text[], text, integer, integer)",
    "qty_parked_replied(bigint[])",
    "qty_parked_summary(text, integer)",
];

/// The functions a partitioned worker calls to share the partitions with its
/// fleet (`store::fleet`). With `ADJUST_FUNCTION`, all the runtime role may execute.
pub const FLEET_FUNCTIONS: [&str; 5] = [
    "qty_fleet_tick(text, text, integer, integer)",
    "qty_lease_claim(text, integer, text, integer)",
    "qty_lease_renew(text, text, integer[], bigint[], integer)",
    "qty_lease_release(text, text, integer, bigint)",
    "qty_fleet_leave(text, text)",
];

/// Why the schema is not usable yet. Each is retried by `run`: a migration or a
/// grant fixes it without a restart.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// `check`: migrations the binary knows are missing (versions, e.g. `3..4`).
    #[error("schema needs migrations {0}")]
    Behind(String),
    /// A privilege is missing: which, on what.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    #[error("cannot apply the migrations: {0}")]
    Failed(String),
}

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
pub async fn apply(mut connection: PgConnection) -> Result<(), SchemaError> {
    let mut migrator = sqlx::migrate!();
    migrator.set_locking(false);
    let mut tx = connection.begin().await.map_err(failed)?;
    sqlx::raw_sql(
        "select pg_advisory_xact_lock(hashtextextended('qty-worker migrations ' || current_database(), 0))",
    )
    .execute(&mut *tx)
    .await
    .map_err(failed)?;
    // `run_direct` rather than `run`: `run` goes through `Acquire`, whose future
    // is not `Send` for every lifetime, which the spawned worker needs.
    migrator
        .run_direct(None, &mut *tx, false)
        .await
        .map_err(migrate_failed)?;
    sqlx::raw_sql("deallocate all")
        .execute(&mut *tx)
        .await
        .map_err(failed)?;
    tx.commit().await.map_err(failed)?;
    connection.close().await.ok();
    Ok(())
}

/// Whether the database holds every embedded migration and the connected role
/// may do what `run` does: read the migrations table, execute `qty_adjust` and
/// the parked requests' functions.
pub async fn check(connection: &mut PgConnection) -> Result<(), SchemaError> {
    let row = query_one(
        connection,
        "select current_schema(), coalesce(has_schema_privilege(current_schema(), 'usage'), false), \
                to_regclass('_sqlx_migrations') is not null",
    )
    .await?;
    let schema: Option<String> = row.try_get(0).map_err(failed)?;
    let schema = schema.unwrap_or_else(|| "(none on the search_path)".into());
    if !row.try_get::<bool, _>(1).map_err(failed)? {
        return Err(SchemaError::PermissionDenied(format!(
            "USAGE on schema {schema}"
        )));
    }
    let known: Vec<i64> = sqlx::migrate!().iter().map(|m| m.version).collect();
    if !row.try_get::<bool, _>(2).map_err(failed)? {
        return Err(SchemaError::Behind(ranges(&known)));
    }
    let readable = query_one(
        connection,
        "select has_table_privilege('_sqlx_migrations', 'select')",
    )
    .await?;
    if !readable.try_get::<bool, _>(0).map_err(failed)? {
        return Err(SchemaError::PermissionDenied(
            "SELECT on table _sqlx_migrations".into(),
        ));
    }
    let applied: Vec<i64> =
        sqlx::raw_sql("select version from _sqlx_migrations where success order by version")
            .fetch_all(&mut *connection)
            .await
            .map_err(failed)?
            .iter()
            .map(|row| row.try_get(0))
            .collect::<Result<_, _>>()
            .map_err(failed)?;
    let missing: Vec<i64> = known.into_iter().filter(|v| !applied.contains(v)).collect();
    if !missing.is_empty() {
        return Err(SchemaError::Behind(ranges(&missing)));
    }
    for function in std::iter::once(&ADJUST_FUNCTION).chain(&PARKED_FUNCTIONS) {
        let granted = query_one(
            connection,
            &format!(
                "select coalesce(has_function_privilege(to_regprocedure({}), 'execute'), false)",
                literal::text(function)
            ),
        )
        .await?;
        if !granted.try_get::<bool, _>(0).map_err(failed)? {
            return Err(SchemaError::PermissionDenied(format!(
                "EXECUTE on function {function}"
            )));
        }
    }
    Ok(())
}

/// Grants `role` exactly what `run` with `QTY_MIGRATE=check` needs: connecting,
/// USAGE on the schema, reading the migrations table, executing `qty_adjust`,
/// the parked requests' functions and the fleet's. Nothing on `items`, `adjustments` or the fleet's
/// tables: the functions change them as their owner.
pub async fn grant_runtime_role(
    connection: &mut PgConnection,
    role: &str,
) -> Result<(), SchemaError> {
    let exists = query_one(
        connection,
        &format!(
            "select exists (select 1 from pg_roles where rolname = {})",
            literal::text(role)
        ),
    )
    .await?;
    if !exists.try_get::<bool, _>(0).map_err(failed)? {
        return Err(SchemaError::Failed(format!(
            "role {role:?} does not exist: create it first (create role … login)"
        )));
    }
    let role = literal::ident(role);
    let mut grants = format!(
        "do $$ begin \
           execute format('grant connect on database %I to {role}', current_database()); \
           execute format('grant usage on schema %I to {role}', current_schema()); \
         end $$; \
         grant select on table _sqlx_migrations to {role}; \
         grant execute on function {ADJUST_FUNCTION} to {role};"
    );
    for function in FLEET_FUNCTIONS.iter().chain(&PARKED_FUNCTIONS) {
        grants.push_str(&format!(" grant execute on function {function} to {role};"));
    }
    sqlx::raw_sql(sqlx::AssertSqlSafe(grants))
        .execute(&mut *connection)
        .await
        .map_err(failed)?;
    Ok(())
}

async fn query_one(
    connection: &mut PgConnection,
    sql: &str,
) -> Result<sqlx::postgres::PgRow, SchemaError> {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(connection)
        .await
        .map_err(failed)
}

/// A database error as one line: PostgreSQL's message alone (no "at line N" from
/// sqlx, no cause repeated), a missing privilege as what it is.
fn failed(error: sqlx::Error) -> SchemaError {
    let text = describe(&error);
    match &error {
        sqlx::Error::Database(db) if db.code().as_deref() == Some("42501") => {
            SchemaError::PermissionDenied(text)
        }
        _ => SchemaError::Failed(text),
    }
}

fn migrate_failed(error: MigrateError) -> SchemaError {
    match error {
        MigrateError::Execute(error) => failed(error),
        MigrateError::ExecuteMigration(error, version) => match failed(error) {
            SchemaError::Failed(text) => {
                SchemaError::Failed(format!("migration {version}: {text}"))
            }
            other => other,
        },
        other => SchemaError::Failed(other.to_string()),
    }
}

/// Versions as runs: `[1, 2, 3, 5]` → `1..3, 5`.
fn ranges(versions: &[i64]) -> String {
    let mut runs: Vec<(i64, i64)> = Vec::new();
    for &v in versions {
        match runs.last_mut() {
            Some((_, end)) if *end + 1 == v => *end = v,
            _ => runs.push((v, v)),
        }
    }
    runs.iter()
        .map(|&(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}..{b}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_versions_read_as_runs() {
        assert_eq!(ranges(&[1, 2, 3, 4]), "1..4");
        assert_eq!(ranges(&[4]), "4");
        assert_eq!(ranges(&[1, 2, 4, 6, 7]), "1..2, 4, 6..7");
    }
}
