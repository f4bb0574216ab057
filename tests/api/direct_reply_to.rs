//! Direct reply-to names that lead nowhere. (One whose requester is merely gone
//! comes back unroutable, like any `reply_to` naming no queue.) One that names a
//! node that is not there makes RabbitMQ 3.10 close the connection that
//! publishes to it (INTERNAL_ERROR): the worker's consuming connection must not
//! be that one, or every redelivery of the request would cut everyone's
//! in-flight deliveries until the delivery limit dead-lettered it.

use qty_test_support::app::{TestApp, request_body};
use qty_test_support::eventually;
use std::time::Duration;

/// A direct reply-to name minted by a RabbitMQ node that no longer exists.
const FOREIGN_NODE: &str =
    "amq.rabbitmq.reply-to.g1h2AA5yZXBseUA2NDI2NDI2MAAAAysAAAAAaw+uvw==.xOB+dcNakZ+B8hpgwm8glA==";

#[tokio::test]
async fn direct_reply_to_names_that_lead_nowhere_are_given_up_without_cutting_the_consumer() {
    let mut app = TestApp::spawn().await;
    let item = app.create_item(100).await;
    for (id, reply_to) in [
        ("malformed-1", "amq.rabbitmq.reply-to.garbage"),
        // A well-formed name of a node that is not there.
        ("elsewhere-1", FOREIGN_NODE),
    ] {
        app.publish_raw(
            app.props(id).with_reply_to(reply_to.into()),
            request_body(item, -1).as_bytes(),
        )
        .await;
    }
    for n in 0..20 {
        app.adjust(&format!("healthy-{n}"), item, -1).await;
    }
    let healthy = app.replies_by_message_id(20).await;
    assert!(healthy.values().all(|r| r.outcome() == "applied"));
    eventually(
        "both replies to be given up",
        Duration::from_secs(30),
        || async {
            let (_, metrics) = app.get("/metrics").await;
            if metrics
                .lines()
                .any(|l| l == "qty_worker_replies_unroutable_total 2")
            {
                Ok(())
            } else {
                Err(metrics)
            }
        },
    )
    .await;
    let (_, metrics) = app.get("/metrics").await;
    for line in [
        r#"qty_worker_reconnects_total{dependency="broker"} 0"#,
        "qty_worker_deliveries_requeued_total 0",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "missing {line:?}:\n{metrics}"
        );
    }
    assert_eq!(app.qty(item).await, 100 - 22, "each was applied once");
    assert_eq!(app.queue_depth().await, 0);
}
