//! Logging: `pretty` for people at a terminal, `json` (one object per line, every
//! field escaped, so a message body can never forge a log line) for everything else.

use crate::settings::LogFormat;
use std::io::IsTerminal as _;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber, writing to stderr; stdout is for command output.
/// `RUST_LOG` overrides `default_filter`.
pub fn init(format: Option<LogFormat>, default_filter: &str) {
    let format = format.unwrap_or(if std::io::stderr().is_terminal() {
        LogFormat::Pretty
    } else {
        LogFormat::Json
    });
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Pretty => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
    // Only a second call in the same process fails, and the first one stands.
    drop(installed);
}
