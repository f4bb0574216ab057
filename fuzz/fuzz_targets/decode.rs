//! The decoder over arbitrary bytes, checked against an independent reading of
//! the contract (§2): every accepted body is a JSON object with exactly the
//! members `item_id` (a hyphenated UUID string) and `delta` (an integer token in
//! the i64 range), each once, and the request holds their values; every
//! rejection has a non-empty error text of bounded length.
//!
//! The first byte picks the properties, so they are fuzzed too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qty_worker::decode::{ItemHeader, MAX_BODY_BYTES, RequestProps, decode};
use serde::de::{Deserializer as _, MapAccess, Visitor};
use serde_json::value::RawValue;
use std::fmt;

/// Longest error text a rejection may carry: the longest fixed text plus at most
/// 100 quoted characters, each escaped to at most 10 bytes (`\u{10ffff}`).
const MAX_ERROR_BYTES: usize = 1_200;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let props = properties(selector);
    match decode(&props, body) {
        Ok(request) => {
            let members = members_of(body).expect("an accepted body is a JSON object");
            assert!(body.len() <= MAX_BODY_BYTES, "accepted a body over the limit");
            assert!(
                props.message_id.as_deref().is_some_and(|id| !id.is_empty()),
                "accepted without a message_id"
            );
            assert_eq!(request.publisher, props.user_id, "the publisher is the user_id as sent");
            match &props.item_header {
                ItemHeader::Absent => {}
                ItemHeader::NotText(_) => panic!("accepted an item_id header that is not a string"),
                ItemHeader::Text(header) => assert_eq!(
                    uuid::Uuid::try_parse(header).ok(),
                    Some(request.item_id),
                    "accepted an item_id header naming another item"
                ),
            }
            let names: Vec<&str> = members.iter().map(|(name, _)| name.as_str()).collect();
            let mut sorted = names.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, ["delta", "item_id"], "accepted members {names:?}");
            for (name, raw) in &members {
                match name.as_str() {
                    "item_id" => {
                        let text: String = serde_json::from_str(raw).expect("item_id is a string");
                        assert_eq!(text.len(), 36, "item_id {text:?} is not hyphenated");
                        let parsed = uuid::Uuid::try_parse(&text).expect("item_id is a UUID");
                        assert_eq!(parsed, request.item_id);
                    }
                    _ => {
                        let token = raw.trim();
                        assert!(
                            !token.contains(['.', 'e', 'E', '"']) && !token.starts_with(['t', 'f', 'n']),
                            "delta {token:?} is not an integer token"
                        );
                        let value: i64 = token.parse().expect("delta fits in i64");
                        assert_eq!(value, request.delta);
                    }
                }
            }
        }
        Err(invalid) => {
            let text = invalid.error.to_string();
            assert!(!text.is_empty(), "a rejection without a text");
            assert!(text.len() <= MAX_ERROR_BYTES, "a rejection text of {} bytes", text.len());
        }
    }
});

fn properties(selector: u8) -> RequestProps {
    RequestProps {
        message_id: match selector % 4 {
            0 => None,
            1 => Some(String::new()),
            _ => Some("fuzz-1".into()),
        },
        content_type: match (selector / 4) % 3 {
            0 => None,
            1 => Some("application/json; charset=utf-8".into()),
            _ => Some("text/plain".into()),
        },
        content_encoding: match (selector / 12) % 3 {
            0 => None,
            1 => Some("UTF-8".into()),
            _ => Some("gzip".into()),
        },
        user_id: match (selector / 36) % 3 {
            0 => None,
            1 => Some(String::new()),
            _ => Some("orders-é'\\".into()),
        },
        item_header: match selector / 108 {
            0 => ItemHeader::Absent,
            1 => ItemHeader::NotText("an integer"),
            _ => ItemHeader::Text(HEADER_ITEM.into()),
        },
    }
}

/// The `item_id` header the third group of selectors sets.
const HEADER_ITEM: &str = "0B6F0C3E-8E1A-4A3C-9C55-3F2D4C1A7E10";

/// The top-level members of a JSON object in order, duplicates kept, with each
/// value's raw text; `None` when the body is not one JSON object.
fn members_of(body: &[u8]) -> Option<Vec<(String, String)>> {
    struct Members;
    impl<'de> Visitor<'de> for Members {
        type Value = Vec<(String, String)>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut members = Vec::new();
            while let Some(name) = map.next_key::<String>()? {
                let raw: Box<RawValue> = map.next_value()?;
                members.push((name, raw.get().to_owned()));
            }
            Ok(members)
        }
    }
    let text = std::str::from_utf8(body).ok()?;
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let members = deserializer.deserialize_map(Members).ok()?;
    deserializer.end().ok()?;
    Some(members)
}
