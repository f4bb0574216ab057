//! A throwaway PgBouncer (Debian's `pgbouncer`) in transaction pooling mode with
//! its defaults, in front of a PostgreSQL server, on a free port of its own. It
//! refuses to run as root, so it runs as `postgres` in a temporary directory that
//! user owns; it is stopped and the directory removed on drop.

use crate::{free_port, run, suffix, watchdog};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where Debian installs it.
pub const BINARY: &str = "/usr/sbin/pgbouncer";

/// Whether this machine has PgBouncer.
pub fn available() -> bool {
    Path::new(BINARY).exists()
}

pub struct PgBouncer {
    pub port: u16,
    root: PathBuf,
}

impl PgBouncer {
    /// Starts PgBouncer in front of the server at `postgres` (`host:port`), with
    /// `pool_size` server sessions per database and user: fewer than the clients,
    /// so that clients' transactions really share server sessions.
    pub fn start(postgres: std::net::SocketAddr, pool_size: u32) -> PgBouncer {
        let root = std::env::temp_dir().join(format!("qtyw-pgb-{}", suffix()));
        std::fs::create_dir_all(&root).expect("create PgBouncer's directory");
        let port = free_port();
        let config = format!(
            "[databases]\n* = host={host} port={pg_port}\n\n\
             [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n\
             auth_type = trust\nauth_file = {root}/users.txt\n\
             pool_mode = transaction\ndefault_pool_size = {pool_size}\n\
             logfile = {root}/pgbouncer.log\npidfile = {root}/pgbouncer.pid\n\
             unix_socket_dir =\n\
             ignore_startup_parameters = extra_float_digits,options\n",
            host = postgres.ip(),
            pg_port = postgres.port(),
            root = root.display(),
        );
        std::fs::write(root.join("pgbouncer.ini"), config).expect("write pgbouncer.ini");
        std::fs::write(root.join("users.txt"), "\"postgres\" \"\"\n").expect("write users.txt");
        run(Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&root));
        watchdog::guard(&format!(
            "kill $(cat {pid} 2>/dev/null) 2>/dev/null; rm -rf {root}",
            pid = root.join("pgbouncer.pid").display(),
            root = root.display()
        ));
        let bouncer = PgBouncer { port, root };
        bouncer.start_again();
        bouncer
    }

    /// `postgres://postgres@127.0.0.1:PORT/DATABASE?statement-cache-capacity=0`:
    /// the `DATABASE_URL` docs/deployment.md gives for a worker behind PgBouncer, whose
    /// connections keep no prepared statement.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{database}?statement-cache-capacity=0",
            self.port
        )
    }

    fn pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.root.join("pgbouncer.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Starts it (daemonised) and waits until it accepts connections.
    fn start_again(&self) {
        run(Command::new("runuser")
            .args(["-u", "postgres", "--", BINARY, "-d"])
            .arg(self.root.join("pgbouncer.ini")));
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
        crate::wait_blocking("PgBouncer to accept connections", || {
            std::net::TcpStream::connect(addr).is_ok()
        });
    }

    /// Stops it (SIGTERM, which cuts every client) and starts it again.
    pub fn restart(&self) {
        self.stop();
        self.start_again();
    }

    fn stop(&self) {
        let Some(pid) = self.pid() else { return };
        Command::new("kill").arg(pid.to_string()).status().ok();
        crate::wait_blocking("PgBouncer to exit", || {
            !Path::new(&format!("/proc/{pid}")).exists()
        });
    }

    /// Its log, for a failure message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        self.stop();
        std::fs::remove_dir_all(&self.root).ok();
    }
}
