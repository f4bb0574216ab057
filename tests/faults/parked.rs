//! Requests parked for a locked item (contract §3 and §5): acked once parked,
//! never charged to the delivery limit, judged in publish order by whoever
//! consumes their queue next, whatever happens to the workers, their database
//! sessions or PostgreSQL meanwhile.
//!
//! Every plan here sends, for each item (starting at 0), `+1, -1, +1, …` in
//! publish order: judged in that order every request applies, so a single
//! `rejected` is a request judged before the one published before it. The
//! final check also compares each item's ledger order with its publish order,
//! and finds nothing left parked and nothing dead-lettered.

use super::{GENEROUS, SERIAL, assert_in_order};
use qty_test_support::faults::{Own, Scenario, Sent};
use uuid::Uuid;

/// `locked` requests for `item`, interleaved with `others` requests spread over
/// the scenario's other items, each item's alternating +1 and -1.
fn plan(s: &Scenario, item: Uuid, locked: usize, others: usize) -> Vec<Sent> {
    let rest: Vec<Uuid> = s.items.iter().map(|i| i.0).filter(|i| *i != item).collect();
    let mut rounds = vec![0usize; s.items.len()];
    let mut sent = Vec::with_capacity(locked + others);
    let (mut l, mut o) = (0, 0);
    while l < locked || o < others {
        // One locked-item request for every two others, while both last.
        let take_locked = l < locked && (o >= others || sent.len().is_multiple_of(3));
        let target = if take_locked {
            l += 1;
            item
        } else {
            o += 1;
            rest[o % rest.len()]
        };
        let index = s.items.iter().position(|i| i.0 == target).expect("an item");
        let round = rounds[index];
        rounds[index] += 1;
        sent.push(Sent {
            message_id: format!("{}-i{index}-r{round}", s.names.queue),
            item: target,
            delta: if round.is_multiple_of(2) { 1 } else { -1 },
            keyed: true,
        });
    }
    sent
}

async fn scenario(label: &str, partitions: Option<u16>) -> Scenario {
    let own = if partitions.is_some() {
        Own::partitioned(1)
    } else {
        Own::default()
    };
    let mut s = Scenario::on(label, 6, 0, own)
        .await
        .expect("the shared servers need no binaries");
    match partitions {
        Some(p) => s.partitioned(p),
        // One worker at a time: per-item order is promised, and checked.
        None => s.ordered = true,
    }
    s
}

/// A worker with `QTY_PREFETCH=40` holds 300 requests for a locked item while
/// 600 others flow, and is SIGKILLed; the lock goes, and the next worker
/// judges the 300 in publish order.
async fn crash_with_a_locked_item(label: &str, partitions: Option<u16>) {
    let mut s = scenario(label, partitions).await;
    s.worker_env.push(("QTY_PREFETCH".into(), "40".into()));
    s.start_worker().await;
    let item = s.items[0].0;
    let lock = s.lock_item(item).await;
    let publisher = s.spawn_publisher(plan(&s, item, 300, 600), 600);
    publisher.await.expect("publisher");
    s.wait_recorded(600, GENEROUS).await;
    s.wait_parked(300, GENEROUS).await;
    s.kill_worker(0);
    lock.rollback().await.expect("release the row");
    s.start_worker().await;
    s.wait_recorded(900, GENEROUS).await;
    assert_in_order(s.finish().await);
}

#[tokio::test]
async fn a_crash_holding_more_locked_requests_than_the_prefetch_keeps_their_order() {
    let _serial = SERIAL.lock().await;
    crash_with_a_locked_item("pcrash", None).await;
}

#[tokio::test]
async fn a_partitioned_crash_holding_more_locked_requests_than_the_prefetch_keeps_their_order() {
    let _serial = SERIAL.lock().await;
    if !qty_test_support::servers_available() {
        println!("skipped: no PostgreSQL/RabbitMQ binaries");
        return;
    }
    crash_with_a_locked_item("ppcrash", Some(2)).await;
}

#[tokio::test]
async fn graceful_restarts_while_an_item_stays_locked_dead_letter_nothing() {
    let _serial = SERIAL.lock().await;
    let mut s = scenario("prestart", None).await;
    // Before parking, 3.10 and 4.0 charged each restart to every waiting
    // request: three restarts dead-lettered them all.
    s.worker_env.push(("QTY_DELIVERY_LIMIT".into(), "3".into()));
    s.worker_env.push(("QTY_DRAIN_SECS".into(), "5".into()));
    s.start_worker().await;
    let item = s.items[0].0;
    let lock = s.lock_item(item).await;
    let publisher = s.spawn_publisher(plan(&s, item, 30, 60), 200);
    publisher.await.expect("publisher");
    s.wait_parked(30, GENEROUS).await;
    for round in 0..5 {
        let live = s.workers.len() - 1;
        s.stop_worker(live).await;
        s.start_worker().await;
        println!("restart {} of 5 while the item is locked", round + 1);
    }
    assert_eq!(s.parked().await, 30, "every waiting request still parked");
    lock.rollback().await.expect("release the row");
    s.wait_recorded(90, GENEROUS).await;
    assert_in_order(s.finish().await);
}

#[tokio::test]
async fn a_worker_killed_again_and_again_while_parking_loses_and_reorders_nothing() {
    let _serial = SERIAL.lock().await;
    let mut s = scenario("pparking", None).await;
    s.start_worker().await;
    let item = s.items[0].0;
    let lock = s.lock_item(item).await;
    let publisher = s.spawn_publisher(plan(&s, item, 600, 600), 400);
    for round in 1..=3 {
        s.wait_parked(100 * round, GENEROUS).await;
        let live = s.workers.len() - 1;
        s.kill_worker(live);
        s.start_worker().await;
    }
    publisher.await.expect("publisher");
    lock.rollback().await.expect("release the row");
    s.wait_recorded(1_200, GENEROUS).await;
    assert_in_order(s.finish().await);
}

#[tokio::test]
async fn a_crash_between_judging_and_replying_sends_the_replies_later_and_applies_nothing_twice() {
    let _serial = SERIAL.lock().await;
    let mut s = scenario("pjudged", None).await;
    // This worker dies right after its first judgement commits.
    s.worker_env
        .push(("QTY_FAULT_ABORT_AFTER_JUDGING".into(), "1".into()));
    s.start_worker().await;
    s.worker_env.pop();
    let item = s.items[0].0;
    let lock = s.lock_item(item).await;
    let publisher = s.spawn_publisher(plan(&s, item, 40, 40), 200);
    publisher.await.expect("publisher");
    s.wait_parked(40, GENEROUS).await;
    lock.rollback().await.expect("release the row");
    s.wait_died(0, GENEROUS).await;
    let owed: i64 = sqlx::query_scalar("select count(*) from parked where judged_at is not null")
        .fetch_one(&s.pool)
        .await
        .expect("count owed replies");
    assert!(owed > 0, "the judgement committed before the crash");
    s.start_worker().await;
    s.wait_recorded(80, GENEROUS).await;
    // The owed replies go out once their judge's time to reply is up.
    qty_test_support::eventually("the owed replies sent and retired", GENEROUS, || async {
        match sqlx::query_scalar::<_, i64>("select count(*) from parked")
            .fetch_one(&s.pool)
            .await
        {
            Ok(0) => Ok(()),
            other => Err(format!("{other:?} parked rows left")),
        }
    })
    .await;
    assert_in_order(s.finish().await);
}

#[tokio::test]
async fn database_sessions_killed_while_parked_requests_are_judged_lose_and_reorder_nothing() {
    let _serial = SERIAL.lock().await;
    let mut s = scenario("pjudgekill", None).await;
    s.start_worker().await;
    let item = s.items[0].0;
    let lock = s.lock_item(item).await;
    let publisher = s.spawn_publisher(plan(&s, item, 1_500, 300), 1_000);
    publisher.await.expect("publisher");
    s.wait_parked(1_500, GENEROUS).await;
    lock.rollback().await.expect("release the row");
    // While the judge works through them: the 300 others were recorded before.
    for round in 1..=4 {
        s.wait_recorded(300 + 250 * round, GENEROUS).await;
        s.terminate_db_sessions().await;
    }
    s.wait_recorded(1_800, GENEROUS).await;
    assert_in_order(s.finish().await);
}

#[tokio::test]
async fn parked_requests_outlive_a_postgres_restart_and_keep_their_order() {
    let _serial = SERIAL.lock().await;
    let Some(mut s) = Scenario::on("ppgrestart", 6, 0, Own::postgres()).await else {
        return;
    };
    s.ordered = true;
    s.start_worker().await;
    let item = s.items[0].0;
    // The restart ends the lock holder's session: the lock goes with it.
    let lock = s.lock_item(item).await;
    let publisher = s.spawn_publisher(plan(&s, item, 200, 400), 300);
    s.wait_parked(100, GENEROUS).await;
    s.primary().restart();
    drop(lock);
    let url = s.names.database_url();
    s.reconnect_pool(&url).await;
    publisher.await.expect("publisher");
    s.wait_recorded(600, GENEROUS).await;
    assert_in_order(s.finish().await);
}
