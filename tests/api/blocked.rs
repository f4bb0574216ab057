//! A broker that blocks publishers (a memory alarm) is shown, and nothing is
//! lost: on a RabbitMQ node of the test's own, whose alarm the test raises.
//!
//! RabbitMQ blocks a connection only when it next publishes, so the worker must
//! be about to reply while the alarm is up. A row lock holds the first requests
//! in the worker until the alarm is raised; releasing it lets the worker apply
//! them and try to reply, which blocks its connection.

use qty_test_support::app::{Names, TestApp, WAIT, connect_any, eventually, publish, request_body};
use qty_test_support::rabbitmq::{Cluster, Node};
use std::collections::BTreeSet;

const BEFORE: usize = 20;
const DURING: usize = 20;

/// A memory alarm on `node`, raised until dropped: cleared on a failed
/// assertion too, before the test's worker and names are dropped (they are
/// declared earlier), so their clean-up never waits on a blocked broker.
struct MemoryAlarm<'a>(&'a Node);

impl MemoryAlarm<'_> {
    fn raise(node: &Node) -> MemoryAlarm<'_> {
        set_memory_watermark(node, "0");
        MemoryAlarm(node)
    }
}

impl Drop for MemoryAlarm<'_> {
    fn drop(&mut self) {
        set_memory_watermark(self.0, "0.4");
    }
}

fn set_memory_watermark(node: &Node, fraction: &str) {
    let output = node
        .ctl()
        .args(["set_vm_memory_high_watermark", fraction])
        .output()
        .expect("run rabbitmqctl");
    assert!(
        output.status.success(),
        "set_vm_memory_high_watermark {fraction}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Whether `/metrics` shows `qty_worker_broker_blocked` at `value`.
async fn blocked_gauge_is(app: &TestApp, value: u8) -> Result<(), String> {
    let (_, metrics) = app.get("/metrics").await;
    let line = metrics
        .lines()
        .find(|line| line.starts_with("qty_worker_broker_blocked "))
        .ok_or("no qty_worker_broker_blocked series")?;
    if line == format!("qty_worker_broker_blocked {value}") {
        Ok(())
    } else {
        Err(line.to_owned())
    }
}

#[tokio::test]
async fn a_broker_that_blocks_publishers_is_shown_and_every_request_is_answered_once_after() {
    if !qty_test_support::servers_available() {
        eprintln!("skipped: no PostgreSQL/RabbitMQ binaries");
        return;
    }
    let cluster = tokio::task::spawn_blocking(|| Cluster::start(1))
        .await
        .expect("start a RabbitMQ node");
    let node = cluster.node(0);
    let names = Names::on_own_servers("postgres://postgres@127.0.0.1:5432".into(), node.url());
    let mut app = TestApp::spawn_on(names, |_| {}).await;
    blocked_gauge_is(&app, 0)
        .await
        .expect("the gauge is there, at 0, before any alarm");
    let item = app.create_item(0).await;

    // The first requests are parked for the locked row.
    let lock = app.lock_row(item).await;
    for n in 0..BEFORE {
        app.adjust(&format!("before-{n}"), item, 1).await;
    }
    app.wait_until_queue_drained().await;

    let alarm = MemoryAlarm::raise(node);
    // More requests while the alarm is up: their publisher blocks too, and its
    // publishes complete once the alarm clears.
    let during = {
        let (url, exchange, reply_to) = (
            app.names.amqp_url.clone(),
            app.names.exchange.clone(),
            app.reply_queue.clone(),
        );
        tokio::spawn(async move {
            let connection = connect_any(&url).await.expect("a publisher connection");
            let channel = connection.create_channel().await.expect("a channel");
            channel
                .confirm_select(Default::default())
                .await
                .expect("confirms");
            for n in 0..DURING {
                let properties = lapin::BasicProperties::default()
                    .with_message_id(format!("during-{n}").into())
                    .with_reply_to(reply_to.as_str().into())
                    .with_delivery_mode(2);
                publish(
                    &channel,
                    &exchange,
                    "qty.adjust",
                    properties,
                    request_body(item, 1).as_bytes(),
                )
                .await;
            }
        })
    };
    lock.rollback().await.expect("release the row");

    // The worker applies the first requests, and its replies are blocked.
    eventually(
        "/readyz to say the broker blocks the worker",
        WAIT,
        || async {
            match app.get("/readyz").await {
                (503, body) if body.contains("broker: blocked: ") => Ok(()),
                other => Err(other),
            }
        },
    )
    .await;
    eventually("qty_worker_broker_blocked to be 1", WAIT, || {
        blocked_gauge_is(&app, 1)
    })
    .await;

    drop(alarm);
    tokio::time::timeout(WAIT, during)
        .await
        .expect("the publishes made during the alarm are confirmed once it clears")
        .expect("the publisher task");
    let replies = app.replies_by_message_id(BEFORE + DURING).await;
    let expected: BTreeSet<String> = (0..BEFORE)
        .map(|n| format!("before-{n}"))
        .chain((0..DURING).map(|n| format!("during-{n}")))
        .collect();
    assert_eq!(
        replies.keys().cloned().collect::<BTreeSet<_>>(),
        expected,
        "one reply for each request"
    );
    assert!(
        replies.values().all(|reply| reply.outcome() == "applied"),
        "every request applied: {replies:?}"
    );
    assert_eq!(app.qty(item).await, (BEFORE + DURING) as i64);
    assert_eq!(app.ledger_rows().await, (BEFORE + DURING) as i64);
    eventually("/readyz to be 200 again", WAIT, || async {
        match app.get("/readyz").await {
            (200, _) => Ok(()),
            other => Err(other),
        }
    })
    .await;
    eventually("qty_worker_broker_blocked to be 0 again", WAIT, || {
        blocked_gauge_is(&app, 0)
    })
    .await;
    app.wait_until_queue_drained().await;
    let dead = dead_letters(&app).await;
    assert_eq!(dead, 0, "nothing dead-lettered");
}

/// Messages in the test's dead-letter queue.
async fn dead_letters(app: &TestApp) -> u32 {
    app.channel
        .queue_declare(
            format!("{}.dead", app.names.queue).as_str().into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .expect("the dead-letter queue exists")
        .message_count()
}
