//! Property tests over the decoder: whatever bytes and properties arrive, decoding
//! ends in a request or a named rejection, never a panic; valid requests always
//! decode to what was sent. These run with every `cargo test`; the coverage-guided
//! fuzz target over the same decoder is `fuzz/` (`cargo fuzz run -s none decode`,
//! on the stable toolchain; CI runs it for a minute).
//!
//! `PROPTEST_CASES=1000000 cargo test --release --test decode_props` runs long.

use proptest::prelude::*;
use qty_worker::decode::{RequestProps, decode};
use uuid::Uuid;

fn props(message_id: Option<String>, content_type: Option<String>) -> RequestProps {
    RequestProps {
        message_id,
        content_type,
        content_encoding: None,
        user_id: None,
        item_header: Default::default(),
    }
}

/// Reads back an escape-string literal as PostgreSQL's lexer does: `''` is a
/// quote, `\\` a backslash, a lone quote ends it. `None` when the text is not
/// exactly one literal (it ends early, or something follows it).
fn read_e_literal(sql: &str) -> Option<String> {
    let mut chars = sql.strip_prefix("E'")?.chars().peekable();
    let mut value = String::new();
    while let Some(c) = chars.next() {
        match c {
            '\\' => value.push(chars.next().filter(|&c| c == '\\')?),
            '\'' if chars.peek() == Some(&'\'') => {
                chars.next();
                value.push('\'');
            }
            '\'' => return chars.next().is_none().then_some(value),
            '\0' => return None,
            c => value.push(c),
        }
    }
    None
}

/// JSON-shaped text: objects and arrays of scalars and fragments of a request,
/// so mutations land near the interesting paths as well as far from them.
fn jsonish() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("null".to_owned()),
        Just("true".to_owned()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| f.to_string()),
        "[0-9]{1,30}",
        "\"[ -~]{0,40}\"",
        Just(format!("\"{}\"", Uuid::nil())),
        Just("\"item_id\"".to_owned()),
        Just("\"delta\"".to_owned()),
    ];
    leaf.prop_recursive(6, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(|v| format!("[{}]", v.join(","))),
            prop::collection::vec(
                (
                    prop_oneof![Just("item_id"), Just("delta"), Just("x")],
                    inner
                ),
                0..5
            )
            .prop_map(|v| {
                let members: Vec<String> =
                    v.into_iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
                format!("{{{}}}", members.join(","))
            }),
        ]
    })
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..2048), id in proptest::option::of("[ -~]{0,20}")) {
        let _ = decode(&props(id, None), &body);
    }

    #[test]
    fn json_shaped_bodies_decode_or_name_their_rejection(body in jsonish(), cut in 0usize..200) {
        let props = props(Some("k".into()), Some("application/json".into()));
        for candidate in [body.as_str(), &body[..body.floor_char_boundary(cut.min(body.len()))]] {
            match decode(&props, candidate.as_bytes()) {
                Ok(request) => prop_assert_eq!(request.message_id, "k"),
                Err(invalid) => prop_assert!(!invalid.error.to_string().is_empty()),
            }
        }
    }

    #[test]
    fn every_valid_request_decodes_to_what_was_sent(id in any::<u128>(), delta in any::<i64>(), upper in any::<bool>(), key in "[ -~]{1,40}", user_id in proptest::option::of(any::<String>())) {
        let item = Uuid::from_u128(id);
        let text = if upper { item.to_string().to_uppercase() } else { item.to_string() };
        let body = format!(r#"{{"delta":{delta},"item_id":"{text}"}}"#);
        let props = RequestProps { user_id: user_id.clone(), ..props(Some(key.clone()), None) };
        let request = decode(&props, body.as_bytes()).expect("valid request");
        prop_assert_eq!((request.message_id, request.item_id, request.delta, request.publisher), (key, item, delta, user_id));
    }

    /// Whatever a `user_id` or `message_id` holds (empty, long, quotes,
    /// backslashes, non-ASCII, control characters), its SQL literal reads back
    /// as exactly that text, so nothing in it can end the literal early.
    #[test]
    fn any_text_becomes_one_sql_literal_that_reads_back_unchanged(text in prop_oneof![any::<String>(), "['\\\\ ;)(-]{0,300}", ".{0,2000}"]) {
        let literal = qty_worker::store::literal::text(&text);
        prop_assert_eq!(read_e_literal(&literal), Some(text.replace('\0', "")));
    }
}
