//! Throwaway servers for qty-worker's tests and for `scripts/dev`: PostgreSQL
//! (alone, or a primary with a streaming standby), RabbitMQ (one node or a
//! cluster) and PgBouncer, each in a temporary directory on a free loopback port.
//! The servers on the default ports are never touched.
//!
//! Every server is removed when its value is dropped, and also by a watchdog
//! process when the process that started it dies without dropping it (a panic
//! that aborts, Ctrl-C, SIGKILL).
//!
//! This crate is small on purpose: `scripts/dev` builds it (with its `qty-dev`
//! binary) right after the worker, and it needs nothing the worker has not built.

pub mod pgbouncer;
pub mod postgres;
pub mod rabbitmq;
mod watchdog;

pub use watchdog::guard as on_exit;

/// Whether this machine has the server binaries the throwaway servers need.
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
pub fn run(command: &mut std::process::Command) -> String {
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

/// Polls `ready` every 100 ms for up to two minutes; past that it panics, naming
/// `what`. For set-up code outside an async runtime.
pub fn wait_blocking(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !ready() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within two minutes"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
