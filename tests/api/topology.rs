//! The topology heals itself and says what is wrong (contract §4, §5, §7): a
//! deleted exchange is declared again, an unroutable reply is counted, and a
//! declare refused for other arguments is reported as a configuration conflict.

use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};
use qty_test_support::app::{Names, RunningWorker, TestApp, WAIT, connect_any, http_get};
use qty_test_support::eventually;
use std::time::Duration;

#[tokio::test]
async fn an_exchange_deleted_while_replies_go_to_reply_to_is_declared_again() {
    let mut app = TestApp::spawn().await;
    let item = app.create_item(10).await;
    app.adjust("before", item, -1).await;
    app.next_reply().await;

    app.delete_exchange().await;
    eventually(
        "the exchange to be declared again",
        Duration::from_secs(15),
        || app.exchange_exists(),
    )
    .await;
    // Published through the exchange again once the request binding is back too
    // (the exchange comes back a moment before it); a returned copy is not
    // enqueued, so exactly one is.
    eventually("the request binding to route again", WAIT, || {
        app.adjust_routed("after", item, -1)
    })
    .await;
    assert_eq!(app.next_reply().await.body["qty"].as_i64(), Some(8));
}

#[tokio::test]
async fn a_reply_to_naming_no_queue_is_counted_logged_and_its_request_acked() {
    let mut app = TestApp::spawn().await;
    let item = app.create_item(10).await;
    let props = app
        .props("lost-reply")
        .with_reply_to("no-such-queue-anywhere".into());
    let body = format!(r#"{{"item_id":"{item}","delta":-1}}"#);
    app.publish_raw(props, body.as_bytes()).await;
    eventually("the unroutable reply to be counted", WAIT, || async {
        let metrics = app.get("/metrics").await.1;
        metrics
            .contains("qty_worker_replies_unroutable_total 1")
            .then_some(())
            .ok_or(metrics)
    })
    .await;
    assert_eq!(app.qty(item).await, 9, "the request was applied once");
    // A retry with the same key gets the stored outcome where it can be heard.
    app.adjust("lost-reply", item, -1).await;
    let reply = app.next_reply().await;
    assert_eq!(reply.body["qty"].as_i64(), Some(9));
    app.wait_until_queue_drained().await;
}

#[tokio::test]
async fn a_queue_declared_with_other_arguments_is_reported_as_a_configuration_conflict() {
    let names = Names::random();
    let connection = connect_any(&names.amqp_url).await.expect("broker");
    let channel = connection.create_channel().await.expect("channel");
    let mut other = FieldTable::default();
    other.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    other.insert("x-delivery-limit".into(), AMQPValue::LongInt(3));
    channel
        .queue_declare(
            names.queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            other,
        )
        .await
        .expect("declare the queue first, with another delivery limit");
    let worker = RunningWorker::start(names.settings());
    let body = eventually("/readyz to name the conflict", WAIT, || async {
        let (status, body) = http_get(worker.http_addr, "/readyz").await;
        (status == 503 && body.contains("broker: configuration conflict"))
            .then_some(body.clone())
            .ok_or(format!("{status}: {body}"))
    })
    .await;
    assert!(body.contains(&names.queue), "{body}");
    drop(worker);
    names.remove_all();
}
