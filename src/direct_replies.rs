//! Replies to RabbitMQ's direct reply-to (`reply_to` = `amq.rabbitmq.reply-to.…`)
//! go out on a connection of their own.
//!
//! A direct reply-to name is only good while the requester's channel lives. A
//! client that gave up before its reply came (a timeout, a crash) leaves a stale
//! name, and RabbitMQ 3.10 answers a publish to it by closing the whole
//! connection with INTERNAL_ERROR. On the consuming connection that would take
//! every in-flight delivery with it, again at each redelivery, until the queue's
//! delivery limit dead-lettered the request: one gone client stalling everyone.
//! Here the broker closes only this connection. The reply is tried once more on
//! a fresh one (so replies that merely shared the closed connection get
//! through), and when that is closed too, it is given up like an unroutable
//! reply: counted, logged, and the request acked (its outcome is recorded).

use crate::broker::Addresses;
use crate::broker::blocked::{self, Watch};
use crate::health::Health;
use crate::metrics::Metrics;
use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection};
use std::sync::Arc;
use tokio::sync::Mutex;

/// The `reply_to` prefix of RabbitMQ's direct reply-to names.
pub const PREFIX: &str = "amq.rabbitmq.reply-to.";

/// Whether a reply to `reply_to` goes out on the direct-reply connection.
pub fn is_direct(reply_to: Option<&str>) -> bool {
    reply_to.is_some_and(|to| to.starts_with(PREFIX))
}

/// The direct-reply connection, opened when first needed and again after the
/// broker closed it.
pub struct DirectReplies {
    addresses: Arc<Addresses>,
    /// Where a blocked direct-reply connection is shown.
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    open: Mutex<Option<(Connection, Channel, Watch)>>,
}

impl DirectReplies {
    pub fn new(
        addresses: Arc<Addresses>,
        health: Arc<Health>,
        metrics: Arc<Metrics>,
    ) -> DirectReplies {
        DirectReplies {
            addresses,
            health,
            metrics,
            open: Mutex::new(None),
        }
    }

    /// A confirm-mode channel on a live direct-reply connection.
    pub async fn channel(&self) -> lapin::Result<Channel> {
        let mut open = self.open.lock().await;
        if let Some((_, channel, _)) = &*open
            && channel.status().connected()
        {
            return Ok(channel.clone());
        }
        let (connection, _) = self
            .addresses
            .connect("qty-worker direct replies")
            .await
            .map_err(|unreachable| {
                lapin::Error::from(std::io::Error::other(unreachable.to_string()))
            })?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let watch = blocked::watch(
            &connection,
            "direct replies",
            self.health.clone(),
            self.metrics.clone(),
        );
        *open = Some((connection, channel.clone(), watch));
        Ok(channel)
    }

    /// Closes the connection, if open (the session is ending).
    pub async fn close(&self) {
        if let Some((connection, _, _)) = self.open.lock().await.take() {
            connection.close(200, "worker stopping".into()).await.ok();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_direct_reply_to_names_are_direct() {
        assert!(is_direct(Some("amq.rabbitmq.reply-to.g1h2AA5.xOB")));
        assert!(!is_direct(Some("amq.rabbitmq.reply-to")));
        assert!(!is_direct(Some("client.replies")));
        assert!(!is_direct(None));
    }
}
