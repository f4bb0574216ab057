//! Stage 5 of the flow: settle deliveries on the channel that delivered them.
//!
//! A delivery is acked only after its reply is confirmed. One that failed for a
//! reason other than its content (a panic, an error that retrying will not
//! cure) is given back with `basic.reject` and requeue: a quorum queue counts
//! that toward `x-delivery-limit` on every supported RabbitMQ, after which it
//! dead-letters the delivery, so a poison message cannot block the queue for
//! ever. A delivery that was never processed (a drain, a hand-over) is given back
//! with `basic.nack` and requeue instead: RabbitMQ 4.3 and later do not count a
//! nack as a failed delivery (3.10 and 4.0 count every return, whatever it is).
//! A nack would not do for the failures: on 4.3 a poison message would then come
//! back for ever.
//!
//! Acks are coalesced. Once every delivery up to tag N has been replied to, one
//! `basic.ack(N, multiple)` settles them all: on a quorum queue each ack is a
//! replicated log entry, so one per batch instead of one per delivery saves the
//! broker a third of its work. A delivery replied to while an earlier one is still
//! being worked on waits for it, but only `hold` of them wait at once; beyond that
//! each is acked on its own, so one slow request never holds up the prefetch
//! window.
//!
//! The broker refuses (and closes the channel for) an ack of a tag it no longer
//! holds, so every ack and nack goes out through one ordered queue, in the order
//! decided under the lock: a single ack or a nack always precedes the multiple ack
//! that covers its tag.

use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The settlement state of one channel's deliveries. Cheap to clone.
#[derive(Clone)]
pub struct Acks {
    state: Arc<Mutex<State>>,
    settle: mpsc::UnboundedSender<Settle>,
}

/// Sends what `Acks` decided; awaiting it makes sure nothing decided is left unsent.
pub struct Sender(JoinHandle<()>);

struct State {
    /// Every delivery not yet settled, in tag order (the order they arrived).
    unsettled: VecDeque<(u64, Entry)>,
    /// Entries that are `Replied`.
    replied: usize,
    hold: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    /// Still being worked on.
    Working,
    /// Replied to; its ack waits for the deliveries before it.
    Replied,
    /// Acked or nacked on its own; the broker no longer holds it.
    Settled,
}

/// One frame to send, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settle {
    /// `basic.ack` with `multiple`: everything the broker still holds up to the tag.
    UpTo(u64),
    One(u64),
    /// `basic.reject` with requeue: it failed, and counts toward the delivery limit.
    Failed(u64),
    /// `basic.nack` with requeue: never processed, given back (uncounted on 4.3+).
    HandBack(u64),
}

impl Acks {
    /// Starts settling on `channel`. At most `hold` replied deliveries wait behind
    /// an unfinished one. If the channel refuses a frame, `lost` is cancelled: its
    /// deliveries can no longer be settled and will come again.
    pub fn start(channel: Channel, hold: usize, lost: CancellationToken) -> (Acks, Sender) {
        let (settle, queue) = mpsc::unbounded_channel();
        let acks = Acks {
            state: Arc::new(Mutex::new(State {
                unsettled: VecDeque::new(),
                replied: 0,
                hold: hold.max(1),
            })),
            settle,
        };
        (acks, Sender(tokio::spawn(send(channel, queue, lost))))
    }

    /// Registers a delivery as it arrives. Deliveries must be registered in the
    /// order the channel delivered them.
    pub fn received(&self, tag: u64) {
        let mut state = self.lock();
        debug_assert!(state.unsettled.back().is_none_or(|&(last, _)| last < tag));
        state.unsettled.push_back((tag, Entry::Working));
    }

    /// The delivery's reply is confirmed: ack it, with those before it when they
    /// are all done.
    pub fn replied(&self, tag: u64) {
        self.lock().replied(tag, &self.settle);
    }

    /// Gives a delivery that failed back to the queue, as a failure (it counts
    /// toward the delivery limit).
    pub fn failed(&self, tag: u64) {
        self.lock().failed(tag, &self.settle);
    }

    /// Hands back every delivery still being worked on (a drain that ran out of
    /// time), one nack each, in the order they were delivered, so that the
    /// queue puts them back in that order. A nack rather than the close: the
    /// current RabbitMQ release does not charge a nack to the delivery limit.
    pub fn hand_back_unfinished(&self) -> usize {
        self.lock().hand_back_unfinished(&self.settle)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is consistent after every statement, so a panic elsewhere
        // while it was held leaves nothing half-done.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    fn replied(&mut self, tag: u64, queue: &mpsc::UnboundedSender<Settle>) {
        let Some(at) = self.working(tag) else {
            return;
        };
        if at == 0 {
            self.unsettled[at].1 = Entry::Replied;
            self.replied += 1;
            self.settle_front(queue);
        } else if self.replied < self.hold {
            self.unsettled[at].1 = Entry::Replied;
            self.replied += 1;
        } else {
            self.unsettled[at].1 = Entry::Settled;
            queue.send(Settle::One(tag)).ok();
        }
    }

    fn failed(&mut self, tag: u64, queue: &mpsc::UnboundedSender<Settle>) {
        if let Some(at) = self.working(tag) {
            self.unsettled[at].1 = Entry::Settled;
            queue.send(Settle::Failed(tag)).ok();
            self.settle_front(queue);
        }
    }

    fn hand_back_unfinished(&mut self, queue: &mpsc::UnboundedSender<Settle>) -> usize {
        let mut handed = 0;
        for (tag, entry) in self.unsettled.iter_mut() {
            if *entry == Entry::Working {
                *entry = Entry::Settled;
                queue.send(Settle::HandBack(*tag)).ok();
                handed += 1;
            }
        }
        self.settle_front(queue);
        handed
    }

    /// Where the delivery is, if it is still being worked on.
    fn working(&self, tag: u64) -> Option<usize> {
        let at = self
            .unsettled
            .binary_search_by_key(&tag, |&(t, _)| t)
            .ok()?;
        (self.unsettled[at].1 == Entry::Working).then_some(at)
    }

    /// Drops the finished deliveries at the front and acks the replied ones among
    /// them with one multiple ack.
    fn settle_front(&mut self, queue: &mpsc::UnboundedSender<Settle>) {
        let mut up_to = None;
        while let Some(&(tag, entry)) = self.unsettled.front() {
            match entry {
                Entry::Working => break,
                Entry::Replied => {
                    self.replied -= 1;
                    up_to = Some(tag);
                }
                Entry::Settled => {}
            }
            self.unsettled.pop_front();
        }
        if let Some(tag) = up_to {
            queue.send(Settle::UpTo(tag)).ok();
        }
    }
}

impl Sender {
    /// Waits until everything decided so far has been handed to the connection.
    /// Call it once every `Acks` clone is dropped.
    pub async fn finish(self) {
        self.0.await.ok();
    }
}

/// Sends the settlements in order. Multiple acks queued back to back are merged
/// into the last one, which covers them all.
async fn send(
    channel: Channel,
    mut queue: mpsc::UnboundedReceiver<Settle>,
    lost: CancellationToken,
) {
    let mut next = None;
    loop {
        let settle = match next.take() {
            Some(settle) => settle,
            None => match queue.recv().await {
                Some(settle) => settle,
                None => return,
            },
        };
        let settle = match settle {
            Settle::UpTo(mut tag) => {
                loop {
                    match queue.try_recv() {
                        Ok(Settle::UpTo(later)) => tag = later,
                        Ok(other) => {
                            next = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                Settle::UpTo(tag)
            }
            other => other,
        };
        if let Err(error) = frame(&channel, settle).await {
            tracing::warn!(%error, "cannot settle deliveries; they will come again");
            lost.cancel();
            return;
        }
    }
}

async fn frame(channel: &Channel, settle: Settle) -> lapin::Result<()> {
    match settle {
        Settle::UpTo(tag) => {
            channel
                .basic_ack(tag, BasicAckOptions { multiple: true })
                .await
        }
        Settle::One(tag) => channel.basic_ack(tag, BasicAckOptions::default()).await,
        Settle::Failed(tag) => {
            channel
                .basic_reject(tag, BasicRejectOptions { requeue: true })
                .await
        }
        Settle::HandBack(tag) => {
            let options = BasicNackOptions {
                multiple: false,
                requeue: true,
            };
            channel.basic_nack(tag, options).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(hold: usize) -> State {
        State {
            unsettled: VecDeque::new(),
            replied: 0,
            hold,
        }
    }

    /// A `State` and what it would send.
    struct Harness {
        state: State,
        sent: mpsc::UnboundedReceiver<Settle>,
        queue: mpsc::UnboundedSender<Settle>,
    }

    impl Harness {
        fn new(hold: usize, tags: impl IntoIterator<Item = u64>) -> Harness {
            let (queue, sent) = mpsc::unbounded_channel();
            let mut state = state(hold);
            state
                .unsettled
                .extend(tags.into_iter().map(|t| (t, Entry::Working)));
            Harness { state, sent, queue }
        }

        fn replied(&mut self, tag: u64) {
            self.state.replied(tag, &self.queue);
        }

        fn failed(&mut self, tag: u64) {
            self.state.failed(tag, &self.queue);
        }

        fn sent(&mut self) -> Vec<Settle> {
            std::iter::from_fn(|| self.sent.try_recv().ok()).collect()
        }
    }

    #[test]
    fn unfinished_deliveries_are_handed_back_in_delivery_order_before_the_ack_of_the_rest() {
        let mut h = Harness::new(10, 1..=5);
        h.replied(2);
        h.replied(4);
        assert_eq!(h.sent(), []);
        let handed = h.state.hand_back_unfinished(&h.queue);
        assert_eq!(handed, 3);
        assert_eq!(
            h.sent(),
            [
                Settle::HandBack(1),
                Settle::HandBack(3),
                Settle::HandBack(5),
                Settle::UpTo(4)
            ]
        );
        assert!(h.state.unsettled.is_empty());
        // A handler that finishes afterwards settles nothing twice.
        h.replied(3);
        assert_eq!(h.sent(), []);
    }

    #[test]
    fn in_order_replies_are_acked_as_they_come() {
        let mut h = Harness::new(10, 1..=3);
        h.replied(1);
        h.replied(2);
        h.replied(3);
        assert_eq!(
            h.sent(),
            [Settle::UpTo(1), Settle::UpTo(2), Settle::UpTo(3)]
        );
    }

    #[test]
    fn replies_behind_an_unfinished_delivery_wait_then_go_in_one_ack() {
        let mut h = Harness::new(10, 1..=4);
        h.replied(4);
        h.replied(2);
        h.replied(3);
        assert_eq!(h.sent(), []);
        h.replied(1);
        assert_eq!(h.sent(), [Settle::UpTo(4)]);
        assert!(h.state.unsettled.is_empty());
        assert_eq!(h.state.replied, 0);
    }

    #[test]
    fn no_more_than_hold_wait_behind_a_slow_delivery() {
        let mut h = Harness::new(2, 1..=5);
        h.replied(2);
        h.replied(3);
        assert_eq!(h.sent(), []);
        h.replied(4);
        h.replied(5);
        assert_eq!(h.sent(), [Settle::One(4), Settle::One(5)]);
        // The multiple ack ends at the last tag the broker still holds.
        h.replied(1);
        assert_eq!(h.sent(), [Settle::UpTo(3)]);
        assert!(h.state.unsettled.is_empty());
    }

    #[test]
    fn a_failure_goes_out_before_the_ack_that_passes_over_it() {
        let mut h = Harness::new(10, 1..=3);
        h.replied(2);
        h.replied(3);
        h.failed(1);
        assert_eq!(h.sent(), [Settle::Failed(1), Settle::UpTo(3)]);
    }

    #[test]
    fn a_failure_in_the_middle_is_passed_over() {
        let mut h = Harness::new(10, 1..=3);
        h.failed(2);
        h.replied(3);
        h.replied(1);
        assert_eq!(h.sent(), [Settle::Failed(2), Settle::UpTo(3)]);
    }

    #[test]
    fn a_tag_is_settled_once() {
        let mut h = Harness::new(10, 1..=2);
        h.replied(2);
        h.replied(2);
        h.failed(2);
        h.replied(7);
        assert_eq!(h.sent(), []);
        h.replied(1);
        assert_eq!(h.sent(), [Settle::UpTo(2)]);
    }
}
