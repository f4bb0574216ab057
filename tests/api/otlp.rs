//! OTLP export (the `otlp` feature): the worker's delivery span reaches a
//! collector, in the caller's trace, with the span id the reply names.

use lapin::types::{AMQPValue, FieldTable};
use qty_test_support::app::{TestApp, WAIT, amqp_url};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;

/// A stand-in collector: accepts OTLP/HTTP posts and hands over their bodies.
async fn fake_collector() -> (String, mpsc::UnboundedReceiver<Vec<u8>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/v1/traces", listener.local_addr().expect("addr"));
    let (bodies, received) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let bodies = bodies.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buffer = [0u8; 8192];
                loop {
                    let Ok(n) = stream.read(&mut buffer).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    request.extend_from_slice(&buffer[..n]);
                    let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&request[..end]).to_lowercase();
                    let length = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    if request.len() >= end + 4 + length {
                        bodies
                            .send(request[end + 4..end + 4 + length].to_vec())
                            .ok();
                        stream
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n")
                            .await
                            .ok();
                        request.clear();
                    }
                }
            });
        }
    });
    (url, received)
}

fn hex_bytes(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect()
}

#[tokio::test]
async fn the_delivery_span_is_exported_in_the_callers_trace() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;

    let (collector, mut posts) = fake_collector().await;
    let mut app = TestApp::spawn().await;
    // The in-process worker has no exporter; the binary below has.
    app.worker.stop().expect("stop the in-process worker");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_qty-worker"))
        .args([
            "run",
            "--http-addr",
            "127.0.0.1:0",
            "--otlp-endpoint",
            &collector,
        ])
        .env("AMQP_URL", amqp_url())
        .env("DATABASE_URL", app.names.database_url())
        .env("QTY_EXCHANGE", &app.names.exchange)
        .env("QTY_QUEUE", &app.names.queue)
        .env("QTY_LOG_FORMAT", "json")
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn the worker");

    let item = app.create_item(1).await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut headers = FieldTable::default();
    let incoming = format!("00-{trace_id}-00f067aa0ba902b7-01");
    headers.insert(
        "traceparent".into(),
        AMQPValue::LongString(incoming.into_bytes().into()),
    );
    app.publish_raw(
        app.props("otlp-1").with_headers(headers),
        format!(r#"{{"item_id":"{item}","delta":1}}"#).as_bytes(),
    )
    .await;
    let reply = app.next_reply().await;
    let outgoing = reply
        .header("traceparent")
        .expect("no traceparent on the reply");
    let our_span_id = outgoing.split('-').nth(2).expect("span id").to_owned();

    // Stopping the worker flushes its exporter.
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    let (trace, span) = (hex_bytes(trace_id), hex_bytes(&our_span_id));
    let found = tokio::time::timeout(WAIT, async {
        while let Some(body) = posts.recv().await {
            let has = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
            if has(&trace) && has(&span) {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(
        found,
        Ok(true),
        "no exported span with trace {trace_id} and span {our_span_id}"
    );
    let running = std::sync::Mutex::new(&mut child);
    qty_test_support::app::eventually("the worker to stop", WAIT, || async {
        let exited = running.lock().expect("child").try_wait().expect("poll");
        exited.ok_or("still running")
    })
    .await;
}
