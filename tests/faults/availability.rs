//! Availability in a production topology (contract §1 and §5): a database that
//! turns read-only, a failover to a standby, a cluster node lost, a database that
//! comes up after the worker. Each runs on servers of the scenario's own, and
//! checks the same invariants as every fault run.

use crate::{GENEROUS, SERIAL, assert_clean, wait_for_readyz};
use qty_test_support::faults::{Own, Scenario};
use std::time::{Duration, Instant};

/// Waits until `rows` more requests are recorded than when it was called.
async fn wait_for_progress(s: &Scenario, rows: usize, within: Duration) -> Duration {
    let from = s.recorded().await;
    let started = Instant::now();
    s.wait_recorded(from + rows, within).await;
    started.elapsed()
}

#[tokio::test]
async fn a_database_read_only_for_20_s_dead_letters_nothing_and_catches_up() {
    let _serial = SERIAL.lock().await;
    let Some(mut s) = Scenario::on("readonly", 10, 1_000, Own::postgres()).await else {
        return;
    };
    s.start_worker().await;
    let publisher = s.spawn_publisher(s.plan(3_500, 21), 100);
    s.wait_recorded(300, GENEROUS).await;
    // What a client still connected to a demoted primary sees: every new session
    // refuses writes with SQLSTATE 25006.
    let database = s.names.database.clone();
    s.primary().query(&format!(
        "alter database {database} set default_transaction_read_only = on"
    ));
    s.primary().query(&format!(
        "select pg_terminate_backend(pid) from pg_stat_activity where datname = '{database}'"
    ));
    let body = wait_for_readyz(&s, 503, "database: read-only").await;
    assert!(body.contains("database: read-only"), "{body}");
    let during = s.recorded().await;
    // The fault's length is the fault itself: nothing observable ends it.
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert!(
        s.recorded().await <= during + 5,
        "requests were recorded while the database refused writes"
    );
    s.primary().query(&format!(
        "alter database {database} reset default_transaction_read_only"
    ));
    wait_for_readyz(&s, 200, "database: up").await;
    publisher.await.expect("publisher");
    s.wait_recorded(3_500, GENEROUS).await;
    let metrics = s.metrics(0).await;
    assert!(
        !metrics.contains(r#"qty_worker_dependency_errors_total{dependency="database"} 0"#),
        "the read-only spell was not counted as a dependency error:\n{metrics}"
    );
    assert!(
        metrics.contains("qty_worker_deliveries_requeued_total 0"),
        "a request was requeued:\n{metrics}"
    );
    assert_clean(s.finish().await);
}

#[tokio::test]
async fn a_failover_to_the_standby_named_in_the_url_resumes_within_30_s() {
    let _serial = SERIAL.lock().await;
    let Some(mut s) = Scenario::on("failover", 10, 1_000, Own::postgres_pair()).await else {
        return;
    };
    let standby = s.servers.standby.as_ref().expect("a standby").addr();
    s.worker_database_url = format!(
        "postgres://postgres@{},{standby}/{}?target_session_attrs=read-write&application_name=qty-worker-fault",
        s.primary().addr(),
        s.names.database
    );
    s.start_worker().await;
    let publisher = s.spawn_publisher(s.plan(3_000, 22), 100);
    s.wait_recorded(500, GENEROUS).await;
    s.primary().stop_immediately();
    let promoted = s.servers.standby.as_ref().expect("a standby");
    promoted.promote();
    let url = promoted.url(&s.names.database);
    s.reconnect_pool(&url).await;
    let resumed = wait_for_progress(&s, 50, Duration::from_secs(30)).await;
    println!("processing resumed on the promoted standby after {resumed:?}");
    publisher.await.expect("publisher");
    s.wait_recorded(3_000, GENEROUS).await;
    assert_clean(s.finish().await);
}

#[tokio::test]
async fn a_cluster_losing_the_workers_node_keeps_replying_through_another() {
    let _serial = SERIAL.lock().await;
    let Some(mut s) = Scenario::on("cluster", 10, 1_000, Own::rabbitmq(3)).await else {
        return;
    };
    s.reach_every_node();
    s.start_worker().await;
    let publisher = s.spawn_publisher(s.plan(3_000, 23), 100);
    s.wait_recorded(300, GENEROUS).await;
    // The worker connects to the first node first.
    s.rabbitmq_node(0).stop_app();
    let resumed = wait_for_progress(&s, 100, Duration::from_secs(20)).await;
    println!("replies resumed through another node after {resumed:?}");
    wait_for_readyz(&s, 200, "broker: consuming").await;
    publisher.await.expect("publisher");
    s.wait_recorded(3_000, GENEROUS).await;
    s.rabbitmq_node(0).start_app();
    assert_clean(s.finish().await);
}

#[tokio::test]
async fn a_worker_started_before_its_database_waits_and_becomes_ready_when_it_comes() {
    let _serial = SERIAL.lock().await;
    let Some(mut s) = Scenario::on("latedb", 5, 1_000, Own::postgres()).await else {
        return;
    };
    s.primary().stop_immediately();
    s.spawn_worker();
    let body = wait_for_readyz(&s, 503, "database: down").await;
    assert!(body.contains("broker: starting"), "{body}");
    assert!(
        s.metrics(0)
            .await
            .contains("qty_worker_deliveries_in_flight"),
        "metrics are served while waiting"
    );
    s.primary().start_again();
    s.wait_ready(0).await;
    s.ensure_reply_queue().await;
    let url = s.names.database_url();
    s.reconnect_pool(&url).await;
    let publisher = s.spawn_publisher(s.plan(300, 24), 300);
    publisher.await.expect("publisher");
    s.wait_recorded(300, GENEROUS).await;
    let log = std::fs::read_to_string(&s.workers[0].log).expect("worker log");
    let waits = log.matches("database unavailable; waiting for it").count();
    assert!(waits >= 1, "no warning while waiting:\n{log}");
    assert_clean(s.finish().await);
}
