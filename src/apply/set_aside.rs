//! The requests set aside for items locked elsewhere, across every lane: what
//! `/readyz` names, the oldest one's age for the metrics, and how many there
//! are, for the worker's delivery window (see `worker::Window`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use uuid::Uuid;

#[derive(Debug, Default)]
pub struct SetAside {
    items: Mutex<HashMap<Uuid, Waiting>>,
    /// Woken whenever more requests are set aside.
    grew: tokio::sync::Notify,
}

#[derive(Debug, Clone, Copy)]
struct Waiting {
    /// When the item's first request still waiting was set aside.
    since: Instant,
    requests: usize,
}

/// What `/readyz` says of the set-aside requests, most waiting first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub requests: usize,
    pub items: Vec<(Uuid, usize)>,
}

impl SetAside {
    fn with<T>(&self, f: impl FnOnce(&mut HashMap<Uuid, Waiting>) -> T) -> T {
        let mut map = self.items.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut map)
    }

    /// `requests` of `item` wait now (set aside first at `since`, or now).
    pub fn waiting(&self, item: Uuid, requests: usize, now: Instant) {
        self.with(|map| {
            map.entry(item)
                .and_modify(|w| w.requests = requests)
                .or_insert(Waiting {
                    since: now,
                    requests,
                });
        });
        self.grew.notify_one();
    }

    /// Completes once more requests have been set aside since the last call.
    pub async fn grown(&self) {
        self.grew.notified().await;
    }

    /// The item's requests have been applied: it waits no more.
    pub fn applied(&self, item: &Uuid) {
        self.with(|map| map.remove(item));
    }

    /// How many requests wait in all.
    pub fn requests(&self) -> usize {
        self.with(|map| map.values().map(|w| w.requests).sum())
    }

    /// How long the longest-waiting item has waited.
    pub fn oldest(&self, now: Instant) -> Duration {
        self.with(|map| {
            map.values()
                .map(|w| now.saturating_duration_since(w.since))
                .max()
                .unwrap_or_default()
        })
    }

    /// The locked items (at most `most`), most waiting first.
    pub fn summary(&self, most: usize) -> Option<Summary> {
        self.with(|map| {
            if map.is_empty() {
                return None;
            }
            let mut items: Vec<(Uuid, usize)> =
                map.iter().map(|(item, w)| (*item, w.requests)).collect();
            items.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            let requests = items.iter().map(|(_, n)| n).sum();
            items.truncate(most);
            Some(Summary { requests, items })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_ages_and_names_the_items_that_wait_longest_and_most() {
        let set_aside = SetAside::default();
        let start = Instant::now();
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        assert_eq!(set_aside.summary(3), None);
        set_aside.waiting(a, 2, start);
        set_aside.waiting(b, 5, start + Duration::from_secs(1));
        set_aside.waiting(a, 3, start + Duration::from_secs(2));
        assert_eq!(set_aside.requests(), 8);
        assert_eq!(
            set_aside.oldest(start + Duration::from_secs(10)),
            Duration::from_secs(10)
        );
        assert_eq!(
            set_aside.summary(1),
            Some(Summary {
                requests: 8,
                items: vec![(b, 5)]
            })
        );
        set_aside.applied(&a);
        assert_eq!(
            set_aside.oldest(start + Duration::from_secs(10)),
            Duration::from_secs(9)
        );
        set_aside.applied(&b);
        assert_eq!(set_aside.requests(), 0);
    }
}
