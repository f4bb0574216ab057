//! Throwaway PostgreSQL servers: a lone server, or a primary with a synchronous
//! streaming standby that can be failed over to. Each lives in a temporary
//! directory owned by `postgres` (the server refuses to run as root), listens on a
//! free loopback port with trust auth, and is stopped and removed on drop.

use crate::{free_port, run, suffix, watchdog};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The newest installed PostgreSQL's `bin` directory, if any.
pub fn bin_dir() -> Option<PathBuf> {
    let versions = std::fs::read_dir("/usr/lib/postgresql").ok()?;
    let newest = versions.flatten().map(|entry| entry.path()).max()?;
    let bin = newest.join("bin");
    bin.join("initdb").exists().then_some(bin)
}

fn bin(name: &str) -> PathBuf {
    bin_dir()
        .expect("PostgreSQL server binaries are installed")
        .join(name)
}

fn as_postgres(program: &str) -> Command {
    let mut command = Command::new("runuser");
    command.args(["-u", "postgres", "--"]).arg(bin(program));
    command
}

/// One PostgreSQL server of a test's own.
pub struct Postgres {
    pub port: u16,
    root: PathBuf,
    data: PathBuf,
}

impl Postgres {
    /// Initialises and starts a new server, ready for a standby to follow it.
    pub fn start() -> Postgres {
        let server = Postgres::create();
        run(as_postgres("initdb")
            .args(["-U", "postgres", "--auth=trust", "--no-sync", "-D"])
            .arg(&server.data));
        server.configure();
        server.start_again();
        server
    }

    /// A streaming standby of `primary`, made with `pg_basebackup -R`. Once it
    /// streams, the primary waits for it on every commit (synchronous replication),
    /// so a promoted standby has every commit a client saw confirmed.
    pub fn start_standby_of(primary: &Postgres) -> Postgres {
        let standby = Postgres::create();
        standby.base_backup_from(primary);
        standby
    }

    fn create() -> Postgres {
        let root = std::env::temp_dir().join(format!("qtyw-pg-{}", suffix()));
        std::fs::create_dir_all(&root).expect("create the server's directory");
        run(Command::new("chown").arg("postgres:postgres").arg(&root));
        let data = root.join("data");
        watchdog::guard(&format!(
            "runuser -u postgres -- {} -D {} stop -m immediate; rm -rf {}",
            bin("pg_ctl").display(),
            data.display(),
            root.display()
        ));
        Postgres {
            port: free_port(),
            root,
            data,
        }
    }

    fn base_backup_from(&self, primary: &Postgres) {
        run(as_postgres("pg_basebackup")
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-R",
                "-X",
                "stream",
                // A fast checkpoint: a spread one can take minutes on a busy primary.
                "--checkpoint=fast",
                "-p",
            ])
            .arg(primary.port.to_string())
            .arg("-D")
            .arg(&self.data));
        self.configure();
        append(
            &self.data.join("postgresql.auto.conf"),
            &format!(
                "primary_conninfo = 'host=127.0.0.1 port={} user=postgres application_name=standby'\n",
                primary.port
            ),
        );
        self.start_again();
        crate::wait_blocking("the standby to stream from the primary", || {
            primary.query("select count(*) from pg_stat_replication where state = 'streaming'")
                == "1"
        });
        primary.query("alter system set synchronous_standby_names = '*'");
        primary.query("select pg_reload_conf()");
    }

    /// Settings appended last, so they win over what a base backup copied.
    fn configure(&self) {
        append(
            &self.data.join("postgresql.auto.conf"),
            &format!(
                "port = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
                 wal_level = replica\nmax_wal_senders = 5\nhot_standby = on\n\
                 synchronous_commit = on\nfsync = off\nmax_connections = 50\n",
                self.port,
                self.root.display()
            ),
        );
    }

    /// `postgres://postgres@127.0.0.1:PORT/DATABASE`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Runs `sql` in database `postgres` and returns its output, unaligned.
    pub fn query(&self, sql: &str) -> String {
        self.query_in("postgres", sql)
    }

    pub fn query_in(&self, database: &str, sql: &str) -> String {
        run(Command::new("psql")
            .args(["-X", "-q", "-At", "-h", "127.0.0.1", "-U", "postgres", "-p"])
            .arg(self.port.to_string())
            .args(["-d", database, "-c", sql]))
        .trim()
        .to_owned()
    }

    /// `pg_ctl` on this server's data directory, logging to its `server.log`.
    fn pg_ctl(&self) -> Command {
        let mut command = as_postgres("pg_ctl");
        command
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(self.root.join("server.log"));
        command
    }

    /// Stops the server at once, as a crash would.
    pub fn stop_immediately(&self) {
        run(self.pg_ctl().args(["stop", "-m", "immediate"]));
    }

    /// Starts a stopped server and waits until it accepts connections.
    pub fn start_again(&self) {
        run(self.pg_ctl().args(["-w", "-t", "120", "start"]));
    }

    /// A fast restart: sessions are cut, the server comes back at once.
    pub fn restart(&self) {
        run(self
            .pg_ctl()
            .args(["-w", "-t", "120", "-m", "fast", "restart"]));
    }

    /// Promotes a standby to primary and waits until it accepts writes.
    pub fn promote(&self) {
        run(self.pg_ctl().args(["-w", "-t", "120", "promote"]));
    }

    /// Rebuilds this (stopped, failed) server as a standby of `primary`, on the
    /// same port: what an operator does after a failover.
    pub fn rebuild_as_standby_of(&self, primary: &Postgres) {
        std::fs::remove_dir_all(&self.data).ok();
        // Until the new standby streams, commits would wait for it.
        primary.query("alter system reset synchronous_standby_names");
        primary.query("select pg_reload_conf()");
        self.base_backup_from(primary);
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.pg_ctl()
            .args(["stop", "-m", "immediate"])
            .output()
            .ok();
        std::fs::remove_dir_all(&self.root).ok();
    }
}

fn append(file: &Path, text: &str) {
    use std::io::Write as _;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(file)
        .expect("open a server config file");
    file.write_all(text.as_bytes())
        .expect("write a server config file");
}
