//! The command line: `run`, `migrate`, and the operator commands. Each
//! subcommand takes, and lists in its `--help`, only the settings it uses (its
//! own options first), so `adjust --help` shows no database and `item --help` no
//! broker (contract §8).

use crate::settings::{
    BrokerArgs, Connections, DatabaseArgs, ExchangeArg, LogArgs, QueueArg, WorkerSettings,
};
use clap::{Args, Parser, Subcommand};
use uuid::Uuid;

#[derive(Debug, Parser)]
#[command(
    name = "qty-worker",
    version,
    about = "Applies qty.adjust requests from RabbitMQ to PostgreSQL, exactly once per message_id."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create and migrate the database, declare the broker topology, and consume.
    Run(RunArgs),
    /// Create the database if missing and apply migrations, then exit.
    Migrate(MigrateArgs),
    /// Create, show or list items.
    #[command(subcommand)]
    Item(ItemCommand),
    /// Show an item's adjustment history, newest first.
    Ledger(LedgerArgs),
    /// List the requests parked for locked items, per item, with their age.
    Parked(ParkedArgs),
    /// Inspect or replay the dead-letter queue.
    #[command(subcommand)]
    DeadLetters(DeadLettersCommand),
    /// Publish one request and print its reply (exit 0 applied, 3 not_found, 4 rejected).
    Adjust(AdjustArgs),
    /// Load a running worker through the broker and print throughput and latency.
    Bench(BenchCommand),
}

/// A setting `run` or `migrate` refused at parse time (a value out of range, say),
/// as the one line the contract promises: the setting's environment name and
/// what was wrong, to be logged in the chosen format. `None` for everything else
/// (help, a typo in a flag, another subcommand), which clap reports as usual.
pub fn refused_setting(error: &clap::Error, args: &[String]) -> Option<(String, String)> {
    use clap::CommandFactory as _;
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if !matches!(
        error.kind(),
        ErrorKind::ValueValidation | ErrorKind::InvalidValue
    ) {
        return None;
    }
    let subcommand = args.iter().skip(1).find(|a| !a.starts_with('-'))?;
    if subcommand != "run" && subcommand != "migrate" {
        return None;
    }
    let Some(ContextValue::String(flag)) = error.get(ContextKind::InvalidArg) else {
        return None;
    };
    let long = flag.trim_start_matches('-').split([' ', '=']).next()?;
    let command = Cli::command();
    let arg = command
        .find_subcommand(subcommand)?
        .get_arguments()
        .find(|a| a.get_long() == Some(long))?;
    let setting = arg.get_env()?.to_str()?.to_owned();
    // clap's own text, first line only, without its "error: " prefix.
    let rendered = error.render().to_string();
    let reason = rendered
        .lines()
        .next()
        .unwrap_or_default()
        .trim_start_matches("error: ")
        .to_owned();
    Some((setting, reason))
}

/// The log format `args` and the environment ask for, read without clap (for a
/// setting clap refused before it could tell).
pub fn requested_log_format(args: &[String]) -> Option<crate::settings::LogFormat> {
    use clap::ValueEnum as _;
    let mut given = std::env::var("QTY_LOG_FORMAT").ok();
    let mut words = args.iter();
    while let Some(word) = words.next() {
        if let Some(value) = word.strip_prefix("--log-format=") {
            given = Some(value.to_owned());
        } else if word == "--log-format" {
            given = words.next().cloned();
        }
    }
    crate::settings::LogFormat::from_str(&given?, true).ok()
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub worker: WorkerSettings,
    #[command(flatten)]
    pub connections: Connections,
    #[command(flatten)]
    pub logs: LogArgs,
    /// Export spans over OTLP/HTTP to this traces URL, e.g.
    /// http://collector:4318/v1/traces (needs a build with the `otlp` feature).
    #[arg(long, env = "QTY_OTLP_ENDPOINT", help_heading = "Logs and traces")]
    pub otlp_endpoint: Option<String>,
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// After migrating, grant this existing role exactly what `run` with
    /// `--migrate check` needs (no privilege on the tables themselves).
    #[arg(long, value_name = "ROLE")]
    pub runtime_role: Option<String>,
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub logs: LogArgs,
}

/// `--json`, for the commands that print results.
#[derive(Debug, Clone, Copy, Args)]
pub struct JsonArg {
    /// Print JSON lines, one object per line (the default when stdout is not a terminal).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum ItemCommand {
    /// Create an item and print it.
    Create {
        /// The item's id; a random one when omitted.
        #[arg(long)]
        id: Option<Uuid>,
        /// Starting quantity (0 or more).
        #[arg(long, allow_negative_numbers = true, value_parser = clap::value_parser!(i64).range(0..))]
        qty: i64,
        #[command(flatten)]
        json: JsonArg,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Print an item (exit 3 when there is none).
    Show {
        /// The item's id, a UUID.
        id: Uuid,
        #[command(flatten)]
        json: JsonArg,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Print items, oldest first.
    List {
        /// Most items to show.
        #[arg(long, default_value_t = 100)]
        limit: i64,
        #[command(flatten)]
        json: JsonArg,
        #[command(flatten)]
        database: DatabaseArgs,
    },
}

#[derive(Debug, Args)]
pub struct LedgerArgs {
    /// The item whose history to show, a UUID.
    pub item_id: Uuid,
    /// Most rows to show.
    #[arg(long, default_value_t = 50)]
    pub limit: i64,
    #[command(flatten)]
    pub json: JsonArg,
    #[command(flatten)]
    pub database: DatabaseArgs,
}

#[derive(Debug, Args)]
pub struct ParkedArgs {
    /// Most rows to show.
    #[arg(long, default_value_t = 1000)]
    pub limit: i64,
    #[command(flatten)]
    pub json: JsonArg,
    #[command(flatten)]
    pub database: DatabaseArgs,
}

#[derive(Debug, Subcommand)]
pub enum DeadLettersCommand {
    /// Show what is in `<queue>.dead` (the messages stay there).
    List(DeadLetterArgs),
    /// Move dead-lettered requests back to the request queue.
    Replay {
        /// The message ids to replay.
        #[arg(required_unless_present = "all")]
        message_ids: Vec<String>,
        /// Replay every dead letter.
        #[arg(long, conflicts_with = "message_ids")]
        all: bool,
        #[command(flatten)]
        dead_letters: DeadLetterArgs,
    },
}

/// What both dead-letter commands take: where the queue is, how to print.
#[derive(Debug, Args)]
pub struct DeadLetterArgs {
    #[command(flatten)]
    pub json: JsonArg,
    #[command(flatten)]
    pub broker: BrokerArgs,
    #[command(flatten)]
    pub queue: QueueArg,
}

#[derive(Debug, Args)]
pub struct AdjustArgs {
    /// The item to adjust, a UUID.
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
    #[command(flatten)]
    pub json: JsonArg,
    #[command(flatten)]
    pub broker: BrokerArgs,
    #[command(flatten)]
    pub exchange: ExchangeArg,
}

#[derive(Debug, Args)]
pub struct BenchCommand {
    #[command(flatten)]
    pub bench: crate::bench::BenchArgs,
    #[command(flatten)]
    pub connections: Connections,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    /// The long options `qty-worker SUBCOMMAND… --help` lists.
    fn options(path: &[&str]) -> Vec<String> {
        let mut command = Cli::command();
        command.build();
        let mut at = &command;
        for name in path {
            at = at.find_subcommand(name).expect("subcommand");
        }
        at.get_arguments()
            .filter_map(|a| a.get_long().map(str::to_owned))
            .filter(|long| long != "help" && long != "version")
            .collect()
    }

    #[test]
    fn each_subcommand_takes_only_the_settings_it_uses() {
        let adjust = options(&["adjust"]);
        assert!(adjust.contains(&"amqp-url".to_owned()) && adjust.contains(&"exchange".to_owned()));
        assert!(
            !adjust
                .iter()
                .any(|o| o == "database-url" || o == "queue" || o == "log-format")
        );
        for item in ["create", "show", "list"] {
            let item = options(&["item", item]);
            assert!(item.contains(&"database-url".to_owned()));
            assert!(
                !item
                    .iter()
                    .any(|o| o.starts_with("amqp") || o == "exchange")
            );
        }
        let ledger = options(&["ledger"]);
        assert!(!ledger.iter().any(|o| o.starts_with("amqp")));
        assert_eq!(options(&["parked"]), ["limit", "json", "database-url"]);
        let dead = options(&["dead-letters", "list"]);
        assert!(dead.contains(&"queue".to_owned()));
        assert!(!dead.iter().any(|o| o == "database-url" || o == "exchange"));
        let run = options(&["run"]);
        assert!(run.contains(&"prefetch".to_owned()) && !run.contains(&"json".to_owned()));
        assert_eq!(
            options(&["migrate"]),
            ["runtime-role", "database-url", "log-format"]
        );
    }

    #[test]
    fn a_subcommands_own_options_come_before_the_connection_settings() {
        let bench = options(&["bench"]);
        let own = bench
            .iter()
            .position(|o| o == "messages")
            .expect("--messages");
        let url = bench
            .iter()
            .position(|o| o == "amqp-url")
            .expect("--amqp-url");
        assert!(own < url, "{bench:?}");
    }

    #[test]
    fn negative_quantities_are_refused_as_out_of_range_not_as_unknown_flags() {
        let error = Cli::try_parse_from(["qty-worker", "item", "create", "--qty", "-1"])
            .expect_err("negative qty");
        assert_eq!(error.kind(), clap::error::ErrorKind::ValueValidation);
    }

    #[test]
    fn replay_without_ids_or_all_is_a_usage_error() {
        let error =
            Cli::try_parse_from(["qty-worker", "dead-letters", "replay"]).expect_err("no ids");
        assert_eq!(
            error.kind(),
            clap::error::ErrorKind::MissingRequiredArgument
        );
    }
}
