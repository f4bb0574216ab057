//! Publishing so that a confirm belongs to the message it settles.
//!
//! The broker numbers a channel's publishes in the order their frames arrive,
//! and its confirms carry those numbers. lapin numbers a publish when it is
//! called, then queues the publish's frames: two steps. Replies are published
//! from tasks on every runtime thread, on one channel. Two threads that
//! interleave between the steps swap numbers, and each confirm then settles the
//! other's future: a reply the broker refused looks routed (its request is acked
//! as if the reply had gone out), and a routed one looks refused (it is
//! published again, and its client gets it twice).

use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, PublisherConfirm};
use std::future::Future;
use std::sync::{Mutex, PoisonError};
use std::task::Poll;

/// Held while lapin numbers a publish and queues its frames. One for the whole
/// process: the critical section is a few microseconds, and a lock per channel
/// would have to follow channels as sessions replace them.
static NUMBERING: Mutex<()> = Mutex::new(());

/// `channel.basic_publish(…)`, with the number lapin gives the publish equal to
/// the one the broker gives it, whichever threads publish on `channel`.
pub async fn publish(
    channel: &Channel,
    exchange: ShortString,
    routing_key: ShortString,
    options: BasicPublishOptions,
    payload: &[u8],
    properties: BasicProperties,
) -> lapin::Result<PublisherConfirm> {
    let mut publish =
        std::pin::pin!(channel.basic_publish(exchange, routing_key, options, payload, properties));
    // lapin takes the number and queues the frames in the first poll of
    // `basic_publish` (it awaits only afterwards, for the frames to be written),
    // so that poll alone is made under the lock, and the lock is never held
    // across an await.
    let first = std::future::poll_fn(|cx| {
        let _numbering = NUMBERING.lock().unwrap_or_else(PoisonError::into_inner);
        Poll::Ready(publish.as_mut().poll(cx))
    })
    .await;
    match first {
        Poll::Ready(published) => published,
        Poll::Pending => publish.await,
    }
}
