//! Who may adjust, and least privilege on RabbitMQ (contract §1, §2, §4, §9). The
//! worker runs as a broker user with exactly the documented permissions and
//! serves only the publishers `QTY_PUBLISHERS` lists, judged by the `user_id`
//! property the broker validates. Users and permissions are the whole broker's,
//! so this runs on a RabbitMQ node of its own.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use qty_test_support::app::{Names, Reply, TestApp, listen, next_reply, request_body};
use qty_test_support::eventually;
use qty_test_support::rabbitmq::{Cluster, Node};
use qty_worker::broker::{Permissions, Topology};
use std::time::Duration;
use uuid::Uuid;

pub(crate) fn add_user(node: &Node, user: &str, permissions: &Permissions) {
    for args in [
        vec!["add_user", user, "secret"],
        [
            vec!["set_permissions", "-p", "/", user],
            permissions.args().to_vec(),
        ]
        .concat(),
    ] {
        let output = node.ctl().args(&args).output().expect("rabbitmqctl");
        assert!(output.status.success(), "rabbitmqctl {args:?}: {output:?}");
    }
}

pub(crate) fn url_of(node: &Node, user: &str) -> String {
    format!("amqp://{user}:secret@127.0.0.1:{}/%2f", node.port)
}

/// A publisher's connection as `user`, with a reply queue of its own.
struct Publisher {
    _connection: Connection,
    channel: Channel,
    reply_queue: String,
    replies: lapin::Consumer,
}

impl Publisher {
    async fn connect(node: &Node, user: &str) -> Publisher {
        let connection = Connection::connect(&url_of(node, user), ConnectionProperties::default())
            .await
            .expect("connect as the publisher");
        let channel = connection.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        let (reply_queue, replies) = listen(&channel, None).await;
        Publisher {
            _connection: connection,
            channel,
            reply_queue,
            replies,
        }
    }

    /// Publishes a request `mandatory`; `user_id` as given (the broker checks
    /// it). A request no queue took is an error.
    async fn publish(
        &self,
        exchange: &str,
        message_id: &str,
        user_id: Option<&str>,
        item: Uuid,
        delta: i64,
    ) -> Result<(), String> {
        let mut properties = BasicProperties::default()
            .with_message_id(message_id.into())
            .with_content_type("application/json".into())
            .with_reply_to(self.reply_queue.as_str().into());
        if let Some(user) = user_id {
            properties = properties.with_user_id(user.into());
        }
        let confirm = self
            .channel
            .basic_publish(
                exchange.into(),
                "qty.adjust".into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                request_body(item, delta).as_bytes(),
                properties,
            )
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        match confirm {
            lapin::Confirmation::Ack(None) => Ok(()),
            other => Err(format!("not routed: {other:?}")),
        }
    }

    async fn reply(&mut self) -> Reply {
        next_reply(&mut self.replies, "a reply to the publisher").await
    }

    /// Publishes a request that must be routed, and waits for its reply.
    async fn adjust(
        &mut self,
        exchange: &str,
        message_id: &str,
        user_id: Option<&str>,
        item: Uuid,
        delta: i64,
    ) -> Reply {
        self.publish(exchange, message_id, user_id, item, delta)
            .await
            .expect("published");
        self.reply().await
    }
}

async fn ledger_publisher(app: &TestApp, message_id: &str) -> Option<Option<String>> {
    sqlx::query_scalar("select publisher from adjustments where message_id = $1")
        .bind(message_id)
        .fetch_optional(&app.pool)
        .await
        .expect("read the ledger")
}

#[tokio::test]
async fn only_listed_publishers_adjust_and_the_worker_needs_only_its_documented_permissions() {
    if !qty_test_support::servers_available() {
        eprintln!("skipped: no PostgreSQL/RabbitMQ binaries");
        return;
    }
    let cluster = Cluster::start(1);
    let node = cluster.node(0);
    let names = Names::on_own_servers("postgres://postgres@127.0.0.1:5432".into(), node.url());
    let topology = Topology::new(&names.exchange, &names.queue, 10);
    add_user(node, "qty-worker", &Permissions::worker(&topology));
    add_user(node, "orders", &Permissions::publisher(&names.exchange));
    add_user(node, "stranger", &Permissions::publisher(&names.exchange));
    let worker_url = url_of(node, "qty-worker");
    let app = TestApp::spawn_on(names, |settings| {
        settings.connections.broker.amqp_url = worker_url.clone();
        settings.worker.publishers = Some("orders,returns".into());
    })
    .await;
    let exchange = app.names.exchange.clone();
    let item = app.create_item(10).await;
    let mut orders = Publisher::connect(node, "orders").await;
    let mut stranger = Publisher::connect(node, "stranger").await;

    // A listed publisher: applied, replied to its own queue, and the ledger
    // names it.
    let reply = orders
        .adjust(&exchange, "o-1", Some("orders"), item, -1)
        .await;
    assert_eq!(
        (reply.outcome(), reply.body["qty"].as_i64()),
        ("applied", Some(9))
    );
    assert_eq!(
        ledger_publisher(&app, "o-1").await,
        Some(Some("orders".into()))
    );

    // Another user, and a listed one without user_id: forbidden, nothing recorded.
    let reply = stranger
        .adjust(&exchange, "s-1", Some("stranger"), item, -5)
        .await;
    assert_eq!(
        (reply.outcome(), reply.reason()),
        ("rejected", Some("forbidden"))
    );
    assert!(
        reply.body["error"]
            .as_str()
            .expect("error")
            .contains("stranger"),
        "{}",
        reply.body
    );
    assert_eq!(reply.body["item_id"], item.to_string());
    let reply = orders.adjust(&exchange, "o-2", None, item, -1).await;
    assert_eq!(
        (reply.outcome(), reply.reason()),
        ("rejected", Some("forbidden"))
    );
    assert_eq!(ledger_publisher(&app, "s-1").await, None);
    assert_eq!(ledger_publisher(&app, "o-2").await, None);
    assert_eq!(app.qty(item).await, 9);

    // A forged user_id never reaches the worker: the broker refuses it.
    let forged = stranger
        .publish(&exchange, "f-1", Some("orders"), item, -9)
        .await;
    let error = forged.expect_err("the broker must refuse a forged user_id");
    assert!(
        error.contains("PRECONDITION_FAILED") || error.contains("406"),
        "{error}"
    );
    assert_eq!(ledger_publisher(&app, "f-1").await, None);

    // No squatting: a refused request claims nothing, so the allowed publisher's
    // request with the same message_id is served as new.
    let stranger = Publisher::connect(node, "stranger").await;
    stranger
        .publish(&exchange, "k-shared", Some("stranger"), item, -9)
        .await
        .expect("published");
    let reply = orders
        .adjust(&exchange, "k-shared", Some("orders"), item, -2)
        .await;
    assert_eq!(
        (reply.outcome(), reply.body["qty"].as_i64()),
        ("applied", Some(7))
    );
    assert_eq!(
        ledger_publisher(&app, "k-shared").await,
        Some(Some("orders".into()))
    );

    let (_, metrics) = app.get("/metrics").await;
    assert!(
        metrics
            .contains(r#"qty_worker_adjustments_total{outcome="rejected",reason="forbidden"} 3"#),
        "{metrics}"
    );

    // With exactly its documented permissions the worker declares its topology
    // again when someone deletes it, and serves on.
    app.delete_exchange().await;
    // Routed once the worker has declared the exchange and its binding again
    // (a publish to a missing exchange would close the publisher's channel).
    eventually(
        "the worker to declare its exchange again",
        Duration::from_secs(30),
        || async { app.exchange_exists().await },
    )
    .await;
    eventually(
        "a request to be routed to the worker's queue again",
        Duration::from_secs(30),
        || orders.publish(&exchange, "o-3", Some("orders"), item, -1),
    )
    .await;
    assert_eq!(orders.reply().await.outcome(), "applied");
    drop(app);
    drop(cluster);
}

/// With exactly its documented permissions, the worker's queue still
/// dead-letters a message that keeps failing to `<queue>.dead`.
#[cfg(feature = "fault-injection")]
#[tokio::test]
async fn with_its_documented_permissions_a_poison_message_is_dead_lettered() {
    if !qty_test_support::servers_available() {
        eprintln!("skipped: no PostgreSQL/RabbitMQ binaries");
        return;
    }
    let cluster = Cluster::start(1);
    let node = cluster.node(0);
    let names = Names::on_own_servers("postgres://postgres@127.0.0.1:5432".into(), node.url());
    let topology = Topology::new(&names.exchange, &names.queue, 3);
    add_user(node, "qty-worker", &Permissions::worker(&topology));
    let worker_url = url_of(node, "qty-worker");
    let app = TestApp::spawn_on(names, |settings| {
        settings.connections.broker.amqp_url = worker_url.clone();
        settings.worker.delivery_limit = 3;
    })
    .await;
    let item = app.create_item(1).await;
    app.adjust("fault:panic-1", item, 1).await;
    let dead = topology.dead_letter_queue.clone();
    eventually(
        "the poison message in the dead-letter queue",
        Duration::from_secs(60),
        || async {
            let queue = app
                .channel
                .queue_declare(
                    dead.as_str().into(),
                    lapin::options::QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    lapin::types::FieldTable::default(),
                )
                .await
                .map_err(|e| e.to_string())?;
            if queue.message_count() == 1 {
                Ok(())
            } else {
                Err(queue.message_count().to_string())
            }
        },
    )
    .await;
    drop(app);
    drop(cluster);
}
