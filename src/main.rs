use clap::Parser as _;
use qty_worker::cli::{Cli, Command, DeadLettersCommand};
use qty_worker::commands::{Output, adjust, dead_letters, item, ledger};
use qty_worker::settings::{SettingError, Settings};
use qty_worker::{commands, telemetry};
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let quiet_by_default = !matches!(cli.command, Command::Run(_));
    let output = Output::choose(cli.json);
    let default_filter = if quiet_by_default { "warn" } else { "info" };
    let _telemetry =
        match telemetry::init(cli.log_format, default_filter, cli.otlp_endpoint.as_deref()) {
            Ok(guard) => guard,
            Err(error) => {
                eprintln!("error: {error:#}");
                return ExitCode::FAILURE;
            }
        };
    let result = match cli.command {
        Command::Run(worker) => {
            let settings = Settings {
                connections: cli.connections,
                worker,
            };
            // Spawned rather than awaited here: `main` runs outside the runtime's
            // worker threads, and every delivery handed from it to a task would
            // cross threads (a quarter of the worker's CPU went to that).
            match tokio::spawn(qty_worker::run(settings, shutdown_signal())).await {
                Ok(result) => result.map(|()| ExitCode::SUCCESS),
                Err(panic) => Err(anyhow::anyhow!("the worker panicked: {panic}")),
            }
        }
        Command::Migrate => commands::migrate(&cli.connections).await,
        Command::Item(command) => item::run(&cli.connections, command, output).await,
        Command::Ledger { item_id, limit } => {
            ledger::run(&cli.connections, item_id, limit, output).await
        }
        Command::DeadLetters(DeadLettersCommand::List) => {
            dead_letters::list(&cli.connections, output).await
        }
        Command::DeadLetters(DeadLettersCommand::Replay { all, message_ids }) => {
            dead_letters::replay(&cli.connections, all, &message_ids, output).await
        }
        Command::Adjust(args) => adjust::run(&cli.connections, args, output).await,
        Command::Bench(args) => commands::bench(&cli.connections, args).await,
    };
    result.unwrap_or_else(|error| match error.downcast_ref::<SettingError>() {
        // A setting that can never work: a usage error, not an outage to wait out.
        Some(setting) => {
            if quiet_by_default {
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
