//! A partitioned worker (`QTY_PARTITIONS`) on a RabbitMQ node of the test's own
//! with the consistent-hash exchange plugin enabled (never on the shared node):
//! its topology, its partitions in `/readyz` and the metrics, the `item_id`
//! header's rules, all with only the permissions docs/security.md gives a
//! partitioned worker; and without the plugin, a configuration problem it reports.

use crate::who_may_adjust::{add_user, url_of};
use lapin::BasicProperties;
use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use qty_test_support::app::{
    Names, RunningWorker, TestApp, WAIT, eventually, http_get, request_body,
};
use qty_test_support::rabbitmq::Cluster;
use qty_worker::broker::{Permissions, Topology};
use uuid::Uuid;

const PLUGIN: &str = "rabbitmq_consistent_hash_exchange";
const PARTITIONS: u16 = 4;

/// Request properties with an `item_id` header holding `header`.
fn keyed(app: &TestApp, message_id: &str, header: AMQPValue) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert("item_id".into(), header);
    app.props(message_id).with_headers(headers)
}

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(value.into())
}

async fn metric(app: &TestApp, name: &str) -> Option<String> {
    let (_, metrics) = app.get("/metrics").await;
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")).map(str::to_owned))
}

#[tokio::test]
async fn a_partitioned_worker_owns_every_partition_alone_and_judges_the_item_header() {
    if !qty_test_support::servers_available() {
        eprintln!("skipped: no PostgreSQL/RabbitMQ binaries");
        return;
    }
    let cluster = tokio::task::spawn_blocking(|| Cluster::start_with_plugins(1, &[PLUGIN]))
        .await
        .expect("start a RabbitMQ node");
    let node = cluster.node(0);
    let names = Names::on_own_servers("postgres://postgres@127.0.0.1:5432".into(), node.url());
    let topology = Topology::new(&names.exchange, &names.queue, 10).partitioned(Some(PARTITIONS));
    add_user(node, "qty-worker", &Permissions::worker(&topology));
    let worker_url = url_of(node, "qty-worker");
    let mut app = TestApp::spawn_on(names, |settings| {
        settings.connections.broker.amqp_url = worker_url.clone();
        settings.worker.partitions = Some(PARTITIONS);
    })
    .await;
    eventually("the lone worker to own every partition", WAIT, || async {
        match app.get("/readyz").await {
            (200, body) if body.contains("partitions: 0,1,2,3\n") => Ok(()),
            other => Err(other),
        }
    })
    .await;
    assert_eq!(
        metric(&app, "qty_worker_partitions_owned").await.as_deref(),
        Some("4")
    );

    // The topology: the hash exchange and the partition queues exist; the
    // unpartitioned request queue was never declared.
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    for index in 0..PARTITIONS {
        let queue = format!("{}.{index}", app.names.queue);
        app.channel
            .queue_declare(queue.as_str().into(), passive, FieldTable::default())
            .await
            .unwrap_or_else(|e| panic!("{queue} exists: {e}"));
    }
    let probe = app.connection.create_channel().await.expect("channel");
    let by_item = probe
        .exchange_declare(
            format!("{}.by-item", app.names.exchange).as_str().into(),
            lapin::ExchangeKind::Custom("x-consistent-hash".into()),
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    assert!(by_item.is_ok(), "the by-item exchange exists: {by_item:?}");
    let probe = app.connection.create_channel().await.expect("channel");
    let unpartitioned = probe
        .queue_declare(
            app.names.queue.as_str().into(),
            passive,
            FieldTable::default(),
        )
        .await;
    assert!(unpartitioned.is_err(), "no unpartitioned request queue");

    // Keyed requests for several items, in order per item.
    let items: Vec<Uuid> = futures::future::join_all((0..6).map(|_| app.create_item(0))).await;
    for round in 0..10 {
        for (n, item) in items.iter().enumerate() {
            let delta = if round % 2 == 0 { 1 } else { -1 };
            let id = format!("r{round}-i{n}");
            app.publish_raw(
                keyed(&app, &id, text(&item.to_string())),
                request_body(*item, delta).as_bytes(),
            )
            .await;
        }
    }
    let replies = app.replies_by_message_id(60).await;
    assert!(
        replies.values().all(|reply| reply.outcome() == "applied"),
        "every request applied in publish order: {replies:?}"
    );

    // The header must be a string naming the body's item.
    let item = items[0];
    let other = Uuid::new_v4().to_string();
    app.publish_raw(
        keyed(&app, "wrong-item", text(&other)),
        request_body(item, 1).as_bytes(),
    )
    .await;
    app.publish_raw(
        keyed(&app, "not-text", AMQPValue::LongLongInt(7)),
        request_body(item, 1).as_bytes(),
    )
    .await;
    // Without the header: served (all such requests share one partition), and counted.
    app.publish_raw(app.props("keyless"), request_body(item, 1).as_bytes())
        .await;
    let replies = app.replies_by_message_id(3).await;
    assert_eq!(replies["wrong-item"].reason(), Some("invalid_message"));
    assert_eq!(
        replies["wrong-item"].body["error"],
        format!("header item_id must equal the body's item_id, got {other:?}")
    );
    assert_eq!(replies["not-text"].reason(), Some("invalid_message"));
    assert_eq!(replies["keyless"].outcome(), "applied");
    assert_eq!(app.qty(item).await, 1, "only the keyless request applied");
    assert_eq!(
        metric(&app, "qty_worker_requests_without_item_header_total")
            .await
            .as_deref(),
        Some("1")
    );
}

#[tokio::test]
async fn without_the_hash_exchange_plugin_a_partitioned_worker_says_so_and_keeps_trying() {
    if !qty_test_support::servers_available() {
        eprintln!("skipped: no PostgreSQL/RabbitMQ binaries");
        return;
    }
    let cluster = tokio::task::spawn_blocking(|| Cluster::start(1))
        .await
        .expect("start a RabbitMQ node");
    let names = Names::on_own_servers(
        "postgres://postgres@127.0.0.1:5432".into(),
        cluster.node(0).url(),
    );
    let _cleanup = names.removed_on_drop();
    let mut settings = names.settings();
    settings.worker.partitions = Some(PARTITIONS);
    let worker = RunningWorker::start(settings);
    eventually("/readyz to name the missing plugin", WAIT, || async {
        match http_get(worker.http_addr, "/readyz").await {
            (503, body) if body.contains(&format!("plugin {PLUGIN} is not enabled")) => Ok(()),
            other => Err(other),
        }
    })
    .await;
    // Still running, still trying: a later look says the same.
    let (status, _) = http_get(worker.http_addr, "/healthz").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn an_unpartitioned_worker_that_sees_other_consumers_says_order_needs_partitions() {
    let app = TestApp::spawn().await;
    let other = RunningWorker::start(app.names.settings());
    other.wait_until_ready().await;
    eventually(
        "/readyz to say that competing workers keep no order across each other",
        WAIT,
        || async {
            match app.get("/readyz").await {
                (200, body) if body.contains("order: 2 consumers on one unpartitioned queue") => {
                    Ok(())
                }
                other => Err(other),
            }
        },
    )
    .await;
}
