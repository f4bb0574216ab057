//! Throwaway RabbitMQ nodes, alone or clustered, of a chosen release. Each node
//! has its own name, ports, data and log directories, its own plugin list (empty
//! unless asked: never the system node's) and a config file that keeps it off the
//! system node's port. Nodes run as `rabbitmq` (sharing that user's Erlang
//! cookie, which clustering needs) and are stopped and removed on drop.
//!
//! The release is this machine's own RabbitMQ (3.10 on Debian 12), or one that
//! `scripts/brokers` set up in a debootstrap chroot (4.0 from Debian 13, the
//! current release from Debian sid): see [`Release`]. A chroot's nodes run in a
//! clean environment with an epmd of their cluster's own, on a port of its own.

use crate::{free_port, run, suffix, watchdog};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// The server script that runs a node in the calling user's environment.
pub const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";

/// The variable that chooses the release the tests run on.
pub const RELEASE_VAR: &str = "QTY_TEST_RABBITMQ";

/// Which RabbitMQ a test's nodes run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Release {
    /// This machine's own binaries (Debian 12's 3.10).
    Machine,
    /// A release installed by `scripts/brokers` in a chroot.
    Chroot {
        /// `4.0` or `current`, as `QTY_TEST_RABBITMQ` names it.
        label: String,
        root: PathBuf,
        /// The chroot's `rabbitmq` user and group.
        uid: u32,
        gid: u32,
    },
}

impl Release {
    /// The release `QTY_TEST_RABBITMQ` names: `3.10` (the default), `4.0` or
    /// `current`. Panics, saying what to run, when that release is not set up.
    pub fn from_env() -> Release {
        match std::env::var(RELEASE_VAR).as_deref() {
            Err(_) | Ok("") | Ok("3.10") => Release::Machine,
            Ok(label @ ("4.0" | "current")) => Release::chroot(label),
            Ok(other) => panic!("{RELEASE_VAR}={other}: expected 3.10, 4.0 or current"),
        }
    }

    /// The chroot `scripts/brokers` made for `label` (`4.0` or `current`).
    pub fn chroot(label: &str) -> Release {
        let suite = match label {
            "4.0" => "trixie",
            "current" => "sid",
            other => panic!("no chroot for RabbitMQ {other}"),
        };
        let base = std::env::var_os("QTY_RABBITMQ_CHROOTS")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                std::env::var_os("XDG_CACHE_HOME")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| {
                        PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache")
                    })
                    .join("qty-worker/rabbitmq")
            });
        let root = base.join(suite);
        assert!(
            root.join(SERVER.trim_start_matches('/')).exists(),
            "RabbitMQ {label} is not set up in {}: run `scripts/brokers {label}` (root, Debian's archive)",
            root.display()
        );
        let passwd = std::fs::read_to_string(root.join("etc/passwd")).expect("the chroot's passwd");
        let entry = passwd
            .lines()
            .find(|line| line.starts_with("rabbitmq:"))
            .expect("the chroot has a rabbitmq user");
        let fields: Vec<&str> = entry.split(':').collect();
        Release::Chroot {
            label: label.to_owned(),
            root,
            uid: fields[2].parse().expect("uid"),
            gid: fields[3].parse().expect("gid"),
        }
    }

    /// `3.10`, `4.0` or `current`.
    pub fn label(&self) -> &str {
        match self {
            Release::Machine => "3.10",
            Release::Chroot { label, .. } => label,
        }
    }

    /// The upstream version of the release's `rabbitmq-server` package
    /// (`4.3.6` of `4.3.6-1`), as the broker reports it; None where no Debian
    /// package says (a broker from Docker, say).
    pub fn version(&self) -> Option<String> {
        let status = match self {
            Release::Machine => PathBuf::from("/var/lib/dpkg/status"),
            Release::Chroot { root, .. } => root.join("var/lib/dpkg/status"),
        };
        let status = std::fs::read_to_string(&status).ok()?;
        let package = status
            .split("\n\n")
            .find(|stanza| stanza.starts_with("Package: rabbitmq-server\n"))?;
        let version = package
            .lines()
            .find_map(|line| line.strip_prefix("Version: "))?;
        // Drop an epoch and the Debian revision.
        let upstream = version.rsplit_once(':').map_or(version, |(_, rest)| rest);
        upstream.split('-').next().map(str::to_owned)
    }

    /// A fresh directory that a node of this release can read, as
    /// (the path here, the path the node sees).
    pub fn scratch_dir(&self, prefix: &str) -> (PathBuf, PathBuf) {
        let name = format!("{prefix}-{}", suffix());
        let (here, seen) = match self {
            Release::Machine => {
                let dir = std::env::temp_dir().join(&name);
                (dir.clone(), dir)
            }
            Release::Chroot { root, .. } => (
                root.join("tmp").join(&name),
                PathBuf::from("/tmp").join(&name),
            ),
        };
        std::fs::create_dir_all(&here).expect("create a scratch directory");
        (here, seen)
    }

    /// A RabbitMQ program (`rabbitmq-server`, `rabbitmqctl`, `rabbitmq-queues`,
    /// `epmd`) run as `rabbitmq` with the variables `vars`, for nodes whose epmd
    /// listens on `epmd_port`.
    fn program(&self, name: &str, epmd_port: Option<u16>, vars: &[(&str, String)]) -> Command {
        match self {
            Release::Machine if name == "rabbitmq-server" => {
                let mut command = Command::new("runuser");
                command
                    .args(["-u", "rabbitmq", "--", SERVER])
                    .current_dir("/var/lib/rabbitmq")
                    .envs(vars.iter().map(|(name, value)| (name, value)));
                command
            }
            // Debian's wrappers switch to the rabbitmq user themselves.
            Release::Machine => {
                let mut command = Command::new(name);
                command.envs(vars.iter().map(|(name, value)| (name, value)));
                command
            }
            Release::Chroot { root, uid, gid, .. } => {
                let path = if name == "epmd" {
                    name.to_owned()
                } else {
                    format!("/usr/lib/rabbitmq/bin/{name}")
                };
                // chroot execs the program itself (no fork in between), so a
                // child's PID is the program's; env -i keeps this machine's
                // RABBITMQ_* and ERL_* out.
                let mut command = Command::new("chroot");
                command
                    .arg(format!("--userspec={uid}:{gid}"))
                    .arg(root)
                    .args([
                        "env",
                        "-i",
                        "HOME=/var/lib/rabbitmq",
                        "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                        "LANG=C.UTF-8",
                    ]);
                if let Some(port) = epmd_port {
                    command.arg(format!("ERL_EPMD_PORT={port}"));
                }
                command.args(vars.iter().map(|(name, value)| format!("{name}={value}")));
                command.arg(path);
                command
            }
        }
    }

    /// The owner the node's files need, for `chown`.
    fn owner(&self) -> String {
        match self {
            Release::Machine => "rabbitmq:rabbitmq".into(),
            Release::Chroot { uid, gid, .. } => format!("{uid}:{gid}"),
        }
    }
}

/// One node of a test's own.
pub struct Node {
    /// `NAME@localhost`, for `rabbitmqctl -n`.
    pub name: String,
    pub port: u16,
    dist_port: u16,
    release: Release,
    epmd_port: Option<u16>,
    /// The node's directory here, and as the node sees it.
    dir: PathBuf,
    inside: PathBuf,
}

impl Node {
    fn create(
        release: &Release,
        epmd_port: Option<u16>,
        name: String,
        extra_config: &str,
        plugins: &[&str],
    ) -> Node {
        let (dir, inside) = release.scratch_dir("qtyw-rmq");
        let port = free_port();
        std::fs::write(
            dir.join("enabled_plugins"),
            format!("[{}].\n", plugins.join(",")),
        )
        .expect("write enabled_plugins");
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!(
                "listeners.tcp.local = 127.0.0.1:{port}\nloopback_users = none\n{extra_config}"
            ),
        )
        .expect("write rabbitmq.conf");
        run(Command::new("chown")
            .args(["-R", &release.owner()])
            .arg(&dir));
        watchdog::guard(&format!(
            "pid=$(cat {pidfile} 2>/dev/null) && kill -9 $pid 2>/dev/null; rm -rf {dir}",
            pidfile = dir.join("pid").display(),
            dir = dir.display()
        ));
        Node {
            name,
            port,
            dist_port: free_port(),
            release: release.clone(),
            epmd_port,
            dir,
            inside,
        }
    }

    fn launch(&self) {
        let dir = |name: &str| self.inside.join(name).display().to_string();
        let vars = [
            ("RABBITMQ_NODENAME", self.name.clone()),
            ("RABBITMQ_NODE_PORT", self.port.to_string()),
            ("RABBITMQ_DIST_PORT", self.dist_port.to_string()),
            ("RABBITMQ_MNESIA_BASE", dir("mnesia")),
            ("RABBITMQ_LOG_BASE", dir("log")),
            ("RABBITMQ_PID_FILE", dir("pid")),
            ("RABBITMQ_ENABLED_PLUGINS_FILE", dir("enabled_plugins")),
            ("RABBITMQ_CONFIG_FILE", dir("rabbitmq.conf")),
        ];
        run(self
            .release
            .program("rabbitmq-server", self.epmd_port, &vars)
            .arg("-detached"));
    }

    fn wait_started(&self) {
        if let Err(failure) = self.started() {
            panic!("{failure}");
        }
    }

    /// Waits until the node runs; why not, when it does not.
    fn started(&self) -> Result<(), String> {
        let mut command = self.ctl();
        command
            .arg("wait")
            .arg(self.inside.join("pid"))
            .args(["--timeout", "120"]);
        let output = command
            .output()
            .map_err(|error| format!("cannot run {command:?}: {error}"))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{command:?} failed ({}):\n{}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    }

    /// `rabbitmqctl -q -n NODE`.
    pub fn ctl(&self) -> Command {
        self.tool("rabbitmqctl")
    }

    /// Another RabbitMQ command (`rabbitmq-queues`, `rabbitmq-diagnostics`) with
    /// `-q -n NODE`.
    pub fn tool(&self, name: &str) -> Command {
        let mut command = self.release.program(name, self.epmd_port, &[]);
        command.args(["-q", "-n", &self.name]);
        command
    }

    /// `amqp://guest:guest@127.0.0.1:PORT/%2f`.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The release this node runs.
    pub fn release(&self) -> &Release {
        &self.release
    }

    /// Stops the RabbitMQ application (the node leaves service; its Erlang VM
    /// and cluster membership stay).
    pub fn stop_app(&self) {
        run(self.ctl().arg("stop_app"));
    }

    pub fn start_app(&self) {
        run(self.ctl().arg("start_app"));
        run(self.ctl().args(["await_startup", "--timeout", "120"]));
    }

    /// Stops the whole node and starts it again, as a restart of the service does.
    pub fn restart(&self) {
        run(self.ctl().arg("stop"));
        self.launch();
        self.wait_started();
    }

    /// Closes every client connection of this node.
    pub fn close_all_connections(&self, reason: &str) {
        run(self.ctl().args(["close_all_connections", reason]));
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.ctl().arg("stop").output().ok();
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("pid")) {
            Command::new("kill").args(["-9", pid.trim()]).output().ok();
        }
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

/// One node, or several clustered.
pub struct Cluster {
    pub nodes: Vec<Node>,
    /// The cluster's own epmd (chroot releases), stopped after the nodes.
    epmd: Option<Child>,
}

impl Cluster {
    /// Starts `size` nodes of the release `QTY_TEST_RABBITMQ` names, and joins
    /// every one after the first to the first.
    pub fn start(size: usize) -> Cluster {
        Cluster::start_with(size, "")
    }

    /// The same, with `extra_config` (rabbitmq.conf lines) added to each node's
    /// configuration: a TLS listener, say.
    pub fn start_with(size: usize, extra_config: &str) -> Cluster {
        Cluster::start_full(&Release::from_env(), size, extra_config, &[])
    }

    /// `size` nodes with `plugins` enabled on each (from the node's own
    /// `enabled_plugins` file): `rabbitmq_consistent_hash_exchange`, say.
    pub fn start_with_plugins(size: usize, plugins: &[&str]) -> Cluster {
        Cluster::start_full(&Release::from_env(), size, "", plugins)
    }

    /// `size` nodes of `release`, with `extra_config` and `plugins` on each.
    /// A node that does not come up is tried again (twice) on other ports: a
    /// free port can be taken by a parallel test before the node binds it.
    pub fn start_full(
        release: &Release,
        size: usize,
        extra_config: &str,
        plugins: &[&str],
    ) -> Cluster {
        assert!(size >= 1);
        let mut attempt = 1;
        loop {
            match Cluster::try_start(release, size, extra_config, plugins) {
                Ok(cluster) => return cluster,
                Err(failure) if attempt < 3 => {
                    eprintln!(
                        "a RabbitMQ node did not start (attempt {attempt}), trying again on other ports: {failure}"
                    );
                    attempt += 1;
                }
                Err(failure) => panic!("RabbitMQ did not start in 3 attempts: {failure}"),
            }
        }
    }

    fn try_start(
        release: &Release,
        size: usize,
        extra_config: &str,
        plugins: &[&str],
    ) -> Result<Cluster, String> {
        let id = suffix();
        let epmd = match release {
            Release::Machine => None,
            Release::Chroot { .. } => {
                let port = free_port();
                let child = release
                    .program("epmd", None, &[])
                    .args(["-port", &port.to_string()])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("start the cluster's epmd");
                watchdog::guard(&format!("sleep 2; kill -9 {} 2>/dev/null", child.id()));
                Some((port, child))
            }
        };
        let epmd_port = epmd.as_ref().map(|(port, _)| *port);
        let nodes: Vec<Node> = (0..size)
            .map(|n| {
                Node::create(
                    release,
                    epmd_port,
                    format!("qtyw{id}n{n}@localhost"),
                    extra_config,
                    plugins,
                )
            })
            .collect();
        let cluster = Cluster {
            nodes,
            epmd: epmd.map(|(_, child)| child),
        };
        // Launching is quick; waiting is what takes time, so launch all first.
        for node in &cluster.nodes {
            node.launch();
        }
        for node in &cluster.nodes {
            // Dropping `cluster` on the way out removes what did start.
            node.started()?;
        }
        for node in &cluster.nodes[1..] {
            run(node.ctl().arg("stop_app"));
            run(node.ctl().args(["join_cluster", &cluster.nodes[0].name]));
            node.start_app();
        }
        Ok(cluster)
    }

    /// Every node's URL, comma-separated, as `AMQP_URL` takes them.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(Node::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Node `index`.
    pub fn node(&self, index: usize) -> &Node {
        &self.nodes[index]
    }

    /// The release the nodes run.
    pub fn release(&self) -> &Release {
        self.nodes[0].release()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // The nodes first (each stops on its own drop), then their epmd.
        self.nodes.clear();
        if let Some(mut epmd) = self.epmd.take() {
            epmd.kill().ok();
            epmd.wait().ok();
        }
    }
}
