//! Where replies go and what they carry (contract §4), and the flow around
//! them: several deliveries in flight, requests straight to the queue.

use lapin::BasicProperties;
use qty_test_support::app::{TestApp, listen, next_reply, publish};
use uuid::Uuid;

#[tokio::test]
async fn a_reply_carries_type_persistence_correlation_and_a_stable_message_id() {
    let mut app = TestApp::spawn().await;
    let item = app.create_item(10).await;
    let props = app.props("k-props").with_correlation_id("corr-7".into());
    app.publish_raw(
        props,
        format!(r#"{{"item_id":"{item}","delta":1}}"#).as_bytes(),
    )
    .await;
    let reply = app.next_reply().await;
    let p = &reply.properties;
    assert_eq!(
        p.content_type().as_ref().map(|s| s.as_str()),
        Some("application/json")
    );
    assert_eq!(
        p.kind().as_ref().map(|s| s.as_str()),
        Some("qty.adjust.applied")
    );
    assert_eq!(*p.delivery_mode(), Some(2));
    assert_eq!(reply.correlation_id().as_deref(), Some("corr-7"));
    let first_id = reply.message_id().expect("reply has a message_id");

    // The duplicate's reply is the same reply, so it carries the same id.
    let props = app.props("k-props").with_correlation_id("corr-7".into());
    app.publish_raw(
        props,
        format!(r#"{{"item_id":"{item}","delta":1}}"#).as_bytes(),
    )
    .await;
    let again = app.next_reply().await;
    assert_eq!(again.message_id(), Some(first_id.clone()));
    assert_eq!(again.raw, reply.raw);
    assert_ne!(first_id, "k-props", "the reply id is derived, not copied");
}

#[tokio::test]
async fn without_a_correlation_id_the_reply_correlates_by_message_id() {
    let mut app = TestApp::spawn().await;
    let item = app.create_item(1).await;
    app.adjust("k-corr", item, 1).await;
    assert_eq!(
        app.next_reply().await.correlation_id().as_deref(),
        Some("k-corr")
    );
}

#[tokio::test]
async fn without_reply_to_the_reply_is_an_event_on_the_exchange_by_outcome() {
    let app = TestApp::spawn().await;
    let (_, mut events) = listen(&app.channel, Some((&app.names.exchange, "qty.adjust.*"))).await;
    let item = app.create_item(1).await;
    for (key, delta) in [("k-ev-1", -1), ("k-ev-2", -1)] {
        let props = BasicProperties::default().with_message_id(key.into());
        app.publish_raw(
            props,
            format!(r#"{{"item_id":"{item}","delta":{delta}}}"#).as_bytes(),
        )
        .await;
    }
    let mut events_seen = [
        next_reply(&mut events, "the first event").await,
        next_reply(&mut events, "the second event").await,
    ];
    events_seen.sort_by(|a, b| a.routing_key.cmp(&b.routing_key));
    let keys: Vec<&str> = events_seen.iter().map(|e| e.routing_key.as_str()).collect();
    assert_eq!(keys, ["qty.adjust.applied", "qty.adjust.rejected"]);
    assert_eq!(events_seen[1].reason(), Some("insufficient_qty"));
    // The listener queue only hears events; nothing came back as a request.
    app.wait_until_queue_drained().await;
    assert_eq!(app.ledger_rows().await, 2);
    let missing = uuid::Uuid::new_v4();
    let props = BasicProperties::default().with_message_id("k-ev-3".into());
    app.publish_raw(
        props,
        format!(r#"{{"item_id":"{missing}","delta":1}}"#).as_bytes(),
    )
    .await;
    assert_eq!(
        next_reply(&mut events, "the not_found event")
            .await
            .routing_key,
        "qty.adjust.not_found"
    );
}

#[tokio::test]
async fn a_request_using_direct_reply_to_gets_its_reply_there() {
    let app = TestApp::spawn().await;
    let item = app.create_item(3).await;
    let channel = app.connection.create_channel().await.expect("channel");
    let mut direct = qty_worker::broker::consume_without_acks(&channel, "amq.rabbitmq.reply-to")
        .await
        .expect("consume direct reply-to");
    let props = BasicProperties::default()
        .with_message_id("k-direct".into())
        .with_reply_to("amq.rabbitmq.reply-to".into());
    channel
        .basic_publish(
            app.names.exchange.as_str().into(),
            "qty.adjust".into(),
            Default::default(),
            format!(r#"{{"item_id":"{item}","delta":-2}}"#).as_bytes(),
            props,
        )
        .await
        .expect("publish");
    let reply = next_reply(&mut direct, "the reply on direct reply-to").await;
    assert_eq!(reply.body["qty"].as_i64(), Some(1));
    assert_eq!(reply.correlation_id().as_deref(), Some("k-direct"));
}

#[tokio::test]
async fn a_request_published_straight_to_the_queue_is_handled() {
    let mut app = TestApp::spawn().await;
    let item = app.create_item(0).await;
    let body = format!(r#"{{"item_id":"{item}","delta":5}}"#);
    publish(
        &app.channel,
        "",
        &app.names.queue,
        app.props("k-direct-queue"),
        body.as_bytes(),
    )
    .await;
    assert_eq!(app.next_reply().await.body["qty"].as_i64(), Some(5));
}

/// Publishes `k-slow` for `slow_item` while the returned transaction holds that
/// item's row lock, and returns once the worker found it locked and parked it.
async fn publish_behind_a_row_lock(
    app: &TestApp,
    slow_item: Uuid,
) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let lock = app.lock_row(slow_item).await;

    app.adjust("k-slow", slow_item, -1).await;
    // Only once it found the row locked and parked it are other requests
    // sent, so they cannot share its batch.
    qty_test_support::app::eventually(
        "k-slow to find the row locked",
        qty_test_support::app::WAIT,
        || async {
            let metrics = app.get("/metrics").await.1;
            (!metrics.contains("qty_worker_lock_waits_timed_out_total 0"))
                .then_some(())
                .ok_or("not parked yet")
        },
    )
    .await;
    lock
}

#[tokio::test]
async fn a_slow_transaction_does_not_stall_the_deliveries_behind_it() {
    let mut app = TestApp::spawn().await;
    let slow_item = app.create_item(10).await;
    let other_item = app.create_item(10).await;

    let lock = publish_behind_a_row_lock(&app, slow_item).await;
    app.adjust("k-fast", other_item, -1).await;
    let first = app.next_reply().await;
    assert_eq!(
        first.body["message_id"], "k-fast",
        "the second request was answered first"
    );

    lock.rollback().await.expect("release the lock");
    let second = app.next_reply().await;
    assert_eq!(second.body["message_id"], "k-slow");
    assert_eq!(second.body["qty"].as_i64(), Some(9));
}

#[tokio::test]
async fn deliveries_answered_behind_a_slow_one_are_acked_without_waiting_for_it() {
    // With a prefetch of 4, acks held back until `k-slow` finished would stop
    // the broker after 3 more deliveries; 12 requests get through only if the
    // ones answered behind it are acked while it still waits.
    let mut app = TestApp::spawn_with(|s| s.worker.prefetch = 4).await;
    let slow_item = app.create_item(10).await;
    let other_item = app.create_item(100).await;

    let lock = publish_behind_a_row_lock(&app, slow_item).await;
    for n in 0..12 {
        app.adjust(&format!("k-fast-{n}"), other_item, -1).await;
    }
    let answered = app.replies_by_message_id(12).await;
    assert!(!answered.contains_key("k-slow"));

    lock.rollback().await.expect("release the lock");
    assert_eq!(app.next_reply().await.body["message_id"], "k-slow");
    app.worker.stop().expect("the worker stops cleanly");
    assert_eq!(app.queue_depth().await, 0, "every delivery was acked");
    assert_eq!(
        (app.qty(slow_item).await, app.qty(other_item).await),
        (9, 88)
    );
}

#[tokio::test]
async fn a_traceparent_on_the_request_goes_on_with_the_reply_in_the_same_trace() {
    use lapin::types::{AMQPValue, FieldTable};
    let mut app = TestApp::spawn().await;
    let item = app.create_item(1).await;
    let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut headers = FieldTable::default();
    headers.insert(
        "traceparent".into(),
        AMQPValue::LongString(incoming.as_bytes().to_vec().into()),
    );
    let props = app.props("k-trace").with_headers(headers);
    app.publish_raw(
        props,
        format!(r#"{{"item_id":"{item}","delta":1}}"#).as_bytes(),
    )
    .await;
    let reply = app.next_reply().await;
    let outgoing = reply
        .header("traceparent")
        .expect("the reply has no traceparent header");
    let parts: Vec<&str> = outgoing.split('-').collect();
    assert_eq!(
        (parts[0], parts[1], parts[3]),
        ("00", "4bf92f3577b34da6a3ce929d0e0e4736", "01")
    );
    assert_ne!(
        parts[2], "00f067aa0ba902b7",
        "the worker's own span is the new parent"
    );

    // Without one, the reply carries none.
    app.adjust("k-untraced", item, 1).await;
    let untraced = app.next_reply().await;
    assert!(
        untraced
            .properties
            .headers()
            .as_ref()
            .is_none_or(|h| !h.contains_key("traceparent"))
    );
}

#[tokio::test]
async fn a_reply_channel_closed_by_the_broker_makes_the_worker_reconnect_and_answer() {
    let app = TestApp::spawn().await;
    let item = app.create_item(3).await;
    // Events then have nowhere to go: publishing one closes the reply channel.
    app.delete_exchange().await;
    let props = BasicProperties::default().with_message_id("k-lost-exchange".into());
    let body = format!(r#"{{"item_id":"{item}","delta":-1}}"#);
    publish(&app.channel, "", &app.names.queue, props, body.as_bytes()).await;

    qty_test_support::app::eventually(
        "the worker to reconnect",
        qty_test_support::app::WAIT,
        || async {
            let metrics = app.get("/metrics").await.1;
            metrics
                .contains(r#"qty_worker_reconnects_total{dependency="broker"} 1"#)
                .then_some(())
                .ok_or(metrics)
        },
    )
    .await;
    app.wait_until_ready().await;
    app.exchange_exists()
        .await
        .expect("the worker declared the exchange again");
    let mut app = app;
    app.worker.stop().expect("the worker stops cleanly");

    assert_eq!(
        app.queue_depth().await,
        0,
        "the request was answered and acked"
    );
    assert_eq!(app.ledger_rows().await, 1);
    assert_eq!(app.qty(item).await, 2);
}
