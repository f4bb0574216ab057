use clap::Parser as _;
use qty_worker::cli::{Cli, Command, DeadLettersCommand};
use qty_worker::commands::{Output, adjust, dead_letters, item, ledger, parked};
use qty_worker::settings::{LogFormat, SettingError, Settings};
use qty_worker::{commands, telemetry};
use std::process::ExitCode;

/// jemalloc rather than the system allocator: a request makes dozens of small
/// allocations (most of them in the AMQP client), which jemalloc's per-thread
/// caches serve cheaply (BENCHMARKS.md has the measurement).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let cli = match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(error) => return refused(error, &args),
    };
    // `run` takes `--threads` (default one: the AMQP client does its I/O on a
    // thread of its own, and PostgreSQL and RabbitMQ need the cores too); the
    // operator commands need no more than one.
    let threads = match &cli.command {
        Command::Run(run) => run.worker.threads,
        _ => 1,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(threads))
        .enable_all()
        .build();
    match runtime {
        Ok(runtime) => runtime.block_on(command(cli)),
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn command(cli: Cli) -> ExitCode {
    let (log_format, otlp_endpoint, default_filter) = logging(&cli.command);
    let quiet = !matches!(cli.command, Command::Run(_) | Command::Migrate(_));
    let _telemetry = match telemetry::init(log_format, default_filter, otlp_endpoint.as_deref()) {
        Ok(guard) => guard,
        Err(error) => {
            eprintln!("error: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Run(run) => {
            let settings = Settings {
                connections: run.connections,
                worker: run.worker,
            };
            // Spawned rather than awaited here: `main` runs outside the runtime's
            // worker threads, and every delivery handed from it to a task would
            // cross threads (a quarter of the worker's CPU went to that).
            match tokio::spawn(qty_worker::run(settings, shutdown_signal())).await {
                Ok(result) => result.map(|()| ExitCode::SUCCESS),
                Err(panic) => Err(anyhow::anyhow!("the worker panicked: {panic}")),
            }
        }
        Command::Migrate(migrate) => {
            commands::migrate(&migrate.database, migrate.runtime_role.as_deref()).await
        }
        Command::Item(command) => item::run(command).await,
        Command::Ledger(args) => {
            let output = Output::choose(args.json.json);
            ledger::run(&args.database, args.item_id, args.limit, output).await
        }
        Command::Parked(args) => {
            let output = Output::choose(args.json.json);
            parked::run(&args.database, args.limit, output).await
        }
        Command::DeadLetters(DeadLettersCommand::List(dead)) => {
            let output = Output::choose(dead.json.json);
            dead_letters::list(&dead.broker, &dead.queue.queue, output).await
        }
        Command::DeadLetters(DeadLettersCommand::Replay {
            message_ids,
            all,
            dead_letters: dead,
        }) => {
            let output = Output::choose(dead.json.json);
            dead_letters::replay(&dead.broker, &dead.queue.queue, all, &message_ids, output).await
        }
        Command::Adjust(args) => {
            let output = Output::choose(args.json.json);
            adjust::run(args, output).await
        }
        Command::Bench(args) => commands::bench(&args.connections, args.bench).await,
    };
    result.unwrap_or_else(|error| match error.downcast_ref::<SettingError>() {
        // A setting that can never work: a usage error, not an outage to wait out.
        Some(setting) => {
            if quiet {
                eprintln!("error: {setting}");
            } else {
                tracing::error!(setting = setting.setting, "{setting}");
            }
            ExitCode::from(2)
        }
        None => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    })
}

/// What clap refused. A setting of `run` or `migrate` out of range is one line
/// naming the setting, in the chosen log format (contract §1), exit 2; anything
/// else is clap's own message (help and version exit 0, usage errors 2).
fn refused(error: clap::Error, args: &[String]) -> ExitCode {
    let Some((setting, reason)) = qty_worker::cli::refused_setting(&error, args) else {
        error.exit()
    };
    let format = qty_worker::cli::requested_log_format(args);
    match telemetry::init(format, "info", None) {
        Ok(_guard) => tracing::error!(setting, "{setting}: {reason}"),
        Err(_) => eprintln!("error: {setting}: {reason}"),
    }
    ExitCode::from(2)
}

/// What `run` and `migrate` log unless `RUST_LOG` says otherwise: info, but not
/// PostgreSQL's notices at info (every start's `CREATE TABLE IF NOT EXISTS` of
/// the migrations table says "already exists, skipping").
const LONG_RUNNING_FILTER: &str = "info,sqlx::postgres::notice=warn";

/// The log format, OTLP endpoint and default filter of a command. The operator
/// commands log only warnings (and nothing of lapin's: they say themselves what
/// went wrong, once).
fn logging(command: &Command) -> (Option<LogFormat>, Option<String>, &'static str) {
    match command {
        Command::Run(run) => (
            run.logs.log_format,
            run.otlp_endpoint.clone(),
            LONG_RUNNING_FILTER,
        ),
        Command::Migrate(migrate) => (migrate.logs.log_format, None, LONG_RUNNING_FILTER),
        _ => (None, None, "warn,lapin=off"),
    }
}

/// Completes on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler installs");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    ctrl_c.await.ok();
    tracing::info!("stop requested");
}
