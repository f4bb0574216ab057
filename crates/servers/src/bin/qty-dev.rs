//! `scripts/dev`: the worker with a throwaway PostgreSQL and RabbitMQ, on a
//! machine with their server binaries and no Docker.
//!
//! Starts both servers in temporary directories on free ports (the same code the
//! tests use), runs `qty-worker run` against them (which creates and migrates the
//! database), waits until it is ready, and prints the `export` lines that let `qty-worker adjust` in another
//! terminal reach them. On Ctrl-C or SIGTERM it stops the worker (which drains),
//! then the servers, and removes their directories; if it is killed outright, the
//! servers' watchdogs remove them once it has gone.

use qty_servers::postgres::Postgres;
use qty_servers::rabbitmq::{Cluster, Release};
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitCode};
use std::time::Duration;
use tokio::signal::unix::{SignalKind, signal};

const DATABASE: &str = "inventory";
const EXCHANGE: &str = "inventory";

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    if !qty_servers::servers_available() {
        eprintln!(
            "qty-dev needs the PostgreSQL and RabbitMQ server binaries (Debian: postgresql, rabbitmq-server), or Docker for `docker compose up --build`"
        );
        return ExitCode::FAILURE;
    }
    // Installed first, so that a Ctrl-C during start-up also cleans up.
    let mut interrupt = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let mut terminate = signal(SignalKind::terminate()).expect("SIGTERM handler");
    eprintln!("starting a throwaway PostgreSQL and RabbitMQ (10-20 s)…");
    let servers = tokio::task::spawn_blocking(|| {
        (
            Postgres::start(),
            Cluster::start_full(&Release::Machine, 1, "", &[]),
        )
    });
    let (postgres, rabbitmq) = tokio::select! {
        started = servers => started.expect("start the servers"),
        // The servers' watchdogs remove what was started once this process ends.
        _ = interrupt.recv() => return ExitCode::FAILURE,
        _ = terminate.recv() => return ExitCode::FAILURE,
    };
    let stack = Stack {
        database_url: postgres.url(DATABASE),
        amqp_url: rabbitmq.urls(),
        http_addr: SocketAddr::from(([127, 0, 0, 1], qty_servers::free_port())),
    };
    let code = match stack.start_worker() {
        Err(message) => {
            eprintln!("{message}");
            ExitCode::FAILURE
        }
        Ok(mut worker) => {
            let stopped = tokio::select! {
                ready = stack.wait_ready(&mut worker) => match ready {
                    Ok(()) => {
                        stack.print_exports();
                        tokio::select! {
                            _ = interrupt.recv() => true,
                            _ = terminate.recv() => true,
                            exited = exited(&mut worker) => {
                                eprintln!("the worker exited ({exited})");
                                false
                            }
                        }
                    }
                    Err(message) => {
                        eprintln!("{message}");
                        false
                    }
                },
                _ = interrupt.recv() => true,
                _ = terminate.recv() => true,
            };
            stop(&mut worker).await;
            if stopped {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    };
    eprintln!("removing the servers");
    tokio::task::spawn_blocking(move || {
        drop(rabbitmq);
        drop(postgres);
    })
    .await
    .ok();
    eprintln!("removed");
    code
}

/// Where the worker and its servers listen.
struct Stack {
    database_url: String,
    amqp_url: String,
    http_addr: SocketAddr,
}

impl Stack {
    /// Starts `qty-worker run` (the binary beside this one), which creates and
    /// migrates the database itself, logging as the rest of its run does.
    fn start_worker(&self) -> Result<Child, String> {
        let worker = std::env::current_exe()
            .map_err(|error| format!("cannot find my own path: {error}"))?
            .with_file_name("qty-worker");
        Command::new(&worker)
            .arg("run")
            .env("DATABASE_URL", &self.database_url)
            .env("AMQP_URL", &self.amqp_url)
            .env("QTY_EXCHANGE", EXCHANGE)
            .env("QTY_HTTP_ADDR", self.http_addr.to_string())
            .env("QTY_LOG_FORMAT", "pretty")
            .spawn()
            .map_err(|error| format!("cannot start {}: {error}", worker.display()))
    }

    /// Waits until `/readyz` answers 200: by then the worker has declared the
    /// exchange that `qty-worker adjust` publishes to.
    async fn wait_ready(&self, worker: &mut Child) -> Result<(), String> {
        loop {
            if readyz(self.http_addr).await {
                return Ok(());
            }
            if let Ok(Some(status)) = worker.try_wait() {
                return Err(format!("the worker exited before it was ready ({status})"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn print_exports(&self) {
        let item = uuid::Uuid::new_v4();
        let Stack {
            database_url,
            amqp_url,
            http_addr,
        } = self;
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "# In another terminal, paste these, then try:\n\
             #   qty-worker item create --id {item} --qty 10\n\
             #   qty-worker adjust {item} -3\n\
             export AMQP_URL='{amqp_url}'\n\
             export DATABASE_URL='{database_url}'\n\
             export QTY_EXCHANGE='{EXCHANGE}'\n\
             export QTY_HTTP_ADDR='{http_addr}'\n\
             # metrics: http://{http_addr}/metrics; Ctrl-C stops the worker and removes both servers"
        )
        .and_then(|()| out.flush())
        .ok();
    }
}

/// Whether `GET /readyz` answers 200 now (asked on a blocking thread, with a
/// two-second limit on each step).
async fn readyz(addr: SocketAddr) -> bool {
    let ask = move || -> std::io::Result<bool> {
        let limit = Some(Duration::from_secs(2));
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        stream.set_read_timeout(limit)?;
        stream.set_write_timeout(limit)?;
        stream.write_all(b"GET /readyz HTTP/1.0\r\nHost: qty-dev\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200"))
    };
    matches!(tokio::task::spawn_blocking(ask).await, Ok(Ok(true)))
}

/// Completes when the worker has exited, with how it exited.
async fn exited(worker: &mut Child) -> String {
    loop {
        match worker.try_wait() {
            Ok(Some(status)) => return status.to_string(),
            Err(error) => return error.to_string(),
            Ok(None) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// SIGTERM to the worker, which drains and exits; then waits for it.
async fn stop(worker: &mut Child) {
    if let Ok(None) = worker.try_wait() {
        eprintln!("stopping the worker");
        Command::new("kill")
            .args(["-TERM", &worker.id().to_string()])
            .status()
            .ok();
    }
    exited(worker).await;
}
