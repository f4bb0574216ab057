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
            let ready = s.database == DatabaseState::Writable
                && s.broker == BrokerState::Consuming
                && s.topology_missing.is_none()
                && s.blocked.is_empty();
            (ready, body)
        })
    }
}
