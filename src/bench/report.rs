//! What a bench run measured: replies matched to publishes, latency percentiles,
//! and the invariant check (every key answered, identical replies, quantities
//! that add up).

use super::BenchArgs;
use super::mix::Planned;
use crate::store;
use anyhow::Context as _;
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::time::Instant;
use uuid::Uuid;

/// What one run measured.
#[derive(Debug, Serialize)]
pub struct Report {
    pub messages: usize,
    pub distinct_keys: usize,
    pub replies: usize,
    pub seconds: f64,
    pub throughput_per_sec: f64,
    pub latency_ms: Latency,
    pub outcomes: HashMap<String, usize>,
    pub invariants_hold: bool,
}

#[derive(Debug, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

/// Matches replies to publishes, computes the figures and checks the invariants.
pub(super) async fn summarize(
    pool: &sqlx::PgPool,
    args: &BenchArgs,
    planned: &[Planned],
    mut sent_at: HashMap<String, VecDeque<Instant>>,
    received: &[(Instant, Vec<u8>)],
    started: Instant,
) -> anyhow::Result<Report> {
    let mut latencies = Vec::with_capacity(received.len());
    let mut outcomes: HashMap<String, usize> = HashMap::new();
    let mut bodies: HashMap<String, Vec<u8>> = HashMap::new();
    let mut identical = true;
    let mut applied: HashMap<Uuid, i64> = HashMap::new();
    for (at, raw) in received {
        let body: serde_json::Value = serde_json::from_slice(raw).context("a reply is not JSON")?;
        let id = body["message_id"].as_str().unwrap_or_default().to_owned();
        if let Some(sent) = sent_at.get_mut(&id).and_then(VecDeque::pop_front) {
            latencies.push(at.duration_since(sent).as_secs_f64() * 1000.0);
        }
        let label = format!(
            "{}/{}",
            body["outcome"].as_str().unwrap_or("?"),
            body["reason"].as_str().unwrap_or("")
        );
        *outcomes.entry(label).or_default() += 1;
        match bodies.get(&id) {
            Some(first) => identical &= first == raw,
            None => {
                if body["outcome"] == "applied" {
                    let item = body["item_id"]
                        .as_str()
                        .and_then(|s| Uuid::parse_str(s).ok());
                    if let (Some(item), Some(delta)) = (item, body["delta"].as_i64()) {
                        *applied.entry(item).or_default() += delta;
                    }
                }
                bodies.insert(id, raw.clone());
            }
        }
    }
    let distinct: std::collections::HashSet<&str> =
        planned.iter().map(|p| p.message_id.as_str()).collect();
    let all_answered = distinct.iter().all(|id| bodies.contains_key(*id));
    let mut quantities_add_up = true;
    let items: std::collections::HashSet<Uuid> = planned.iter().map(|p| p.item).collect();
    for item in items {
        let now = store::find_item(pool, item).await?.map(|i| i.qty);
        quantities_add_up &= now == Some(args.start_qty + applied.get(&item).copied().unwrap_or(0));
    }
    // A backlog is timed from its first reply, so the time before the worker
    // started does not count; otherwise from the first publish.
    let from = match (args.backlog, received.first()) {
        (true, Some((first, _))) => *first,
        _ => started,
    };
    let seconds = received
        .last()
        .map_or(0.0, |(at, _)| at.duration_since(from).as_secs_f64());
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    Ok(Report {
        messages: planned.len(),
        distinct_keys: distinct.len(),
        replies: received.len(),
        seconds,
        throughput_per_sec: if seconds > 0.0 {
            received.len() as f64 / seconds
        } else {
            0.0
        },
        latency_ms: Latency {
            p50: pct(0.50),
            p90: pct(0.90),
            p99: pct(0.99),
            max: latencies.last().copied().unwrap_or(0.0),
        },
        outcomes,
        invariants_hold: all_answered
            && identical
            && quantities_add_up
            && received.len() == planned.len(),
    })
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "messages     {} ({} distinct keys)",
            self.messages, self.distinct_keys
        )?;
        writeln!(f, "replies      {} in {:.2}s", self.replies, self.seconds)?;
        writeln!(f, "throughput   {:.0} msg/s", self.throughput_per_sec)?;
        let l = &self.latency_ms;
        writeln!(
            f,
            "latency ms   p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1}",
            l.p50, l.p90, l.p99, l.max
        )?;
        let mut outcomes: Vec<_> = self.outcomes.iter().collect();
        outcomes.sort();
        for (label, count) in outcomes {
            writeln!(f, "  {label:<32} {count}")?;
        }
        write!(
            f,
            "invariants   {}",
            if self.invariants_hold {
                "hold"
            } else {
                "BROKEN"
            }
        )
    }
}
