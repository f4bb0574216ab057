//! A reply as a listener sees it, checked against the documented schema.

use crate::WAIT;
use futures::StreamExt as _;
use lapin::{BasicProperties, Consumer};
use serde_json::Value;

/// `docs/schemas/reply.json`, which `docs/asyncapi.yaml` points at: every reply a
/// test receives is checked against it, so the document cannot drift from the code.
static REPLY_SCHEMA: std::sync::LazyLock<jsonschema::Validator> = std::sync::LazyLock::new(|| {
    let schema: Value = serde_json::from_str(include_str!("../../../docs/schemas/reply.json"))
        .expect("reply.json is JSON");
    jsonschema::validator_for(&schema).expect("reply.json is a valid JSON Schema")
});

/// Panics unless `body` matches the documented reply schema.
pub fn assert_documented_reply(body: &Value) {
    if let Err(error) = REPLY_SCHEMA.validate(body) {
        panic!("reply does not match docs/schemas/reply.json: {error}\n{body}");
    }
}

/// A reply as a listener sees it.
#[derive(Debug, Clone)]
pub struct Reply {
    pub body: Value,
    pub raw: Vec<u8>,
    pub properties: BasicProperties,
    pub routing_key: String,
}

impl Reply {
    pub fn outcome(&self) -> &str {
        self.body["outcome"].as_str().expect("reply has an outcome")
    }
    pub fn reason(&self) -> Option<&str> {
        self.body["reason"].as_str()
    }
    pub fn message_id(&self) -> Option<String> {
        self.properties.message_id().as_ref().map(|s| s.to_string())
    }
    /// A text header of the reply (`traceparent`, say).
    pub fn header(&self, name: &str) -> Option<String> {
        qty_worker::broker::header_text(&self.properties, name)
    }

    pub fn correlation_id(&self) -> Option<String> {
        self.properties
            .correlation_id()
            .as_ref()
            .map(|s| s.to_string())
    }
}

pub async fn next_reply(consumer: &mut Consumer, what: &str) -> Reply {
    let delivery = tokio::time::timeout(WAIT, consumer.next())
        .await
        .unwrap_or_else(|_| panic!("no {what} within {WAIT:?}"))
        .unwrap_or_else(|| panic!("consumer ended while waiting for {what}"))
        .expect("delivery");
    let body: Value = serde_json::from_slice(&delivery.data).expect("reply body is JSON");
    assert_documented_reply(&body);
    Reply {
        body,
        raw: delivery.data.clone(),
        properties: delivery.properties.clone(),
        routing_key: delivery.routing_key.to_string(),
    }
}
