//! What qty-worker's tests and its chaos example share, as a crate of its own:
//!
//! - [`app`]: a worker per test with its own database, exchange and queue (built
//!   from `names`, `in_process`, `amqp`, `reply` and `http`, one job each);
//! - [`faults`]: the fault harness (worker processes behind proxies, a publisher
//!   that keeps going through faults, the invariant check after each run);
//! - [`eventually`]: wait for a condition with a deadline that names what it waited for;
//! - [`postgres`] and [`rabbitmq`]: throwaway servers in temporary directories on free
//!   ports, for the tests that stop, fail over, make read-only or cluster a server. The
//!   servers on the default ports are only ever used, never disturbed;
//! - [`proxy`]: a TCP proxy that cuts, stalls or refuses a link on command.
//!
//! Every throwaway server is removed when its value is dropped, and also by a
//! watchdog process when the test process dies without dropping it (a panic that
//! aborts, Ctrl-C, SIGKILL).

mod amqp;
pub mod app;
pub mod eventually;
pub mod faults;
mod http;
mod in_process;
mod names;
pub mod pgbouncer;
pub mod postgres;
pub mod proxy;
pub mod rabbitmq;
mod reply;
mod watchdog;

pub use watchdog::guard as on_exit;

pub use eventually::eventually;

/// How long any single wait in a test may take before it fails with a message.
pub const WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Whether this machine has the server binaries the throwaway servers need. Suites
/// that need them print `skipped: no PostgreSQL/RabbitMQ binaries` when it has not
/// (a machine with only Docker, say).
pub fn servers_available() -> bool {
    postgres::bin_dir().is_some()
        && std::path::Path::new(rabbitmq::SERVER).exists()
        && which("runuser")
        && which("rabbitmqctl")
}

fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// A free loopback TCP port (free when asked; a server started right after takes it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free loopback port")
}

/// A fresh short random suffix for names.
pub fn suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..10].to_owned()
}

/// Runs a command and fails loudly, with its output, when it fails.
pub(crate) fn run(command: &mut std::process::Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("cannot run {command:?}: {error}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}
