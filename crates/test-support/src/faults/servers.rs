//! The servers a scenario runs on. By default the shared ones at the default
//! addresses, which a scenario only uses: it never stops, restarts, reconfigures
//! or disconnects them. A scenario that needs to do any of that asks for servers
//! of its own (`Own`), which the test-support crate starts in temporary
//! directories on free ports and removes when the scenario ends, failed or not.

use crate::postgres::Postgres;
use crate::rabbitmq::Cluster;
use std::net::SocketAddr;

/// Which servers a scenario starts for itself.
#[derive(Clone, Copy, Debug, Default)]
pub struct Own {
    /// A PostgreSQL of its own.
    pub postgres: bool,
    /// With a synchronous streaming standby, to fail over to.
    pub standby: bool,
    /// RabbitMQ nodes of its own (clustered when more than one); 0 uses the shared one.
    pub rabbitmq_nodes: usize,
    /// With the consistent-hash exchange plugin, which partitioned workers need.
    pub hash_exchange: bool,
}

impl Own {
    pub fn postgres() -> Own {
        Own {
            postgres: true,
            ..Own::default()
        }
    }

    pub fn postgres_pair() -> Own {
        Own {
            postgres: true,
            standby: true,
            ..Own::default()
        }
    }

    pub fn rabbitmq(nodes: usize) -> Own {
        Own {
            rabbitmq_nodes: nodes,
            ..Own::default()
        }
    }

    /// RabbitMQ nodes of its own with the consistent-hash exchange plugin.
    pub fn partitioned(nodes: usize) -> Own {
        Own {
            rabbitmq_nodes: nodes,
            hash_exchange: true,
            ..Own::default()
        }
    }

    fn any(&self) -> bool {
        self.postgres || self.rabbitmq_nodes > 0
    }
}

/// The servers of one scenario.
pub struct Servers {
    pub primary: Option<Postgres>,
    pub standby: Option<Postgres>,
    pub rabbitmq: Option<Cluster>,
}

impl Servers {
    /// Starts what `own` asks for; `None` (after printing why) when this machine
    /// lacks the server binaries, so the calling test can return early.
    pub fn start(own: Own) -> Option<Servers> {
        if own.any() && !crate::servers_available() {
            println!("skipped: no PostgreSQL/RabbitMQ binaries");
            return None;
        }
        let primary = own.postgres.then(Postgres::start);
        let standby = match (&primary, own.standby) {
            (Some(primary), true) => Some(Postgres::start_standby_of(primary)),
            _ => None,
        };
        let plugins: &[&str] = if own.hash_exchange {
            &["rabbitmq_consistent_hash_exchange"]
        } else {
            &[]
        };
        let rabbitmq = (own.rabbitmq_nodes > 0)
            .then(|| Cluster::start_with_plugins(own.rabbitmq_nodes, plugins));
        Some(Servers {
            primary,
            standby,
            rabbitmq,
        })
    }

    pub fn own_any(&self) -> bool {
        self.primary.is_some() || self.rabbitmq.is_some()
    }

    /// Where PostgreSQL (the primary) listens.
    pub fn postgres_addr(&self) -> SocketAddr {
        self.primary.as_ref().map_or_else(
            || "127.0.0.1:5432".parse().expect("address"),
            Postgres::addr,
        )
    }

    /// `postgres://postgres@HOST:PORT` of the primary.
    pub fn postgres_base(&self) -> String {
        format!("postgres://postgres@{}", self.postgres_addr())
    }

    /// Where the first RabbitMQ node listens: the scenario's own, or the
    /// shared broker (on 5672, or a node of the release under test).
    pub fn rabbitmq_addr(&self) -> SocketAddr {
        self.rabbitmq.as_ref().map_or_else(
            || {
                let url: lapin::uri::AMQPUri = crate::app::amqp_url()
                    .parse()
                    .expect("the shared broker's URL");
                SocketAddr::from(([127, 0, 0, 1], url.authority.port))
            },
            |cluster| cluster.node(0).addr(),
        )
    }

    /// Every RabbitMQ node's URL, comma-separated.
    pub fn amqp_urls(&self) -> String {
        self.rabbitmq
            .as_ref()
            .map_or_else(|| crate::app::amqp_url().to_owned(), Cluster::urls)
    }
}
