//! The worker behind PgBouncer in transaction pooling mode, with PgBouncer's
//! defaults (contract §9): a server session is lent for one transaction at a
//! time, and no prepared statement survives into the next. PgBouncer here has
//! fewer server sessions than the workers have clients, so the clients'
//! transactions really share them. It runs on a port of the test's own, in front
//! of the shared PostgreSQL, which it only connects to.

use crate::{GENEROUS, SERIAL, assert_clean};
use qty_test_support::faults::Scenario;
use qty_test_support::pgbouncer::{self, PgBouncer};
use std::process::Command;

/// PgBouncer, or `None` after saying the test is skipped. CI installs it, and
/// there a missing PgBouncer fails the test instead.
fn pgbouncer_or_skip() -> bool {
    if pgbouncer::available() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "PgBouncer is not installed ({}); CI must install it",
        pgbouncer::BINARY
    );
    eprintln!("skipped: no PgBouncer at {}", pgbouncer::BINARY);
    false
}

const NO_DATABASE_ERRORS: &str = r#"qty_worker_dependency_errors_total{dependency="database"} 0"#;
/// A statement PostgreSQL refuses (a missing prepared statement) is a permanent
/// error: its request is handed back, not retried as an outage.
const NOTHING_REQUEUED: &str = "qty_worker_deliveries_requeued_total 0";

#[tokio::test]
async fn behind_pgbouncer_every_request_is_applied_once_without_a_database_error_and_a_restart_is_survived()
 {
    let _serial = SERIAL.lock().await;
    if !pgbouncer_or_skip() {
        return;
    }
    let mut s = Scenario::new("pgbouncer", 5, 1_000).await;
    let bouncer = PgBouncer::start(s.servers.postgres_addr(), 2);
    s.worker_database_url = bouncer.url(&s.names.database);
    // Two workers: four lanes and two readiness probes over two server sessions.
    s.start_worker().await;
    s.start_worker().await;
    // One item locked for a while: its requests are parked, then judged,
    // through PgBouncer too.
    let lock = s.lock_item(s.items[0].0).await;
    let publisher = s.spawn_publisher(s.plan(3_000, 31), 500);
    s.wait_parked(50, GENEROUS).await;
    lock.rollback().await.expect("release the row");
    s.wait_recorded(1_200, GENEROUS).await;
    for worker in 0..2 {
        let metrics = s.metrics(worker).await;
        assert!(
            metrics.contains(NO_DATABASE_ERRORS) && metrics.contains(NOTHING_REQUEUED),
            "worker {worker} met a database error before any fault:\n{metrics}\nPgBouncer's log:\n{}",
            bouncer.log()
        );
    }
    bouncer.restart();
    publisher.await.expect("publisher");
    s.wait_recorded(3_000, GENEROUS).await;
    for worker in &s.workers {
        let log = std::fs::read_to_string(&worker.log).expect("worker log");
        for symptom in ["prepared statement", "bind message", "advisory"] {
            assert!(
                !log.contains(symptom),
                "{:?} mentions {symptom:?}:\n{log}",
                worker.log
            );
        }
    }
    assert_clean(s.finish().await);
}

#[tokio::test]
async fn two_migrations_at_once_through_pgbouncer_create_one_schema() {
    let _serial = SERIAL.lock().await;
    if !pgbouncer_or_skip() {
        return;
    }
    let names = qty_test_support::app::Names::random();
    let _cleanup = names.removed_on_drop();
    let bouncer = PgBouncer::start("127.0.0.1:5432".parse().expect("address"), 1);
    let url = bouncer.url(&names.database);
    let running: Vec<_> = (0..2)
        .map(|_| {
            Command::new(env!("CARGO_BIN_EXE_qty-worker"))
                .args(["migrate", "--log-format", "json"])
                .env("DATABASE_URL", &url)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("run qty-worker migrate")
        })
        .collect();
    for child in running {
        let output = child.wait_with_output().expect("qty-worker migrate ends");
        assert!(
            output.status.success(),
            "migrate through PgBouncer failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let pool = sqlx::PgPool::connect(&names.database_url())
        .await
        .expect("connect directly");
    let (applied, migrations): (i64, i64) =
        sqlx::query_as("select count(*), count(*) filter (where success) from _sqlx_migrations")
            .fetch_one(&pool)
            .await
            .expect("read the migrations table");
    assert_eq!(applied, migrations);
    assert_eq!(applied as usize, sqlx::migrate!().iter().count());
    pool.close().await;
}
