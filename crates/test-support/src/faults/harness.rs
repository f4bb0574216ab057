//! A fault scenario: its servers, the TCP proxies in front of them, its worker
//! processes, and what it published. The publisher and the invariant check have
//! modules of their own.

use super::invariants::Verdicts;
use super::publisher::{Sent, publish_through_faults};
use super::servers::{Own, Servers};
use crate::app::{Names, WAIT, connect_any, eventually, http_get};
use crate::free_port;
use crate::proxy::Proxy;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use sqlx::PgPool;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// A worker process of the scenario.
pub struct WorkerProcess {
    pub child: Child,
    pub http_port: u16,
    pub log: PathBuf,
    /// Stopped by the test with SIGTERM (and checked then).
    stopped: bool,
}

/// The requests parked and not yet judged.
const PARKED: &str = "select count(*) from parked where judged_at is null";

/// How long `finish` waits for parked requests to be answered.
const OWED_REPLIES_WITHIN: Duration = Duration::from_secs(30);

pub struct Scenario {
    pub names: Names,
    pub servers: Servers,
    /// What workers started from now on are given: by default the proxies.
    pub worker_amqp_url: String,
    pub worker_database_url: String,
    pub pg_proxy: Proxy,
    pub amqp_proxy: Proxy,
    pub pool: PgPool,
    pub workers: Vec<WorkerProcess>,
    /// More environment for the workers started from now on (`QTY_PARTITIONS`…).
    pub worker_env: Vec<(String, String)>,
    /// Partitioned: how many partitions, whose queues the final check drains and
    /// whose order per item it checks (ledger order = publish order).
    pub partitions: Option<u16>,
    pub items: Vec<(Uuid, i64)>,
    pub sent: Vec<Sent>,
    pub poison: Vec<String>,
    /// Whether the final check compares each item's ledger order with its
    /// publish order (partitioned runs, and runs with one worker at a time).
    pub ordered: bool,
    /// Workers the test killed on purpose; any other exit is a violation.
    killed: usize,
    label: String,
}

impl Scenario {
    /// A fresh database and names on the shared servers, proxies in front of
    /// both, and `items` items with `start_qty` each.
    pub async fn new(label: &str, items: usize, start_qty: i64) -> Scenario {
        Scenario::on(label, items, start_qty, Own::default())
            .await
            .expect("the shared servers need no binaries")
    }

    /// The same on servers of the scenario's own; `None` when this machine has
    /// no server binaries (the test then says it skipped).
    pub async fn on(label: &str, items: usize, start_qty: i64, own: Own) -> Option<Scenario> {
        let servers = Servers::start(own)?;
        let names = if servers.own_any() {
            Names::on_own_servers(servers.postgres_base(), servers.amqp_urls())
        } else {
            Names::random()
        };
        qty_worker::store::open_prepared(&names.database_url(), 1)
            .await
            .expect("create the database")
            .pool
            .close()
            .await;
        // A pool of the harness's own, apart from the worker's settings: it pings
        // a connection before lending it (sqlx's default), so a session a fault
        // killed is replaced rather than failing the harness's next query.
        let pool = PgPool::connect(&names.database_url())
            .await
            .expect("connect the harness's pool");
        let mut created = Vec::with_capacity(items);
        for _ in 0..items {
            let id = Uuid::new_v4();
            qty_worker::store::create_item(&pool, id, start_qty)
                .await
                .expect("create item");
            created.push((id, start_qty));
        }
        let pg_proxy = Proxy::start(servers.postgres_addr()).await;
        let amqp_proxy = Proxy::start(servers.rabbitmq_addr()).await;
        Some(Scenario {
            worker_amqp_url: format!("amqp://guest:guest@{}/%2f?heartbeat=2", amqp_proxy.addr),
            worker_database_url: format!(
                "postgres://postgres@{}/{}?application_name=qty-worker-fault",
                pg_proxy.addr, names.database
            ),
            names,
            servers,
            pg_proxy,
            amqp_proxy,
            pool,
            workers: Vec::new(),
            worker_env: Vec::new(),
            partitions: None,
            items: created,
            sent: Vec::new(),
            poison: Vec::new(),
            ordered: false,
            killed: 0,
            label: label.to_owned(),
        })
    }

    /// Opens the harness's own pool again at `database_url` (after a restart or
    /// a failover took the old one's server away).
    pub async fn reconnect_pool(&mut self, database_url: &str) {
        self.pool.close().await;
        self.pool = PgPool::connect(database_url)
            .await
            .expect("reconnect the harness's pool");
    }

    pub fn reply_queue(&self) -> String {
        format!("{}.replies", self.names.queue)
    }

    /// Starts a worker process behind the proxies and waits until it consumes.
    pub async fn start_worker(&mut self) {
        let index = self.spawn_worker();
        self.wait_ready(index).await;
        self.ensure_reply_queue().await;
    }

    /// Starts a worker process and returns its index, without waiting for it.
    pub fn spawn_worker(&mut self) -> usize {
        let http_port = free_port();
        let log_dir = profile_dir().join("fault-logs");
        std::fs::create_dir_all(&log_dir).expect("log dir");
        let log = log_dir.join(format!(
            "{}-{}-{}.log",
            self.label,
            self.names.database,
            self.workers.len()
        ));
        let child = Command::new(worker_binary())
            .arg("run")
            .env("AMQP_URL", &self.worker_amqp_url)
            .env("DATABASE_URL", &self.worker_database_url)
            .env("QTY_EXCHANGE", &self.names.exchange)
            .env("QTY_QUEUE", &self.names.queue)
            .env("QTY_HTTP_ADDR", format!("127.0.0.1:{http_port}"))
            .env("QTY_DELIVERY_LIMIT", "5")
            .env("QTY_PREFETCH", "100")
            .env("QTY_LOG_FORMAT", "json")
            .env("RUST_LOG", "info,qty_worker::delivery=warn")
            .envs(self.worker_env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn qty-worker");
        // A worker outlives a test process killed before its Drop ran (Ctrl-C);
        // this ends it then, if that pid is still this binary.
        crate::on_exit(&format!(
            "[ \"$(readlink /proc/{pid}/exe)\" = {binary:?} ] && kill -9 {pid}",
            pid = child.id(),
            binary = std::fs::canonicalize(worker_binary())
                .unwrap_or_else(|_| worker_binary())
                .display()
                .to_string(),
        ));
        self.workers.push(WorkerProcess {
            child,
            http_port,
            log,
            stopped: false,
        });
        self.workers.len() - 1
    }

    /// Waits until worker `index` answers /readyz with 200.
    pub async fn wait_ready(&mut self, index: usize) {
        let addr = self.http_addr(index);
        let worker = &mut self.workers[index];
        let what = format!("worker {index} to be ready (its log: {:?})", worker.log);
        let (child, log) = (std::sync::Mutex::new(&mut worker.child), &worker.log);
        eventually(&what, WAIT * 2, || async {
            let exited = child
                .lock()
                .expect("child")
                .try_wait()
                .expect("poll worker");
            if let Some(status) = exited {
                panic!("worker {index} exited ({status}) before it was ready; see {log:?}");
            }
            match readyz_at(addr).await {
                Some((200, _)) => Ok(()),
                other => Err(other),
            }
        })
        .await;
    }

    /// Worker `index`'s /readyz status and body, or None while it does not answer.
    pub async fn readyz_body(&self, index: usize) -> Option<(u16, String)> {
        readyz_at(self.http_addr(index)).await
    }

    /// Worker `index`'s /metrics text.
    pub async fn metrics(&self, index: usize) -> String {
        http_get(self.http_addr(index), "/metrics").await.1
    }

    fn http_addr(&self, index: usize) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.workers[index].http_port))
    }

    /// The scenario's own PostgreSQL primary.
    pub fn primary(&self) -> &crate::postgres::Postgres {
        self.servers
            .primary
            .as_ref()
            .expect("the scenario has its own PostgreSQL")
    }

    /// A RabbitMQ node of the scenario's own.
    pub fn rabbitmq_node(&self, index: usize) -> &crate::rabbitmq::Node {
        self.servers
            .rabbitmq
            .as_ref()
            .expect("the scenario has its own RabbitMQ")
            .node(index)
    }

    /// Declares the scenario's reply queue: a quorum queue, so that in a cluster
    /// it outlives the loss of any one node.
    pub async fn ensure_reply_queue(&self) {
        let connection = connect_any(&self.names.amqp_url)
            .await
            .expect("a broker node");
        let channel = connection.create_channel().await.expect("channel");
        let mut quorum = FieldTable::default();
        quorum.insert(
            "x-queue-type".into(),
            lapin::types::AMQPValue::LongString("quorum".into()),
        );
        channel
            .queue_declare(
                self.reply_queue().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                quorum,
            )
            .await
            .expect("declare the reply queue");
        connection.close(200, "ok".into()).await.ok();
    }

    /// Plans `count` requests over the items: mostly small takes, some adds.
    pub fn plan(&self, count: usize, seed: u64) -> Vec<Sent> {
        let mut rng = fastrand::Rng::with_seed(seed);
        (0..count)
            .map(|n| Sent {
                message_id: format!("{}-{seed}-{n}", self.label),
                item: self.items[rng.usize(..self.items.len())].0,
                delta: rng.i64(-4..=2),
                keyed: true,
            })
            .collect()
    }

    /// Has the workers started from now on reach every node of the scenario's
    /// cluster directly (not through the proxy), with a 2 s heartbeat, so that
    /// losing a node moves them to another.
    pub fn reach_every_node(&mut self) {
        self.worker_amqp_url = self
            .names
            .amqp_url
            .split(',')
            .map(|url| format!("{url}?heartbeat=2"))
            .collect::<Vec<_>>()
            .join(",");
    }

    /// Runs the scenario's workers partitioned, `partitions` partitions, and has
    /// the final check verify per-item order.
    pub fn partitioned(&mut self, partitions: u16) {
        self.partitions = Some(partitions);
        self.ordered = true;
        self.worker_env
            .push(("QTY_PARTITIONS".into(), partitions.to_string()));
    }

    /// `rounds` requests per item, round-robin over the items, alternating +1
    /// and -1: on items that start at 0, every request applies when judged in
    /// publish order, and any request judged before the one published before it
    /// is a spurious `insufficient_qty`.
    pub fn plan_alternating(&self, rounds: usize, keyed: bool) -> Vec<Sent> {
        let mut requests = Vec::with_capacity(rounds * self.items.len());
        for round in 0..rounds {
            for (n, (item, _)) in self.items.iter().enumerate() {
                requests.push(Sent {
                    message_id: format!("{}-i{n}-r{round}", self.label),
                    item: *item,
                    delta: if round % 2 == 0 { 1 } else { -1 },
                    keyed,
                });
            }
        }
        requests
    }

    /// Publishes `requests` at about `per_second`, through every broker fault:
    /// each request is republished until the broker confirms it.
    pub fn spawn_publisher(
        &mut self,
        requests: Vec<Sent>,
        per_second: u64,
    ) -> tokio::task::JoinHandle<usize> {
        self.sent.extend(requests.iter().cloned());
        let exchange = self.names.exchange.clone();
        let reply_queue = self.reply_queue();
        let urls = self.names.amqp_url.clone();
        tokio::spawn(async move {
            publish_through_faults(&urls, &exchange, &reply_queue, &requests, per_second).await
        })
    }

    /// Publishes one request that makes the worker panic (fault-injection build).
    pub async fn publish_poison(&mut self, message_id: &str) {
        let item = self.items[0].0;
        let poison = Sent {
            message_id: format!("fault:panic:{message_id}"),
            item,
            delta: -1,
            keyed: true,
        };
        self.poison.push(poison.message_id.clone());
        publish_through_faults(
            &self.names.amqp_url,
            &self.names.exchange,
            &self.reply_queue(),
            &[poison],
            0,
        )
        .await;
    }

    /// Ledger rows recorded so far.
    pub async fn recorded(&self) -> usize {
        self.count("the ledger", "select count(*) from adjustments")
            .await
    }

    /// Waits until the ledger holds at least `count` rows.
    pub async fn wait_recorded(&self, count: usize, within: Duration) {
        self.wait_count(
            "recorded",
            "select count(*) from adjustments",
            count,
            within,
        )
        .await;
    }

    /// Rows `sql` counts. Asked again on failure, never read as 0: a count
    /// that failed once while a fault was on made the next one look like
    /// progress.
    async fn count(&self, what: &str, sql: &'static str) -> usize {
        let rows: i64 = eventually(&format!("{what} counted"), Duration::from_secs(30), || {
            sqlx::query_scalar(sql).fetch_one(&self.pool)
        })
        .await;
        rows as usize
    }

    /// Waits until `sql` counts at least `count` rows (requests `what`).
    async fn wait_count(&self, what: &str, sql: &'static str, count: usize, within: Duration) {
        eventually(&format!("{count} requests {what}"), within, || async {
            match self.count(what, sql).await {
                now if now >= count => Ok(()),
                now => Err(format!("{now} {what}")),
            }
        })
        .await;
    }

    /// Stops worker `index` with SIGTERM and waits for it to exit 0 (its drain,
    /// partitions handed over, included).
    pub async fn stop_worker(&mut self, index: usize) {
        let worker = &mut self.workers[index];
        let mut violations = Vec::new();
        terminate(&mut worker.child, index, &worker.log, &mut violations).await;
        assert!(violations.is_empty(), "{violations:?}");
        worker.stopped = true;
        self.killed += 1;
    }

    /// Worker `index`'s gauge `qty_worker_partitions_owned`, once it answers.
    pub async fn partitions_owned(&self, index: usize) -> Option<u64> {
        tokio::net::TcpStream::connect(self.http_addr(index))
            .await
            .ok()?;
        self.metrics(index)
            .await
            .lines()
            .find_map(|line| line.strip_prefix("qty_worker_partitions_owned "))
            .and_then(|value| value.parse().ok())
    }

    /// Whether worker `index` still runs.
    pub fn running(&mut self, index: usize) -> bool {
        matches!(self.workers[index].child.try_wait(), Ok(None))
    }

    /// SIGKILLs worker `index`.
    pub fn kill_worker(&mut self, index: usize) {
        self.workers[index]
            .child
            .kill()
            .expect("SIGKILL the worker");
        self.workers[index].child.wait().expect("reap the worker");
        self.killed += 1;
    }

    /// Waits for worker `index` to die by itself (a fault it was told to
    /// inject), and counts it as killed on purpose.
    pub async fn wait_died(&mut self, index: usize, within: Duration) {
        let child = &mut self.workers[index].child;
        eventually(&format!("worker {index} to die"), within, || {
            let gone = !matches!(child.try_wait(), Ok(None));
            async move { if gone { Ok(()) } else { Err("still running") } }
        })
        .await;
        self.killed += 1;
    }

    /// Locks `item`'s row as an operator's `SELECT … FOR UPDATE` does, until
    /// the transaction returned ends.
    pub async fn lock_item(&self, item: Uuid) -> sqlx::Transaction<'static, sqlx::Postgres> {
        crate::app::lock_row(&self.pool, item).await
    }

    /// Requests parked and not yet judged.
    pub async fn parked(&self) -> usize {
        self.count("the parked rows", PARKED).await
    }

    /// Waits until at least `count` requests wait parked.
    pub async fn wait_parked(&self, count: usize, within: Duration) {
        self.wait_count("parked", PARKED, count, within).await;
    }

    /// Terminates every PostgreSQL session the workers hold.
    pub async fn terminate_db_sessions(&self) -> usize {
        let killed: Vec<bool> = sqlx::query_scalar(
            "select pg_terminate_backend(pid) from pg_stat_activity where application_name = 'qty-worker-fault' and datname = $1",
        )
        .bind(&self.names.database)
        .fetch_all(&self.pool)
        .await
        .expect("terminate sessions");
        killed.len()
    }

    /// Stops every live worker with SIGTERM and checks the invariants. First
    /// gives the live workers time to answer what is still parked (a reply
    /// owed by a judge that failed goes out once its time to reply is up).
    pub async fn finish(mut self) -> Verdicts {
        let started = Instant::now();
        while started.elapsed() < OWED_REPLIES_WITHIN
            && (0..self.workers.len()).any(|index| self.running(index))
            && sqlx::query_scalar::<_, i64>("select count(*) from parked")
                .fetch_one(&self.pool)
                .await
                .is_ok_and(|rows| rows > 0)
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut verdicts = Verdicts::default();
        let expected_running = self.workers.len() - self.killed;
        let mut running = 0;
        for (index, worker) in self.workers.iter_mut().enumerate() {
            if let Some(status) = worker.child.try_wait().expect("poll worker") {
                if status.code().is_some() && !worker.stopped {
                    verdicts.violations.push(format!(
                        "worker {index} exited on its own ({status}); see {:?}",
                        worker.log
                    ));
                }
                continue;
            }
            running += 1;
            terminate(
                &mut worker.child,
                index,
                &worker.log,
                &mut verdicts.violations,
            )
            .await;
        }
        if running != expected_running {
            verdicts.violations.push(format!(
                "{running} workers running at the end, expected {expected_running}"
            ));
        }
        self.check(&mut verdicts).await;
        verdicts
    }
}

impl Drop for Scenario {
    fn drop(&mut self) {
        for worker in &mut self.workers {
            worker.child.kill().ok();
            worker.child.wait().ok();
        }
        self.names.remove_all();
    }
}

async fn terminate(child: &mut Child, index: usize, log: &PathBuf, violations: &mut Vec<String>) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    let deadline = Instant::now() + WAIT * 2;
    loop {
        if let Some(status) = child.try_wait().expect("poll worker") {
            if status.code() != Some(0) {
                violations.push(format!(
                    "worker {index} exited {status} after SIGTERM; see {log:?}"
                ));
            }
            return;
        }
        if Instant::now() > deadline {
            violations.push(format!(
                "worker {index} still running {:?} after SIGTERM",
                WAIT * 2
            ));
            child.kill().ok();
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `/readyz`'s status and body at `addr`, or None while nothing answers there.
async fn readyz_at(addr: std::net::SocketAddr) -> Option<(u16, String)> {
    tokio::net::TcpStream::connect(addr).await.ok()?;
    Some(http_get(addr, "/readyz").await)
}

/// The cargo profile directory the running test or example was built into
/// (`target/debug` or `target/release`): tests live in its `deps/`, examples in its
/// `examples/`, and the worker binary beside both.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("own path");
    exe.parent()
        .and_then(|dir| dir.parent())
        .unwrap_or_else(|| panic!("{} has no profile directory", exe.display()))
        .to_path_buf()
}

/// The worker binary of the same build. Cargo builds it before an integration
/// test; an example needs `cargo build` first, and this says so.
fn worker_binary() -> PathBuf {
    let binary = profile_dir().join("qty-worker");
    assert!(
        binary.is_file(),
        "no worker binary at {}: run `cargo build` with the same profile and features first",
        binary.display()
    );
    binary
}
