//! `qty-worker bench`: a load tool in the spirit of rabbitmq-perf-test. It creates
//! its own items, publishes requests (as fast as it can, or at a fixed rate) with
//! a chosen mix, collects the replies, prints throughput and publish→reply
//! latency, and checks the invariants at the end. It drives a worker that is
//! already running; it never talks to the worker except through the broker.

use crate::broker::{self, REQUEST_ROUTING_KEY, short};
use crate::settings::Connections;
use crate::store;
use anyhow::{Context as _, ensure};
use clap::Args;
use futures::StreamExt as _;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::io::IsTerminal as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use uuid::Uuid;

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Requests to publish (duplicates included).
    #[arg(long, default_value_t = 10_000)]
    pub messages: usize,
    /// Distinct items to spread requests over.
    #[arg(long, default_value_t = 100)]
    pub items: usize,
    /// Share of requests (0..1) that go to the first item, the hot one.
    #[arg(long, default_value_t = 0.0)]
    pub hot_share: f64,
    /// Smallest delta.
    #[arg(long, default_value_t = -3, allow_negative_numbers = true)]
    pub delta_min: i64,
    /// Largest delta.
    #[arg(long, default_value_t = 2, allow_negative_numbers = true)]
    pub delta_max: i64,
    /// Share of requests (0..1) that repeat an earlier message_id and payload.
    #[arg(long, default_value_t = 0.0)]
    pub duplicate_share: f64,
    /// Requests per second; 0 publishes as fast as confirms allow.
    #[arg(long, default_value_t = 0, conflicts_with = "backlog")]
    pub rate: u64,
    /// Publish every request before any is consumed, then time the drain from the
    /// first reply to the last. Start the worker after "backlog published" appears
    /// on stderr; the bench declares the queue itself if it is missing.
    #[arg(long)]
    pub backlog: bool,
    /// Starting quantity of every item.
    #[arg(long, default_value_t = 1_000_000)]
    pub start_qty: i64,
    /// Unconfirmed publishes allowed at once.
    #[arg(long, default_value_t = 500)]
    pub publish_window: usize,
    /// Seconds to wait for the last reply after the last publish.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
    /// Seed for the request mix, to repeat a run exactly.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

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

/// One planned request.
struct Planned {
    message_id: String,
    item: Uuid,
    delta: i64,
}

/// A small deterministic generator (SplitMix64), so a seed repeats a run's mix.
/// The equivalence tests draw their random streams from it too.
pub struct Mix(pub u64);

impl Mix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

fn plan(args: &BenchArgs, items: &[Uuid]) -> Vec<Planned> {
    let mut mix = Mix(args.seed);
    let run = Uuid::new_v4().simple().to_string();
    let span = (args.delta_max - args.delta_min + 1) as u64;
    let mut planned: Vec<Planned> = Vec::with_capacity(args.messages);
    for n in 0..args.messages {
        if n > 0 && mix.unit() < args.duplicate_share {
            let earlier = &planned[mix.below(n as u64) as usize];
            let repeat = Planned {
                message_id: earlier.message_id.clone(),
                item: earlier.item,
                delta: earlier.delta,
            };
            planned.push(repeat);
            continue;
        }
        let item = if mix.unit() < args.hot_share {
            items[0]
        } else {
            items[mix.below(items.len() as u64) as usize]
        };
        let delta = args.delta_min + mix.below(span) as i64;
        planned.push(Planned {
            message_id: format!("bench-{run}-{n}"),
            item,
            delta,
        });
    }
    planned
}

pub async fn run(connections: &Connections, args: BenchArgs) -> anyhow::Result<Report> {
    ensure!(
        args.items > 0 && args.messages > 0,
        "--items and --messages must be positive"
    );
    ensure!(
        args.delta_min <= args.delta_max,
        "--delta-min must not exceed --delta-max"
    );
    let pool = store::connect(&connections.database_url, 2).await?;
    store::migrate(&pool).await?;
    let mut items = Vec::with_capacity(args.items);
    for _ in 0..args.items {
        items.push(
            store::create_item(&pool, Uuid::new_v4(), args.start_qty)
                .await?
                .id,
        );
    }
    let planned = plan(&args, &items);

    let connection = broker::connect(connections, "qty-worker bench").await?;
    let publisher = connection.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let listener = connection.create_channel().await?;
    let reply_queue = listener
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let reply_queue = reply_queue.name().to_string();
    let mut replies = broker::consume_without_acks(&listener, &reply_queue).await?;

    if args.backlog {
        let topology = crate::broker::Topology {
            exchange: connections.exchange.clone(),
            queue: connections.queue.clone(),
            delivery_limit: crate::settings::DEFAULT_DELIVERY_LIMIT,
        };
        topology.declare(&publisher).await.context(
            "cannot declare the queue (a worker with another --delivery-limit declared it first?)",
        )?;
    }
    let progress = !args.json && std::io::stderr().is_terminal();
    let expected = planned.len();
    let idle = Duration::from_secs(args.timeout);
    let answered = Arc::new(AtomicUsize::new(0));
    let collector = {
        let answered = answered.clone();
        tokio::spawn(async move {
            let mut received: Vec<(Instant, Vec<u8>)> = Vec::with_capacity(expected);
            while received.len() < expected {
                match tokio::time::timeout(idle, replies.next()).await {
                    Ok(Some(Ok(delivery))) => {
                        received.push((Instant::now(), delivery.data));
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => break,
                }
            }
            received
        })
    };
    let ticker = progress.then(|| {
        let answered = answered.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                eprint!(
                    "\rreplies {} / {expected}   ",
                    answered.load(Ordering::Relaxed)
                );
            }
        })
    });

    let started = Instant::now();
    let sent_at = publish_all(
        &publisher,
        connections,
        &args,
        &planned,
        &reply_queue,
        started,
    )
    .await?;
    if args.backlog {
        eprintln!(
            "backlog published: {} requests wait in {}; start the worker now",
            planned.len(),
            connections.queue
        );
    }
    let received = collector.await.context("reply collector failed")?;
    if let Some(ticker) = ticker {
        ticker.abort();
        eprintln!();
    }
    connection.close(200, "bench done".into()).await.ok();
    let report = summarize(&pool, &args, &planned, sent_at, &received, started).await?;
    Ok(report)
}

/// Matches replies to publishes, computes the figures and checks the invariants.
async fn summarize(
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

/// Publishes every planned request with up to `publish_window` confirms pending;
/// returns when each send happened, per message_id.
async fn publish_all(
    channel: &Channel,
    connections: &Connections,
    args: &BenchArgs,
    planned: &[Planned],
    reply_queue: &str,
    started: Instant,
) -> anyhow::Result<HashMap<String, VecDeque<Instant>>> {
    let mut sent_at: HashMap<String, VecDeque<Instant>> = HashMap::new();
    let mut pending = futures::stream::FuturesUnordered::new();
    let interval = (args.rate > 0).then(|| Duration::from_secs_f64(1.0 / args.rate as f64));
    for (n, request) in planned.iter().enumerate() {
        if let Some(interval) = interval {
            let due = started + interval * n as u32;
            tokio::time::sleep_until(due.into()).await;
        }
        let body =
            serde_json::json!({ "item_id": request.item, "delta": request.delta }).to_string();
        let properties = BasicProperties::default()
            .with_message_id(short(&request.message_id))
            .with_reply_to(short(reply_queue))
            .with_content_type(short("application/json"))
            .with_delivery_mode(2);
        sent_at
            .entry(request.message_id.clone())
            .or_default()
            .push_back(Instant::now());
        let confirm = channel
            .basic_publish(
                short(&connections.exchange),
                short(REQUEST_ROUTING_KEY),
                BasicPublishOptions::default(),
                body.as_bytes(),
                properties,
            )
            .await
            .context("cannot publish a request")?;
        pending.push(confirm);
        while pending.len() >= args.publish_window {
            pending
                .next()
                .await
                .expect("pending is not empty")
                .context("publish not confirmed")?;
        }
    }
    while let Some(confirm) = pending.next().await {
        confirm.context("publish not confirmed")?;
    }
    Ok(sent_at)
}
