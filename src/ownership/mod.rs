//! Partition ownership (contract §3): which partition queues of a fleet this
//! worker consumes, decided with the other workers through the database they
//! already share, so no new server is needed.
//!
//! - [`plan`]: given the live members and each partition's owner, what to claim
//!   and what to give up (pure).
//! - [`Leases`]: the leases this worker holds, how long each is certainly its
//!   own, and the renewer that keeps them (`renew`).
//! - The database side is `store::fleet` (migration 0006).
//!
//! Why leases can be trusted for order. RabbitMQ's single active consumer is
//! the broker's fence (one consumer of a partition is active at a time), but
//! it keeps order across a hand-over only in two cases: the old consumer's
//! connection dies (its deliveries go back first, then the next consumer is
//! activated), or nobody else is subscribed when the old consumer lets go. A
//! cancel or a graceful close while another consumer waits activates that one
//! while the old deliveries are still out. So: a worker subscribes only to a
//! partition whose lease it holds; it renews the lease on a task of its own, far
//! inside the lease's life; it lets go gracefully only while the lease is
//! certainly still its own; and when it cannot be sure any more (renewals
//! failing, a lease claimed by another), it drops its broker connection without
//! the closing handshake (`broker::Cut`), the ordered path.

pub mod plan;

use crate::store::fleet::Fleet;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How often a worker reads the fleet and acts on its plan.
pub const TICK: Duration = Duration::from_secs(1);
/// A worker that has not ticked for this long is no longer a member.
pub const MEMBER_TTL: Duration = Duration::from_secs(6);
/// How long a claim or a renewal holds a lease: a crashed worker's partitions
/// are claimed by others about this long after its last renewal.
pub const LEASE_TTL: Duration = Duration::from_secs(10);
/// How often held leases are renewed.
pub const RENEW_EVERY: Duration = Duration::from_secs(2);
/// A lease within this of lapsing (by this worker's clock, counted from before
/// the last renewal was sent) is no longer certainly held: graceful hand-overs
/// stop, and the connection is dropped.
pub const MARGIN: Duration = Duration::from_secs(3);

/// One lease this worker holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub epoch: i64,
    /// Until when it is certainly held: the time before the claim or renewal
    /// that set it was sent, plus [`LEASE_TTL`]. The database's expiry is later.
    valid_until: Instant,
}

/// The leases this worker holds, shared by the loop that claims and releases
/// and the task that renews.
#[derive(Debug, Default)]
pub struct Leases(Mutex<BTreeMap<u16, Lease>>);

impl Leases {
    fn with<T>(&self, f: impl FnOnce(&mut BTreeMap<u16, Lease>) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Records a lease claimed at `epoch` by a claim sent at `sent`.
    pub fn claimed(&self, partition: u16, epoch: i64, sent: Instant) {
        let lease = Lease {
            epoch,
            valid_until: sent + LEASE_TTL,
        };
        self.with(|held| held.insert(partition, lease));
    }

    pub fn remove(&self, partition: u16) -> Option<Lease> {
        self.with(|held| held.remove(&partition))
    }

    /// Forgets every lease (the connection was dropped; the database's rows
    /// stay this worker's until claimed again or expired).
    pub fn clear(&self) {
        self.with(BTreeMap::clear);
    }

    pub fn held(&self) -> BTreeSet<u16> {
        self.with(|held| held.keys().copied().collect())
    }

    /// Whether `partition`'s lease is certainly held for at least [`MARGIN`].
    pub fn sure(&self, partition: u16, now: Instant) -> bool {
        self.with(|held| {
            held.get(&partition)
                .is_some_and(|lease| lease.valid_until > now + MARGIN)
        })
    }

    /// A held partition whose lease is no longer certainly held, if any.
    pub fn lapsing(&self, now: Instant) -> Option<u16> {
        self.with(|held| {
            held.iter()
                .find(|(_, lease)| lease.valid_until <= now + MARGIN)
                .map(|(partition, _)| *partition)
        })
    }

    fn snapshot(&self) -> Vec<(u16, i64)> {
        self.with(|held| held.iter().map(|(p, lease)| (*p, lease.epoch)).collect())
    }

    /// Applies a renewal of `asked`, sent at `sent`, that renewed `renewed`:
    /// returns the partitions asked for and not renewed, which another worker
    /// has claimed (those still held at the epoch asked; one released or claimed
    /// again meanwhile is not counted).
    fn renewed(&self, asked: &[(u16, i64)], renewed: &[u16], sent: Instant) -> Vec<u16> {
        self.with(|held| {
            let mut lost = Vec::new();
            for (partition, epoch) in asked {
                let Some(lease) = held.get_mut(partition) else {
                    continue;
                };
                if lease.epoch != *epoch {
                    continue;
                }
                if renewed.contains(partition) {
                    lease.valid_until = lease.valid_until.max(sent + LEASE_TTL);
                } else {
                    lost.push(*partition);
                }
            }
            lost
        })
    }
}

/// Renews every held lease each [`RENEW_EVERY`], for ever (abort the task to
/// stop it), and sends each lease found claimed by another worker to `lost`.
/// A renewal that fails changes nothing: the leases run towards their margin,
/// where the consuming side lets go the ordered way.
pub async fn renew(fleet: Fleet, leases: std::sync::Arc<Leases>, lost: mpsc::UnboundedSender<u16>) {
    loop {
        tokio::time::sleep(RENEW_EVERY).await;
        let asked = leases.snapshot();
        if asked.is_empty() {
            continue;
        }
        let sent = Instant::now();
        match tokio::time::timeout(RENEW_EVERY, fleet.renew(&asked, LEASE_TTL)).await {
            Ok(Ok(renewed)) => {
                for partition in leases.renewed(&asked, &renewed, sent) {
                    lost.send(partition).ok();
                }
            }
            Ok(Err(error)) => tracing::warn!(%error, "cannot renew the partition leases"),
            Err(_) => tracing::warn!(
                "cannot renew the partition leases: no answer within {RENEW_EVERY:?}"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_sure_until_the_margin_and_lapsing_after() {
        let leases = Leases::default();
        let t0 = Instant::now();
        leases.claimed(3, 1, t0);
        assert!(leases.sure(3, t0));
        assert!(!leases.sure(4, t0), "not held");
        let late = t0 + LEASE_TTL - MARGIN;
        assert!(!leases.sure(3, late));
        assert_eq!(leases.lapsing(t0), None);
        assert_eq!(leases.lapsing(late), Some(3));
    }

    #[test]
    fn a_renewal_extends_what_it_renewed_and_reports_what_another_claimed() {
        let leases = Leases::default();
        let t0 = Instant::now();
        leases.claimed(1, 5, t0);
        leases.claimed(2, 7, t0);
        let asked = leases.snapshot();
        let later = t0 + Duration::from_secs(5);
        let lost = leases.renewed(&asked, &[1], later);
        assert_eq!(lost, [2]);
        assert!(leases.sure(1, t0 + LEASE_TTL));
        // Released or claimed again while the renewal was out: not lost.
        leases.remove(2);
        leases.claimed(2, 8, later);
        assert!(leases.renewed(&asked, &[1], later).is_empty());
    }
}
