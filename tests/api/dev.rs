//! `scripts/dev`, the README's way to run the worker without Docker: it brings up
//! a working stack whose printed `export` lines let `qty-worker adjust` reach it,
//! and Ctrl-C removes everything it started. It runs exactly as the README shows
//! it, in an environment with only `PATH` and `HOME`, as a newcomer's plain shell
//! would have: no project variable, no profile or feature chosen for it.

use qty_test_support::eventually;
use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// `scripts/dev`, sent Ctrl-C (SIGINT) when dropped if it still runs, so a
/// failing test leaves no stack behind either.
struct Dev(std::process::Child);

impl Dev {
    fn interrupt(&self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        )
        .ok();
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            self.interrupt();
            self.0.wait().ok();
        }
    }
}

/// `command` with the environment of a plain shell: `PATH` and `HOME`, nothing else.
fn plain_shell(command: &mut Command) -> &mut Command {
    command.env_clear();
    for name in ["PATH", "HOME"] {
        if let Some(value) = std::env::var_os(name) {
            command.env(name, value);
        }
    }
    command
}

fn listening(addr: &str) -> bool {
    std::net::TcpStream::connect(addr).is_ok()
}

#[tokio::test]
async fn the_dev_command_runs_a_stack_that_adjust_reaches_and_ctrl_c_removes_it() {
    if !qty_test_support::servers_available() {
        eprintln!("skipped: no PostgreSQL/RabbitMQ binaries");
        return;
    }
    let mut dev = Dev(plain_shell(&mut Command::new("scripts/dev"))
        .current_dir(ROOT)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start scripts/dev"));
    // Read the export lines as a second terminal would copy them.
    let stdout = dev.0.stdout.take().expect("stdout");
    let exports = tokio::task::spawn_blocking(move || {
        let mut exports = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.expect("a line");
            if let Some(pair) = line.strip_prefix("export ") {
                let (name, value) = pair.split_once('=').expect("NAME=value");
                exports.push((name.to_owned(), value.trim_matches('\'').to_owned()));
                if name == "QTY_HTTP_ADDR" {
                    break;
                }
            }
        }
        exports
    });
    let exports = tokio::time::timeout(Duration::from_secs(1200), exports)
        .await
        .expect(
            "scripts/dev printed its export lines within 20 minutes (a release build, two servers)",
        )
        .expect("read the export lines");
    let names: Vec<&str> = exports.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["AMQP_URL", "DATABASE_URL", "QTY_EXCHANGE", "QTY_HTTP_ADDR"]
    );
    let value = |name: &str| {
        exports
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .expect("exported")
    };

    let qty_worker = |args: &[&str]| {
        let output = plain_shell(&mut Command::new(env!("CARGO_BIN_EXE_qty-worker")))
            .args(args)
            .arg("--json")
            .envs(exports.iter().map(|(n, v)| (n, v)))
            .output()
            .expect("run qty-worker");
        assert!(
            output.status.success(),
            "qty-worker {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&output.stdout).expect("JSON")
    };
    let item = uuid::Uuid::new_v4().to_string();
    qty_worker(&["item", "create", "--id", &item, "--qty", "10"]);
    let reply = qty_worker(&["adjust", &item, "-3"]);
    assert_eq!(reply["outcome"], "applied", "{reply}");
    assert_eq!(reply["qty"], 7, "{reply}");

    // Ctrl-C: the worker drains, both servers stop and their ports close.
    dev.interrupt();
    let status = tokio::task::spawn_blocking(move || dev.0.wait())
        .await
        .expect("join")
        .expect("wait for scripts/dev");
    assert!(status.success(), "scripts/dev exited {status}");
    let amqp = value("AMQP_URL");
    let database = value("DATABASE_URL");
    let addr = |url: &str| {
        let rest = url.split('@').nth(1).expect("host after @");
        rest.split('/').next().expect("host:port").to_owned()
    };
    for addr in [addr(&amqp), addr(&database), value("QTY_HTTP_ADDR")] {
        eventually(
            &format!("{addr} to stop listening after Ctrl-C"),
            Duration::from_secs(30),
            || async {
                if listening(&addr) {
                    Err("still listening")
                } else {
                    Ok(())
                }
            },
        )
        .await;
    }
}
