//! What qty-worker's tests and its chaos example share, as a crate of its own:
//!
//! - [`app`]: a worker per test with its own database, exchange and queue (built
//!   from `names`, `in_process`, `amqp`, `reply` and `http`, one job each);
//! - [`faults`]: the fault harness (worker processes behind proxies, a publisher
//!   that keeps going through faults, the invariant check after each run);
//! - [`eventually`]: wait for a condition with a deadline that names what it waited for;
//! - [`postgres`], [`rabbitmq`] and [`pgbouncer`]: throwaway servers in temporary
//!   directories on free ports, for the tests that stop, fail over, make read-only or
//!   cluster a server (from the `qty-servers` crate, which `scripts/dev` shares). The
//!   servers on the default ports are only ever used, never disturbed;
//! - [`proxy`]: a TCP proxy that cuts, stalls or refuses a link on command.

mod amqp;
pub mod app;
pub mod eventually;
pub mod faults;
mod http;
mod in_process;
mod names;
pub mod proxy;
mod reply;

pub use qty_servers::{
    free_port, on_exit, pgbouncer, postgres, rabbitmq, run, servers_available, suffix,
};

pub use eventually::eventually;

/// How long any single wait in a test may take before it fails with a message.
pub const WAIT: std::time::Duration = std::time::Duration::from_secs(30);
