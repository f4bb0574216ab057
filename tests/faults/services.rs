//! Stopping, starting and disturbing the real servers, for the faults that need
//! it. Two flavours: services installed on this machine (as here and in CI), and
//! the `docker compose` services that `scripts/test` starts on a machine without
//! local ones (it sets `QTY_TEST_SERVICES=compose`).

use std::process::Command;
use std::time::{Duration, Instant};

/// A server the fault tests may stop and start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    Postgres,
    Rabbitmq,
}

fn compose() -> bool {
    std::env::var("QTY_TEST_SERVICES").as_deref() == Ok("compose")
}

/// Polls `check` for up to two minutes: servers take a while to come back.
const WAIT_UP: &str = "for _ in $(seq 1 240); do CHECK && exit 0; sleep 0.5; done; exit 1";

impl Service {
    /// A shell command that succeeds while the server accepts connections.
    pub fn check(self) -> &'static str {
        match (self, compose()) {
            (Service::Postgres, false) => "pg_isready -q -h 127.0.0.1 -p 5432",
            (Service::Postgres, true) => {
                "docker compose exec -T postgres pg_isready -q -U postgres"
            }
            (Service::Rabbitmq, false) => {
                "rabbitmq-diagnostics -q check_port_connectivity >/dev/null 2>&1"
            }
            (Service::Rabbitmq, true) => {
                "docker compose exec -T rabbitmq rabbitmq-diagnostics -q check_port_connectivity >/dev/null 2>&1"
            }
        }
    }

    /// Starts the server and waits until it accepts connections.
    pub fn start(self) -> String {
        let start = match (self, compose()) {
            (Service::Postgres, false) => {
                "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
            }
            (Service::Rabbitmq, false) => "rabbitmq-server -detached",
            (Service::Postgres, true) => "docker compose start postgres",
            (Service::Rabbitmq, true) => "docker compose start rabbitmq",
        };
        format!("{start}; {}", WAIT_UP.replace("CHECK", self.check()))
    }

    /// Restarts the server for real and waits until it is back; the returned
    /// guard starts it again if anything failed half-way.
    pub fn restart(self) -> Restore {
        let restore = Restore(self);
        match (self, compose()) {
            (Service::Postgres, false) => sh(
                "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main restart -m fast",
            ),
            (Service::Rabbitmq, false) => {
                sh("rabbitmqctl -q shutdown");
                sh(&self.start());
            }
            (service, true) => {
                let name = if service == Service::Postgres {
                    "postgres"
                } else {
                    "rabbitmq"
                };
                sh(&format!("docker compose restart {name}"));
                sh(&WAIT_UP.replace("CHECK", self.check()));
            }
        }
        restore
    }
}

/// Closes every client connection the broker has (the publisher's too).
pub fn close_all_broker_connections(reason: &str) {
    let rabbitmqctl = if compose() {
        "docker compose exec -T rabbitmq rabbitmqctl"
    } else {
        "rabbitmqctl"
    };
    sh(&format!(
        "{rabbitmqctl} -q close_all_connections '{reason}'"
    ));
}

/// Runs `command` and fails loudly when it does.
pub fn sh(command: &str) {
    let status = Command::new("bash")
        .arg("-c")
        .arg(command)
        .status()
        .expect("run a shell command");
    assert!(status.success(), "`{command}` failed with {status}");
}

/// Puts a service back when dropped, even when the test failed half-way.
pub struct Restore(pub Service);

impl Drop for Restore {
    fn drop(&mut self) {
        let up = || {
            Command::new("bash")
                .arg("-c")
                .arg(self.0.check())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !up() {
            Command::new("bash")
                .arg("-c")
                .arg(self.0.start())
                .status()
                .ok();
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        while !up() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
