//! The one outcome type that drives everything after the database: the reply body,
//! its routing key and `type`, the metrics labels and the log line all come from
//! [`Verdict`], so no second place re-derives them (contract §4).

use crate::admit::Forbidden;
use crate::decode::{Invalid, Request};
use serde::Serialize;
use sha1::{Digest as _, Sha1};
use uuid::Uuid;

/// What happened to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The adjustment was applied; `qty` is the quantity right after it.
    Applied { qty: i64 },
    /// No item has the request's `item_id`.
    NotFound,
    /// The request was refused, for this reason.
    Rejected(Reason),
}

/// Why a request was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// The request broke §2 of the contract; the text says how.
    InvalidMessage(String),
    InsufficientQty,
    QtyOutOfRange,
    IdempotencyConflict,
    /// `QTY_PUBLISHERS` does not list the request's `user_id`; the text says whose.
    Forbidden(String),
}

impl Outcome {
    /// One outcome of every label combination (`outcome`, `reason`), so the
    /// metrics can show each from the start.
    pub fn all_labels() -> [Outcome; 7] {
        [
            Outcome::Applied { qty: 0 },
            Outcome::NotFound,
            Outcome::Rejected(Reason::InvalidMessage(String::new())),
            Outcome::Rejected(Reason::InsufficientQty),
            Outcome::Rejected(Reason::QtyOutOfRange),
            Outcome::Rejected(Reason::IdempotencyConflict),
            Outcome::Rejected(Reason::Forbidden(String::new())),
        ]
    }

    /// The contract's name for the outcome: `applied`, `not_found` or `rejected`.
    pub fn name(&self) -> &'static str {
        match self {
            Outcome::Applied { .. } => "applied",
            Outcome::NotFound => "not_found",
            Outcome::Rejected(_) => "rejected",
        }
    }

    /// The reason code, only on `rejected`.
    pub fn reason(&self) -> Option<&'static str> {
        match self {
            Outcome::Rejected(reason) => Some(reason.code()),
            _ => None,
        }
    }

    /// The human text of the reply's `error` member, absent on `applied`.
    pub fn error(&self) -> Option<&str> {
        match self {
            Outcome::Applied { .. } => None,
            Outcome::NotFound => Some("item not found"),
            Outcome::Rejected(Reason::InvalidMessage(text) | Reason::Forbidden(text)) => Some(text),
            Outcome::Rejected(Reason::InsufficientQty) => Some("qty cannot go below 0"),
            Outcome::Rejected(Reason::QtyOutOfRange) => {
                Some("qty would exceed the signed 64-bit range")
            }
            Outcome::Rejected(Reason::IdempotencyConflict) => {
                Some("message_id was already used with a different item_id or delta")
            }
        }
    }
}

impl Reason {
    pub fn code(&self) -> &'static str {
        match self {
            Reason::InvalidMessage(_) => "invalid_message",
            Reason::InsufficientQty => "insufficient_qty",
            Reason::QtyOutOfRange => "qty_out_of_range",
            Reason::IdempotencyConflict => "idempotency_conflict",
            Reason::Forbidden(_) => "forbidden",
        }
    }

    /// The reason a ledger row stores, back to its variant.
    pub fn from_code(code: &str) -> Option<Reason> {
        match code {
            "insufficient_qty" => Some(Reason::InsufficientQty),
            "qty_out_of_range" => Some(Reason::QtyOutOfRange),
            "idempotency_conflict" => Some(Reason::IdempotencyConflict),
            _ => None,
        }
    }
}

/// A request's outcome together with what the reply echoes from the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub message_id: Option<String>,
    pub item_id: Option<Uuid>,
    pub delta: Option<i64>,
    pub outcome: Outcome,
    /// True when the outcome came from the ledger rather than from this delivery.
    pub replayed: bool,
}

#[derive(Serialize)]
struct ReplyBody<'a> {
    message_id: Option<&'a str>,
    outcome: &'static str,
    item_id: Option<Uuid>,
    delta: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    qty: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

/// Fixed namespace for reply message ids, so the same reply always gets the same id.
const REPLY_ID_NAMESPACE: Uuid = Uuid::from_u128(0x5d0c_6f1e_8a4b_4e7c_9b2a_61f3_0c8d_7e45);

impl Verdict {
    /// The outcome of a request that reached the database.
    pub fn for_request(request: &Request, outcome: Outcome, replayed: bool) -> Verdict {
        Verdict {
            message_id: Some(request.message_id.clone()),
            item_id: Some(request.item_id),
            delta: Some(request.delta),
            outcome,
            replayed,
        }
    }

    /// The `invalid_message` rejection of a request that broke the contract.
    pub fn for_invalid(invalid: &Invalid) -> Verdict {
        Verdict {
            message_id: invalid.message_id.clone(),
            item_id: invalid.item_id,
            delta: invalid.delta,
            outcome: Outcome::Rejected(Reason::InvalidMessage(invalid.error.to_string())),
            replayed: false,
        }
    }

    /// The `forbidden` rejection of a request whose publisher may not adjust. It
    /// echoes what the request itself carried (decoded or not), nothing more.
    pub fn for_forbidden(
        forbidden: &Forbidden,
        decoded: &Result<Request, Box<Invalid>>,
    ) -> Verdict {
        let (message_id, item_id, delta) = match decoded {
            Ok(request) => (
                Some(request.message_id.clone()),
                Some(request.item_id),
                Some(request.delta),
            ),
            Err(invalid) => (invalid.message_id.clone(), invalid.item_id, invalid.delta),
        };
        Verdict {
            message_id,
            item_id,
            delta,
            outcome: Outcome::Rejected(Reason::Forbidden(forbidden.to_string())),
            replayed: false,
        }
    }

    /// The reply body. Rendered from the verdict alone, so a replay from the
    /// ledger is byte-for-byte the reply first sent.
    pub fn body(&self) -> Vec<u8> {
        let body = ReplyBody {
            message_id: self.message_id.as_deref(),
            outcome: self.outcome.name(),
            item_id: self.item_id,
            delta: self.delta,
            qty: match self.outcome {
                Outcome::Applied { qty } => Some(qty),
                _ => None,
            },
            reason: self.outcome.reason(),
            error: self.outcome.error(),
        };
        serde_json::to_vec(&body).expect("a reply body always serializes")
    }

    /// The reply's `type` property, and its routing key on the exchange.
    pub fn event_type(&self) -> String {
        format!("qty.adjust.{}", self.outcome.name())
    }

    /// The reply's `message_id`: derived from the body (which carries the
    /// request's `message_id`), so every copy of one reply shares an id while an
    /// `idempotency_conflict` reply to a reused key gets an id of its own. A
    /// request without a `message_id` gets a fresh one.
    pub fn reply_message_id(&self, body: &[u8]) -> String {
        match self.message_id {
            Some(_) => uuid_v5(&REPLY_ID_NAMESPACE, body).to_string(),
            None => Uuid::new_v4().to_string(),
        }
    }
}

/// The UUIDv5 of `name` in `namespace`, as `Uuid::new_v5` computes it, but with
/// the `sha1` crate, which uses the CPU's SHA instructions where it has them.
/// `Uuid::new_v5` hashes in portable code, a visible share of the worker's
/// instructions per request (BENCHMARKS.md).
fn uuid_v5(namespace: &Uuid, name: &[u8]) -> Uuid {
    let digest = Sha1::new()
        .chain_update(namespace.as_bytes())
        .chain_update(name)
        .finalize();
    let mut bytes = [0; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_sha1_bytes(bytes).into_uuid()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn verdict(outcome: Outcome) -> Verdict {
        Verdict {
            message_id: Some("k-42".into()),
            item_id: Some(Uuid::nil()),
            delta: Some(-1),
            outcome,
            replayed: false,
        }
    }

    #[test]
    fn reply_ids_are_standard_uuid_v5() {
        for name in [&b""[..], b"k", &[7; 55], &[7; 56], &[7; 64], &[0xff; 200]] {
            assert_eq!(
                uuid_v5(&REPLY_ID_NAMESPACE, name),
                Uuid::new_v5(&REPLY_ID_NAMESPACE, name)
            );
        }
        let body = verdict(Outcome::Applied { qty: 3 }).body();
        let id = uuid_v5(&REPLY_ID_NAMESPACE, &body);
        assert_eq!(id, Uuid::new_v5(&REPLY_ID_NAMESPACE, &body));
        assert_eq!(id.get_version_num(), 5);
    }

    fn body_json(verdict: &Verdict) -> serde_json::Value {
        serde_json::from_slice(&verdict.body()).expect("reply body is JSON")
    }

    #[test]
    fn applied_reply_carries_qty_and_no_error() {
        let v = verdict(Outcome::Applied { qty: 3 });
        assert_eq!(
            body_json(&v),
            json!({"message_id": "k-42", "outcome": "applied", "item_id": Uuid::nil(), "delta": -1, "qty": 3})
        );
        assert_eq!(v.event_type(), "qty.adjust.applied");
    }

    #[test]
    fn not_found_reply_carries_error_only() {
        let v = verdict(Outcome::NotFound);
        assert_eq!(
            body_json(&v),
            json!({"message_id": "k-42", "outcome": "not_found", "item_id": Uuid::nil(), "delta": -1, "error": "item not found"})
        );
        assert_eq!(v.event_type(), "qty.adjust.not_found");
    }

    #[test]
    fn rejected_reply_carries_reason_and_error() {
        let v = verdict(Outcome::Rejected(Reason::InsufficientQty));
        assert_eq!(
            body_json(&v),
            json!({"message_id": "k-42", "outcome": "rejected", "item_id": Uuid::nil(), "delta": -1,
                   "reason": "insufficient_qty", "error": "qty cannot go below 0"})
        );
    }

    #[test]
    fn unreadable_request_fields_are_null() {
        let v = Verdict {
            message_id: None,
            item_id: None,
            delta: None,
            outcome: Outcome::Rejected(Reason::InvalidMessage("body is empty".into())),
            replayed: false,
        };
        assert_eq!(
            body_json(&v),
            json!({"message_id": null, "outcome": "rejected", "item_id": null, "delta": null,
                   "reason": "invalid_message", "error": "body is empty"})
        );
    }

    #[test]
    fn reply_ids_are_stable_per_body_and_fresh_without_message_id() {
        let v = verdict(Outcome::Applied { qty: 3 });
        let other = verdict(Outcome::Rejected(Reason::IdempotencyConflict));
        assert_eq!(v.reply_message_id(&v.body()), v.reply_message_id(&v.body()));
        assert_ne!(
            v.reply_message_id(&v.body()),
            other.reply_message_id(&other.body())
        );
        let anonymous = Verdict {
            message_id: None,
            ..v
        };
        let body = anonymous.body();
        assert_ne!(
            anonymous.reply_message_id(&body),
            anonymous.reply_message_id(&body)
        );
    }

    #[test]
    fn stored_reason_codes_round_trip() {
        for reason in [
            Reason::InsufficientQty,
            Reason::QtyOutOfRange,
            Reason::IdempotencyConflict,
        ] {
            assert_eq!(Reason::from_code(reason.code()), Some(reason));
        }
        assert_eq!(Reason::from_code("invalid_message"), None);
    }
}
