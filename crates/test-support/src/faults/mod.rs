//! The fault harness, shared by the fault suite (`tests/faults`) and the long-run
//! chaos example: real worker processes behind TCP proxies, a publisher that
//! keeps publishing through faults, servers of a scenario's own, and the
//! invariant check run after each run.

pub mod harness;
pub mod invariants;
pub mod publisher;
pub mod servers;

pub use harness::{Scenario, WorkerProcess};
pub use invariants::Verdicts;
pub use publisher::Sent;
pub use servers::{Own, Servers};
