//! Requests that break contract §2, sent through the broker: each is
//! answered `rejected` / `invalid_message` with a specific error, acked, and never
//! recorded in the ledger.

use lapin::BasicProperties;
use qty_test_support::app::TestApp;

#[tokio::test]
async fn every_kind_of_broken_request_gets_a_specific_invalid_message_reply() {
    let mut app = TestApp::spawn().await;
    let item = app.create_item(10).await;
    let good = |delta: &str| format!(r#"{{"item_id":"{item}","delta":{delta}}}"#).into_bytes();
    let props = |id: &str| app.props(id);
    let cases: Vec<(BasicProperties, Vec<u8>, String)> = vec![
        (
            props("bad-1"),
            good("true"),
            "delta must be an integer, got boolean".into(),
        ),
        (
            props("bad-2"),
            good("1.0"),
            "delta must be an integer, got float".into(),
        ),
        (
            props("bad-3"),
            good("1e2"),
            "delta must be an integer, got float".into(),
        ),
        (
            props("bad-4"),
            good("\"1\""),
            "delta must be an integer, got string".into(),
        ),
        (
            props("bad-5"),
            good("null"),
            "delta must be an integer, got null".into(),
        ),
        (
            props("bad-6"),
            good("9223372036854775808"),
            "delta must be within the signed 64-bit range, got 9223372036854775808".into(),
        ),
        (
            props("bad-7"),
            br#"{"item_id":"not-a-uuid","delta":1}"#.to_vec(),
            r#"item_id must be a hyphenated UUID, got "not-a-uuid""#.into(),
        ),
        (
            props("bad-8"),
            format!(r#"{{"item_id":"{item}","delta":1,"extra":true}}"#).into_bytes(),
            r#"body has unknown member "extra""#.into(),
        ),
        (props("bad-9"), b"".to_vec(), "body is empty".into()),
        (
            props("bad-10"),
            b"[1]".to_vec(),
            "body must be a JSON object, got array".into(),
        ),
        (
            props("bad-11"),
            b"\xff".to_vec(),
            "body is not valid UTF-8 (at byte 0)".into(),
        ),
        (
            props("bad-12").with_content_type("text/plain".into()),
            good("1"),
            r#"content_type must be application/json, got "text/plain""#.into(),
        ),
        (
            props("bad-13").with_content_encoding("gzip".into()),
            good("1"),
            r#"content_encoding must be absent, utf-8, identity or binary, got "gzip""#.into(),
        ),
        (
            props("bad-14"),
            vec![b' '; 64 * 1024 + 1],
            format!("body must be at most 65536 bytes, got {}", 64 * 1024 + 1),
        ),
    ];
    let count = cases.len();
    for (props, body, _) in &cases {
        app.publish_raw(props.clone(), body).await;
    }
    let replies = app.replies_by_message_id(count).await;
    for (props, _, expected) in &cases {
        let id = props
            .message_id()
            .as_ref()
            .map(|s| s.to_string())
            .expect("cases have ids");
        let reply = &replies[&id];
        assert_eq!(reply.outcome(), "rejected", "{id:?}");
        assert_eq!(reply.reason(), Some("invalid_message"), "{id:?}");
        assert_eq!(
            reply.body["error"].as_str(),
            Some(expected.as_str()),
            "{id:?}"
        );
    }
    // Readable parts are echoed, unreadable ones are null.
    assert_eq!(
        replies["bad-1"].body["item_id"].as_str(),
        Some(item.to_string().as_str())
    );
    assert!(replies["bad-1"].body["delta"].is_null());

    app.worker.stop().expect("the worker stops cleanly");
    app.wait_until_queue_drained().await;
    assert_eq!(
        app.ledger_rows().await,
        0,
        "invalid requests are not recorded"
    );
    assert_eq!(app.qty(item).await, 10);
}

#[tokio::test]
async fn a_request_without_message_id_is_rejected_with_a_fresh_reply_id() {
    let mut app = TestApp::spawn().await;
    let item = app.create_item(10).await;
    let props = BasicProperties::default().with_reply_to(app.reply_queue.as_str().into());
    let body = format!(r#"{{"item_id":"{item}","delta":-1}}"#);
    app.publish_raw(props.clone(), body.as_bytes()).await;
    app.publish_raw(props, body.as_bytes()).await;
    let [first, second] = <[_; 2]>::try_from(app.replies(2).await).expect("two replies");
    assert_eq!(
        first.body["error"].as_str(),
        Some("message_id property is required")
    );
    assert!(first.body["message_id"].is_null());
    assert_eq!(
        first.body["delta"].as_i64(),
        Some(-1),
        "the readable body is echoed"
    );
    assert!(first.correlation_id().is_none());
    assert_ne!(
        first.message_id(),
        second.message_id(),
        "no key, so no stable reply id"
    );
    assert_eq!(app.qty(item).await, 10);
}
