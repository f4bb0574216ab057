//! A broker that blocks publishers, made visible (contract §7).
//!
//! RabbitMQ blocks a connection that publishes while a memory or disk alarm is
//! raised (`connection.blocked`). The worker cannot publish replies then, so it
//! cannot ack either: without a signal that looks like a silent stall. Each of
//! the worker's connections (the consuming one, and the one for direct reply-to
//! replies) is watched here: while any is blocked, `/readyz` answers 503
//! `broker: blocked: <reason>`, the gauge `qty_worker_broker_blocked` is 1, and
//! the start and the end are each logged once. Nothing is settled differently:
//! deliveries wait unacked, and work resumes when the broker unblocks.

use crate::health::Health;
use crate::metrics::Metrics;
use futures::StreamExt as _;
use lapin::{Connection, Event};
use std::sync::Arc;

/// A connection being watched; dropping it ends the watch.
pub struct Watch(tokio::task::JoinHandle<()>);

impl Drop for Watch {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Watches `connection` (called `name` in logs and `/readyz`) until the returned
/// [`Watch`] is dropped or the connection ends; either way its blocked state is
/// cleared, since a connection that is gone blocks nothing.
pub fn watch(
    connection: &Connection,
    name: &'static str,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
) -> Watch {
    let mut events = connection.events_listener();
    Watch(tokio::spawn(async move {
        let state = Blocked {
            name,
            health,
            metrics,
        };
        while let Some(event) = events.next().await {
            match event {
                Event::ConnectionBlocked(reason) => state.set(Some(reason)),
                Event::ConnectionUnblocked => state.set(None),
                _ => {}
            }
        }
    }))
}

/// One connection's blocked state, cleared when the watch ends (aborted included).
struct Blocked {
    name: &'static str,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
}

impl Blocked {
    fn set(&self, reason: Option<String>) {
        let was = self.health.set_blocked(self.name, reason.clone());
        self.metrics
            .broker_blocked
            .set(i64::from(self.health.broker_blocked()));
        match (was, reason) {
            (None, Some(reason)) => tracing::warn!(
                connection = self.name,
                %reason,
                "broker: blocked: RabbitMQ refuses this connection's publishes (a memory or disk alarm); replies and acks wait until it clears"
            ),
            (Some(_), None) => tracing::info!(
                connection = self.name,
                "broker: unblocked; replies flow again"
            ),
            _ => {}
        }
    }
}

impl Drop for Blocked {
    fn drop(&mut self) {
        if self.health.set_blocked(self.name, None).is_some() {
            self.metrics
                .broker_blocked
                .set(i64::from(self.health.broker_blocked()));
        }
    }
}
