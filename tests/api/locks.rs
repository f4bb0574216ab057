//! Lock isolation and per-item order (contract §3 and §5): a row locked by
//! someone else delays only the requests for that item, and one worker applies an
//! item's requests in the order they were delivered.

use qty_test_support::app::TestApp;
use qty_test_support::eventually;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Publishes `count` requests spread over `items` at about `per_second`, and
/// returns how many replies came back while publishing and for a moment after,
/// per second of that window.
async fn steady_rate(app: &mut TestApp, items: &[Uuid], label: &str, count: usize) -> f64 {
    let per_second = 100.0;
    let started = Instant::now();
    for n in 0..count {
        let due = started + Duration::from_secs_f64(n as f64 / per_second);
        tokio::time::sleep_until(due.into()).await;
        app.adjust(&format!("{label}-{n}"), items[n % items.len()], 1)
            .await;
    }
    let answered = app.replies_by_message_id(count).await;
    assert!(answered.keys().all(|id| id.starts_with(label)));
    count as f64 / started.elapsed().as_secs_f64()
}

#[tokio::test]
async fn a_row_locked_elsewhere_delays_only_its_own_requests_which_keep_their_order() {
    let mut app = TestApp::spawn_with(|s| {
        s.worker.prefetch = 1000;
        s.worker.db_pool = 4;
    })
    .await;
    let others: Vec<Uuid> = {
        let mut ids = Vec::new();
        for _ in 0..50 {
            ids.push(app.create_item(0).await);
        }
        ids
    };
    let locked = app.create_item(0).await;

    let unlocked_rate = steady_rate(&mut app, &others, "free", 500).await;

    let lock = app.lock_row(locked).await;
    // Requests for the locked item, interleaved with the others' traffic: the
    // first comes now, the rest between bursts.
    let mut to_locked = Vec::new();
    let mut rates = Vec::new();
    for round in 0..4 {
        let id = format!("locked-{round}");
        app.adjust(&id, locked, round + 1).await;
        to_locked.push(id);
        rates.push(steady_rate(&mut app, &others, &format!("busy{round}"), 250).await);
    }
    let locked_rate = rates.iter().sum::<f64>() / rates.len() as f64;
    println!("replies per second: {unlocked_rate:.1} unlocked, {locked_rate:.1} with a row locked");
    assert!(
        locked_rate >= 0.8 * unlocked_rate,
        "the other items slowed down: {locked_rate:.1}/s against {unlocked_rate:.1}/s unlocked"
    );
    assert_eq!(app.qty(locked).await, 0, "the locked item changed");

    lock.rollback().await.expect("release the lock");
    // Replies are published concurrently, so their arrival order says nothing;
    // the quantity each one saw says in which order they were applied.
    let replies = app.replies_by_message_id(to_locked.len()).await;
    let after: Vec<i64> = to_locked
        .iter()
        .map(|id| replies[id].body["qty"].as_i64().expect("applied"))
        .collect();
    assert_eq!(
        after,
        [1, 3, 6, 10],
        "the locked item's requests changed order"
    );
    let metrics = app.get("/metrics").await.1;
    assert!(
        !metrics.contains("qty_worker_lock_waits_timed_out_total 0"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("qty_worker_requests_parked_total 0"),
        "{metrics}"
    );
}

#[tokio::test]
async fn each_items_replies_match_a_sequential_replay_of_its_requests_in_publish_order() {
    let mut app = TestApp::spawn_with(|s| {
        s.worker.prefetch = qty_worker::settings::DEFAULT_PREFETCH;
        s.worker.db_pool = qty_worker::settings::DEFAULT_DB_POOL;
        s.worker.batch_max = qty_worker::settings::DEFAULT_BATCH_MAX;
    })
    .await;
    let mut items = Vec::new();
    for _ in 0..4 {
        items.push(app.create_item(5).await);
    }
    let mut mix = fastrand::Rng::with_seed(77);
    let requests: Vec<(String, Uuid, i64)> = (0..2_000)
        .map(|n| {
            let item = items[mix.usize(..items.len())];
            (format!("o-{n}"), item, mix.i64(-10..=10))
        })
        .collect();
    for (id, item, delta) in &requests {
        app.adjust(id, *item, *delta).await;
    }
    let replies = app.replies_by_message_id(requests.len()).await;

    let mut qty: HashMap<Uuid, i64> = items.iter().map(|i| (*i, 5)).collect();
    let mut judged_otherwise = Vec::new();
    for (id, item, delta) in &requests {
        let now = qty.get_mut(item).expect("item");
        let expected = if *now + delta >= 0 {
            *now += delta;
            format!("applied {now}")
        } else {
            "rejected insufficient_qty".to_owned()
        };
        let reply = &replies[id].body;
        let got = match reply["outcome"].as_str() {
            Some("applied") => format!("applied {}", reply["qty"]),
            _ => format!("rejected {}", reply["reason"].as_str().unwrap_or("?")),
        };
        if got != expected {
            judged_otherwise.push(format!("{id}: {got}, in order {expected}"));
        }
    }
    assert!(
        judged_otherwise.is_empty(),
        "{} of {} requests were judged out of publish order, e.g. {:?}",
        judged_otherwise.len(),
        requests.len(),
        &judged_otherwise[..judged_otherwise.len().min(5)]
    );
    for item in &items {
        assert_eq!(app.qty(*item).await, qty[item]);
    }
}

/// The first value of a metric in the exposition, e.g. `qty_worker_parked_requests`.
fn metric(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{exposition}"))
}

#[tokio::test]
async fn more_requests_for_a_locked_item_than_the_prefetch_are_parked_and_hold_no_slot() {
    let mut app = TestApp::spawn_with(|s| s.worker.prefetch = 100).await;
    let mut others = Vec::new();
    for _ in 0..20 {
        others.push(app.create_item(0).await);
    }
    let locked = app.create_item(0).await;
    let unlocked_rate = steady_rate(&mut app, &others, "free", 200).await;

    let lock = app.lock_row(locked).await;
    // Fifteen windows' worth for the locked item: parked, none holds a slot.
    let waiting = 1_500;
    for n in 0..waiting {
        app.adjust(&format!("locked-{n}"), locked, 1).await;
    }
    let locked_rate = steady_rate(&mut app, &others, "busy", 200).await;
    println!(
        "replies per second to other items: {unlocked_rate:.1} unlocked, {locked_rate:.1} with {waiting} requests parked (prefetch 100)"
    );
    assert!(
        locked_rate >= 0.8 * unlocked_rate,
        "the other items slowed down: {locked_rate:.1}/s against {unlocked_rate:.1}/s unlocked"
    );
    // Operators see which item holds them up, and for how long; the worker is
    // still ready, since it serves everything else.
    let (status, body) = app.get("/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&format!("{locked} ({waiting})")), "{body}");
    // Parked: acked, nothing of them held by the worker or the broker.
    assert_eq!(app.queue_depth().await, 0);
    let parked: i64 = sqlx::query_scalar("select count(*) from parked where item_id = $1")
        .bind(locked)
        .fetch_one(&app.pool)
        .await
        .expect("count parked rows");
    assert_eq!(parked, i64::from(waiting));
    let metrics = eventually(
        "the parked gauges to show them",
        Duration::from_secs(10),
        || async {
            let (_, metrics) = app.get("/metrics").await;
            let shown = (
                metric(&metrics, "qty_worker_parked_requests"),
                metric(&metrics, "qty_worker_parked_items"),
            );
            if shown == (f64::from(waiting), 1.0) {
                Ok(metrics)
            } else {
                Err(shown)
            }
        },
    )
    .await;
    assert!(
        metric(&metrics, "qty_worker_parked_oldest_seconds") > 0.0,
        "{metrics}"
    );

    lock.rollback().await.expect("release the lock");
    let replies = app.replies_by_message_id(waiting as usize).await;
    for n in 0..waiting {
        let reply = &replies[&format!("locked-{n}")];
        assert_eq!(
            reply.body["qty"].as_i64(),
            Some(i64::from(n) + 1),
            "locked-{n} was not applied in publish order: {}",
            reply.body
        );
    }
    eventually(
        "the parked gauges to return to 0",
        Duration::from_secs(10),
        || async {
            let (_, metrics) = app.get("/metrics").await;
            let left = (
                metric(&metrics, "qty_worker_parked_requests"),
                metric(&metrics, "qty_worker_parked_oldest_seconds"),
            );
            if left == (0.0, 0.0) {
                Ok(())
            } else {
                Err(left)
            }
        },
    )
    .await;
    let (_, metrics) = app.get("/metrics").await;
    assert_eq!(
        metric(&metrics, "qty_worker_deliveries_requeued_total"),
        0.0
    );
    assert_eq!(app.queue_depth().await, 0);
}

#[tokio::test]
async fn a_duplicate_of_a_parked_request_is_not_parked_twice_and_gets_the_one_reply() {
    let mut app = TestApp::spawn().await;
    let item = app.create_item(0).await;
    let lock = app.lock_row(item).await;
    app.adjust("parked-1", item, 5).await;
    app.adjust("parked-1", item, 5).await;
    app.adjust("parked-2", item, -5).await;
    app.wait_until_queue_drained().await;
    eventually(
        "parked-1 and parked-2 parked once each, in order",
        Duration::from_secs(10),
        || async {
            let parked: Vec<String> =
                sqlx::query_scalar("select message_id from parked where item_id = $1 order by seq")
                    .bind(item)
                    .fetch_all(&app.pool)
                    .await
                    .expect("read the parked rows");
            if parked == ["parked-1", "parked-2"] {
                Ok(())
            } else {
                Err(parked)
            }
        },
    )
    .await;
    // The duplicate was acked without being parked again.
    assert_eq!(app.queue_depth().await, 0);

    lock.rollback().await.expect("release the lock");
    let judged = app.replies(2).await;
    let id = |r: &qty_test_support::app::Reply| r.body["message_id"].as_str().map(str::to_owned);
    let mut ids: Vec<String> = judged.iter().filter_map(id).collect();
    ids.sort();
    assert_eq!(ids, ["parked-1", "parked-2"], "one reply each: {judged:?}");
    let first = judged
        .iter()
        .find(|r| id(r).as_deref() == Some("parked-1"))
        .expect("parked-1's reply");
    assert_eq!(first.body["qty"], 5, "{}", first.body);

    // Judged now: a repeat is answered at once, from the ledger, alike; and
    // nothing else of parked-1 comes before the next request's reply.
    app.adjust("parked-1", item, 5).await;
    app.adjust("after", item, 1).await;
    let later = app.replies(2).await;
    let ids: Vec<Option<String>> = later.iter().map(id).collect();
    assert!(
        ids.contains(&Some("parked-1".into())) && ids.contains(&Some("after".into())),
        "{later:?}"
    );
    let again = later
        .iter()
        .find(|r| id(r).as_deref() == Some("parked-1"))
        .expect("the repeat's reply");
    assert_eq!(again.body, first.body, "the stored reply, identical");
    assert_eq!(app.qty(item).await, 1);
}
