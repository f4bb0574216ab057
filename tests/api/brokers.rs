//! The README's Brokers table, measured on the release the tests run on
//! (`QTY_TEST_RABBITMQ`): how a quorum queue returns, requeues and counts
//! deliveries, and the version the worker shows. Each row is measured here, on
//! queues of the test's own, and compared with what the README says of that
//! release, so a broker release that changes a row fails this test.

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicRejectOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection};
use qty_test_support::app::{TestApp, WAIT, amqp_url, connect_any, eventually, publish, run_apart};
use qty_test_support::rabbitmq::Release;

/// One release's column of the README's Brokers table.
#[derive(Debug, PartialEq, Eq)]
struct Column {
    /// Where a requeued message goes in a queue with a delivery limit (the
    /// worker's queues have one): `front` or `back`.
    requeue_with_limit: &'static str,
    /// The same in a quorum queue without a delivery limit.
    requeue_without_limit: &'static str,
    /// Whether `basic.nack` with requeue counts toward `x-delivery-limit`.
    nack_counts: bool,
    /// Whether `basic.reject` with requeue counts.
    reject_counts: bool,
    /// Whether a channel closed with the delivery in hand counts.
    close_counts: bool,
    /// How many deliveries a quorum queue declared without a delivery limit
    /// allows before it drops a message that keeps being rejected (None: no limit).
    default_limit: Option<u32>,
}

/// What the README's Brokers table says of `release`.
fn documented(release: &str) -> Column {
    match release {
        "3.10" => Column {
            requeue_with_limit: "front",
            requeue_without_limit: "back",
            nack_counts: true,
            reject_counts: true,
            close_counts: true,
            default_limit: None,
        },
        "4.0" => Column {
            requeue_with_limit: "front",
            requeue_without_limit: "front",
            nack_counts: true,
            reject_counts: true,
            close_counts: true,
            default_limit: Some(20),
        },
        "current" => Column {
            requeue_with_limit: "front",
            requeue_without_limit: "front",
            nack_counts: false,
            reject_counts: true,
            close_counts: true,
            default_limit: Some(20),
        },
        other => panic!("no Brokers column for {other}"),
    }
}

/// How the test gives a message back.
#[derive(Clone, Copy, Debug)]
enum GiveBack {
    Nack,
    Reject,
    /// Closes the channel with the message unacked.
    Close,
}

/// A quorum queue of the test's own, deleted on drop.
struct ProbeQueue {
    name: String,
    dead: String,
    connection: Connection,
}

impl ProbeQueue {
    /// Dead-lettering to a queue of its own; with `limit`, after that many
    /// returns, as the worker's request queue does.
    async fn declare(limit: Option<i32>) -> ProbeQueue {
        let connection = connect_any(amqp_url()).await.expect("connect");
        let name = format!("qtyw-probe-{}", qty_test_support::suffix());
        let dead = format!("{name}.dead");
        let channel = connection.create_channel().await.expect("channel");
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let mut arguments = FieldTable::default();
        arguments.insert("x-queue-type".into(), text("quorum"));
        channel
            .queue_declare(dead.as_str().into(), durable, arguments.clone())
            .await
            .expect("declare the dead-letter queue");
        arguments.insert("x-dead-letter-exchange".into(), text(""));
        arguments.insert("x-dead-letter-routing-key".into(), text(&dead));
        if let Some(limit) = limit {
            arguments.insert("x-delivery-limit".into(), AMQPValue::LongInt(limit));
        }
        channel
            .queue_declare(name.as_str().into(), durable, arguments)
            .await
            .expect("declare the probe queue");
        ProbeQueue {
            name,
            dead,
            connection,
        }
    }

    async fn publish(&self, bodies: impl IntoIterator<Item = String>) {
        let channel = self.connection.create_channel().await.expect("channel");
        channel
            .confirm_select(Default::default())
            .await
            .expect("confirms");
        for body in bodies {
            publish(
                &channel,
                "",
                &self.name,
                BasicProperties::default(),
                body.as_bytes(),
            )
            .await;
        }
    }

    /// The next message, by `basic.get` on `channel`.
    async fn get(&self, channel: &Channel) -> Option<(u64, String)> {
        let got = channel
            .basic_get(self.name.as_str().into(), BasicGetOptions::default())
            .await
            .expect("basic.get")?;
        Some((
            got.delivery.delivery_tag,
            String::from_utf8_lossy(&got.delivery.data).into_owned(),
        ))
    }

    async fn count(&self, queue: &str) -> u32 {
        let channel = self.connection.create_channel().await.expect("channel");
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let count = channel
            .queue_declare(queue.into(), passive, FieldTable::default())
            .await
            .expect("the queue exists")
            .message_count();
        channel.close(200, "counted".into()).await.ok();
        count
    }

    /// Publishes `0`..`4`, takes `0`, gives it back, and says where it went.
    async fn requeue_position(&self) -> &'static str {
        self.publish((0..5).map(|n| n.to_string())).await;
        let channel = self.connection.create_channel().await.expect("channel");
        let (tag, first) = self.get(&channel).await.expect("a first message");
        assert_eq!(first, "0");
        give_back(&channel, tag, GiveBack::Nack).await;
        let (tag, next) = self.get(&channel).await.expect("a next message");
        channel
            .basic_ack(tag, BasicAckOptions::default())
            .await
            .expect("ack");
        channel.close(200, "measured".into()).await.ok();
        if next == "0" { "front" } else { "back" }
    }

    /// Gives one message back `how` until the queue no longer has it (at most
    /// `tries` times); returns how often it was delivered.
    async fn deliveries_until_gone(&self, how: GiveBack, tries: u32) -> u32 {
        self.publish(["poison".to_owned()]).await;
        let mut delivered = 0;
        for _ in 0..tries {
            // A channel each time: a closed one cannot take the next get.
            let channel = self.connection.create_channel().await.expect("channel");
            let Some((tag, _)) = self.get(&channel).await else {
                break;
            };
            delivered += 1;
            give_back(&channel, tag, how).await;
            channel.close(200, "given back".into()).await.ok();
            // The queue applies the return through its log: wait for it.
            self.wait_until_back_or_dead().await;
        }
        delivered
    }

    /// Waits until the message is back in the queue or dead-lettered.
    async fn wait_until_back_or_dead(&self) {
        eventually("the message to be back or dead-lettered", WAIT, || async {
            let ready = self.count(&self.name).await;
            let dead = self.count(&self.dead).await;
            if ready + dead == 1 {
                Ok(())
            } else {
                Err(format!("{ready} ready, {dead} dead-lettered"))
            }
        })
        .await;
    }

    /// Whether `how` counts toward a delivery limit of 2: counted, the message
    /// goes to the dead-letter queue after its third delivery.
    async fn counts(how: GiveBack) -> bool {
        let queue = ProbeQueue::declare(Some(2)).await;
        let delivered = queue.deliveries_until_gone(how, 8).await;
        let dead = queue.count(&queue.dead).await;
        match (delivered, dead) {
            (3, 1) => true,
            (8, 0) => false,
            other => panic!("{how:?}: delivered and dead-lettered {other:?}"),
        }
    }
}

impl Drop for ProbeQueue {
    fn drop(&mut self) {
        let queues = [self.name.clone(), self.dead.clone()];
        run_apart(async move {
            let Some(connection) = connect_any(amqp_url()).await else {
                return;
            };
            if let Ok(channel) = connection.create_channel().await {
                for queue in queues {
                    channel
                        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                        .await
                        .ok();
                }
            }
            connection.close(200, "test done".into()).await.ok();
        });
    }
}

/// Gives the delivery `tag` back `how`, with requeue (`Close`: leaves it in
/// hand for the channel's close).
async fn give_back(channel: &Channel, tag: u64, how: GiveBack) {
    match how {
        GiveBack::Nack => {
            let options = BasicNackOptions {
                requeue: true,
                ..Default::default()
            };
            channel.basic_nack(tag, options).await.expect("nack");
        }
        GiveBack::Reject => {
            let options = BasicRejectOptions { requeue: true };
            channel.basic_reject(tag, options).await.expect("reject");
        }
        GiveBack::Close => {}
    }
}

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.as_bytes().to_vec()))
}

#[tokio::test]
async fn the_brokers_table_holds_for_the_release_under_test() {
    let release = Release::from_env();
    let expected = documented(release.label());

    let default_limit = {
        let queue = ProbeQueue::declare(None).await;
        let delivered = queue.deliveries_until_gone(GiveBack::Reject, 25).await;
        (queue.count(&queue.dead).await == 1).then_some(delivered - 1)
    };
    let measured = Column {
        requeue_with_limit: ProbeQueue::declare(Some(10)).await.requeue_position().await,
        requeue_without_limit: ProbeQueue::declare(None).await.requeue_position().await,
        nack_counts: ProbeQueue::counts(GiveBack::Nack).await,
        reject_counts: ProbeQueue::counts(GiveBack::Reject).await,
        close_counts: ProbeQueue::counts(GiveBack::Close).await,
        default_limit,
    };
    assert_eq!(
        measured,
        expected,
        "RabbitMQ {} ({:?}) no longer behaves as the README's Brokers table says",
        release.label(),
        release.version()
    );
}

#[tokio::test]
async fn the_worker_shows_the_version_of_its_broker() {
    let Some(version) = Release::from_env().version() else {
        println!("skipped: no Debian package says which RabbitMQ runs");
        return;
    };
    let app = TestApp::spawn().await;
    let expected =
        format!("qty_worker_broker_info{{product=\"RabbitMQ\",version=\"{version}\"}} 1");
    eventually(
        "qty_worker_broker_info to name the broker",
        WAIT,
        || async {
            let (_, metrics) = app.get("/metrics").await;
            let shown: Vec<&str> = metrics
                .lines()
                .filter(|line| line.starts_with("qty_worker_broker_info"))
                .collect();
            if shown == [expected.as_str()] {
                Ok(())
            } else {
                Err(format!("{shown:?}"))
            }
        },
    )
    .await;
}
