//! The fault suite (contract section 5): real worker processes, driven through
//! the broker, with faults injected while they work. After each run the harness
//! checks that nothing was lost, applied twice or left unanswered.
//!
//! Tests that disturb shared services (restarts, closing every broker
//! connection) would break tests running beside them, so every test here holds
//! one lock and they run one at a time.

mod harness;
#[path = "../api/helpers.rs"]
#[allow(dead_code)]
mod helpers;
mod invariants;
mod proxy;
mod publisher;
mod services;

use harness::Scenario;
use services::{Service, close_all_broker_connections};
use std::time::Duration;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const GENEROUS: Duration = Duration::from_secs(120);

fn assert_clean(verdicts: harness::Verdicts) {
    assert!(
        verdicts.violations.is_empty(),
        "invariants broken: {:#?}",
        verdicts.violations
    );
    assert!(
        verdicts.messages > 0 && verdicts.replies >= verdicts.messages,
        "{verdicts:?}"
    );
}

#[tokio::test]
async fn a_worker_killed_mid_stream_and_restarted_loses_nothing_and_applies_nothing_twice() {
    let _serial = SERIAL.lock().await;
    let mut s = Scenario::new("sigkill", 5, 1_000).await;
    s.start_worker().await;
    let publisher = s.spawn_publisher(s.plan(1_500, 1), 1_000);
    s.wait_recorded(300, GENEROUS).await;
    s.kill_worker(0);
    s.start_worker().await;
    publisher.await.expect("publisher");
    s.wait_recorded(1_500, GENEROUS).await;
    assert_clean(s.finish().await);
}

#[tokio::test]
async fn terminated_database_sessions_are_retried_without_loss() {
    let _serial = SERIAL.lock().await;
    let mut s = Scenario::new("pgterm", 5, 1_000).await;
    s.start_worker().await;
    let publisher = s.spawn_publisher(s.plan(1_500, 2), 750);
    for round in 1..=3 {
        s.wait_recorded(300 * round, GENEROUS).await;
        assert!(
            s.terminate_db_sessions().await > 0,
            "the worker held no session to terminate"
        );
    }
    publisher.await.expect("publisher");
    s.wait_recorded(1_500, GENEROUS).await;
    assert_clean(s.finish().await);
}

#[tokio::test]
async fn the_broker_closing_every_connection_is_survived() {
    let _serial = SERIAL.lock().await;
    let mut s = Scenario::new("closeall", 5, 1_000).await;
    s.start_worker().await;
    let publisher = s.spawn_publisher(s.plan(1_500, 3), 750);
    for round in 1..=2 {
        s.wait_recorded(400 * round, GENEROUS).await;
        close_all_broker_connections("fault test");
    }
    publisher.await.expect("publisher");
    s.wait_recorded(1_500, GENEROUS).await;
    s.wait_ready(0).await;
    assert_clean(s.finish().await);
}

#[tokio::test]
async fn cut_and_stalled_links_to_both_servers_are_survived() {
    let _serial = SERIAL.lock().await;
    let mut s = Scenario::new("links", 5, 1_000).await;
    s.start_worker().await;
    let publisher = s.spawn_publisher(s.plan(2_000, 4), 500);
    s.wait_recorded(200, GENEROUS).await;
    s.amqp_proxy.cut();
    s.wait_recorded(500, GENEROUS).await;
    s.pg_proxy.cut();
    s.wait_recorded(800, GENEROUS).await;
    // Stalled past two heartbeats (the test URL sets 2 s), the broker link is
    // declared dead and rebuilt.
    s.amqp_proxy.stall();
    wait_for_readyz(&s, 503, "broker").await;
    s.amqp_proxy.resume();
    s.wait_recorded(1_100, GENEROUS).await;
    // A database stall is not detected (no keepalive that short); its length is
    // the fault itself: the transactions in flight simply wait it out.
    s.pg_proxy.stall();
    tokio::time::sleep(Duration::from_secs(2)).await;
    s.pg_proxy.resume();
    publisher.await.expect("publisher");
    s.wait_recorded(2_000, GENEROUS).await;
    assert_clean(s.finish().await);
}

#[tokio::test]
async fn readiness_follows_each_dependency_down_and_back() {
    let _serial = SERIAL.lock().await;
    let mut s = Scenario::new("readyz", 1, 10).await;
    s.start_worker().await;
    for (name, proxy) in [("database", &s.pg_proxy), ("broker", &s.amqp_proxy)] {
        proxy.refuse();
        wait_for_readyz(&s, 503, name).await;
        proxy.resume();
        wait_for_readyz(&s, 200, name).await;
    }
    let addr = format!("127.0.0.1:{}", s.workers[0].http_port)
        .parse()
        .expect("address");
    let metrics = helpers::http_get(addr, "/metrics").await.1;
    assert!(
        metrics.contains(r#"qty_worker_reconnects_total{dependency="broker"} 1"#),
        "{metrics}"
    );
    assert_clean_or_empty(s.finish().await);
}

async fn wait_for_readyz(s: &Scenario, want: u16, dependency: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if s.readyz(0).await == Some(want) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz never said {want} with the {dependency} link changed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn assert_clean_or_empty(verdicts: harness::Verdicts) {
    assert!(
        verdicts.violations.is_empty(),
        "invariants broken: {:#?}",
        verdicts.violations
    );
}

#[tokio::test]
async fn a_real_rabbitmq_restart_is_survived() {
    let _serial = SERIAL.lock().await;
    let mut s = Scenario::new("rmqrestart", 5, 1_000).await;
    s.start_worker().await;
    let publisher = s.spawn_publisher(s.plan(1_500, 5), 500);
    s.wait_recorded(300, GENEROUS).await;
    drop(Service::Rabbitmq.restart());
    publisher.await.expect("publisher");
    s.wait_recorded(1_500, GENEROUS).await;
    s.wait_ready(0).await;
    assert_clean(s.finish().await);
}

#[tokio::test]
async fn a_real_postgres_restart_is_survived() {
    let _serial = SERIAL.lock().await;
    let mut s = Scenario::new("pgrestart", 5, 1_000).await;
    s.start_worker().await;
    let publisher = s.spawn_publisher(s.plan(1_500, 6), 500);
    s.wait_recorded(300, GENEROUS).await;
    drop(Service::Postgres.restart());
    s.pool.close().await;
    s.pool = sqlx::PgPool::connect(&s.names.database_url())
        .await
        .expect("reconnect the harness");
    publisher.await.expect("publisher");
    s.wait_recorded(1_500, GENEROUS).await;
    assert_clean(s.finish().await);
}

#[tokio::test]
async fn two_workers_share_the_queue_and_survive_one_being_killed() {
    let _serial = SERIAL.lock().await;
    let mut s = Scenario::new("twoworkers", 3, 1_000).await;
    s.start_worker().await;
    s.start_worker().await;
    let publisher = s.spawn_publisher(s.plan(2_000, 7), 1_000);
    s.wait_recorded(500, GENEROUS).await;
    s.kill_worker(0);
    s.start_worker().await;
    publisher.await.expect("publisher");
    s.wait_recorded(2_000, GENEROUS).await;
    assert_clean(s.finish().await);
}

#[cfg(feature = "fault-injection")]
#[tokio::test]
async fn a_poison_message_is_dead_lettered_without_blocking_the_rest() {
    let _serial = SERIAL.lock().await;
    let mut s = Scenario::new("poison", 3, 1_000).await;
    s.start_worker().await;
    s.publish_poison("p-1").await;
    let publisher = s.spawn_publisher(s.plan(500, 8), 1_000);
    publisher.await.expect("publisher");
    s.wait_recorded(500, GENEROUS).await;
    assert_clean(s.finish().await);
}
