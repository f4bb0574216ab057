//! Logging: `pretty` for people at a terminal, `json` (one object per line, every
//! field escaped, so a message body can never forge a log line) for everything
//! else. With the `otlp` feature and `--otlp-endpoint`, spans are also exported
//! to an OpenTelemetry collector over OTLP/HTTP.

use crate::settings::LogFormat;
use std::fmt;
use std::io::IsTerminal as _;
use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FormatFields, FormattedFields};
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
            .fmt_fields(JsonSpanFields)
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

/// A span's fields as one JSON object, written out as they are recorded.
///
/// tracing-subscriber's own `JsonFields` collects them into a map of
/// `serde_json::Value`s first and serializes that: for the span every delivery
/// opens, that cost about a sixteenth of the worker's instructions per request.
/// Strings are escaped by serde_json all the same, so a field can never break
/// out of its string.
struct JsonSpanFields;

impl<'writer> FormatFields<'writer> for JsonSpanFields {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        let mut object = JsonObject::default();
        fields.record(&mut object);
        writer.write_str(&object.finish()?)
    }

    /// Fields recorded after the span was made go inside its object.
    fn add_fields(
        &self,
        current: &'writer mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        let mut object = JsonObject::default();
        fields.record(&mut object);
        let added = object.finish()?;
        match current.fields.strip_suffix('}') {
            // Both are objects: splice the new fields into the old one.
            Some(old) if added.len() > 2 => {
                let separator = if old == "{" { "" } else { "," };
                current.fields = format!("{old}{separator}{}", &added[1..]);
            }
            Some(_) => {}
            None => current.fields = added,
        }
        Ok(())
    }
}

/// A JSON object, built in one buffer sized for a few short fields, so a span
/// costs one allocation for its fields rather than one per write.
struct JsonObject {
    buffer: Vec<u8>,
    failed: bool,
}

impl Default for JsonObject {
    fn default() -> Self {
        let mut buffer = Vec::with_capacity(128);
        buffer.push(b'{');
        JsonObject {
            buffer,
            failed: false,
        }
    }
}

impl JsonObject {
    fn entry(&mut self, field: &Field, value: impl serde::Serialize) {
        if self.buffer.len() > 1 {
            self.buffer.push(b',');
        }
        let written = serde_json::to_writer(&mut self.buffer, field.name()).and_then(|()| {
            self.buffer.push(b':');
            serde_json::to_writer(&mut self.buffer, &value)
        });
        self.failed |= written.is_err();
    }

    fn finish(mut self) -> Result<String, fmt::Error> {
        self.buffer.push(b'}');
        if self.failed {
            return Err(fmt::Error);
        }
        String::from_utf8(self.buffer).map_err(|_| fmt::Error)
    }
}

impl Visit for JsonObject {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.entry(field, value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.entry(field, format!("{value:?}"));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.entry(field, value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.entry(field, value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.entry(field, value);
    }

    /// Not a number (NaN, infinities) becomes `null`, as serde_json writes it.
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.entry(field, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::fmt::MakeWriter;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .expect("no writer panicked")
                .extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }

    /// Logs one event inside the span `make` returns, and returns the JSON
    /// line's `span` object.
    fn logged_span(make: impl FnOnce() -> tracing::Span) -> serde_json::Value {
        let captured = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .fmt_fields(JsonSpanFields)
            .with_writer(captured.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            make().in_scope(|| tracing::warn!("inside"));
        });
        let bytes = captured.0.lock().expect("no writer panicked").clone();
        let line = String::from_utf8(bytes).expect("log lines are UTF-8");
        let event: serde_json::Value = serde_json::from_str(line.trim()).expect("one JSON line");
        event["span"].clone()
    }

    fn awkward_span() -> tracing::Span {
        tracing::info_span!(
            "delivery",
            message_id = "k\"1\n\u{7}é",
            correlation_id = None::<&str>,
            attempt = 3u64,
            offset = -2i64,
            redelivered = true,
            share = 0.5f64,
            odd = ?("x", 1),
            later = tracing::field::Empty,
        )
    }

    #[test]
    fn span_fields_are_escaped_json_of_their_own_types() {
        let span = logged_span(awkward_span);
        assert_eq!(
            span,
            serde_json::json!({
                "name": "delivery",
                "message_id": "k\"1\n\u{7}é",
                "attempt": 3,
                "offset": -2,
                "redelivered": true,
                "share": 0.5,
                "odd": "(\"x\", 1)",
            })
        );
    }

    #[test]
    fn fields_recorded_later_join_the_same_object() {
        let span = logged_span(|| {
            let span = awkward_span();
            span.record("later", "set\"after");
            span
        });
        assert_eq!(span["later"], "set\"after");
        assert_eq!(span["message_id"], "k\"1\n\u{7}é");
        assert_eq!(span["attempt"], 3);

        let span = logged_span(|| {
            let span = tracing::info_span!("bare", later = tracing::field::Empty);
            span.record("later", 7u64);
            span
        });
        assert_eq!(span, serde_json::json!({"name": "bare", "later": 7}));
    }
}
