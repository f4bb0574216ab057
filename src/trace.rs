//! W3C Trace Context on messages: a request's `traceparent` header joins the
//! delivery's span to the caller's trace, and the reply carries it onward with
//! this worker's own span id as the parent (<https://www.w3.org/TR/trace-context/>).

use std::fmt;

/// A parsed `traceparent` (version 00).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub parent_id: [u8; 8],
    pub flags: u8,
}

impl TraceParent {
    /// Parses `00-<32 hex>-<16 hex>-<2 hex>`; anything else, including the
    /// all-zero ids the spec forbids, is ignored rather than propagated.
    pub fn parse(header: &str) -> Option<TraceParent> {
        let mut parts = header.trim().split('-');
        let (version, trace, parent, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if version != "00" || parts.next().is_some() {
            return None;
        }
        let trace_id: [u8; 16] = hex(trace)?.try_into().ok()?;
        let parent_id: [u8; 8] = hex(parent)?.try_into().ok()?;
        let flags = *hex(flags)?.first().filter(|_| flags.len() == 2)?;
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(TraceParent {
            trace_id,
            parent_id,
            flags,
        })
    }

    /// The same trace, with `span_id` (this worker's span) as the parent.
    pub fn child(&self, span_id: [u8; 8]) -> TraceParent {
        TraceParent {
            parent_id: span_id,
            ..*self
        }
    }

    pub fn trace_id_hex(&self) -> String {
        to_hex(&self.trace_id)
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            to_hex(&self.trace_id),
            to_hex(&self.parent_id),
            self.flags
        )
    }
}

/// Makes `span` a child of the caller's span in the OpenTelemetry layer, when one
/// is installed (`--otlp-endpoint`), and returns the `traceparent` naming `span`
/// itself: the one to send on. `None` without the layer.
#[cfg(feature = "otlp")]
pub fn join_exported_trace(span: &tracing::Span, caller: &TraceParent) -> Option<TraceParent> {
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
    };
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let remote = SpanContext::new(
        TraceId::from_bytes(caller.trace_id),
        SpanId::from_bytes(caller.parent_id),
        TraceFlags::new(caller.flags),
        true,
        TraceState::default(),
    );
    span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote))
        .ok()?;
    let context = span.context();
    let ours = context.span().span_context().clone();
    ours.is_valid().then(|| TraceParent {
        trace_id: ours.trace_id().to_bytes(),
        parent_id: ours.span_id().to_bytes(),
        flags: ours.trace_flags().to_u8(),
    })
}

#[cfg(not(feature = "otlp"))]
pub fn join_exported_trace(_span: &tracing::Span, _caller: &TraceParent) -> Option<TraceParent> {
    None
}

/// A fresh, non-zero span id.
pub fn new_span_id() -> [u8; 8] {
    let bytes = uuid::Uuid::new_v4().into_bytes();
    let mut id = [0u8; 8];
    id.copy_from_slice(&bytes[..8]);
    id[0] |= 1;
    id
}

fn hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2)
        || !text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_header_round_trips() {
        let parsed = TraceParent::parse(SAMPLE).expect("valid traceparent");
        assert_eq!(parsed.to_string(), SAMPLE);
        assert_eq!(parsed.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    #[test]
    fn the_child_keeps_the_trace_and_flags_and_changes_the_parent() {
        let parsed = TraceParent::parse(SAMPLE).expect("valid traceparent");
        let child = parsed.child([1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(
            child.to_string(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0102030405060708-01"
        );
    }

    #[test]
    fn malformed_or_forbidden_headers_are_ignored() {
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn new_span_ids_make_valid_distinct_children() {
        // A receiver drops a traceparent whose span id is zero or malformed, and
        // two spans sharing an id would merge in a trace view.
        let parent = TraceParent::parse(SAMPLE).expect("valid traceparent");
        let children: std::collections::HashSet<String> = (0..1_000)
            .map(|_| {
                let child = parent.child(new_span_id()).to_string();
                let parsed = TraceParent::parse(&child).expect("a valid child header");
                assert_eq!(parsed.trace_id_hex(), parent.trace_id_hex());
                child
            })
            .collect();
        assert_eq!(children.len(), 1_000, "span ids repeat");
    }
}
