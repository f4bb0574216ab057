//! TLS to PostgreSQL with `sslmode=verify-full` and a private CA: a throwaway
//! cluster that only accepts TLS, with certificates made by the test.

use qty_test_support::app::WAIT;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A PostgreSQL cluster of the test's own, TLS only, removed on drop.
struct TlsPostgres {
    dir: PathBuf,
    port: u16,
}

fn run(command: &mut Command) {
    let output = command.output().expect("run a setup command");
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn postgres_bin(name: &str) -> PathBuf {
    let versions = std::fs::read_dir("/usr/lib/postgresql").expect("PostgreSQL is installed");
    let version = versions
        .flatten()
        .map(|e| e.path())
        .max()
        .expect("a PostgreSQL version");
    version.join("bin").join(name)
}

/// A CA and, when `server` is set, a certificate for localhost signed by it.
fn make_ca(dir: &Path, name: &str, server: bool) {
    let path = |file: &str| dir.join(format!("{name}-{file}"));
    run(Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
        ])
        .arg(format!("/CN=qty-worker test {name}"))
        .arg("-keyout")
        .arg(path("ca.key"))
        .arg("-out")
        .arg(path("ca.pem")));
    if server {
        run(Command::new("openssl")
            .args([
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                "/CN=localhost",
            ])
            .arg("-keyout")
            .arg(dir.join("server.key"))
            .arg("-out")
            .arg(dir.join("server.csr")));
        std::fs::write(
            dir.join("san.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )
        .expect("write san.ext");
        run(Command::new("openssl")
            .args(["x509", "-req", "-days", "1", "-CAcreateserial"])
            .arg("-in")
            .arg(dir.join("server.csr"))
            .arg("-CA")
            .arg(path("ca.pem"))
            .arg("-CAkey")
            .arg(path("ca.key"))
            .arg("-extfile")
            .arg(dir.join("san.ext"))
            .arg("-out")
            .arg(dir.join("server.crt")));
    }
}

impl TlsPostgres {
    fn start() -> TlsPostgres {
        let dir = std::env::temp_dir().join(format!("qtyw-tls-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("free port")
            .local_addr()
            .expect("addr")
            .port();
        make_ca(&dir, "trusted", true);
        make_ca(&dir, "stranger", false);
        let data = dir.join("data");
        run(Command::new("chown")
            .arg("-R")
            .arg("postgres:postgres")
            .arg(&dir));
        run(Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(postgres_bin("initdb"))
            .args(["--auth=trust", "--no-sync", "-D"])
            .arg(&data));
        let conf = format!(
            "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nssl = on\n\
             ssl_cert_file = '{}'\nssl_key_file = '{}'\nfsync = off\n",
            dir.display(),
            dir.join("server.crt").display(),
            dir.join("server.key").display()
        );
        std::fs::write(data.join("postgresql.auto.conf"), conf).expect("write conf");
        // TLS or nothing: a plain connection is refused by the server itself.
        std::fs::write(
            data.join("pg_hba.conf"),
            "hostssl all all 127.0.0.1/32 trust\n",
        )
        .expect("write hba");
        run(Command::new("chmod").arg("600").arg(dir.join("server.key")));
        run(Command::new("chown")
            .arg("-R")
            .arg("postgres:postgres")
            .arg(&dir));
        let server = TlsPostgres { dir, port };
        run(Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(postgres_bin("pg_ctl"))
            .args(["-w", "-t", &WAIT.as_secs().to_string(), "-D"])
            .arg(&data)
            .arg("-l")
            .arg(server.dir.join("log"))
            .arg("start"));
        server
    }

    fn url(&self, params: &str) -> String {
        format!(
            "postgres://postgres@localhost:{}/inventory?{params}",
            self.port
        )
    }

    fn ca(&self, name: &str) -> String {
        self.dir
            .join(format!("{name}-ca.pem"))
            .display()
            .to_string()
    }
}

impl Drop for TlsPostgres {
    fn drop(&mut self) {
        Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(postgres_bin("pg_ctl"))
            .args(["-m", "immediate", "-D"])
            .arg(self.dir.join("data"))
            .arg("stop")
            .output()
            .ok();
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

/// These tests start their own PostgreSQL and a broker listener, which needs the
/// servers on this machine, not in `docker compose` (see `scripts/test`).
fn servers_are_local() -> bool {
    let local = qty_test_support::servers_available();
    if !local {
        println!("skipped: no PostgreSQL/RabbitMQ binaries");
    }
    local
}

fn migrate(database_url: &str) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_qty-worker"))
        .arg("migrate")
        .env("DATABASE_URL", database_url)
        .env_remove("RUST_LOG")
        .output()
        .expect("run qty-worker");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn postgres_over_tls_verifies_the_server_against_a_private_ca() {
    if !servers_are_local() {
        return;
    }
    let server = TlsPostgres::start();

    let trusted = server.url(&format!(
        "sslmode=verify-full&sslrootcert={}",
        server.ca("trusted")
    ));
    let (ok, err) = migrate(&trusted);
    assert!(ok, "verify-full with the right CA must work: {err}");

    let stranger = server.url(&format!(
        "sslmode=verify-full&sslrootcert={}",
        server.ca("stranger")
    ));
    let (ok, err) = migrate(&stranger);
    assert!(!ok, "a server certificate from another CA must be refused");
    assert!(err.contains("no PostgreSQL host is usable"), "{err}");
    assert!(err.contains("UnknownIssuer"), "{err}");

    let (ok, _) = migrate(&server.url("sslmode=disable"));
    assert!(
        !ok,
        "the server accepts TLS only, so a plain connection must fail"
    );
}

/// A RabbitMQ node of the test's own with a TLS listener beside its plain one,
/// its certificate signed by a throwaway CA; removed on drop.
struct TlsBroker {
    dir: PathBuf,
    port: u16,
    node: qty_test_support::rabbitmq::Cluster,
}

impl TlsBroker {
    fn start() -> TlsBroker {
        // In a directory the node can read: inside its chroot for a release there.
        let release = qty_test_support::rabbitmq::Release::from_env();
        let (dir, seen) = release.scratch_dir("qtyw-amqps");
        make_ca(&dir, "trusted", true);
        // The broker runs as its own user and must read the key.
        run(Command::new("chmod").arg("-R").arg("a+rX").arg(&dir));
        let port = qty_test_support::free_port();
        let node = qty_test_support::rabbitmq::Cluster::start_with(
            1,
            &format!(
                "listeners.ssl.default = 127.0.0.1:{port}\nssl_options.certfile = {}\n\
                 ssl_options.keyfile = {}\nssl_options.cacertfile = {}\n",
                seen.join("server.crt").display(),
                seen.join("server.key").display(),
                seen.join("trusted-ca.pem").display()
            ),
        );
        TlsBroker { dir, port, node }
    }
}

impl Drop for TlsBroker {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

#[tokio::test]
async fn the_worker_consumes_over_amqps_trusting_a_private_ca() {
    if !qty_test_support::servers_available() {
        println!("skipped: no PostgreSQL/RabbitMQ binaries");
        return;
    }
    let broker = TlsBroker::start();
    let amqps = format!("amqps://guest:guest@localhost:{}/%2f", broker.port);
    let ca = broker.dir.join("trusted-ca.pem");
    let mut names = qty_test_support::app::Names::random();
    names.amqp_url = broker.node.urls();
    let mut app = qty_test_support::app::TestApp::spawn_on(names, |settings| {
        settings.connections.broker.amqp_url = amqps.clone();
        settings.connections.broker.amqp_ca_file = Some(ca.clone());
    })
    .await;
    let item = app.create_item(2).await;
    app.adjust("tls-1", item, -1).await;
    assert_eq!(app.next_reply().await.body["qty"].as_i64(), Some(1));
    // The broker's version is read over TLS too.
    qty_test_support::app::eventually("qty_worker_broker_info over amqps", WAIT, || async {
        let (_, metrics) = app.get("/metrics").await;
        match metrics
            .lines()
            .find(|line| line.starts_with("qty_worker_broker_info{product=\"RabbitMQ\""))
        {
            Some(_) => Ok(()),
            None => Err("no qty_worker_broker_info series".to_owned()),
        }
    })
    .await;
}
