//! The real binary: its subcommands, HTTP endpoints, and a clean exit on SIGTERM.

use qty_test_support::app::{Names, TestApp, WAIT, amqp_url};
use qty_test_support::eventually;
use std::process::{Command, Stdio};

fn qty_worker(names: &Names) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_qty-worker"));
    command
        .env("AMQP_URL", amqp_url())
        .env("DATABASE_URL", names.database_url())
        .env("QTY_EXCHANGE", &names.exchange)
        .env("QTY_QUEUE", &names.queue)
        .env("QTY_LOG_FORMAT", "json")
        .env_remove("RUST_LOG");
    command
}

/// The JSON lines a command printed: one object per line.
fn json_lines(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}")))
        .collect()
}

fn run_to_end(command: &mut Command) -> (i32, String, String) {
    let output = command.output().expect("run qty-worker");
    (
        output.status.code().expect("exit code"),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn item_and_adjust_commands_show_each_outcome_by_exit_code() {
    let app = TestApp::spawn().await;
    let names = &app.names;
    let (code, out, err) = run_to_end(qty_worker(names).args(["item", "create", "--qty", "2"]));
    assert_eq!(code, 0, "{err}");
    let item: serde_json::Value = serde_json::from_str(&out).expect("item JSON");
    let id = item["id"].as_str().expect("id").to_owned();
    assert_eq!(item["qty"], 2);

    let (code, out, err) =
        run_to_end(qty_worker(names).args(["adjust", &id, "-1", "--message-id", "cli-1"]));
    assert_eq!(code, 0, "{err}");
    let reply: serde_json::Value = serde_json::from_str(&out).expect("reply JSON");
    assert_eq!(
        (reply["outcome"].as_str(), reply["qty"].as_i64()),
        (Some("applied"), Some(1))
    );

    let (code, out, _) = run_to_end(qty_worker(names).args(["adjust", &id, "-5"]));
    assert_eq!(code, 4, "rejected exits 4: {out}");
    let missing = uuid::Uuid::new_v4().to_string();
    let (code, _, _) = run_to_end(qty_worker(names).args(["adjust", &missing, "1"]));
    assert_eq!(code, 3, "not_found exits 3");

    let (code, out, _) = run_to_end(qty_worker(names).args(["item", "show", &id]));
    assert_eq!(
        (code, out.trim()),
        (0, format!(r#"{{"id":"{id}","qty":1}}"#).as_str())
    );
    let (code, _, err) = run_to_end(qty_worker(names).args(["item", "show", &missing]));
    assert_eq!(code, 3, "{err}");
    // `adjust` names its publisher: the user it connected as (guest here).
    let (code, out, err) = run_to_end(qty_worker(names).args(["ledger", &id, "--json"]));
    assert_eq!(code, 0, "{err}");
    let rows = json_lines(&out);
    assert!(
        !rows.is_empty() && rows.iter().all(|r| r["publisher"] == "guest"),
        "{out}"
    );
}

#[tokio::test]
async fn migrate_creates_the_database_and_nothing_else() {
    let names = Names::random();
    let cleanup = names.removed_on_drop();
    let (code, _, err) = run_to_end(qty_worker(&names).arg("migrate"));
    assert_eq!(code, 0, "{err}");
    let pool = sqlx::PgPool::connect(&names.database_url())
        .await
        .expect("database exists");
    let tables: Vec<String> = sqlx::query_scalar(
        "select table_name::text from information_schema.tables where table_schema = 'public' order by 1",
    )
    .fetch_all(&pool)
    .await
    .expect("list tables");
    assert_eq!(
        tables,
        [
            "_sqlx_migrations",
            "adjustments",
            "fleet_members",
            "items",
            "parked",
            "partition_leases"
        ]
    );
    pool.close().await;
    // No topology was declared: a passive declare of the queue fails.
    let connection = lapin::Connection::connect(amqp_url(), Default::default())
        .await
        .expect("broker");
    let channel = connection.create_channel().await.expect("channel");
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let declared = channel
        .queue_declare(names.queue.as_str().into(), passive, Default::default())
        .await;
    assert!(declared.is_err(), "migrate must not declare the queue");
    // Again, on the migrated database: nothing to do, and PostgreSQL's notice
    // that the migrations table already exists stays below info.
    let (code, _, err) = run_to_end(qty_worker(&names).arg("migrate"));
    assert_eq!(code, 0, "{err}");
    assert!(
        !err.contains("already exists"),
        "a notice logged at info: {err}"
    );
    drop(cleanup);
}

#[tokio::test]
async fn every_metric_family_is_exposed_before_the_first_event() {
    let app = TestApp::spawn().await;
    let (_, metrics) = app.get("/metrics").await;
    for line in [
        r#"qty_worker_dependency_errors_total{dependency="database"} 0"#,
        r#"qty_worker_dependency_errors_total{dependency="broker"} 0"#,
        r#"qty_worker_reconnects_total{dependency="database"} 0"#,
        r#"qty_worker_reconnects_total{dependency="broker"} 0"#,
        r#"qty_worker_adjustments_total{outcome="not_found",reason=""} 0"#,
        r#"qty_worker_adjustments_total{outcome="rejected",reason="invalid_message"} 0"#,
        r#"qty_worker_adjustments_total{outcome="rejected",reason="idempotency_conflict"} 0"#,
        "qty_worker_replies_unroutable_total 0",
        "qty_worker_lock_waits_timed_out_total 0",
        "qty_worker_parked_requests 0",
        "qty_worker_parked_items 0",
        "qty_worker_parked_oldest_seconds 0.0",
        "qty_worker_requests_parked_total 0",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "missing {line:?} in\n{metrics}"
        );
    }
}

#[tokio::test]
async fn metrics_count_adjustments_by_outcome_and_reason_and_health_answers() {
    let mut app = TestApp::spawn().await;
    // Separate items, so the outcomes do not depend on which runs first.
    let stocked = app.create_item(1).await;
    let empty = app.create_item(0).await;
    app.adjust("m-1", stocked, -1).await;
    app.adjust("m-2", empty, -1).await;
    app.adjust("m-2", empty, -1).await;
    app.replies(3).await;
    let (status, metrics) = app.get("/metrics").await;
    assert_eq!(status, 200);
    for line in [
        r#"qty_worker_adjustments_total{outcome="applied",reason=""} 1"#,
        r#"qty_worker_adjustments_total{outcome="rejected",reason="insufficient_qty"} 2"#,
        "qty_worker_duplicates_replayed_total 1",
        "qty_worker_batch_size_sum 3.0",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "missing {line:?} in\n{metrics}"
        );
    }
    assert!(
        metrics.contains(r#"qty_worker_db_connections{state="idle"}"#),
        "{metrics}"
    );
    assert_eq!(app.get("/healthz").await.0, 200);
    let (status, body) = app.get("/readyz").await;
    assert_eq!(
        (status, body.as_str()),
        (200, "database: up\nbroker: consuming\n")
    );
}

#[tokio::test]
async fn sigterm_finishes_in_flight_work_and_exits_zero_with_nothing_unacked() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;

    let app = TestApp::spawn().await;
    let item = app.create_item(1_000_000).await;
    // The in-process worker of TestApp would compete for the queue; stop it.
    let mut app = app;
    app.worker.stop().expect("in-process worker stops");

    let total = 3_000;
    for n in 0..total {
        app.adjust(&format!("t-{n}"), item, -1).await;
    }
    let mut child = qty_worker(&app.names)
        // One request per transaction keeps the drain slow enough that the stop
        // surely lands mid-backlog, even on a fast machine.
        .args([
            "run",
            "--http-addr",
            "127.0.0.1:0",
            "--prefetch",
            "50",
            "--batch-max",
            "1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the worker");
    // Let it get going: the first replies prove it is consuming.
    let mut answered = app.replies(20).await.len();
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("send SIGTERM");

    let running = std::sync::Mutex::new(&mut child);
    let status =
        qty_test_support::app::eventually("the worker to exit after SIGTERM", WAIT, || async {
            let exited = running
                .lock()
                .expect("child")
                .try_wait()
                .expect("poll child");
            exited.ok_or("still running")
        })
        .await;
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr).ok();
    assert_eq!(status.code(), Some(0), "exit status; log:\n{stderr}");

    // Every request the worker recorded was replied to, and every one it did not
    // record is still in the queue: nothing applied was left unacked.
    let recorded = app.ledger_rows().await as usize;
    while answered < recorded {
        app.next_reply().await;
        answered += 1;
    }
    let left = app.queue_depth().await as usize;
    assert!(
        recorded < total,
        "the stop came before the backlog was drained"
    );
    assert_eq!(left + recorded, total, "requests lost or left unacked");
    assert_eq!(app.qty(item).await, 1_000_000 - recorded as i64);
}

#[tokio::test]
async fn ledger_and_item_list_show_what_happened_as_json() {
    let mut app = TestApp::spawn().await;
    let item = app.create_item(3).await;
    app.adjust("l-1", item, -2).await;
    app.adjust("l-2", item, -2).await;
    app.replies(2).await;
    let (code, out, err) =
        run_to_end(qty_worker(&app.names).args(["ledger", &item.to_string(), "--json"]));
    assert_eq!(code, 0, "{err}");
    let rows = json_lines(&out);
    let mut outcomes: Vec<(String, String)> = rows
        .iter()
        .map(|r| {
            (
                r["message_id"].as_str().unwrap_or_default().to_owned(),
                r["outcome"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    outcomes.sort();
    let applied_first = outcomes.iter().filter(|(_, o)| o == "applied").count();
    assert_eq!((rows.len(), applied_first), (2, 1), "{out}");

    let (code, out, _) = run_to_end(qty_worker(&app.names).args(["item", "list", "--json"]));
    assert_eq!(code, 0);
    let items = json_lines(&out);
    assert_eq!(items, [serde_json::json!({"id": item, "qty": 1})]);
}

#[tokio::test]
async fn parked_lists_the_requests_waiting_per_item_and_exits_0_with_none() {
    let mut app = TestApp::spawn().await;
    let (code, out, err) = run_to_end(qty_worker(&app.names).args(["parked", "--json"]));
    assert_eq!((code, out.as_str()), (0, ""), "{err}");

    let item = app.create_item(3).await;
    let lock = app.lock_row(item).await;
    app.adjust("p-1", item, -2).await;
    app.adjust("p-2", item, 4).await;
    let rows = eventually("both requests parked", WAIT, || async {
        let (code, out, err) = run_to_end(qty_worker(&app.names).args(["parked", "--json"]));
        let rows = json_lines(&out);
        if code == 0 && rows.len() == 2 {
            Ok(rows)
        } else {
            Err(format!("{code}: {out}{err}"))
        }
    })
    .await;
    let listed: Vec<(&str, &str, i64, &str)> = rows
        .iter()
        .map(|r| {
            (
                r["item_id"].as_str().unwrap_or_default(),
                r["message_id"].as_str().unwrap_or_default(),
                r["delta"].as_i64().unwrap_or_default(),
                r["state"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    let item_text = item.to_string();
    assert_eq!(
        listed,
        [
            (item_text.as_str(), "p-1", -2, "waiting"),
            (item_text.as_str(), "p-2", 4, "waiting")
        ],
        "in the order they will be judged"
    );
    assert!(
        rows.iter()
            .all(|r| r["waited_seconds"].as_f64() >= Some(0.0))
    );

    lock.rollback().await.expect("release the lock");
    app.replies(2).await;
    eventually("nothing parked any more", WAIT, || async {
        let (code, out, _) = run_to_end(qty_worker(&app.names).args(["parked", "--json"]));
        if code == 0 && out.is_empty() {
            Ok(())
        } else {
            Err(out)
        }
    })
    .await;
}

#[tokio::test]
async fn dead_letters_can_be_listed_and_replayed_into_the_queue() {
    let mut app = TestApp::spawn().await;
    let item = app.create_item(5).await;
    // Dead-letter a request by hand, as the broker would: into <exchange>.dlx with
    // the queue's name as routing key.
    let body = format!(r#"{{"item_id":"{item}","delta":-1}}"#);
    qty_test_support::app::publish(
        &app.channel,
        &format!("{}.dlx", app.names.exchange),
        &app.names.queue,
        app.props("dl-1"),
        body.as_bytes(),
    )
    .await;
    qty_test_support::app::publish(
        &app.channel,
        &format!("{}.dlx", app.names.exchange),
        &app.names.queue,
        app.props("dl-2"),
        body.as_bytes(),
    )
    .await;

    let (code, out, err) =
        run_to_end(qty_worker(&app.names).args(["dead-letters", "list", "--json"]));
    assert_eq!(code, 0, "{err}");
    let listed = json_lines(&out);
    let mut ids: Vec<&str> = listed
        .iter()
        .filter_map(|l| l["message_id"].as_str())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["dl-1", "dl-2"], "listing leaves them in place: {out}");

    let (code, _, err) =
        run_to_end(qty_worker(&app.names).args(["dead-letters", "replay", "dl-2", "dl-9"]));
    assert_eq!(code, 3, "an id not in the queue is reported: {err}");
    assert!(err.contains("dl-9"), "{err}");
    let reply = app.next_reply().await;
    assert_eq!(
        (
            reply.body["message_id"].as_str(),
            reply.body["qty"].as_i64()
        ),
        (Some("dl-2"), Some(4))
    );

    let (code, out, _) =
        run_to_end(qty_worker(&app.names).args(["dead-letters", "list", "--json"]));
    assert_eq!(code, 0);
    let left = json_lines(&out);
    assert_eq!(left.len(), 1, "{out}");
    let (code, _, _) = run_to_end(qty_worker(&app.names).args(["dead-letters", "replay", "--all"]));
    assert_eq!(code, 0);
    assert_eq!(
        app.next_reply().await.body["message_id"].as_str(),
        Some("dl-1")
    );
}

#[tokio::test]
async fn an_unreachable_broker_gets_an_error_that_says_what_to_do() {
    let names = Names::random();
    let (code, _, err) = run_to_end(
        qty_worker(&names)
            .env("AMQP_URL", "amqp://guest:secret@127.0.0.1:1/%2f")
            .args(["adjust", &uuid::Uuid::new_v4().to_string(), "1"]),
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("cannot reach RabbitMQ: amqp://guest:***@127.0.0.1:1/%2f"),
        "{err}"
    );
    assert!(err.contains("check AMQP_URL"), "{err}");
    assert!(!err.contains("secret"), "the password leaked: {err}");
}

#[tokio::test]
async fn a_setting_that_can_never_work_exits_2_with_one_line_naming_it() {
    let names = Names::random();
    for (setting, value) in [
        ("AMQP_URL", "amqp://guest:secret@h1,h2/"),
        ("DATABASE_URL", "postgres://u:secret@h1:port/db"),
        ("DATABASE_URL", "mysql://root@h/x"),
        // Out of range: refused by the parser, still one line in the log format.
        ("QTY_PREFETCH", "0"),
        ("QTY_DB_POOL", "100000"),
    ] {
        let (code, _, err) = run_to_end(
            qty_worker(&names)
                .env(setting, value)
                .env("QTY_HTTP_ADDR", "127.0.0.1:0")
                .arg("run"),
        );
        assert_eq!(code, 2, "{setting}={value}: {err}");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{err}");
        let line: serde_json::Value = serde_json::from_str(lines[0]).expect("a JSON log line");
        assert_eq!(line["level"], "ERROR", "{err}");
        assert_eq!(line["fields"]["setting"], setting, "{err}");
        assert!(!err.contains("secret"), "the password leaked: {err}");
    }
}

#[test]
fn bench_flags_that_cannot_work_are_usage_errors() {
    let names = Names::random();
    for flags in [
        vec!["--publish-window", "0"],
        vec!["--messages", "0"],
        vec!["--items", "0"],
        vec![
            "--delta-min",
            "-9223372036854775808",
            "--delta-max",
            "9223372036854775807",
        ],
        vec!["--delta-min", "5", "--delta-max", "1"],
    ] {
        let (code, out, err) = run_to_end(qty_worker(&names).arg("bench").args(&flags));
        assert_eq!(code, 2, "{flags:?}: {out}{err}");
        assert!(!err.contains("panicked"), "{flags:?}: {err}");
    }
}

#[tokio::test]
async fn operator_commands_refuse_a_database_that_does_not_exist_and_create_none() {
    let names = Names::random();
    for args in [
        vec!["item".to_owned(), "list".to_owned()],
        vec![
            "item".to_owned(),
            "show".to_owned(),
            uuid::Uuid::new_v4().to_string(),
        ],
        vec!["ledger".to_owned(), uuid::Uuid::new_v4().to_string()],
    ] {
        let (code, _, err) = run_to_end(qty_worker(&names).args(&args));
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(err.contains("check DATABASE_URL"), "{err}");
        assert_eq!(err.lines().count(), 1, "one line, the cause once: {err}");
    }
    let admin = sqlx::PgPool::connect(&format!("{}/postgres", names.postgres))
        .await
        .expect("admin");
    let created: bool =
        sqlx::query_scalar("select exists (select 1 from pg_database where datname = $1)")
            .bind(&names.database)
            .fetch_one(&admin)
            .await
            .expect("look the database up");
    assert!(!created, "an operator command created {}", names.database);
}

#[tokio::test]
async fn output_piped_into_a_reader_that_stops_early_ends_quietly() {
    use std::io::Read as _;
    let app = TestApp::spawn().await;
    // More than a pipe holds, so the command is still writing when the reader goes.
    sqlx::query(
        "insert into items (id, qty) select gen_random_uuid(), 1 from generate_series(1, 3000)",
    )
    .execute(&app.pool)
    .await
    .expect("items");
    let mut child = qty_worker(&app.names)
        .args(["item", "list", "--limit", "3000", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut first = [0_u8; 600];
    child
        .stdout
        .take()
        .expect("stdout")
        .read_exact(&mut first)
        .expect("the first bytes");
    let output = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{err}");
    assert!(err.is_empty(), "{err}");
}
