//! The command line: `run`, `migrate`, and the operator commands.

use crate::settings::{Connections, LogFormat, WorkerSettings};
use clap::{Args, Parser, Subcommand};
use uuid::Uuid;

#[derive(Debug, Parser)]
#[command(
    name = "qty-worker",
    version,
    about = "Applies qty.adjust requests from RabbitMQ to PostgreSQL, exactly once per message_id."
)]
pub struct Cli {
    #[command(flatten)]
    pub connections: Connections,

    /// Print command results as JSON (the default when stdout is not a terminal).
    #[arg(long, global = true)]
    pub json: bool,

    /// Export spans over OTLP/HTTP to this traces URL, e.g.
    /// http://collector:4318/v1/traces (needs a build with the `otlp` feature).
    #[arg(long, env = "QTY_OTLP_ENDPOINT", global = true)]
    pub otlp_endpoint: Option<String>,

    /// Log format; defaults to pretty on a terminal and json otherwise.
    #[arg(long, env = "QTY_LOG_FORMAT", value_enum, global = true)]
    pub log_format: Option<LogFormat>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create and migrate the database, declare the broker topology, and consume.
    Run(WorkerSettings),
    /// Create the database if missing and apply migrations, then exit.
    Migrate,
    /// Create, show or list items.
    #[command(subcommand)]
    Item(ItemCommand),
    /// Show an item's adjustment history, newest first.
    Ledger {
        item_id: Uuid,
        /// Most rows to show.
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// Inspect or replay the dead-letter queue.
    #[command(subcommand)]
    DeadLetters(DeadLettersCommand),
    /// Publish one request and print its reply (exit 0 applied, 3 not_found, 4 rejected).
    Adjust(AdjustArgs),
    /// Load a running worker through the broker and print throughput and latency.
    Bench(crate::bench::BenchArgs),
}

#[derive(Debug, Subcommand)]
pub enum ItemCommand {
    /// Create an item and print it.
    Create {
        /// The item's id; a random one when omitted.
        #[arg(long)]
        id: Option<Uuid>,
        /// Starting quantity (0 or more).
        #[arg(long, value_parser = clap::value_parser!(i64).range(0..))]
        qty: i64,
    },
    /// Print an item.
    Show { id: Uuid },
    /// Print items, oldest first.
    List {
        /// Most items to show.
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeadLettersCommand {
    /// Show what is in `<queue>.dead` (the messages stay there).
    List,
    /// Move dead-lettered requests back to the request queue.
    Replay {
        /// Replay every dead letter.
        #[arg(long, conflicts_with = "message_ids")]
        all: bool,
        /// The message ids to replay.
        message_ids: Vec<String>,
    },
}

#[derive(Debug, Args)]
pub struct AdjustArgs {
    /// The item to adjust.
    pub item_id: Uuid,
    /// How much to add (negative to take away).
    #[arg(allow_negative_numbers = true)]
    pub delta: i64,
    /// Idempotency key; a random one when omitted. Reuse it to retry safely.
    #[arg(long)]
    pub message_id: Option<String>,
    /// Seconds to wait for the reply.
    #[arg(long, default_value_t = 30)]
    pub timeout: u64,
}
