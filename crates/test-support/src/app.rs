//! One test's world (`TestApp`): its own database, exchange and queue (random
//! suffix), a worker running on its own runtime thread, and a publisher/listener
//! connection of its own. Everything is removed on drop, even when a test fails.
//! The pieces live in modules of their own and are re-exported here.

pub use crate::WAIT;
pub use crate::amqp::{connect_any, listen, publish, request_body};
pub use crate::eventually;
pub use crate::http::http_get;
pub use crate::in_process::{RunningWorker, init_logs};
pub use crate::names::{Names, RemovedOnDrop, amqp_url, run_apart};
pub use crate::reply::{Reply, assert_documented_reply, next_reply};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, Consumer};
use qty_worker::settings::Settings;
use sqlx::PgPool;
use uuid::Uuid;

/// One test's world: names, worker, database pool and broker client.
pub struct TestApp {
    pub names: Names,
    pub worker: RunningWorker,
    pub pool: PgPool,
    pub connection: Connection,
    pub channel: Channel,
    /// Server-named queue the test's requests name as `reply_to`.
    pub reply_queue: String,
    replies: Consumer,
}

/// Holds `item`'s row `FOR UPDATE` in a transaction on `pool`, as an
/// operator's would, until the returned transaction ends.
pub async fn lock_row(pool: &PgPool, item: Uuid) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut lock = pool.begin().await.expect("begin");
    sqlx::query("select 1 from items where id = $1 for update")
        .bind(item)
        .execute(&mut *lock)
        .await
        .expect("lock the row");
    lock
}

impl TestApp {
    pub async fn spawn() -> TestApp {
        Self::spawn_with(|_| {}).await
    }

    pub async fn spawn_with(configure: impl FnOnce(&mut Settings)) -> TestApp {
        Self::spawn_on(Names::random(), configure).await
    }

    /// A test app whose own clients use `names`' servers, and whose worker is
    /// configured by `configure` from there.
    pub async fn spawn_on(names: Names, configure: impl FnOnce(&mut Settings)) -> TestApp {
        init_logs();
        let mut settings = names.settings();
        configure(&mut settings);
        let worker = RunningWorker::start(settings);
        worker.wait_until_ready().await;
        let pool = PgPool::connect(&names.database_url())
            .await
            .expect("test pool");
        let connection = connect_any(&names.amqp_url)
            .await
            .expect("test broker connection");
        let channel = connection.create_channel().await.expect("test channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        let (reply_queue, replies) = listen(&channel, None).await;
        TestApp {
            names,
            worker,
            pool,
            connection,
            channel,
            reply_queue,
            replies,
        }
    }

    pub async fn create_item(&self, qty: i64) -> Uuid {
        let id = Uuid::new_v4();
        sqlx::query("insert into items (id, qty) values ($1, $2)")
            .bind(id)
            .bind(qty)
            .execute(&self.pool)
            .await
            .expect("insert item");
        id
    }

    pub async fn qty(&self, item: Uuid) -> i64 {
        sqlx::query_scalar("select qty from items where id = $1")
            .bind(item)
            .fetch_one(&self.pool)
            .await
            .expect("item exists")
    }

    pub async fn ledger_rows(&self) -> i64 {
        sqlx::query_scalar("select count(*) from adjustments")
            .fetch_one(&self.pool)
            .await
            .expect("count ledger")
    }

    /// Request properties as a well-behaved publisher sets them.
    pub fn props(&self, message_id: &str) -> BasicProperties {
        BasicProperties::default()
            .with_message_id(message_id.into())
            .with_content_type("application/json".into())
            .with_reply_to(self.reply_queue.as_str().into())
            .with_delivery_mode(2)
    }

    /// Publishes raw bytes to the exchange with routing key `qty.adjust`.
    pub async fn publish_raw(&self, properties: BasicProperties, body: &[u8]) {
        publish(
            &self.channel,
            &self.names.exchange,
            "qty.adjust",
            properties,
            body,
        )
        .await;
    }

    /// Publishes a well-formed request whose reply comes to this test.
    pub async fn adjust(&self, message_id: &str, item: Uuid, delta: i64) {
        self.publish_raw(self.props(message_id), request_body(item, delta).as_bytes())
            .await;
    }

    /// Publishes a well-formed request `mandatory`, and says whether the broker
    /// routed it to a queue (a returned one was not enqueued anywhere).
    pub async fn adjust_routed(
        &self,
        message_id: &str,
        item: Uuid,
        delta: i64,
    ) -> Result<(), String> {
        let body = request_body(item, delta);
        let confirm = self
            .channel
            .basic_publish(
                self.names.exchange.as_str().into(),
                "qty.adjust".into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body.as_bytes(),
                self.props(message_id),
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

    /// The next reply on this test's reply queue.
    pub async fn next_reply(&mut self) -> Reply {
        next_reply(&mut self.replies, "a reply on the test's reply queue").await
    }

    pub async fn replies(&mut self, count: usize) -> Vec<Reply> {
        let mut replies = Vec::with_capacity(count);
        for _ in 0..count {
            replies.push(self.next_reply().await);
        }
        replies
    }

    /// The next `count` replies keyed by the body's `message_id`; replies to
    /// concurrent requests arrive in any order.
    pub async fn replies_by_message_id(
        &mut self,
        count: usize,
    ) -> std::collections::BTreeMap<String, Reply> {
        let mut by_id = std::collections::BTreeMap::new();
        for reply in self.replies(count).await {
            let id = reply.body["message_id"]
                .as_str()
                .expect("reply names its message_id")
                .to_owned();
            assert!(
                by_id.insert(id.clone(), reply).is_none(),
                "two replies for {id}"
            );
        }
        by_id
    }

    /// Messages ready in the request queue (unacked ones are not counted until
    /// their channel closes).
    pub async fn queue_depth(&self) -> u32 {
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        self.channel
            .queue_declare(
                self.names.queue.as_str().into(),
                passive,
                FieldTable::default(),
            )
            .await
            .expect("the request queue exists")
            .message_count()
    }

    /// Holds `item`'s row `FOR UPDATE` in a transaction of another session, as
    /// an operator's would, until the returned transaction ends.
    pub async fn lock_row(&self, item: Uuid) -> sqlx::Transaction<'static, sqlx::Postgres> {
        let holder = PgPool::connect(&self.names.database_url())
            .await
            .expect("a session to hold the lock");
        lock_row(&holder, item).await
    }

    /// Deletes the test's exchange, as an operator might by mistake.
    pub async fn delete_exchange(&self) {
        self.channel
            .exchange_delete(
                self.names.exchange.as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await
            .expect("delete the exchange");
    }

    /// Whether the test's exchange exists, asked on a channel of its own (a
    /// passive declare of a missing exchange closes its channel).
    pub async fn exchange_exists(&self) -> Result<(), String> {
        let probe = self
            .connection
            .create_channel()
            .await
            .map_err(|e| e.to_string())?;
        let found = probe
            .exchange_declare(
                self.names.exchange.as_str().into(),
                lapin::ExchangeKind::Topic,
                lapin::options::ExchangeDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        probe.close(200, "probe".into()).await.ok();
        found.map_err(|e| e.to_string())
    }

    /// Waits until the request queue has no messages ready.
    pub async fn wait_until_queue_drained(&self) {
        eventually("the request queue to be drained", WAIT, || async {
            match self.queue_depth().await {
                0 => Ok(()),
                depth => Err(format!("{depth} messages ready")),
            }
        })
        .await;
    }

    pub async fn wait_until_ready(&self) {
        self.worker.wait_until_ready().await;
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        http_get(self.worker.http_addr, path).await
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.worker.stop().ok();
        self.names.remove_all();
    }
}
