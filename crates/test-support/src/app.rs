//! Test harness: each `TestApp` gets its own database, exchange and queue (random
//! suffix), a worker running on its own runtime thread, and a publisher/listener
//! connection of its own. Everything is removed on drop, even when a test fails.

pub use crate::eventually;
use futures::StreamExt as _;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use qty_worker::settings::{
    BrokerArgs, Connections, DatabaseArgs, ExchangeArg, QueueArg, Settings, WorkerSettings,
};
use serde_json::Value;
use sqlx::{Connection as _, PgConnection, PgPool};
use std::net::SocketAddr;
use std::time::Duration;
use uuid::Uuid;

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// How long any single wait in a test may take before it fails with a message.
pub const WAIT: Duration = Duration::from_secs(30);

/// Worker logs go to the test output when `RUST_LOG` is set, and nowhere otherwise.
pub fn init_logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .try_init()
            .ok();
    }
}

/// A fresh set of names for one test, and the servers they live on.
#[derive(Clone, Debug)]
pub struct Names {
    pub database: String,
    pub exchange: String,
    pub queue: String,
    /// `postgres://postgres@HOST:PORT`, without a database.
    pub postgres: String,
    /// The broker's URL, or several comma-separated (a cluster's nodes).
    pub amqp_url: String,
}

impl Names {
    /// Names on the servers at the default addresses.
    pub fn random() -> Names {
        let suffix = Uuid::new_v4().simple().to_string()[..12].to_owned();
        Names {
            database: format!("qtyw_test_{suffix}"),
            exchange: format!("qtyw-test-{suffix}"),
            queue: format!("qtyw-test-{suffix}.adjust"),
            postgres: "postgres://postgres@127.0.0.1:5432".into(),
            amqp_url: AMQP_URL.into(),
        }
    }

    /// Names on servers of the test's own (the fault suite's).
    pub fn on_own_servers(postgres: String, amqp_url: String) -> Names {
        Names {
            postgres,
            amqp_url,
            ..Names::random()
        }
    }

    pub fn database_url(&self) -> String {
        format!("{}/{}", self.postgres, self.database)
    }

    pub fn settings(&self) -> Settings {
        Settings {
            connections: Connections {
                broker: BrokerArgs {
                    amqp_url: self.amqp_url.clone(),
                    amqp_ca_file: None,
                },
                database: DatabaseArgs {
                    database_url: self.database_url(),
                },
                exchange: ExchangeArg {
                    exchange: self.exchange.clone(),
                },
                queue: QueueArg {
                    queue: self.queue.clone(),
                },
            },
            worker: WorkerSettings {
                prefetch: 32,
                http_addr: "127.0.0.1:0".parse().expect("valid address"),
                delivery_limit: 10,
                db_pool: 4,
                batch_max: 100,
                lock_wait_ms: qty_worker::settings::DEFAULT_LOCK_WAIT_MS,
                drain_secs: 10,
                publishers: None,
                set_aside_max: qty_worker::settings::DEFAULT_SET_ASIDE_MAX,
                migrate: qty_worker::settings::MigrateMode::Apply,
            },
        }
    }

    /// Deletes the test's queues, exchanges and database. Runs on its own runtime
    /// so it can be called from `Drop`.
    pub fn remove_all(&self) {
        let names = self.clone();
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cleanup runtime");
            runtime.block_on(async move {
                if let Some(connection) = connect_any(&names.amqp_url).await
                    && let Ok(channel) = connection.create_channel().await
                {
                    let topology =
                        qty_worker::broker::Topology::new(&names.exchange, &names.queue, 1);
                    let queues = [
                        topology.queue,
                        topology.dead_letter_queue,
                        format!("{}.replies", names.queue),
                    ];
                    for queue in queues {
                        channel
                            .queue_delete(queue.into(), QueueDeleteOptions::default())
                            .await
                            .ok();
                    }
                    for exchange in [topology.exchange, topology.dead_letter_exchange] {
                        channel
                            .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
                            .await
                            .ok();
                    }
                    connection.close(200, "test done".into()).await.ok();
                }
                if let Ok(mut admin) =
                    PgConnection::connect(&format!("{}/postgres", names.postgres)).await
                {
                    let drop = format!(
                        "drop database if exists \"{}\" with (force)",
                        names.database
                    );
                    sqlx::query(sqlx::AssertSqlSafe(drop))
                        .execute(&mut admin)
                        .await
                        .ok();
                }
            });
        });
        cleanup.join().ok();
    }
}

/// A worker running in-process on its own runtime thread.
pub struct RunningWorker {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
    pub http_addr: SocketAddr,
}

impl RunningWorker {
    pub fn start(settings: Settings) -> RunningWorker {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("worker runtime");
            runtime.block_on(async move {
                let worker = qty_worker::Worker::build(settings).await?;
                ready_tx.send(worker.http_addr()).ok();
                worker
                    .run_until_stopped(async {
                        stopped.await.ok();
                    })
                    .await
            })
        });
        let http_addr = ready_rx
            .recv_timeout(WAIT)
            .expect("the worker did not build within the wait (database reachable?)");
        RunningWorker {
            stop: Some(stop),
            thread: Some(thread),
            http_addr,
        }
    }

    /// Waits until `/readyz` says the worker is consuming, so requests published
    /// from now on find the topology declared.
    pub async fn wait_until_ready(&self) {
        eventually("the worker to be ready", WAIT, || async {
            match http_get(self.http_addr, "/readyz").await {
                (200, _) => Ok(()),
                (status, body) => Err(format!("{status}: {body}")),
            }
        })
        .await;
    }

    /// Asks the worker to stop and waits for it; returns what `run_until_stopped` returned.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            stop.send(()).ok();
        }
        match self.thread.take() {
            Some(thread) => thread.join().expect("worker thread panicked"),
            None => Ok(()),
        }
    }
}

impl Drop for RunningWorker {
    fn drop(&mut self) {
        self.stop().ok();
    }
}

/// `docs/schemas/reply.json`, which `docs/asyncapi.yaml` points at: every reply a
/// test receives is checked against it, so the document cannot drift from the code.
static REPLY_SCHEMA: std::sync::LazyLock<jsonschema::Validator> = std::sync::LazyLock::new(|| {
    let schema: Value = serde_json::from_str(include_str!("../../../docs/schemas/reply.json"))
        .expect("reply.json is JSON");
    jsonschema::validator_for(&schema).expect("reply.json is a valid JSON Schema")
});

/// Panics unless `body` matches the documented reply schema.
pub fn assert_documented_reply(body: &Value) {
    if let Err(error) = REPLY_SCHEMA.validate(body) {
        panic!("reply does not match docs/schemas/reply.json: {error}\n{body}");
    }
}

/// A reply as a listener sees it.
#[derive(Debug, Clone)]
pub struct Reply {
    pub body: Value,
    pub raw: Vec<u8>,
    pub properties: BasicProperties,
    pub routing_key: String,
}

impl Reply {
    pub fn outcome(&self) -> &str {
        self.body["outcome"].as_str().expect("reply has an outcome")
    }
    pub fn reason(&self) -> Option<&str> {
        self.body["reason"].as_str()
    }
    pub fn message_id(&self) -> Option<String> {
        self.properties.message_id().as_ref().map(|s| s.to_string())
    }
    /// A text header of the reply (`traceparent`, say).
    pub fn header(&self, name: &str) -> Option<String> {
        qty_worker::broker::header_text(&self.properties, name)
    }

    pub fn correlation_id(&self) -> Option<String> {
        self.properties
            .correlation_id()
            .as_ref()
            .map(|s| s.to_string())
    }
}

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
        let mut lock = holder.begin().await.expect("begin");
        sqlx::query("select 1 from items where id = $1 for update")
            .bind(item)
            .execute(&mut *lock)
            .await
            .expect("lock the row");
        lock
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

/// Connects to the first broker of a comma-separated list that answers.
/// A well-formed request body.
pub fn request_body(item: Uuid, delta: i64) -> String {
    serde_json::json!({ "item_id": item, "delta": delta }).to_string()
}

pub async fn connect_any(urls: &str) -> Option<Connection> {
    for url in urls.split(',') {
        if let Ok(connection) = Connection::connect(url, ConnectionProperties::default()).await {
            return Some(connection);
        }
    }
    None
}

/// Declares a server-named exclusive queue, optionally bound to `exchange` with
/// `binding`, and consumes it without acks.
pub async fn listen(channel: &Channel, binding: Option<(&str, &str)>) -> (String, Consumer) {
    let name = qty_worker::broker::declare_private_queue(channel)
        .await
        .expect("declare listener queue");
    if let Some((exchange, key)) = binding {
        channel
            .queue_bind(
                name.as_str().into(),
                exchange.into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind listener queue");
    }
    let consumer = qty_worker::broker::consume_without_acks(channel, &name)
        .await
        .expect("consume listener queue");
    (name, consumer)
}

pub async fn publish(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    properties: BasicProperties,
    body: &[u8],
) {
    let confirm = channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            body,
            properties,
        )
        .await
        .expect("publish request")
        .await
        .expect("request confirmed");
    assert!(confirm.is_ack(), "the broker refused the request");
}

pub async fn next_reply(consumer: &mut Consumer, what: &str) -> Reply {
    let delivery = tokio::time::timeout(WAIT, consumer.next())
        .await
        .unwrap_or_else(|_| panic!("no {what} within {WAIT:?}"))
        .unwrap_or_else(|| panic!("consumer ended while waiting for {what}"))
        .expect("delivery");
    let body: Value = serde_json::from_slice(&delivery.data).expect("reply body is JSON");
    assert_documented_reply(&body);
    Reply {
        body,
        raw: delivery.data.clone(),
        properties: delivery.properties.clone(),
        routing_key: delivery.routing_key.to_string(),
    }
}

/// A minimal HTTP/1.0 GET, enough for /metrics and the health endpoints.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the HTTP listener");
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").as_bytes())
        .await
        .expect("send request");
    let mut response = String::new();
    tokio::time::timeout(WAIT, stream.read_to_string(&mut response))
        .await
        .expect("HTTP response within the wait")
        .expect("read response");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("HTTP status line");
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}
