//! Stage 2 of the flow: turn a delivery's properties and body into a [`Request`],
//! or into an [`Invalid`] naming exactly what broke the contract (§2).
//!
//! Pure: no broker or database types, so every rejection is unit-tested over
//! fixtures. Decoding never stops at serde's first complaint about a member:
//! members are captured raw and judged here, so the error names the member and
//! what it held (`delta must be an integer, got boolean`), and whatever *was*
//! readable (`item_id`, `delta`) still reaches the reply.

use serde::de::{self, DeserializeSeed, Deserializer as _, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use std::fmt;
use uuid::Uuid;

/// Largest body the worker reads; larger ones are rejected unparsed.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Most characters of the request an error text quotes (contract §4), so a
/// 60,000-character member name cannot make a 60,000-character reply.
pub const MAX_QUOTE_CHARS: usize = 100;

/// `content_encoding` values that leave the body as sent: kombu and Celery set
/// one of these on every message.
const BYTES_AS_SENT: [&str; 4] = ["utf-8", "utf8", "identity", "binary"];

/// `text` cut to [`MAX_QUOTE_CHARS`] characters, with `…` where it was cut.
fn quote(text: &str) -> String {
    match text.char_indices().nth(MAX_QUOTE_CHARS) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

/// The AMQP properties decoding looks at, copied out of the broker's types.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestProps {
    pub message_id: Option<String>,
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    /// The publisher's RabbitMQ user name, validated by the broker: carried into
    /// the ledger, never judged here (who may adjust is `admit`'s business).
    pub user_id: Option<String>,
    /// The `item_id` header, which the broker routes partitioned requests by.
    pub item_header: ItemHeader,
}

/// The request's `item_id` header (contract §2): a copy of the body's `item_id`
/// that the broker can hash, so that one item's requests share a partition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ItemHeader {
    /// No such header: served all the same (and counted, see `delivery`).
    #[default]
    Absent,
    Text(String),
    /// A header of another AMQP type, named for the error text.
    NotText(&'static str),
}

/// A request that satisfies the contract.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub message_id: String,
    pub item_id: Uuid,
    pub delta: i64,
    /// The `user_id` property, recorded in the ledger; `None` without one.
    pub publisher: Option<String>,
}

/// A request that breaks the contract, with the parts of it that were readable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub error: DecodeError,
    pub message_id: Option<String>,
    pub item_id: Option<Uuid>,
    pub delta: Option<i64>,
}

/// Every way a request can break §2 of the contract. The `Display` text is
/// the reply's `error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("message_id property is required")]
    MissingMessageId,
    #[error("message_id property must not be empty")]
    EmptyMessageId,
    /// PostgreSQL text cannot hold NUL, so such a key could never be recorded.
    #[error("message_id property must not contain NUL characters")]
    NulInMessageId,
    #[error("content_type must be application/json, got {0:?}")]
    WrongContentType(String),
    #[error("content_type charset must be utf-8, got {0:?}")]
    WrongCharset(String),
    #[error("content_encoding must be absent, utf-8, identity or binary, got {0:?}")]
    ContentEncoding(String),
    #[error("body must be at most {MAX_BODY_BYTES} bytes, got {0}")]
    BodyTooLarge(usize),
    #[error("body is empty")]
    EmptyBody,
    #[error("body is not valid UTF-8 (at byte {0})")]
    NotUtf8(usize),
    #[error("body is not valid JSON: {0}")]
    Syntax(String),
    #[error("body must be a JSON object, got {0}")]
    NotAnObject(JsonKind),
    #[error("body has unknown member {0:?}")]
    UnknownMember(String),
    #[error("body has member {0:?} twice")]
    DuplicateMember(&'static str),
    #[error("body is missing member {0:?}")]
    MissingMember(&'static str),
    #[error("item_id must be a string, got {0}")]
    ItemIdNotString(JsonKind),
    #[error("item_id must be a hyphenated UUID, got {0:?}")]
    ItemIdNotUuid(String),
    #[error("delta must be an integer, got {0}")]
    DeltaNotInteger(JsonKind),
    #[error("delta must be within the signed 64-bit range, got {0}")]
    DeltaOutOfRange(String),
    #[error("header item_id must be a string, got {0}")]
    ItemHeaderNotString(&'static str),
    /// The broker routed the request by a header that names another item: its
    /// order against that item's other requests would be lost.
    #[error("header item_id must equal the body's item_id, got {0:?}")]
    ItemHeaderMismatch(String),
}

/// The JSON type a value turned out to have, for error texts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonKind {
    Null,
    Boolean,
    Integer,
    Float,
    String,
    Array,
    Object,
}

impl fmt::Display for JsonKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            JsonKind::Null => "null",
            JsonKind::Boolean => "boolean",
            JsonKind::Integer => "integer",
            JsonKind::Float => "float",
            JsonKind::String => "string",
            JsonKind::Array => "array",
            JsonKind::Object => "object",
        })
    }
}

impl JsonKind {
    /// The kind of a syntactically valid JSON value, from its first characters.
    fn of(raw: &str) -> JsonKind {
        match raw.as_bytes().first() {
            Some(b'n') => JsonKind::Null,
            Some(b't' | b'f') => JsonKind::Boolean,
            Some(b'"') => JsonKind::String,
            Some(b'[') => JsonKind::Array,
            Some(b'{') => JsonKind::Object,
            _ if raw.contains(['.', 'e', 'E']) => JsonKind::Float,
            _ => JsonKind::Integer,
        }
    }
}

/// Decodes one request. Properties are judged first, then the body; the body is
/// read even when a property is wrong, so the reply can still echo `item_id` and
/// `delta`.
pub fn decode(props: &RequestProps, body: &[u8]) -> Result<Request, Box<Invalid>> {
    let property_error = check_properties(props).err();
    let fields = read_body(body);
    let header_error = match (&props.item_header, fields.item_id) {
        (ItemHeader::Text(header), Some(item_id)) if !names(header, item_id) => {
            Some(DecodeError::ItemHeaderMismatch(quote(header)))
        }
        _ => None,
    };
    let error = property_error.or(fields.error).or(header_error);
    let message_id = props
        .message_id
        .clone()
        .filter(|id| !id.is_empty() && !id.contains('\0'));
    match (error, message_id, fields.item_id, fields.delta) {
        (None, Some(message_id), Some(item_id), Some(delta)) => Ok(Request {
            message_id,
            item_id,
            delta,
            publisher: props.user_id.clone(),
        }),
        (error, message_id, item_id, delta) => Err(Box::new(Invalid {
            // Without an error, a field can only be absent because it was missing.
            error: error.unwrap_or(DecodeError::MissingMessageId),
            message_id,
            item_id,
            delta,
        })),
    }
}

fn check_properties(props: &RequestProps) -> Result<(), DecodeError> {
    match props.message_id.as_deref() {
        None => return Err(DecodeError::MissingMessageId),
        Some("") => return Err(DecodeError::EmptyMessageId),
        Some(id) if id.contains('\0') => return Err(DecodeError::NulInMessageId),
        Some(_) => {}
    }
    if let Some(encoding) = &props.content_encoding
        && !BYTES_AS_SENT
            .iter()
            .any(|ok| encoding.eq_ignore_ascii_case(ok))
    {
        return Err(DecodeError::ContentEncoding(quote(encoding)));
    }
    if let Some(content_type) = &props.content_type {
        check_content_type(content_type)?;
    }
    if let ItemHeader::NotText(kind) = props.item_header {
        return Err(DecodeError::ItemHeaderNotString(kind));
    }
    Ok(())
}

/// Whether the `item_id` header names `item_id`: the same UUID in the same
/// hyphenated form the body must use (either case).
fn names(header: &str, item_id: Uuid) -> bool {
    header.len() == 36 && Uuid::try_parse(header).is_ok_and(|id| id == item_id)
}

/// `application/json`, any case, with optional parameters; a charset parameter,
/// when given, must be UTF-8 since that is the only encoding the body may have.
fn check_content_type(content_type: &str) -> Result<(), DecodeError> {
    let mut parts = content_type.split(';');
    let essence = parts.next().unwrap_or_default().trim();
    if !essence.eq_ignore_ascii_case("application/json") {
        return Err(DecodeError::WrongContentType(quote(content_type)));
    }
    for parameter in parts {
        let Some((name, value)) = parameter.split_once('=') else {
            continue;
        };
        let value = value.trim().trim_matches('"');
        if name.trim().eq_ignore_ascii_case("charset")
            && !value.eq_ignore_ascii_case("utf-8")
            && !value.eq_ignore_ascii_case("utf8")
        {
            return Err(DecodeError::WrongCharset(quote(value)));
        }
    }
    Ok(())
}

/// What the body yielded: the first error, plus every member that was valid.
#[derive(Default)]
struct BodyFields {
    item_id: Option<Uuid>,
    delta: Option<i64>,
    error: Option<DecodeError>,
}

impl BodyFields {
    fn fail(&mut self, error: DecodeError) {
        self.error.get_or_insert(error);
    }
}

fn read_body(body: &[u8]) -> BodyFields {
    let mut fields = BodyFields::default();
    if body.len() > MAX_BODY_BYTES {
        fields.fail(DecodeError::BodyTooLarge(body.len()));
        return fields;
    }
    let text = match std::str::from_utf8(body) {
        Ok(text) => text,
        Err(e) => {
            fields.fail(DecodeError::NotUtf8(e.valid_up_to()));
            return fields;
        }
    };
    if text.trim().is_empty() {
        fields.fail(DecodeError::EmptyBody);
        return fields;
    }
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let parsed = deserializer
        .deserialize_any(BodyVisitor {
            fields: &mut fields,
        })
        .and_then(|()| deserializer.end());
    if let Err(e) = parsed {
        // A member judged invalid stops nothing, so a serde error here is always
        // about the JSON text itself, or the shape the visitor already recorded.
        fields.fail(DecodeError::Syntax(e.to_string()));
    }
    if fields.error.is_none() {
        if fields.item_id.is_none() {
            fields.fail(DecodeError::MissingMember("item_id"));
        } else if fields.delta.is_none() {
            fields.fail(DecodeError::MissingMember("delta"));
        }
    }
    fields
}

/// Walks the top-level value. Anything but an object is recorded and ends the
/// walk with a bare serde error, which `read_body` then ignores (first error wins).
struct BodyVisitor<'f> {
    fields: &'f mut BodyFields,
}

impl BodyVisitor<'_> {
    fn not_an_object<E: de::Error>(self, kind: JsonKind) -> Result<(), E> {
        self.fields.fail(DecodeError::NotAnObject(kind));
        Err(E::custom("not an object"))
    }
}

impl<'de> Visitor<'de> for BodyVisitor<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen_item_id = false;
        let mut seen_delta = false;
        while let Some(key) = map.next_key::<String>()? {
            let raw: &RawValue = map.next_value()?;
            match key.as_str() {
                "item_id" if seen_item_id => {
                    self.fields.fail(DecodeError::DuplicateMember("item_id"));
                    self.fields.item_id = None;
                }
                "item_id" => {
                    seen_item_id = true;
                    match parse_item_id(raw.get()) {
                        Ok(id) => self.fields.item_id = Some(id),
                        Err(e) => self.fields.fail(e),
                    }
                }
                "delta" if seen_delta => {
                    self.fields.fail(DecodeError::DuplicateMember("delta"));
                    self.fields.delta = None;
                }
                "delta" => {
                    seen_delta = true;
                    match parse_delta(raw.get()) {
                        Ok(delta) => self.fields.delta = Some(delta),
                        Err(e) => self.fields.fail(e),
                    }
                }
                _ => self.fields.fail(DecodeError::UnknownMember(quote(&key))),
            }
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        self.not_an_object(JsonKind::Array)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.not_an_object(JsonKind::String)
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.not_an_object(JsonKind::Boolean)
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.not_an_object(JsonKind::Null)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.not_an_object(JsonKind::Integer)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.not_an_object(JsonKind::Integer)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.not_an_object(JsonKind::Float)
    }
}

impl<'de> DeserializeSeed<'de> for BodyVisitor<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

/// `item_id` must be a JSON string holding the 36-character hyphenated form.
fn parse_item_id(raw: &str) -> Result<Uuid, DecodeError> {
    let kind = JsonKind::of(raw);
    if kind != JsonKind::String {
        return Err(DecodeError::ItemIdNotString(kind));
    }
    let text: String = serde_json::from_str(raw).map_err(|e| DecodeError::Syntax(e.to_string()))?;
    // Uuid::try_parse also takes the simple, braced and URN forms; of those,
    // only the hyphenated one is 36 characters long.
    match Uuid::try_parse(&text) {
        Ok(id) if text.len() == 36 => Ok(id),
        _ => Err(DecodeError::ItemIdNotUuid(quote(&text))),
    }
}

/// `delta` must be a JSON integer in i64 range. Judged on the raw text, so that
/// `1.0` and `1e2` are floats and `-9223372036854775809` is out of range rather
/// than a float, which is what a parsed `f64` would make of it.
fn parse_delta(raw: &str) -> Result<i64, DecodeError> {
    match JsonKind::of(raw) {
        JsonKind::Integer => raw
            .parse::<i64>()
            .map_err(|_| DecodeError::DeltaOutOfRange(quote(raw))),
        kind => Err(DecodeError::DeltaNotInteger(kind)),
    }
}

#[cfg(test)]
#[path = "decode_tests.rs"]
mod tests;
