//! The idempotency ledger (contract §3): one effect per message_id, the
//! stored reply replayed, conflicts refused, concurrency and the hot item.

use qty_test_support::app::TestApp;
use std::collections::{BTreeMap, HashSet};

#[tokio::test]
async fn a_duplicate_replays_the_stored_reply_whatever_happened_since() {
    let mut app = TestApp::spawn().await;
    let item = app.create_item(5).await;
    let missing = uuid::Uuid::new_v4();

    app.adjust("k-a", item, -2).await; // applied, qty 3
    app.adjust("k-r", item, -10).await; // rejected
    app.adjust("k-n", missing, 1).await; // not_found
    let first = app.replies_by_message_id(3).await;

    // Change the world: the item grows, the missing item appears.
    app.adjust("k-grow", item, 100).await;
    app.next_reply().await;
    sqlx::query("insert into items (id, qty) values ($1, 50)")
        .bind(missing)
        .execute(&app.pool)
        .await
        .expect("create the missing item");

    app.adjust("k-a", item, -2).await;
    app.adjust("k-r", item, -10).await;
    app.adjust("k-n", missing, 1).await;
    let again = app.replies_by_message_id(3).await;
    for (id, first) in &first {
        assert_eq!(
            String::from_utf8_lossy(&again[id].raw),
            String::from_utf8_lossy(&first.raw)
        );
    }
    assert_eq!(first["k-a"].body["qty"].as_i64(), Some(3));
    assert_eq!(app.qty(item).await, 103, "the duplicates changed nothing");
    assert_eq!(app.qty(missing).await, 50);
    assert_eq!(app.ledger_rows().await, 4);
}

#[tokio::test]
async fn a_reused_key_with_another_payload_is_an_idempotency_conflict() {
    let mut app = TestApp::spawn().await;
    let item = app.create_item(5).await;
    let other = app.create_item(5).await;
    app.adjust("k-c", item, -1).await;
    let original = app.next_reply().await;

    app.adjust("k-c", item, -2).await;
    app.adjust("k-c", other, -1).await;
    for conflict in app.replies(2).await {
        assert_eq!(conflict.reason(), Some("idempotency_conflict"));
        assert_ne!(
            conflict.message_id(),
            original.message_id(),
            "a conflict is a different reply"
        );
    }
    assert_eq!((app.qty(item).await, app.qty(other).await), (4, 5));

    // The first outcome stays: the original payload still replays it.
    app.adjust("k-c", item, -1).await;
    assert_eq!(app.next_reply().await.raw, original.raw);
    let stored: (i64, String) =
        sqlx::query_as("select delta, outcome from adjustments where message_id = 'k-c'")
            .fetch_one(&app.pool)
            .await
            .expect("ledger row");
    assert_eq!(stored, (-1, "applied".to_owned()));
}

#[tokio::test]
async fn the_same_message_thirty_times_in_flight_applies_once() {
    let mut app = TestApp::spawn().await;
    let item = app.create_item(100).await;
    for _ in 0..30 {
        app.adjust("k-same", item, -7).await;
    }
    let replies = app.replies(30).await;
    let bodies: HashSet<&[u8]> = replies.iter().map(|r| r.raw.as_slice()).collect();
    assert_eq!(bodies.len(), 1, "every copy got the identical reply");
    assert_eq!(replies[0].body["qty"].as_i64(), Some(93));
    assert_eq!(app.qty(item).await, 93);
    assert_eq!(app.ledger_rows().await, 1);
}

#[tokio::test]
async fn a_hot_item_gives_exactly_its_stock_and_no_more() {
    let mut app = TestApp::spawn().await;
    let item = app.create_item(250).await;
    for n in 0..400 {
        app.adjust(&format!("k-hot-{n}"), item, -1).await;
    }
    let replies = app.replies(400).await;
    let mut by_outcome: BTreeMap<String, usize> = BTreeMap::new();
    let mut applied_qtys = Vec::new();
    for reply in &replies {
        let label = format!("{}/{}", reply.outcome(), reply.reason().unwrap_or(""));
        *by_outcome.entry(label).or_default() += 1;
        if let Some(qty) = reply.body["qty"].as_i64() {
            applied_qtys.push(qty);
        }
    }
    assert_eq!(by_outcome.get("applied/"), Some(&250));
    assert_eq!(by_outcome.get("rejected/insufficient_qty"), Some(&150));
    applied_qtys.sort_unstable();
    assert_eq!(applied_qtys, (0..250).collect::<Vec<i64>>());
    assert_eq!(app.qty(item).await, 0);

    let recorded: (i64, i64) = sqlx::query_as(
        "select count(*) filter (where outcome = 'applied'), coalesce(sum(delta) filter (where outcome = 'applied'), 0)::bigint from adjustments",
    )
    .fetch_one(&app.pool)
    .await
    .expect("ledger totals");
    assert_eq!(recorded, (250, -250));
}

#[tokio::test]
async fn the_database_refuses_a_negative_qty_even_without_the_worker() {
    let app = TestApp::spawn().await;
    let item = app.create_item(1).await;
    let refused = sqlx::query("update items set qty = -1 where id = $1")
        .bind(item)
        .execute(&app.pool)
        .await;
    let code = refused
        .expect_err("check constraint")
        .as_database_error()
        .and_then(|e| e.code().map(|c| c.into_owned()));
    assert_eq!(code.as_deref(), Some("23514"));
}
