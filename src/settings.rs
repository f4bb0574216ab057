//! Every setting of contract section 1: a flag with an environment variable behind it.

use crate::broker::Topology;
use clap::{Args, ValueEnum};
use std::net::SocketAddr;

/// How many deliveries are in flight at once unless `--prefetch` says otherwise.
pub const DEFAULT_PREFETCH: u16 = 1000;

/// Deliveries of one message before it is dead-lettered unless `--delivery-limit` says otherwise.
pub const DEFAULT_DELIVERY_LIMIT: u32 = 10;

/// PostgreSQL connections (and concurrent transactions) unless `--db-pool` says otherwise.
pub const DEFAULT_DB_POOL: u32 = 4;

/// Requests per transaction at most unless `--batch-max` says otherwise.
pub const DEFAULT_BATCH_MAX: u32 = 100;

/// Connection settings shared by every subcommand.
#[derive(Debug, Clone, Args)]
pub struct Connections {
    /// RabbitMQ URL (amqp:// or amqps://).
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        global = true
    )]
    pub amqp_url: String,

    /// PEM file of extra CAs to trust for amqps:// (a private CA, say).
    #[arg(long, env = "AMQP_CA_FILE", global = true)]
    pub amqp_ca_file: Option<std::path::PathBuf>,

    /// PostgreSQL URL; the database is created if it does not exist. For TLS use
    /// `?sslmode=verify-full&sslrootcert=/path/ca.pem`.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/inventory",
        global = true
    )]
    pub database_url: String,

    /// Topic exchange that requests arrive on and events leave by.
    #[arg(long, env = "QTY_EXCHANGE", default_value = "inventory", value_parser = name_parser, global = true)]
    pub exchange: String,

    /// Durable quorum queue the worker consumes requests from.
    #[arg(long, env = "QTY_QUEUE", default_value = "qty.adjust", value_parser = name_parser, global = true)]
    pub queue: String,
}

/// Settings only the worker itself (`run`) uses.
#[derive(Debug, Clone, Args)]
pub struct WorkerSettings {
    /// Deliveries in flight at once (AMQP prefetch); also bounds memory.
    #[arg(long, env = "QTY_PREFETCH", default_value_t = DEFAULT_PREFETCH, value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: u16,

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

    /// Seconds a stop (SIGTERM, Ctrl-C) waits for in-flight deliveries to finish.
    #[arg(long, env = "QTY_DRAIN_SECS", default_value_t = 30)]
    pub drain_secs: u64,
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

impl Settings {
    pub fn topology(&self) -> Topology {
        Topology {
            exchange: self.connections.exchange.clone(),
            queue: self.connections.queue.clone(),
            delivery_limit: self.worker.delivery_limit,
        }
    }
}

/// Exchange and queue names: non-empty, and short enough that the derived
/// `.dlx` / `.dead` names still fit AMQP's 255-byte limit.
fn name_parser(value: &str) -> Result<String, String> {
    if value.is_empty() || value.len() > 250 {
        return Err("must be 1 to 250 bytes long".into());
    }
    Ok(value.to_owned())
}

/// The URL with its password replaced, fit for logs and error messages.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
            let hidden = if userinfo.contains(':') { ":***" } else { "" };
            format!("{scheme}://{user}{hidden}@{host}{path}")
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn redact_hides_only_the_password() {
        assert_eq!(
            redact("amqp://guest:secret@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(
            redact("postgres://postgres@h/db"),
            "postgres://postgres@h/db"
        );
        assert_eq!(
            redact("postgres://u:p@ss@h/db?x=1"),
            "postgres://u:***@h/db?x=1"
        );
        assert_eq!(redact("not a url"), "not a url");
    }
}
