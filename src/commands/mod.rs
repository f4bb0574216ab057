//! The operator commands. Each prints human-readable text on a terminal and JSON
//! when piped or given `--json`; errors go to stderr and say what to do.
//!
//! Exit codes: 0 success (`adjust`: applied), 1 error, 2 usage, 3 not found
//! (`adjust`: not_found; `item show`: no such item), 4 rejected (`adjust`).

pub mod adjust;
pub mod dead_letters;
pub mod item;
pub mod ledger;
pub mod parked;

use crate::settings::{Connections, DatabaseArgs};
use crate::store;
use serde::Serialize;
use sqlx::PgPool;
use std::io::IsTerminal as _;
use std::process::ExitCode;

pub const EXIT_NOT_FOUND: u8 = 3;
pub const EXIT_REJECTED: u8 = 4;

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Human,
    Json,
}

impl Output {
    /// JSON when asked for or when stdout is not a terminal.
    pub fn choose(json: bool) -> Output {
        if json || !std::io::stdout().is_terminal() {
            Output::Json
        } else {
            Output::Human
        }
    }

    /// Prints rows as JSON lines (one object per line, for `jq` and streaming),
    /// or as `human` renders them all.
    pub fn print_rows<T: Serialize>(self, rows: &[T], human: impl FnOnce(&[T]) -> String) {
        match self {
            Output::Json => {
                for row in rows {
                    emit(&serde_json::to_string(row).expect("serializable output"));
                }
            }
            Output::Human => emit(&human(rows)),
        }
    }

    /// Prints `value` as one JSON line, or as `human` renders it.
    pub fn print<T: Serialize>(self, value: &T, human: impl FnOnce(&T) -> String) {
        match self {
            Output::Json => emit(&serde_json::to_string(value).expect("serializable output")),
            Output::Human => emit(&human(value)),
        }
    }

    /// Prints a reply body as it came (JSON), pretty-printed for people.
    pub fn reply(self, text: &str) {
        match (self, serde_json::from_str::<serde_json::Value>(text)) {
            (Output::Human, Ok(value)) => {
                emit(&serde_json::to_string_pretty(&value).expect("serializable"))
            }
            _ => emit(text),
        }
    }
}

/// Prints one line to stdout. A reader that went away (`| head`) ends the
/// command quietly, as it ends any Unix tool, instead of a panic.
pub fn emit(line: &str) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    if let Err(error) = writeln!(stdout, "{line}").and_then(|()| stdout.flush()) {
        if error.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: cannot write the output: {error}");
        std::process::exit(1);
    }
}

/// Opens the existing, migrated database: only `run` and `migrate` create or
/// migrate one, so a typo in `DATABASE_URL` never leaves a new database behind.
async fn database(database: &DatabaseArgs) -> anyhow::Result<PgPool> {
    store::open_existing(&database.database_url).await
}

/// Creates the database if it is missing and applies the migrations; with a
/// runtime role, grants it what `run --migrate check` needs.
pub async fn migrate(
    database: &DatabaseArgs,
    runtime_role: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let prepared = store::open_prepared(&database.database_url, 1).await?;
    eprintln!("database is migrated");
    if let Some(role) = runtime_role {
        let mut connection = prepared.target.locate(None).await?;
        store::schema::grant_runtime_role(&mut connection, role)
            .await
            .map_err(|error| anyhow::anyhow!("cannot grant {role:?} its privileges: {error}"))?;
        eprintln!("granted {role:?} what `run --migrate check` needs");
    }
    prepared.pool.close().await;
    Ok(ExitCode::SUCCESS)
}

/// Runs `bench` and prints its report; exits 1 when an invariant is broken.
pub async fn bench(
    connections: &Connections,
    args: crate::bench::BenchArgs,
) -> anyhow::Result<ExitCode> {
    let json = args.json;
    let report = crate::bench::run(connections, args).await?;
    if json {
        emit(&serde_json::to_string(&report)?);
    } else {
        emit(&report.to_string());
    }
    Ok(if report.invariants_hold {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
