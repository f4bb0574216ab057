//! What the unpartitioned and the partitioned loop share about opening a broker
//! session: why it failed, how that is reported, the broker's version shown,
//! and the reply channel.

use super::{Addresses, DeclareError, HASH_PLUGIN, Unreachable, version};
use crate::health::{BrokerState, Health};
use crate::metrics::Metrics;
use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection};
use std::sync::Arc;
use std::time::Duration;

/// Why a session could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Unreachable(#[from] Unreachable),
    #[error(transparent)]
    Declare(#[from] DeclareError),
    #[error("{0}: {1}")]
    Broker(&'static str, lapin::Error),
}

/// Says in `/readyz` and the log why the session could not be opened; it is
/// tried again in `retry`. A configuration problem (a conflicting declare, the
/// hash exchange's plugin missing) is named as such, not as an outage.
pub fn report(error: &OpenError, health: &Health, retry: Duration) {
    let retry_in_ms = retry.as_millis() as u64;
    match error {
        OpenError::Declare(DeclareError::Conflict(what)) => {
            health.set_broker(BrokerState::ConfigurationConflict(what.clone()));
            tracing::warn!(conflict = %what, retry_in_ms, "broker: configuration conflict: the worker's declare differs from what exists; settle it (delete the queue, or align the settings)");
        }
        OpenError::Declare(DeclareError::PluginMissing) => {
            health.set_broker(BrokerState::ConfigurationConflict(format!(
                "plugin {HASH_PLUGIN} is not enabled"
            )));
            tracing::error!(
                retry_in_ms,
                "broker: QTY_PARTITIONS needs RabbitMQ's consistent-hash exchange: enable it with `rabbitmq-plugins enable {HASH_PLUGIN}` (it ships with RabbitMQ)"
            );
        }
        other => {
            health.set_broker(BrokerState::Down);
            tracing::warn!(error = %other, retry_in_ms, "broker unavailable");
        }
    }
}

/// Reads the version of the broker at address `index` beside the session, and
/// shows it (`version::announce`); a probe that fails leaves the last one shown.
pub fn show_version(addresses: &Arc<Addresses>, index: usize, metrics: &Arc<Metrics>) {
    let (addresses, metrics) = (addresses.clone(), metrics.clone());
    tokio::spawn(async move {
        match addresses.version(index).await {
            Ok(found) => version::announce(&found, addresses.shown(index), &metrics),
            Err(error) => {
                tracing::warn!(%error, node = addresses.shown(index), "cannot read the broker's version")
            }
        }
    });
}

/// A channel in confirm mode for the replies of a session's deliveries.
pub async fn reply_channel(connection: &Connection) -> Result<Channel, OpenError> {
    let replies = connection
        .create_channel()
        .await
        .map_err(|error| OpenError::Broker("cannot open a channel", error))?;
    replies
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|error| OpenError::Broker("cannot turn on publisher confirms", error))?;
    Ok(replies)
}
