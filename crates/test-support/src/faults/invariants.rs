//! The invariants every fault run must keep, checked once the workers stopped:
//! nothing lost, nothing applied twice, every request answered with identical
//! replies, the queue drained, nothing left parked, and only the poison
//! dead-lettered. Partitioned (or with one worker at a time), also per-item
//! order: each item's requests are in the ledger (by `recorded_at`) in the
//! order they were published.

use super::{Scenario, Sent};
use crate::app::connect_any;
use lapin::options::BasicGetOptions;
use std::collections::{BTreeMap, HashMap};
use uuid::Uuid;

/// What a finished run found.
#[derive(Debug, Default)]
pub struct Verdicts {
    pub messages: usize,
    pub replies: usize,
    pub lost: usize,
    pub applied_twice: usize,
    pub unanswered: usize,
    /// Requests recorded as rejected (on a plan where all apply in order, each
    /// is one judged out of order).
    pub rejected: usize,
    /// Items whose ledger order is not their publish order (partitioned runs).
    pub items_out_of_order: usize,
    pub violations: Vec<String>,
}

impl Scenario {
    /// Fills `verdicts` from the queues, the ledger and the items.
    pub(crate) async fn check(&self, verdicts: &mut Verdicts) {
        let replies = drain_queue(&self.names.amqp_url, &self.reply_queue()).await;
        let mut leftover = drain_queue(&self.names.amqp_url, &self.names.queue).await;
        for index in 0..self.partitions.unwrap_or(0) {
            let queue = format!("{}.{index}", self.names.queue);
            leftover.extend(drain_queue(&self.names.amqp_url, &queue).await);
        }
        let dead = drain_queue(
            &self.names.amqp_url,
            &qty_worker::broker::Topology::dead_letter_queue_of(&self.names.queue),
        )
        .await;
        let v = &mut verdicts.violations;

        let mut by_id: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
        for body in &replies {
            let value: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
            crate::app::assert_documented_reply(&value);
            let id = value["message_id"].as_str().unwrap_or_default().to_owned();
            by_id.entry(id).or_default().push(body.clone());
        }
        let ledger: Vec<(String, Uuid, i64, String)> = sqlx::query_as(
            "select message_id, item_id, delta, outcome from adjustments order by recorded_at",
        )
        .fetch_all(&self.pool)
        .await
        .expect("read the ledger");
        verdicts.rejected = ledger.iter().filter(|r| r.3 == "rejected").count();
        let recorded: HashMap<&str, &(String, Uuid, i64, String)> =
            ledger.iter().map(|r| (r.0.as_str(), r)).collect();

        let mut distinct: HashMap<&str, &Sent> = HashMap::new();
        for sent in &self.sent {
            distinct.insert(sent.message_id.as_str(), sent);
        }
        verdicts.messages = distinct.len();
        verdicts.replies = replies.len();
        for (id, sent) in &distinct {
            match recorded.get(id) {
                None => verdicts.lost += 1,
                Some(row) if row.1 != sent.item || row.2 != sent.delta => {
                    v.push(format!("{id}: ledger payload differs"))
                }
                Some(_) => {}
            }
            match by_id.get(*id) {
                None => verdicts.unanswered += 1,
                Some(bodies) if bodies.iter().any(|b| b != &bodies[0]) => {
                    v.push(format!("{id}: replies differ"))
                }
                Some(bodies) => {
                    let value: serde_json::Value =
                        serde_json::from_slice(&bodies[0]).unwrap_or_default();
                    if recorded
                        .get(id)
                        .is_some_and(|row| value["outcome"] != row.3.as_str())
                    {
                        v.push(format!("{id}: the reply's outcome is not the ledger's"));
                    }
                }
            }
        }
        for poison in &self.poison {
            if recorded.contains_key(poison.as_str()) {
                v.push(format!("poison {poison} was recorded"));
            }
        }

        // qty = start + applied deltas (each recorded once, by the primary key),
        // so any double application shows here.
        for (item, start) in &self.items {
            let applied: i64 = ledger
                .iter()
                .filter(|r| r.1 == *item && r.3 == "applied")
                .map(|r| r.2)
                .sum();
            let qty: i64 = sqlx::query_scalar("select qty from items where id = $1")
                .bind(item)
                .fetch_one(&self.pool)
                .await
                .expect("item");
            if qty != start + applied {
                verdicts.applied_twice += 1;
                v.push(format!(
                    "item {item}: qty {qty} but start {start} + applied {applied}"
                ));
            }
            if qty < 0 {
                v.push(format!("item {item}: negative qty {qty}"));
            }
        }
        if self.ordered {
            verdicts.items_out_of_order = self.check_order(&ledger, v);
        }
        let parked: i64 = sqlx::query_scalar("select count(*) from parked")
            .fetch_one(&self.pool)
            .await
            .expect("count the parked rows");
        if parked > 0 {
            v.push(format!(
                "{parked} requests still parked, or judged with their replies owed"
            ));
        }
        if !leftover.is_empty() {
            v.push(format!("{} requests left in the queue", leftover.len()));
        }
        if dead.len() != self.poison.len() {
            v.push(format!(
                "{} dead-lettered, expected {} (the poison only)",
                dead.len(),
                self.poison.len()
            ));
        }
        if verdicts.lost > 0 {
            v.push(format!("{} requests never recorded", verdicts.lost));
        }
        if verdicts.unanswered > 0 {
            v.push(format!("{} requests never answered", verdicts.unanswered));
        }
    }
}

impl Scenario {
    /// Compares each item's ledger order with its publish order; returns how
    /// many items differ, naming the first place each differs.
    fn check_order(&self, ledger: &[(String, Uuid, i64, String)], v: &mut Vec<String>) -> usize {
        let mut published: HashMap<Uuid, Vec<&str>> = HashMap::new();
        let mut seen = std::collections::HashSet::new();
        for sent in &self.sent {
            if seen.insert(sent.message_id.as_str()) {
                published
                    .entry(sent.item)
                    .or_default()
                    .push(&sent.message_id);
            }
        }
        let mut recorded: HashMap<Uuid, Vec<&str>> = HashMap::new();
        for row in ledger {
            recorded.entry(row.1).or_default().push(&row.0);
        }
        let mut out_of_order = 0;
        for (item, order) in &published {
            let got = recorded.get(item).cloned().unwrap_or_default();
            if let Some(at) = order.iter().zip(&got).position(|(a, b)| a != b) {
                out_of_order += 1;
                v.push(format!(
                    "item {item}: the ledger has {} where {} was published ({} of {})",
                    got[at],
                    order[at],
                    at + 1,
                    order.len()
                ));
            }
        }
        out_of_order
    }
}

/// Takes every message from `queue` (acking it) and returns the bodies.
async fn drain_queue(amqp_urls: &str, queue: &str) -> Vec<Vec<u8>> {
    let connection = connect_any(amqp_urls).await.expect("a broker node");
    let channel = connection.create_channel().await.expect("channel");
    let mut bodies = Vec::new();
    while let Ok(Some(message)) = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
    {
        bodies.push(message.delivery.data.clone());
    }
    connection.close(200, "ok".into()).await.ok();
    bodies
}
