//! The fault suite (contract §5): real worker processes, driven through the
//! broker, with faults injected while they work. After each run the harness
//! checks that nothing was lost, applied twice or left unanswered.
//!
//! Faults that disturb a server (a restart, closing every connection, a
//! failover, a read-only database, a lost cluster node) happen on servers the
//! scenario started for itself; the shared servers at the default addresses are
//! only ever used. Tests still run one at a time: their timing is part of what
//! they check, and the machine is small.

mod availability;
mod fleet;
mod parked;
mod pgbouncer;

use qty_test_support::faults::{Own, Scenario, Verdicts};
use std::time::Duration;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const GENEROUS: Duration = Duration::from_secs(120);

fn assert_clean(verdicts: Verdicts) {
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

/// Clean, and every item's requests judged in publish order: on plans where
/// every request applies in that order, a `rejected` is one judged too early.
fn assert_in_order(verdicts: Verdicts) {
    assert_eq!(
        (verdicts.rejected, verdicts.items_out_of_order),
        (0, 0),
        "requests judged out of publish order: {:#?}",
        verdicts.violations
    );
    assert_clean(verdicts);
}

fn assert_clean_or_empty(verdicts: Verdicts) {
    assert!(
        verdicts.violations.is_empty(),
        "invariants broken: {:#?}",
        verdicts.violations
    );
}

/// Waits until worker 0's `/readyz` answers `want` with `line` in its body.
async fn wait_for_readyz(s: &Scenario, want: u16, line: &str) -> String {
    qty_test_support::eventually(
        &format!("/readyz to answer {want} with {line:?}"),
        Duration::from_secs(60),
        || async {
            let (status, body) = s.readyz_body(0).await.ok_or("no answer")?;
            if status == want && body.contains(line) {
                Ok(body)
            } else {
                Err(format!("{status}: {body}"))
            }
        },
    )
    .await
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
    let Some(mut s) = Scenario::on("closeall", 5, 1_000, Own::rabbitmq(1)).await else {
        return;
    };
    s.start_worker().await;
    let publisher = s.spawn_publisher(s.plan(1_500, 3), 750);
    for round in 1..=2 {
        s.wait_recorded(400 * round, GENEROUS).await;
        // The scenario's own node (Own::rabbitmq): the shared one is never touched.
        s.rabbitmq_node(0).close_all_connections("fault test");
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
    wait_for_readyz(&s, 503, "broker: down").await;
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
    for (proxy, down) in [
        (&s.pg_proxy, "database: down"),
        (&s.amqp_proxy, "broker: down"),
    ] {
        proxy.refuse();
        wait_for_readyz(&s, 503, down).await;
        proxy.resume();
        wait_for_readyz(&s, 200, "broker: consuming").await;
    }
    let metrics = s.metrics(0).await;
    assert!(
        metrics.contains(r#"qty_worker_reconnects_total{dependency="broker"} 1"#),
        "{metrics}"
    );
    assert_clean_or_empty(s.finish().await);
}

#[tokio::test]
async fn a_real_rabbitmq_restart_is_survived() {
    let _serial = SERIAL.lock().await;
    let Some(mut s) = Scenario::on("rmqrestart", 5, 1_000, Own::rabbitmq(1)).await else {
        return;
    };
    s.start_worker().await;
    let publisher = s.spawn_publisher(s.plan(1_500, 5), 500);
    s.wait_recorded(300, GENEROUS).await;
    s.rabbitmq_node(0).restart();
    publisher.await.expect("publisher");
    s.wait_recorded(1_500, GENEROUS).await;
    s.wait_ready(0).await;
    assert_clean(s.finish().await);
}

#[tokio::test]
async fn a_real_postgres_restart_is_survived() {
    let _serial = SERIAL.lock().await;
    let Some(mut s) = Scenario::on("pgrestart", 5, 1_000, Own::postgres()).await else {
        return;
    };
    s.start_worker().await;
    let publisher = s.spawn_publisher(s.plan(1_500, 6), 500);
    s.wait_recorded(300, GENEROUS).await;
    s.primary().restart();
    let url = s.names.database_url();
    s.reconnect_pool(&url).await;
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
