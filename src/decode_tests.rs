//! Fixture tests for the decoder: one row per way a request can break the contract.

use super::*;

const ITEM: &str = "0b6f0c3e-8e1a-4a3c-9c55-3f2d4c1a7e10";

fn props() -> RequestProps {
    RequestProps {
        message_id: Some("k-1".into()),
        content_type: Some("application/json".into()),
        content_encoding: None,
        user_id: None,
        item_header: ItemHeader::Absent,
    }
}

fn body(delta: &str) -> String {
    format!(r#"{{"item_id":"{ITEM}","delta":{delta}}}"#)
}

fn error_of(props: &RequestProps, body: &[u8]) -> String {
    match decode(props, body) {
        Ok(request) => panic!("expected a rejection, decoded {request:?}"),
        Err(invalid) => invalid.error.to_string(),
    }
}

#[test]
fn a_valid_request_decodes() {
    let request = decode(&props(), body("-3").as_bytes()).expect("valid request");
    assert_eq!(request.message_id, "k-1");
    assert_eq!(request.item_id.to_string(), ITEM);
    assert_eq!(request.delta, -3);
}

#[test]
fn extremes_of_i64_zero_and_member_order_decode() {
    for delta in [i64::MIN, i64::MAX, 0] {
        let request = decode(&props(), body(&delta.to_string()).as_bytes()).expect("valid");
        assert_eq!(request.delta, delta);
    }
    let reordered = format!(r#" {{ "delta" : 5 , "item_id" : "{ITEM}" }} "#);
    assert_eq!(
        decode(&props(), reordered.as_bytes()).map(|r| r.delta),
        Ok(5)
    );
}

#[test]
fn uppercase_uuid_and_escaped_member_names_decode() {
    let upper = format!(r#"{{"item_id":"{}","delta":1}}"#, ITEM.to_uppercase());
    assert_eq!(
        decode(&props(), upper.as_bytes()).map(|r| r.item_id.to_string()),
        Ok(ITEM.to_owned())
    );
    let escaped = format!(r#"{{"item\u005fid":"{ITEM}","delta":1}}"#);
    assert!(decode(&props(), escaped.as_bytes()).is_ok());
}

#[test]
fn content_type_may_carry_parameters_or_be_absent() {
    for content_type in [
        Some("application/json; charset=utf-8"),
        Some("Application/JSON;charset=\"UTF-8\""),
        None,
    ] {
        let props = RequestProps {
            content_type: content_type.map(str::to_owned),
            ..props()
        };
        assert!(
            decode(&props, body("1").as_bytes()).is_ok(),
            "{content_type:?}"
        );
    }
}

#[test]
fn delta_of_every_wrong_type_names_the_member_and_the_type() {
    let cases = [
        ("true", "delta must be an integer, got boolean"),
        ("false", "delta must be an integer, got boolean"),
        ("1.0", "delta must be an integer, got float"),
        ("1.5", "delta must be an integer, got float"),
        ("1e2", "delta must be an integer, got float"),
        ("1E2", "delta must be an integer, got float"),
        ("\"1\"", "delta must be an integer, got string"),
        ("null", "delta must be an integer, got null"),
        ("[1]", "delta must be an integer, got array"),
        ("{}", "delta must be an integer, got object"),
    ];
    for (delta, expected) in cases {
        assert_eq!(
            error_of(&props(), body(delta).as_bytes()),
            expected,
            "delta {delta}"
        );
    }
}

#[test]
fn delta_outside_i64_is_out_of_range_not_a_float() {
    for delta in [
        "9223372036854775808",
        "-9223372036854775809",
        "1000000000000000000000000",
    ] {
        assert_eq!(
            error_of(&props(), body(delta).as_bytes()),
            format!("delta must be within the signed 64-bit range, got {delta}")
        );
    }
}

#[test]
fn missing_unknown_and_duplicated_members_are_named() {
    let cases = [
        (
            format!(r#"{{"item_id":"{ITEM}"}}"#),
            r#"body is missing member "delta""#,
        ),
        (
            r#"{"delta":1}"#.to_owned(),
            r#"body is missing member "item_id""#,
        ),
        ("{}".to_owned(), r#"body is missing member "item_id""#),
        (
            format!(r#"{{"item_id":"{ITEM}","delta":1,"qty":3}}"#),
            r#"body has unknown member "qty""#,
        ),
        (
            format!(r#"{{"item_id":"{ITEM}","delta":1,"delta":2}}"#),
            r#"body has member "delta" twice"#,
        ),
        (
            format!(r#"{{"item_id":"{ITEM}","item_id":"{ITEM}","delta":1}}"#),
            r#"body has member "item_id" twice"#,
        ),
    ];
    for (body, expected) in cases {
        assert_eq!(error_of(&props(), body.as_bytes()), expected, "body {body}");
    }
}

#[test]
fn item_id_must_be_a_hyphenated_uuid_string() {
    let simple = ITEM.replace('-', "");
    let cases = [
        (
            r#""not-a-uuid""#.to_owned(),
            r#"item_id must be a hyphenated UUID, got "not-a-uuid""#,
        ),
        (
            format!("\"{simple}\""),
            &*format!("item_id must be a hyphenated UUID, got \"{simple}\""),
        ),
        (
            format!("\"{{{ITEM}}}\""),
            &*format!("item_id must be a hyphenated UUID, got \"{{{ITEM}}}\""),
        ),
        (
            format!("\"urn:uuid:{ITEM}\""),
            &*format!("item_id must be a hyphenated UUID, got \"urn:uuid:{ITEM}\""),
        ),
        ("42".to_owned(), "item_id must be a string, got integer"),
        ("null".to_owned(), "item_id must be a string, got null"),
    ]
    .map(|(raw, expected)| (raw, expected.to_owned()));
    for (raw, expected) in cases {
        let body = format!(r#"{{"item_id":{raw},"delta":1}}"#);
        assert_eq!(
            error_of(&props(), body.as_bytes()),
            expected,
            "item_id {raw}"
        );
    }
}

#[test]
fn bodies_that_are_not_a_json_object_are_rejected_by_kind() {
    let cases: [(&[u8], &str); 7] = [
        (b"", "body is empty"),
        (b"  \n", "body is empty"),
        (b"[1]", "body must be a JSON object, got array"),
        (b"42", "body must be a JSON object, got integer"),
        (b"\"x\"", "body must be a JSON object, got string"),
        (b"null", "body must be a JSON object, got null"),
        (b"\xff\xfe{}", "body is not valid UTF-8 (at byte 0)"),
    ];
    for (body, expected) in cases {
        assert_eq!(error_of(&props(), body), expected, "body {body:?}");
    }
}

#[test]
fn truncated_json_and_trailing_garbage_are_syntax_errors() {
    let full = body("1");
    for broken in [
        &full[..full.len() - 1],
        &format!("{full} x"),
        "{\"item_id\":",
    ] {
        let error = error_of(&props(), broken.as_bytes());
        assert!(
            error.starts_with("body is not valid JSON: "),
            "{broken}: {error}"
        );
    }
}

#[test]
fn nesting_bombs_are_rejected_without_overflowing_the_stack() {
    // As deep as 64 KiB allows; a recursive walk of this would overflow the stack.
    let depth = 32_000;
    let (open, close) = ("[".repeat(depth), "]".repeat(depth));
    let in_delta = format!(r#"{{"item_id":"{ITEM}","delta":{open}{close}}}"#);
    assert_eq!(
        error_of(&props(), in_delta.as_bytes()),
        "delta must be an integer, got array"
    );
    let in_unknown = format!(r#"{{"x":{open}{close},"item_id":"{ITEM}","delta":1}}"#);
    assert_eq!(
        error_of(&props(), in_unknown.as_bytes()),
        r#"body has unknown member "x""#
    );
    let at_top = format!("{open}{close}");
    assert_eq!(
        error_of(&props(), at_top.as_bytes()),
        "body must be a JSON object, got array"
    );
    let unbalanced = format!(r#"{{"item_id":"{ITEM}","delta":{open}"#);
    assert!(error_of(&props(), unbalanced.as_bytes()).starts_with("body is not valid JSON"));
}

#[test]
fn a_body_over_64_kib_is_rejected_unread() {
    let padding = " ".repeat(MAX_BODY_BYTES);
    let big = format!("{}{padding}", body("1"));
    assert_eq!(
        error_of(&props(), big.as_bytes()),
        format!("body must be at most 65536 bytes, got {}", big.len())
    );
    let just_fits = format!(
        "{}{}",
        body("1"),
        " ".repeat(MAX_BODY_BYTES - body("1").len())
    );
    assert!(decode(&props(), just_fits.as_bytes()).is_ok());
}

#[test]
fn wrong_properties_are_named() {
    let cases = [
        (
            RequestProps {
                message_id: None,
                ..props()
            },
            "message_id property is required",
        ),
        (
            RequestProps {
                message_id: Some(String::new()),
                ..props()
            },
            "message_id property must not be empty",
        ),
        (
            RequestProps {
                message_id: Some("a\0b".into()),
                ..props()
            },
            "message_id property must not contain NUL characters",
        ),
        (
            RequestProps {
                content_type: Some("text/plain".into()),
                ..props()
            },
            r#"content_type must be application/json, got "text/plain""#,
        ),
        (
            RequestProps {
                content_type: Some("application/json; charset=latin1".into()),
                ..props()
            },
            r#"content_type charset must be utf-8, got "latin1""#,
        ),
        (
            RequestProps {
                content_encoding: Some("gzip".into()),
                ..props()
            },
            r#"content_encoding must be absent, utf-8, identity or binary, got "gzip""#,
        ),
    ];
    for (props, expected) in cases {
        assert_eq!(
            error_of(&props, body("1").as_bytes()),
            expected,
            "{props:?}"
        );
    }
}

#[test]
fn the_encodings_kombu_and_celery_set_are_bytes_as_sent() {
    for encoding in ["utf-8", "UTF-8", "utf8", "identity", "binary", "Binary"] {
        let props = RequestProps {
            content_encoding: Some(encoding.into()),
            ..props()
        };
        let request = decode(&props, body("-2").as_bytes()).expect(encoding);
        assert_eq!(request.delta, -2);
    }
}

#[test]
fn an_error_quotes_at_most_100_characters_of_the_request() {
    let long_name = "m".repeat(60_000);
    let text = format!(r#"{{"item_id":"{ITEM}","delta":1,"{long_name}":0}}"#);
    let error = error_of(&props(), text.as_bytes());
    assert_eq!(
        error,
        format!("body has unknown member \"{}…\"", "m".repeat(100))
    );
    let long_encoding = RequestProps {
        content_encoding: Some("é".repeat(300)),
        ..props()
    };
    let error = error_of(&long_encoding, body("1").as_bytes());
    assert!(error.chars().count() < 200, "{error}");
}

#[test]
fn a_rejection_keeps_whatever_was_readable() {
    let invalid = decode(&props(), body("true").as_bytes()).expect_err("boolean delta");
    assert_eq!(invalid.message_id.as_deref(), Some("k-1"));
    assert_eq!(
        invalid.item_id.map(|id| id.to_string()).as_deref(),
        Some(ITEM)
    );
    assert_eq!(invalid.delta, None);

    let no_id = RequestProps {
        message_id: None,
        ..props()
    };
    let invalid = decode(&no_id, body("7").as_bytes()).expect_err("no message_id");
    assert_eq!(invalid.error, DecodeError::MissingMessageId);
    assert_eq!((invalid.message_id, invalid.delta), (None, Some(7)));
}

#[test]
fn an_item_id_header_naming_the_bodys_item_is_accepted_in_either_case() {
    for header in [ITEM.to_owned(), ITEM.to_uppercase()] {
        let props = RequestProps {
            item_header: ItemHeader::Text(header.clone()),
            ..props()
        };
        let request = decode(&props, body("1").as_bytes()).expect(&header);
        assert_eq!(request.item_id.to_string(), ITEM);
    }
}

#[test]
fn an_item_id_header_that_is_not_a_string_or_names_another_item_is_invalid() {
    let other = "1b6f0c3e-8e1a-4a3c-9c55-3f2d4c1a7e10";
    let simple = ITEM.replace('-', "");
    let cases = [
        (
            ItemHeader::NotText("an integer"),
            "header item_id must be a string, got an integer".to_owned(),
        ),
        (
            ItemHeader::Text(other.into()),
            format!("header item_id must equal the body's item_id, got {other:?}"),
        ),
        (
            ItemHeader::Text(simple.clone()),
            format!("header item_id must equal the body's item_id, got {simple:?}"),
        ),
        (
            ItemHeader::Text(String::new()),
            r#"header item_id must equal the body's item_id, got """#.to_owned(),
        ),
    ];
    for (item_header, expected) in cases {
        let props = RequestProps {
            item_header: item_header.clone(),
            ..props()
        };
        let invalid = decode(&props, body("1").as_bytes()).expect_err(&expected);
        assert_eq!(invalid.error.to_string(), expected, "{item_header:?}");
        // What was readable still reaches the reply.
        assert_eq!(
            invalid.item_id.map(|id| id.to_string()).as_deref(),
            Some(ITEM)
        );
    }
}

#[test]
fn a_body_error_is_named_before_a_header_that_disagrees_with_it() {
    let props = RequestProps {
        item_header: ItemHeader::Text(ITEM.into()),
        ..props()
    };
    assert_eq!(
        error_of(&props, br#"{"item_id":"nope","delta":1}"#),
        r#"item_id must be a hyphenated UUID, got "nope""#
    );
}
