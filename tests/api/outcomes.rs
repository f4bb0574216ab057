//! Each outcome of contract §4, and what it does to the item.

use qty_test_support::app::TestApp;
use uuid::Uuid;

#[tokio::test]
async fn an_adjustment_that_fits_is_applied_and_replies_with_the_new_qty() {
    let mut app = TestApp::spawn().await;
    let item = app.create_item(4).await;
    app.adjust("k-applied", item, -1).await;
    let reply = app.next_reply().await;
    assert_eq!(
        reply.body,
        serde_json::json!({"message_id": "k-applied", "outcome": "applied", "item_id": item, "delta": -1, "qty": 3})
    );
    assert_eq!(app.qty(item).await, 3);
}

#[tokio::test]
async fn a_zero_delta_is_applied_and_changes_nothing() {
    let mut app = TestApp::spawn().await;
    let item = app.create_item(7).await;
    app.adjust("k-zero", item, 0).await;
    let reply = app.next_reply().await;
    assert_eq!(
        (reply.outcome(), reply.body["qty"].as_i64()),
        ("applied", Some(7))
    );
    assert_eq!(app.ledger_rows().await, 1);
}

#[tokio::test]
async fn an_unknown_item_is_not_found_and_recorded() {
    let mut app = TestApp::spawn().await;
    let missing = Uuid::new_v4();
    app.adjust("k-missing", missing, 5).await;
    let reply = app.next_reply().await;
    assert_eq!(
        reply.body,
        serde_json::json!({"message_id": "k-missing", "outcome": "not_found", "item_id": missing, "delta": 5,
                           "error": "item not found"})
    );
    assert_eq!(app.ledger_rows().await, 1);
}

#[tokio::test]
async fn going_below_zero_is_rejected_and_leaves_qty_alone() {
    let mut app = TestApp::spawn().await;
    let item = app.create_item(2).await;
    app.adjust("k-short", item, -3).await;
    let reply = app.next_reply().await;
    assert_eq!(
        reply.body,
        serde_json::json!({"message_id": "k-short", "outcome": "rejected", "item_id": item, "delta": -3,
                           "reason": "insufficient_qty", "error": "qty cannot go below 0"})
    );
    assert_eq!(app.qty(item).await, 2);
}

#[tokio::test]
async fn the_most_negative_delta_is_insufficient_qty_not_an_sql_error() {
    let mut app = TestApp::spawn().await;
    let item = app.create_item(5).await;
    app.adjust("k-min", item, i64::MIN).await;
    let reply = app.next_reply().await;
    assert_eq!(reply.reason(), Some("insufficient_qty"));
    assert_eq!(app.qty(item).await, 5);
}

#[tokio::test]
async fn overflowing_i64_is_qty_out_of_range() {
    let mut app = TestApp::spawn().await;
    let item = app.create_item(i64::MAX - 1).await;
    app.adjust("k-over", item, 2).await;
    let reply = app.next_reply().await;
    assert_eq!(reply.reason(), Some("qty_out_of_range"));
    assert_eq!(app.qty(item).await, i64::MAX - 1);
    app.adjust("k-exact", item, 1).await;
    assert_eq!(app.next_reply().await.body["qty"].as_i64(), Some(i64::MAX));
}

#[tokio::test]
async fn taking_exactly_everything_reaches_zero() {
    let mut app = TestApp::spawn().await;
    let item = app.create_item(9).await;
    app.adjust("k-all", item, -9).await;
    assert_eq!(app.next_reply().await.body["qty"].as_i64(), Some(0));
    assert_eq!(app.qty(item).await, 0);
}
