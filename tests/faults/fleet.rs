//! Per-item order across a fleet (contract §3): partitioned workers
//! (`QTY_PARTITIONS`) on RabbitMQ nodes of the scenario's own, with the
//! consistent-hash exchange plugin, while workers are killed, stopped and
//! added, their database sessions terminated, or their broker node lost.
//!
//! Every plan here sends, for each item (starting at 0), `+1, -1, +1, …` in
//! publish order: judged in that order every request applies, so a single
//! `rejected` is a request judged before the one published before it. The
//! final check also compares each item's ledger order with its publish order.

use super::{GENEROUS, SERIAL, assert_in_order};
use qty_test_support::faults::{Own, Scenario};
use std::time::{Duration, Instant};

const PARTITIONS: u16 = 8;

/// Within how long a stable fleet spreads the partitions evenly (contract §3).
const SPREAD_WITHIN: Duration = Duration::from_secs(15);

/// Waits until the `live` workers own every partition between them, each
/// ⌊P/M⌋ or ⌈P/M⌉; returns how long it took.
async fn wait_even_spread(s: &Scenario, live: &[usize], within: Duration) -> Duration {
    let started = Instant::now();
    let count = live.len();
    let (low, high) = (
        usize::from(PARTITIONS) / count,
        usize::from(PARTITIONS).div_ceil(count),
    );
    qty_test_support::eventually(
        &format!("workers {live:?} to own {low} or {high} partitions each"),
        within,
        || async {
            let mut owned = Vec::new();
            for &index in live {
                owned.push(s.partitions_owned(index).await.unwrap_or(0) as usize);
            }
            let even = owned.iter().all(|n| (low..=high).contains(n))
                && owned.iter().sum::<usize>() == usize::from(PARTITIONS);
            if even { Ok(()) } else { Err(owned) }
        },
    )
    .await;
    started.elapsed()
}

async fn fleet(label: &str, items: usize, own: Own) -> Option<Scenario> {
    let mut s = Scenario::on(label, items, 0, own).await?;
    s.partitioned(PARTITIONS);
    // A short drain, so a hand-over with a locked item gives back in seconds.
    s.worker_env.push(("QTY_DRAIN_SECS".into(), "5".into()));
    Some(s)
}

#[tokio::test]
async fn a_fleet_keeps_per_item_order_while_workers_are_killed_stopped_and_added() {
    let _serial = SERIAL.lock().await;
    let Some(mut s) = fleet("fleet", 20, Own::partitioned(1)).await else {
        return;
    };
    for _ in 0..3 {
        s.start_worker().await;
    }
    let spread = wait_even_spread(&s, &[0, 1, 2], SPREAD_WITHIN).await;
    println!("three workers spread the partitions in {spread:?}");
    let publisher = s.spawn_publisher(s.plan_alternating(300, true), 400);
    s.wait_recorded(800, GENEROUS).await;
    s.kill_worker(0);
    let moved = Instant::now();
    wait_even_spread(&s, &[1, 2], SPREAD_WITHIN).await;
    println!(
        "a SIGKILLed worker's partitions moved in {:?}",
        moved.elapsed()
    );
    s.stop_worker(1).await;
    s.start_worker().await;
    s.start_worker().await;
    publisher.await.expect("publisher");
    s.wait_recorded(6_000, GENEROUS).await;
    let spread = wait_even_spread(&s, &[2, 3, 4], SPREAD_WITHIN).await;
    println!("the last fleet spread the partitions in {spread:?}");
    assert_in_order(s.finish().await);
}

#[tokio::test]
async fn requests_without_the_item_header_stay_in_order_on_one_partition() {
    let _serial = SERIAL.lock().await;
    let Some(mut s) = fleet("keyless", 10, Own::partitioned(1)).await else {
        return;
    };
    for _ in 0..2 {
        s.start_worker().await;
    }
    let publisher = s.spawn_publisher(s.plan_alternating(100, false), 300);
    s.wait_recorded(300, GENEROUS).await;
    s.kill_worker(0);
    s.start_worker().await;
    publisher.await.expect("publisher");
    s.wait_recorded(1_000, GENEROUS).await;
    let counted: u64 = [1, 2]
        .iter()
        .map(|&index| s.metrics(index))
        .collect::<futures::future::JoinAll<_>>()
        .await
        .iter()
        .filter_map(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("qty_worker_requests_without_item_header_total "))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .sum();
    assert!(counted > 0, "requests without the header are counted");
    assert_in_order(s.finish().await);
}

#[tokio::test]
async fn terminated_database_sessions_keep_the_fleets_order() {
    let _serial = SERIAL.lock().await;
    let Some(mut s) = fleet("fleetpg", 10, Own::partitioned(1)).await else {
        return;
    };
    for _ in 0..2 {
        s.start_worker().await;
    }
    let publisher = s.spawn_publisher(s.plan_alternating(200, true), 300);
    for round in 1..=3 {
        s.wait_recorded(400 * round, GENEROUS).await;
        let terminated = s.terminate_db_sessions().await;
        assert!(terminated > 0, "round {round}: no session to terminate");
    }
    publisher.await.expect("publisher");
    s.wait_recorded(2_000, GENEROUS).await;
    wait_even_spread(&s, &[0, 1], SPREAD_WITHIN).await;
    assert_in_order(s.finish().await);
}

#[tokio::test]
async fn a_fleet_losing_its_broker_node_keeps_order_through_another() {
    let _serial = SERIAL.lock().await;
    let Some(mut s) = fleet("fleetnode", 10, Own::partitioned(3)).await else {
        return;
    };
    s.reach_every_node();
    for _ in 0..2 {
        s.start_worker().await;
    }
    let publisher = s.spawn_publisher(s.plan_alternating(200, true), 200);
    s.wait_recorded(400, GENEROUS).await;
    // Both workers connect to the first node first.
    s.rabbitmq_node(0).stop_app();
    publisher.await.expect("publisher");
    s.wait_recorded(2_000, GENEROUS).await;
    wait_even_spread(&s, &[0, 1], SPREAD_WITHIN).await;
    s.rabbitmq_node(0).start_app();
    assert_in_order(s.finish().await);
}

#[tokio::test]
async fn a_partition_handed_over_while_an_item_is_locked_keeps_that_items_order() {
    let _serial = SERIAL.lock().await;
    let Some(mut s) = fleet("fleetlock", 6, Own::partitioned(1)).await else {
        return;
    };
    // A low limit: hand-overs must not charge the waiting requests to it.
    s.worker_env.push(("QTY_DELIVERY_LIMIT".into(), "2".into()));
    s.start_worker().await;
    s.start_worker().await;
    wait_even_spread(&s, &[0, 1], SPREAD_WITHIN).await;
    // An operator holds one item's row: its requests are parked by whichever
    // worker owns its partition, while the others flow.
    let locked = s.items[0].0;
    let lock = s.lock_item(locked).await;
    let publisher = s.spawn_publisher(s.plan_alternating(60, true), 200);
    s.wait_recorded(250, GENEROUS).await;
    // The fleet churns while the lock is held: one worker stops (its
    // partitions move to the other), a newcomer takes half, one crashes, and
    // another joins.
    s.stop_worker(0).await;
    s.start_worker().await;
    wait_even_spread(&s, &[1, 2], SPREAD_WITHIN).await;
    s.kill_worker(1);
    s.start_worker().await;
    wait_even_spread(&s, &[2, 3], SPREAD_WITHIN).await;
    let parked: i64 = sqlx::query_scalar("select count(*) from parked where item_id = $1")
        .bind(locked)
        .fetch_one(&s.pool)
        .await
        .expect("count parked rows");
    assert!(parked > 0, "the locked item's requests wait parked");
    lock.rollback().await.expect("release the row");
    publisher.await.expect("publisher");
    s.wait_recorded(360, GENEROUS).await;
    assert_in_order(s.finish().await);
}

#[tokio::test]
async fn switching_to_partitions_serves_the_old_queues_backlog_first_and_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let Some(mut s) = Scenario::on("upgrade", 10, 0, Own::partitioned(1)).await else {
        return;
    };
    // Yesterday's deployment: one unpartitioned worker, stopped with a backlog
    // waiting in its queue.
    s.start_worker().await;
    s.stop_worker(0).await;
    let mut plan = s.plan_alternating(100, true);
    let later = plan.split_off(500);
    s.spawn_publisher(plan, 0).await.expect("publisher");
    // Today's: partitioned workers, while publishers go on.
    s.partitioned(PARTITIONS);
    let publisher = s.spawn_publisher(later, 200);
    s.start_worker().await;
    s.start_worker().await;
    publisher.await.expect("publisher");
    s.wait_recorded(1_000, GENEROUS).await;
    wait_even_spread(&s, &[1, 2], SPREAD_WITHIN).await;
    let log = std::fs::read_to_string(&s.workers[1].log).expect("log")
        + &std::fs::read_to_string(&s.workers[2].log).expect("log");
    assert!(
        log.contains("the unpartitioned queue is served and deleted"),
        "no worker served the old queue:\n{log}"
    );
    assert_in_order(s.finish().await);
}
