//! Least privilege on PostgreSQL (contract §1, §6): the worker runs as a role
//! with no privilege on the tables, granted by `qty-worker migrate
//! --runtime-role`, with `--migrate check`. Roles are the whole server's, so
//! these tests run on a PostgreSQL of their own.

use qty_test_support::app::{Names, RunningWorker, TestApp, WAIT, http_get};
use qty_test_support::eventually;
use qty_test_support::postgres::Postgres;
use qty_worker::settings::MigrateMode;
use sqlx::Connection as _;
use std::process::Command;

const ROLE: &str = "qty_runtime";

/// A server of the test's own with the runtime role, or `None` without binaries.
fn server_with_runtime_role() -> Option<Postgres> {
    if qty_test_support::postgres::bin_dir().is_none() {
        eprintln!("skipped: no PostgreSQL binaries");
        return None;
    }
    let server = Postgres::start();
    server.query(&format!("create role {ROLE} login"));
    Some(server)
}

fn migrate(database_url: &str, runtime_role: &str) {
    let output = Command::new(env!("CARGO_BIN_EXE_qty-worker"))
        .args(["migrate", "--runtime-role", runtime_role])
        .env("DATABASE_URL", database_url)
        .env("QTY_LOG_FORMAT", "json")
        .output()
        .expect("run qty-worker migrate");
    assert!(
        output.status.success(),
        "migrate --runtime-role failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn runtime_url(server: &Postgres, database: &str) -> String {
    format!("postgres://{ROLE}@127.0.0.1:{}/{database}", server.port)
}

async fn wait_for_readyz(worker: &RunningWorker, status: u16, line: &str) {
    eventually(
        &format!("/readyz to answer {status} with {line:?}"),
        WAIT,
        || async {
            match http_get(worker.http_addr, "/readyz").await {
                (s, body) if s == status && body.contains(line) => Ok(()),
                other => Err(other),
            }
        },
    )
    .await;
}

#[tokio::test]
async fn the_runtime_role_serves_the_contract_but_cannot_change_a_table_directly() {
    let Some(server) = server_with_runtime_role() else {
        return;
    };
    let names = Names::on_own_servers(
        format!("postgres://postgres@127.0.0.1:{}", server.port),
        qty_test_support::app::amqp_url().into(),
    );
    migrate(&names.database_url(), ROLE);
    let runtime = runtime_url(&server, &names.database);
    let mut app = TestApp::spawn_on(names, |settings| {
        settings.connections.database.database_url = runtime.clone();
        settings.worker.migrate = MigrateMode::Check;
    })
    .await;

    let item = app.create_item(5).await;
    app.adjust("rt-1", item, -2).await;
    let reply = app.next_reply().await;
    assert_eq!(
        (reply.outcome(), reply.body["qty"].as_i64()),
        ("applied", Some(3))
    );
    app.adjust("rt-1", item, -2).await;
    assert_eq!(
        app.next_reply().await.raw,
        reply.raw,
        "a duplicate gets the stored reply"
    );

    // Parked and judged as the runtime role, through the owner's functions.
    let lock = app.lock_row(item).await;
    app.adjust("rt-parked", item, 1).await;
    qty_test_support::eventually("rt-parked parked", WAIT, || async {
        match sqlx::query_scalar::<_, i64>("select count(*) from parked")
            .fetch_one(&app.pool)
            .await
        {
            Ok(1) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    lock.rollback().await.expect("release the lock");
    let reply = app.next_reply().await;
    assert_eq!(
        (reply.outcome(), reply.body["qty"].as_i64()),
        ("applied", Some(4))
    );
    app.adjust("rt-1b", item, -1).await;
    assert_eq!(app.next_reply().await.body["qty"].as_i64(), Some(3));

    let mut direct = sqlx::PgConnection::connect(&runtime)
        .await
        .expect("connect as the runtime role");
    for statement in [
        "select * from parked".to_owned(),
        "delete from parked".to_owned(),
        "update items set qty = 1000000".to_owned(),
        format!(
            "insert into adjustments (message_id, item_id, delta, outcome, qty_after) values ('forged', '{item}', 1, 'applied', 1)"
        ),
        "delete from adjustments".to_owned(),
        "select qty from items".to_owned(),
    ] {
        let refused = sqlx::raw_sql(sqlx::AssertSqlSafe(statement.clone()))
            .execute(&mut direct)
            .await
            .expect_err("the runtime role must be refused");
        let code = refused.as_database_error().and_then(|e| e.code());
        assert_eq!(code.as_deref(), Some("42501"), "{statement}: {refused}");
    }
    assert_eq!(app.qty(item).await, 3);

    // A revoked EXECUTE is a configuration problem: 503 naming it, requests wait
    // (nothing is dead-lettered), and a grant ends it without a restart.
    let function = qty_worker::store::schema::ADJUST_FUNCTION;
    server.query_in(
        &app.names.database,
        &format!("revoke execute on function {function} from {ROLE}"),
    );
    wait_for_readyz(&app.worker, 503, "database: permission denied").await;
    app.adjust("rt-2", item, -1).await;
    server.query_in(
        &app.names.database,
        &format!("grant execute on function {function} to {ROLE}"),
    );
    let reply = app.next_reply().await;
    assert_eq!(
        (reply.outcome(), reply.body["qty"].as_i64()),
        ("applied", Some(2))
    );
    wait_for_readyz(&app.worker, 200, "database: up").await;
    let (_, metrics) = app.get("/metrics").await;
    assert!(
        metrics.contains("qty_worker_deliveries_requeued_total 0"),
        "a request was handed back while the privilege was missing:\n{metrics}"
    );
}

#[tokio::test]
async fn check_waits_for_a_missing_migration_and_serves_once_it_is_applied() {
    let Some(server) = server_with_runtime_role() else {
        return;
    };
    let names = Names::on_own_servers(
        format!("postgres://postgres@127.0.0.1:{}", server.port),
        qty_test_support::app::amqp_url().into(),
    );
    // The schema one migration behind the binary, as the previous release left it.
    server.query(&format!("create database {}", names.database));
    let latest = sqlx::migrate!()
        .iter()
        .map(|m| m.version)
        .max()
        .expect("migrations");
    let behind = sqlx::migrate::Migrator::with_migrations(
        sqlx::migrate!()
            .iter()
            .filter(|m| m.version < latest)
            .cloned()
            .collect(),
    );
    let mut owner = sqlx::PgConnection::connect(&names.database_url())
        .await
        .expect("connect as the owner");
    behind
        .run(&mut owner)
        .await
        .expect("migrate all but the latest");
    owner.close().await.ok();
    server.query_in(
        &names.database,
        &format!(
            "grant usage on schema public to {ROLE}; grant select on _sqlx_migrations to {ROLE}"
        ),
    );

    let mut settings = names.settings();
    settings.connections.database.database_url = runtime_url(&server, &names.database);
    settings.worker.migrate = MigrateMode::Check;
    let mut worker = RunningWorker::start(settings);
    wait_for_readyz(
        &worker,
        503,
        &format!("database: schema needs migrations {latest}"),
    )
    .await;
    migrate(&names.database_url(), ROLE);
    wait_for_readyz(&worker, 200, "database: up").await;
    worker.stop().expect("the worker stops cleanly");
    names.remove_all();
}

#[tokio::test]
async fn a_failed_migration_leaves_no_lock_behind_for_the_next_one() {
    let Some(server) = server_with_runtime_role() else {
        return;
    };
    let database = "broken";
    server.query(&format!("create database {database}"));
    // Something that makes the first migration fail: an items table of another shape.
    server.query_in(database, "create table items (id int)");
    let url = format!("postgres://postgres@127.0.0.1:{}/{database}", server.port);
    // A worker that keeps failing to migrate (and retrying) …
    let mut settings = Names::random().settings();
    settings.connections.database.database_url = url.clone();
    let mut worker = RunningWorker::start(settings);
    wait_for_readyz(&worker, 503, "database: down").await;
    // … must not keep another from trying: `migrate` fails at once, it does not hang.
    let started = std::time::Instant::now();
    let output = tokio::task::spawn_blocking(move || {
        Command::new("timeout")
            .args(["60", env!("CARGO_BIN_EXE_qty-worker"), "migrate"])
            .env("DATABASE_URL", &url)
            .env("QTY_LOG_FORMAT", "json")
            .output()
            .expect("run qty-worker migrate")
    })
    .await
    .expect("join");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("migration 1"), "{stderr}");
    assert!(
        !stderr.contains("at line"),
        "sqlx's location reached the message: {stderr}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(50),
        "migrate waited for a lock"
    );
    worker.stop().expect("the worker stops cleanly");
}
