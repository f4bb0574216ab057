//! Where partition queues' leaders live: spread over a cluster's nodes
//! (`x-queue-leader-locator: balanced`), and partition queues that an older
//! version declared without the locator kept working, with no configuration
//! conflict. On nodes of the test's own, of the release under test.

use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};
use qty_test_support::app::{Names, TestApp, WAIT, eventually, request_body};
use qty_test_support::rabbitmq::Cluster;
use std::collections::BTreeSet;

const PLUGIN: &str = "rabbitmq_consistent_hash_exchange";

/// `size` clustered nodes of the release under test with the hash exchange
/// plugin, and names on the first; `None` (after saying so) without binaries.
async fn nodes_with_plugin(size: usize) -> Option<(Cluster, Names)> {
    if !qty_test_support::servers_available() {
        eprintln!("skipped: no PostgreSQL/RabbitMQ binaries");
        return None;
    }
    let cluster = tokio::task::spawn_blocking(move || Cluster::start_with_plugins(size, &[PLUGIN]))
        .await
        .expect("start RabbitMQ nodes");
    let names = Names::on_own_servers(
        "postgres://postgres@127.0.0.1:5432".into(),
        cluster.node(0).url(),
    );
    Some((cluster, names))
}

#[tokio::test]
async fn partition_leaders_spread_over_every_node_of_a_cluster() {
    // The worker knows only the first node: the leaders would all be there
    // if the node it declares on chose them.
    let Some((cluster, names)) = nodes_with_plugin(3).await else {
        return;
    };
    let app = TestApp::spawn_on(names, |settings| settings.worker.partitions = Some(8)).await;
    let listed = qty_test_support::run(cluster.node(0).ctl().args([
        "list_queues",
        "name",
        "leader",
        "--no-table-headers",
    ]));
    let prefix = format!("{}.", app.names.queue);
    let leaders: Vec<(&str, &str)> = listed
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .filter(|(name, _)| {
            name.strip_prefix(&prefix)
                .is_some_and(|index| index.parse::<u16>().is_ok())
        })
        .collect();
    assert_eq!(leaders.len(), 8, "8 partition queues: {listed}");
    let nodes: BTreeSet<&str> = leaders.iter().map(|(_, leader)| *leader).collect();
    let all: BTreeSet<&str> = cluster
        .nodes
        .iter()
        .map(|node| node.name.as_str())
        .collect();
    assert_eq!(
        nodes, all,
        "the partition leaders sit on every node: {leaders:?}"
    );
    drop(app);
    drop(cluster);
}

#[tokio::test]
async fn partition_queues_an_older_version_declared_keep_working() {
    let Some((cluster, names)) = nodes_with_plugin(1).await else {
        return;
    };
    // The partition queues exactly as the previous version declared them:
    // no leader locator.
    let connection = qty_test_support::app::connect_any(&names.amqp_url)
        .await
        .expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    let mut v4 = FieldTable::default();
    let text = |value: &str| AMQPValue::LongString(value.into());
    v4.insert("x-queue-type".into(), text("quorum"));
    v4.insert(
        "x-dead-letter-exchange".into(),
        text(&format!("{}.dlx", names.exchange)),
    );
    v4.insert("x-dead-letter-routing-key".into(), text(&names.queue));
    v4.insert("x-delivery-limit".into(), AMQPValue::LongInt(10));
    v4.insert("x-dead-letter-strategy".into(), text("at-least-once"));
    v4.insert("x-overflow".into(), text("reject-publish"));
    v4.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    for index in 0..2 {
        channel
            .queue_declare(
                format!("{}.{index}", names.queue).as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                v4.clone(),
            )
            .await
            .expect("declare a partition queue as v4 did");
    }

    let mut app = TestApp::spawn_on(names, |settings| settings.worker.partitions = Some(2)).await;
    eventually("the worker to own both partitions", WAIT, || async {
        match app.get("/readyz").await {
            (200, body) if body.contains("partitions: 0,1\n") => Ok(()),
            other => Err(other),
        }
    })
    .await;
    let items: Vec<uuid::Uuid> =
        futures::future::join_all((0..4).map(|_| app.create_item(1))).await;
    for (n, item) in items.iter().enumerate() {
        let mut headers = FieldTable::default();
        headers.insert("item_id".into(), text(&item.to_string()));
        app.publish_raw(
            app.props(&format!("old-{n}")).with_headers(headers),
            request_body(*item, 1).as_bytes(),
        )
        .await;
    }
    let replies = app.replies_by_message_id(4).await;
    assert!(
        replies.values().all(|reply| reply.outcome() == "applied"),
        "{replies:?}"
    );
    // The topology keeper re-declares every few seconds: still no conflict.
    let (status, body) = app.get("/readyz").await;
    assert_eq!(status, 200, "{body}");
    drop(app);
    drop(cluster);
}
