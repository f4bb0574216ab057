//! Switching a deployment from one request queue to partitions (contract §1):
//! the requests already waiting in the unpartitioned queue `<queue>` are served
//! before any partition request, so no item's order breaks at the switch.
//!
//! While `<queue>` exists, partitioned workers claim no partition. The first
//! one unbinds it from the exchange (new requests now reach only the
//! partitions, where they wait), and one worker at a time, the holder of the
//! lease [`LEGACY`], consumes it like a partition. Once it is empty the holder
//! hands it over, deletes it (only if still empty) and releases the lease; every
//! worker then sees it gone and starts claiming partitions.

use crate::broker::{REQUEST_ROUTING_KEY, Topology, amqp_code};
use lapin::Connection;
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;

/// The lease that lets one worker drain the unpartitioned queue. Partitions
/// are numbered below 1,024, so this number is never one of them.
pub const LEGACY: u16 = u16::MAX;

/// The unpartitioned queue's ready messages, or `None` once it is gone.
pub async fn ready(connection: &Connection, topology: &Topology) -> lapin::Result<Option<u32>> {
    let channel = connection.create_channel().await?;
    let declared = channel
        .queue_declare(
            topology.queue.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    match declared {
        Ok(queue) => {
            channel.close(200, "checked".into()).await.ok();
            Ok(Some(queue.message_count()))
        }
        // A passive declare of a missing queue closes the channel.
        Err(error) if amqp_code(&error) == Some(404) => Ok(None),
        Err(error) => Err(error),
    }
}

/// Unbinds the unpartitioned queue from the exchange: requests published from
/// now on reach only the partitions.
pub async fn unbind(connection: &Connection, topology: &Topology) -> lapin::Result<()> {
    let channel = connection.create_channel().await?;
    channel
        .queue_unbind(
            topology.queue.as_str().into(),
            topology.exchange.as_str().into(),
            REQUEST_ROUTING_KEY.into(),
            FieldTable::default(),
        )
        .await?;
    channel.close(200, "unbound".into()).await.ok();
    Ok(())
}

/// Deletes the unpartitioned queue if it is empty; whether it is gone.
///
/// Called by the holder of the [`LEGACY`] lease once it has handed the queue
/// over: nobody else consumes it and it is unbound, so nothing it holds can be
/// unacked elsewhere or arrive meanwhile. Quorum queues refuse `if-empty` (with
/// an error that closes the connection), so the count is checked just before.
pub async fn delete_if_empty(connection: &Connection, topology: &Topology) -> lapin::Result<bool> {
    match ready(connection, topology).await? {
        None => return Ok(true),
        Some(0) => {}
        Some(_) => return Ok(false),
    }
    let channel = connection.create_channel().await?;
    channel
        .queue_delete(
            topology.queue.as_str().into(),
            QueueDeleteOptions::default(),
        )
        .await?;
    channel.close(200, "deleted".into()).await.ok();
    Ok(true)
}
