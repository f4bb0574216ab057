//! Throwaway RabbitMQ nodes, alone or clustered. Each node has its own name,
//! ports, data and log directories, its own plugin list (empty unless asked:
//! never the system node's) and a config file that keeps it off the system
//! node's port. Nodes run as `rabbitmq` (sharing that
//! user's Erlang cookie, which clustering needs) and are stopped and removed on
//! drop.

use crate::{free_port, run, suffix, watchdog};
use std::path::PathBuf;
use std::process::Command;

/// The server script that runs a node in the calling user's environment.
pub const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";

/// One node of a test's own.
pub struct Node {
    /// `NAME@localhost`, for `rabbitmqctl -n`.
    pub name: String,
    pub port: u16,
    dist_port: u16,
    dir: PathBuf,
}

impl Node {
    fn create(name: String, extra_config: &str, plugins: &[&str]) -> Node {
        let dir = std::env::temp_dir().join(format!("qtyw-rmq-{}", suffix()));
        std::fs::create_dir_all(&dir).expect("create the node's directory");
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
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(&dir));
        watchdog::guard(&format!(
            "rabbitmqctl -q -n {name} stop >/dev/null 2>&1; \
             pid=$(cat {pidfile} 2>/dev/null) && kill -9 $pid 2>/dev/null; rm -rf {dir}",
            pidfile = dir.join("pid").display(),
            dir = dir.display()
        ));
        Node {
            name,
            port,
            dist_port: free_port(),
            dir,
        }
    }

    fn launch(&self) {
        let dir = &self.dir;
        run(Command::new("runuser")
            .args(["-u", "rabbitmq", "--", SERVER, "-detached"])
            .current_dir("/var/lib/rabbitmq")
            .env("RABBITMQ_NODENAME", &self.name)
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_PID_FILE", dir.join("pid"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf")));
    }

    fn wait_started(&self) {
        let pidfile = self.dir.join("pid");
        run(self
            .ctl()
            .arg("wait")
            .arg(&pidfile)
            .args(["--timeout", "120"]));
    }

    /// `rabbitmqctl -q -n NODE`.
    pub fn ctl(&self) -> Command {
        let mut command = Command::new("rabbitmqctl");
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
}

impl Cluster {
    /// Starts `size` nodes and joins every one after the first to the first.
    pub fn start(size: usize) -> Cluster {
        Cluster::start_with(size, "")
    }

    /// The same, with `extra_config` (rabbitmq.conf lines) added to each node's
    /// configuration: a TLS listener, say.
    pub fn start_with(size: usize, extra_config: &str) -> Cluster {
        Cluster::start_full(size, extra_config, &[])
    }

    /// `size` nodes with `plugins` enabled on each (from the node's own
    /// `enabled_plugins` file): `rabbitmq_consistent_hash_exchange`, say.
    pub fn start_with_plugins(size: usize, plugins: &[&str]) -> Cluster {
        Cluster::start_full(size, "", plugins)
    }

    fn start_full(size: usize, extra_config: &str, plugins: &[&str]) -> Cluster {
        assert!(size >= 1);
        let id = suffix();
        let nodes: Vec<Node> = (0..size)
            .map(|n| Node::create(format!("qtyw{id}n{n}@localhost"), extra_config, plugins))
            .collect();
        // Launching is quick; waiting is what takes time, so launch all first.
        for node in &nodes {
            node.launch();
        }
        for node in &nodes {
            node.wait_started();
        }
        for node in &nodes[1..] {
            run(node.ctl().arg("stop_app"));
            run(node.ctl().args(["join_cluster", &nodes[0].name]));
            node.start_app();
        }
        Cluster { nodes }
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
}
