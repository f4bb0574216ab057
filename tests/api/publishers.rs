//! The publisher examples in `examples/publishers/`, run against a real worker:
//! pika, kombu's ordinary `Producer.publish` (which always sets
//! `content_encoding`), and Node's amqplib on direct reply-to. Each must get its
//! request applied, so the examples shown to users cannot rot.
//!
//! `scripts/test` installs their libraries and says where
//! (`QTY_PUBLISHER_PYTHON`, `QTY_PUBLISHER_NODE_PATH`). Without them these tests
//! say they were skipped, unless `QTY_REQUIRE_PUBLISHERS` is set (CI sets it).

use qty_test_support::app::TestApp;
use std::path::Path;
use std::process::Command;

/// The interpreter and the module path a publisher example needs, if installed.
fn runtime(script: &str) -> Option<Command> {
    let (program, path_var, path) = if script.ends_with(".py") {
        (std::env::var("QTY_PUBLISHER_PYTHON").ok()?, None, None)
    } else {
        let modules = std::env::var("QTY_PUBLISHER_NODE_PATH").ok()?;
        ("node".to_owned(), Some("NODE_PATH"), Some(modules))
    };
    if !Path::new(&program).exists() && program != "node" {
        return None;
    }
    let mut command = Command::new(program);
    if let (Some(var), Some(path)) = (path_var, path) {
        command.env(var, path);
    }
    Some(command)
}

async fn publishes_and_gets_applied(script: &str) {
    let Some(mut command) = runtime(script) else {
        assert!(
            std::env::var_os("QTY_REQUIRE_PUBLISHERS").is_none(),
            "the publisher examples' libraries are not installed (run scripts/test)"
        );
        println!("skipped: the publisher examples' libraries are not installed");
        return;
    };
    let app = TestApp::spawn().await;
    let item = app.create_item(10).await;
    let message_id = format!("{script}-1");
    let output = command
        .arg(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("examples/publishers")
                .join(script),
        )
        .args([&item.to_string(), "-3", &message_id])
        .env("AMQP_URL", &app.names.amqp_url)
        .env("QTY_EXCHANGE", &app.names.exchange)
        .output()
        .expect("run the publisher example");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{script} exited {}:\n{stdout}\n{stderr}",
        output.status
    );
    let reply: serde_json::Value =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(reply["outcome"], "applied", "{reply}");
    assert_eq!(reply["message_id"], message_id.as_str(), "{reply}");
    assert_eq!(reply["qty"].as_i64(), Some(7), "{reply}");
    assert_eq!(app.qty(item).await, 7);
}

#[tokio::test]
async fn the_pika_example_gets_its_request_applied() {
    publishes_and_gets_applied("pika_publish.py").await;
}

#[tokio::test]
async fn the_kombu_example_gets_its_request_applied_through_an_ordinary_producer_publish() {
    publishes_and_gets_applied("kombu_publish.py").await;
}

#[tokio::test]
async fn the_amqplib_example_gets_its_request_applied_on_direct_reply_to() {
    publishes_and_gets_applied("amqplib_publish.js").await;
}
