//! Every setting of the contract's section 1 (`docs/contract.md`): a flag with an
//! environment variable behind it. This module depends on nothing else of the
//! crate; the modules that use a setting parse and check it (`broker::Addresses`,
//! `store::Target`) and report a [`SettingError`] when it can never work.

use clap::{Args, ValueEnum};
use std::net::SocketAddr;

/// Runtime threads unless `--threads` says otherwise (BENCHMARKS.md: one is the
/// fastest on 2 cores shared with the broker and the database).
pub const DEFAULT_THREADS: u16 = 1;

/// How many deliveries are in flight at once unless `--prefetch` says otherwise.
pub const DEFAULT_PREFETCH: u16 = 1000;

/// Deliveries of one message before it is dead-lettered unless `--delivery-limit` says otherwise.
pub const DEFAULT_DELIVERY_LIMIT: u32 = 10;

/// PostgreSQL connections (and concurrent transactions) unless `--db-pool` says
/// otherwise. Two: fewer, larger transactions cost the database less
/// (BENCHMARKS.md).
pub const DEFAULT_DB_POOL: u32 = 2;

/// Requests per transaction at most unless `--batch-max` says otherwise.
pub const DEFAULT_BATCH_MAX: u32 = 100;

/// How long a lock held by someone else is waited for unless `--lock-wait-ms`
/// says otherwise. A competing worker holds an item's row for one short
/// transaction (a few milliseconds, tens under load); an operator's transaction may
/// hold it for minutes. 200 ms lets the first pass, and bounds what each retry
/// against the second costs the lane that waits.
pub const DEFAULT_LOCK_WAIT_MS: u64 = 200;

/// How to reach RabbitMQ.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "RabbitMQ")]
pub struct BrokerArgs {
    /// RabbitMQ URL (amqp:// or amqps://), or several comma-separated, one per
    /// cluster node: every (re)connect tries them in turn.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,

    /// PEM file of extra CAs to trust for amqps:// (a private CA, say).
    #[arg(long, env = "AMQP_CA_FILE")]
    pub amqp_ca_file: Option<std::path::PathBuf>,
}

/// How to reach PostgreSQL.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "PostgreSQL")]
pub struct DatabaseArgs {
    /// PostgreSQL URL. Several hosts follow a failover:
    /// postgres://u@h1:5432,h2:5432/db?target_session_attrs=read-write. For TLS add
    /// `sslmode=verify-full&sslrootcert=/path/ca.pem`.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/inventory"
    )]
    pub database_url: String,
}

/// The exchange requests arrive on.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Names")]
pub struct ExchangeArg {
    /// Topic exchange that requests arrive on and events leave by.
    #[arg(long, env = "QTY_EXCHANGE", default_value = "inventory", value_parser = name_parser)]
    pub exchange: String,
}

/// The queue requests are consumed from.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Names")]
pub struct QueueArg {
    /// Durable quorum queue the worker consumes requests from.
    #[arg(long, env = "QTY_QUEUE", default_value = "qty.adjust", value_parser = name_parser)]
    pub queue: String,
}

/// Everything that connects the worker to its broker and database, with the
/// names it uses there.
#[derive(Debug, Clone, Args)]
pub struct Connections {
    #[command(flatten)]
    pub broker: BrokerArgs,
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub exchange: ExchangeArg,
    #[command(flatten)]
    pub queue: QueueArg,
}

impl Connections {
    pub fn database_url(&self) -> &str {
        &self.database.database_url
    }

    pub fn exchange(&self) -> &str {
        &self.exchange.exchange
    }

    pub fn queue(&self) -> &str {
        &self.queue.queue
    }
}

/// Logging and tracing for the commands that run for long (`run`, `migrate`).
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Logs and traces")]
pub struct LogArgs {
    /// Log format; defaults to pretty on a terminal and json otherwise.
    #[arg(long, env = "QTY_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
}

/// Settings only the worker itself (`run`) uses.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Worker")]
pub struct WorkerSettings {
    /// Deliveries in flight at once (AMQP prefetch); also bounds memory.
    #[arg(long, env = "QTY_PREFETCH", default_value_t = DEFAULT_PREFETCH, value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: u16,

    /// Threads that run the worker's tasks (the AMQP client does its I/O on a
    /// thread of its own besides). One is the fastest on a small machine that
    /// also runs the broker and the database; give more on a larger one.
    #[arg(long, env = "QTY_THREADS", default_value_t = DEFAULT_THREADS, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: u16,

    /// Address of the /metrics, /healthz and /readyz listener; port 0 picks a free one.
    #[arg(long, env = "QTY_HTTP_ADDR", default_value = "127.0.0.1:9464")]
    pub http_addr: SocketAddr,

    /// Deliveries of one message before the queue dead-letters it (set when the
    /// queue is first declared).
    #[arg(long, env = "QTY_DELIVERY_LIMIT", default_value_t = DEFAULT_DELIVERY_LIMIT, value_parser = clap::value_parser!(u32).range(1..1000))]
    pub delivery_limit: u32,

    /// PostgreSQL connections, which is also how many transactions run at once.
    #[arg(long, env = "QTY_DB_POOL", default_value_t = DEFAULT_DB_POOL, value_parser = clap::value_parser!(u32).range(1..1000))]
    pub db_pool: u32,

    /// Most requests one transaction carries; 1 turns batching off.
    #[arg(long, env = "QTY_BATCH_MAX", default_value_t = DEFAULT_BATCH_MAX, value_parser = clap::value_parser!(u32).range(1..10_000))]
    pub batch_max: u32,

    /// Milliseconds a transaction waits for a lock held by someone else (an item's
    /// row, a message_id) before parking the request in the database, to be
    /// judged in its order once the lock is gone.
    #[arg(long, env = "QTY_LOCK_WAIT_MS", default_value_t = DEFAULT_LOCK_WAIT_MS, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub lock_wait_ms: u64,

    /// Seconds a stop (SIGTERM, Ctrl-C) waits for in-flight deliveries to finish.
    #[arg(long, env = "QTY_DRAIN_SECS", default_value_t = 30)]
    pub drain_secs: u64,

    /// RabbitMQ users allowed to adjust, comma-separated: a request whose
    /// (broker-validated) user_id is absent or not listed is rejected as
    /// `forbidden`. Unset: every publisher is served.
    #[arg(long, env = "QTY_PUBLISHERS", value_parser = publishers_parser)]
    pub publishers: Option<String>,

    /// At start: `apply` creates the database if missing and applies pending
    /// migrations; `check` changes nothing and waits (/readyz 503) until the
    /// schema holds every migration, as a runtime role with no DDL rights must.
    #[arg(long = "migrate", env = "QTY_MIGRATE", value_enum, default_value_t = MigrateMode::Apply)]
    pub migrate: MigrateMode,

    /// Partition queues of a fleet: P queues `<queue>.0..P-1` fed by item, each
    /// consumed by one worker at a time, so that any number of workers keep
    /// per-item order. Every worker of a fleet needs the same value. Unset: one
    /// request queue.
    #[arg(long, env = "QTY_PARTITIONS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub partitions: Option<u16>,
}

/// What `run` does about the schema at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MigrateMode {
    Apply,
    Check,
}

/// Log output: human-friendly, or one JSON object per line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Pretty,
    Json,
}

/// Everything `run` needs.
#[derive(Debug, Clone)]
pub struct Settings {
    pub connections: Connections,
    pub worker: WorkerSettings,
}

/// A setting that can never work as given (a URL that does not parse, say). The
/// worker stops at start with exit code 2 rather than retry it for ever.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{setting} {message}")]
pub struct SettingError {
    /// The environment variable behind the setting, e.g. `AMQP_URL`.
    pub setting: &'static str,
    /// What is wrong with it, never including a password.
    pub message: String,
}

impl SettingError {
    pub fn new(setting: &'static str, message: impl Into<String>) -> SettingError {
        SettingError {
            setting,
            message: message.into(),
        }
    }
}

/// `QTY_PUBLISHERS`: one or more comma-separated user names, none empty.
fn publishers_parser(value: &str) -> Result<String, String> {
    if value.split(',').any(|name| name.trim().is_empty()) {
        return Err("must be comma-separated RabbitMQ user names, none empty".into());
    }
    Ok(value.to_owned())
}

/// Exchange and queue names: non-empty, and short enough that the derived
/// `.dlx` / `.dead` names still fit AMQP's 255-byte limit.
fn name_parser(value: &str) -> Result<String, String> {
    if value.is_empty() || value.len() > 250 {
        return Err("must be 1 to 250 bytes long".into());
    }
    Ok(value.to_owned())
}
