//! What `/readyz` reports (contract §7): ready only while the database accepts
//! writes, the consumer is running and the topology exists; otherwise a line
//! naming each thing that is not.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// The database as last seen by a transaction or a probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseState {
    /// Not reached yet since start (or not yet migrated).
    Starting,
    Writable,
    ReadOnly,
    Down,
    /// Reachable but not usable as configured, until a migration or a grant
    /// fixes it: `schema needs migrations 4`, `permission denied: …`.
    Misconfigured(String),
}

/// The broker session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerState {
    /// Connecting, or waiting for the database before consuming.
    Starting,
    Consuming,
    Down,
    /// A declare was refused because what exists has other arguments.
    ConfigurationConflict(String),
}

#[derive(Debug)]
struct State {
    database: DatabaseState,
    /// Whether start-up found the schema ready; `/readyz` probes only after.
    prepared: bool,
    broker: BrokerState,
    /// Set while something the worker declares was found missing, until it is
    /// declared again.
    topology_missing: Option<String>,
    /// The broker's reason, by connection, while it blocks that connection's
    /// publishes (`connection.blocked`).
    blocked: BTreeMap<&'static str, String>,
    /// Unpartitioned: the most consumers last seen on the request queue, once
    /// there were others besides this worker (order across them needs
    /// `QTY_PARTITIONS`).
    competing: Option<u32>,
    /// Partitioned: the partitions this worker consumes now.
    partitions: Option<Vec<u16>>,
}

#[derive(Debug)]
pub struct Health(Mutex<State>);

impl Default for Health {
    fn default() -> Self {
        Health(Mutex::new(State {
            database: DatabaseState::Starting,
            prepared: false,
            broker: BrokerState::Starting,
            topology_missing: None,
            blocked: BTreeMap::new(),
            competing: None,
            partitions: None,
        }))
    }
}

impl Health {
    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut state = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut state)
    }

    pub fn set_database(&self, state: DatabaseState) {
        self.with(|s| s.database = state);
    }

    pub fn database(&self) -> DatabaseState {
        self.with(|s| s.database.clone())
    }

    /// Start-up found the schema ready and the database writable.
    pub fn set_prepared(&self) {
        self.with(|s| {
            s.prepared = true;
            s.database = DatabaseState::Writable;
        });
    }

    pub fn prepared(&self) -> bool {
        self.with(|s| s.prepared)
    }

    pub fn set_broker(&self, state: BrokerState) {
        self.with(|s| s.broker = state);
    }

    pub fn set_topology_missing(&self, what: Option<String>) {
        self.with(|s| s.topology_missing = what);
    }

    /// Records whether the broker blocks connection `name` (with its reason), and
    /// returns what was recorded before.
    pub fn set_blocked(&self, name: &'static str, reason: Option<String>) -> Option<String> {
        self.with(|s| match reason {
            Some(reason) => s.blocked.insert(name, reason),
            None => s.blocked.remove(name),
        })
    }

    /// Whether the broker blocks any of the worker's connections now.
    pub fn broker_blocked(&self) -> bool {
        self.with(|s| !s.blocked.is_empty())
    }

    /// Records that the unpartitioned request queue has `consumers` consumers,
    /// this worker's included. The first time, says once at warn that per-item
    /// order across competing workers needs partitions.
    pub fn set_competing_consumers(&self, consumers: u32) {
        let first = self.with(|s| s.competing.replace(consumers).is_none());
        if first {
            tracing::warn!(
                consumers,
                "other workers consume this request queue: they do not keep per-item order across each other; run the fleet with QTY_PARTITIONS"
            );
        }
    }

    /// Partitioned: the partitions consumed now (for `/readyz`).
    pub fn set_partitions(&self, owned: Vec<u16>) {
        self.with(|s| s.partitions = Some(owned));
    }

    /// Whether the worker is ready, and the body `/readyz` answers with.
    pub fn report(&self) -> (bool, String) {
        self.with(|s| {
            let database = match &s.database {
                DatabaseState::Starting => "starting",
                DatabaseState::Writable => "up",
                DatabaseState::ReadOnly => "read-only",
                DatabaseState::Down => "down",
                DatabaseState::Misconfigured(what) => what,
            };
            let mut reasons: Vec<&str> = s.blocked.values().map(String::as_str).collect();
            reasons.dedup();
            let broker = match &s.broker {
                // A blocked connection is up: say why nothing is replied.
                _ if !reasons.is_empty() => format!("blocked: {}", reasons.join("; ")),
                BrokerState::Starting => "starting".to_owned(),
                BrokerState::Consuming => "consuming".to_owned(),
                BrokerState::Down => "down".to_owned(),
                BrokerState::ConfigurationConflict(what) => {
                    format!("configuration conflict: {what}")
                }
            };
            let mut body = format!("database: {database}\nbroker: {broker}\n");
            if let Some(what) = &s.topology_missing {
                body.push_str(&format!("topology: missing {what}, declaring it again\n"));
            }
            if let Some(consumers) = s.competing {
                body.push_str(&format!(
                    "order: {consumers} consumers on one unpartitioned queue keep no per-item order across each other (QTY_PARTITIONS)\n"
                ));
            }
            if let Some(owned) = &s.partitions {
                let listed: Vec<String> = owned.iter().map(u16::to_string).collect();
                match listed.is_empty() {
                    true => body.push_str("partitions: none (standby)\n"),
                    false => body.push_str(&format!("partitions: {}\n", listed.join(","))),
                }
            }
            let ready = s.database == DatabaseState::Writable
                && s.broker == BrokerState::Consuming
                && s.topology_missing.is_none()
                && s.blocked.is_empty();
            (ready, body)
        })
    }
}
