//! Logging: `pretty` for people at a terminal, `json` (one object per line, every
//! field escaped, so a message body can never forge a log line) for everything
//! else. With the `otlp` feature and `--otlp-endpoint`, spans are also exported
//! to an OpenTelemetry collector over OTLP/HTTP.

use crate::settings::LogFormat;
use std::io::IsTerminal as _;
use tracing_subscriber::layer::{Layer, Layered, SubscriberExt as _};
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Registry};

type Filtered = Layered<EnvFilter, Registry>;
type BoxedLayer = Box<dyn Layer<Filtered> + Send + Sync>;

/// Keeps exporters alive; dropping it flushes the spans not yet exported.
#[derive(Default)]
pub struct TelemetryGuard {
    #[cfg(feature = "otlp")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        #[cfg(feature = "otlp")]
        if let Some(provider) = self.provider.take() {
            provider.shutdown().ok();
        }
    }
}

/// Installs the global subscriber, writing to stderr; stdout is for command
/// output. `RUST_LOG` overrides `default_filter`. `otlp_endpoint` is the full
/// OTLP/HTTP traces URL, e.g. `http://collector:4318/v1/traces`.
pub fn init(
    format: Option<LogFormat>,
    default_filter: &str,
    otlp_endpoint: Option<&str>,
) -> anyhow::Result<TelemetryGuard> {
    let format = format.unwrap_or(if std::io::stderr().is_terminal() {
        LogFormat::Pretty
    } else {
        LogFormat::Json
    });
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let output: BoxedLayer = match format {
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let mut layers = vec![output];
    let mut guard = TelemetryGuard::default();
    if let Some(endpoint) = otlp_endpoint {
        layers.push(otlp_layer(endpoint, &mut guard)?);
    }
    // Only a second call in the same process fails, and the first one stands.
    tracing_subscriber::registry()
        .with(filter)
        .with(layers)
        .try_init()
        .ok();
    Ok(guard)
}

#[cfg(feature = "otlp")]
fn otlp_layer(endpoint: &str, guard: &mut TelemetryGuard) -> anyhow::Result<BoxedLayer> {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::WithExportConfig as _;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(endpoint)
        .build()?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name("qty-worker")
        .build();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("qty-worker");
    guard.provider = Some(provider);
    Ok(tracing_opentelemetry::layer().with_tracer(tracer).boxed())
}

#[cfg(not(feature = "otlp"))]
fn otlp_layer(_endpoint: &str, _guard: &mut TelemetryGuard) -> anyhow::Result<BoxedLayer> {
    anyhow::bail!(
        "--otlp-endpoint needs a build with the `otlp` feature (cargo build --features otlp)"
    )
}
