//! A client whose reply queue refuses replies (contract §4): its replies are
//! given up after a few tries and counted, its requests acked, and nobody
//! else's replies wait for it.

use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};
use qty_test_support::app::{TestApp, request_body};
use qty_test_support::eventually;
use std::time::Duration;

#[tokio::test]
async fn a_client_whose_queue_refuses_replies_holds_up_nobody() {
    let mut app = TestApp::spawn_with(|s| s.worker.prefetch = 20).await;
    // The usual guard on a client's queue, and nobody consuming it: a stalled client.
    let stalled = format!("{}.replies", app.names.queue);
    let mut arguments = FieldTable::default();
    arguments.insert("x-max-length".into(), AMQPValue::LongInt(10));
    arguments.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    app.channel
        .queue_declare(
            stalled.as_str().into(),
            QueueDeclareOptions::default(),
            arguments,
        )
        .await
        .expect("declare the stalled client's queue");
    let item = app.create_item(1_000).await;
    let refused = 60;
    for n in 0..refused {
        let properties = app
            .props(&format!("stalled-{n}"))
            .with_reply_to(stalled.as_str().into());
        app.publish_raw(properties, request_body(item, -1).as_bytes())
            .await;
    }
    // A healthy client's requests behind them, with a window of 20: each is
    // answered although the stalled client's 60 came first.
    for n in 0..40 {
        app.adjust(&format!("healthy-{n}"), item, -1).await;
    }
    let healthy = app.replies_by_message_id(40).await;
    assert!(healthy.values().all(|r| r.outcome() == "applied"));

    eventually(
        "every refused reply to be given up and counted",
        Duration::from_secs(60),
        || async {
            let (_, metrics) = app.get("/metrics").await;
            let line = format!("qty_worker_replies_refused_total {}", refused - 10);
            if metrics.lines().any(|l| l == line) {
                Ok(())
            } else {
                Err(metrics
                    .lines()
                    .find(|l| l.starts_with("qty_worker_replies_refused_total"))
                    .map(str::to_owned))
            }
        },
    )
    .await;
    // Their requests were applied and acked: nothing waits, nothing went back.
    assert_eq!(app.qty(item).await, 1_000 - 100);
    eventually(
        "every delivery to be settled",
        Duration::from_secs(10),
        || async {
            let (_, metrics) = app.get("/metrics").await;
            let settled = metrics
                .lines()
                .any(|l| l == "qty_worker_deliveries_in_flight 0");
            if settled { Ok(()) } else { Err(metrics) }
        },
    )
    .await;
    let (_, metrics) = app.get("/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l == "qty_worker_deliveries_requeued_total 0"),
        "{metrics}"
    );
    assert_eq!(app.queue_depth().await, 0);
    // A retry of a refused one gets the stored reply, once the client listens.
    app.adjust("stalled-59", item, -1).await;
    let reply = app.next_reply().await;
    assert_eq!(reply.body["message_id"], "stalled-59");
    assert_eq!(
        app.qty(item).await,
        1_000 - 100,
        "the retry changed nothing"
    );
}
