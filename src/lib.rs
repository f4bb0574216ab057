//! qty-worker applies `qty.adjust` requests from RabbitMQ to PostgreSQL: exactly
//! one effect per `message_id`, at least one reply, and an ack only after the
//! reply is confirmed. `docs/contract.md` is the contract it keeps.
//!
//! # Layout
//!
//! The message flow is the architecture, one stage a module:
//!
//! - [`worker`]: settings, lanes, the judge of parked requests; then one loop.
//! - [`consume`]: the two loops, side by side: the one request queue
//!   (connect, declare, consume, reconnect, drain on stop), and a fleet's
//!   partition queues (`QTY_PARTITIONS`, with [`ownership`]), each on its own
//!   channel.
//! - [`delivery`]: one delivery through the stages below, in one tracing span.
//! - [`admit`]: who may adjust: the validated `user_id` against `QTY_PUBLISHERS` (pure).
//! - [`decode`]: properties and body to a `Request`, or a named rejection (pure).
//! - [`apply`]: ledger and guarded update in one transaction, transient retries;
//!   a request whose item is locked elsewhere is parked in the database.
//! - [`parked`]: parked requests judged in their order once the lock is gone,
//!   and answered.
//! - [`reply`]: publish the reply and wait for the broker's confirm.
//! - [`ack`]: settle the delivery on the channel that delivered it.
//!
//! Around them: [`outcome`] (the one type behind reply, routing, metrics and logs),
//! [`store`] (all SQL), [`broker`] (connections and topology), [`metrics`],
//! [`health`] and [`http`] (Prometheus, readiness), [`settings`], [`redact`],
//! [`cli`], [`commands`] (operator commands), [`bench`] (the load tool),
//! [`telemetry`] and [`trace`] (W3C trace context on messages).

pub mod ack;
pub mod admit;
pub mod apply;
pub mod backoff;
pub mod bench;
pub mod broker;
pub mod cli;
pub mod commands;
pub mod consume;
pub mod decode;
pub mod delivery;
pub mod direct_replies;
pub mod health;
pub mod http;
pub mod log_budget;
pub mod metrics;
pub mod outcome;
pub mod ownership;
pub mod parked;
pub mod redact;
pub mod reply;
pub mod settings;
pub mod store;
pub mod telemetry;
pub mod trace;
pub mod worker;

pub use worker::{Worker, run};
