//! `qty-worker bench`: a load tool in the spirit of rabbitmq-perf-test. It creates
//! its own items, publishes requests (as fast as it can, or at a fixed rate) with
//! a chosen mix, collects the replies, prints throughput and publish→reply
//! latency, and checks the invariants at the end. It drives a worker that is
//! already running; it never talks to the worker except through the broker.

mod mix;
mod report;

use mix::{Planned, plan};
use report::summarize;
pub use report::{Latency, Report};

use crate::broker::{self, REQUEST_ROUTING_KEY, short};
use crate::settings::{Connections, SettingError};
use crate::store;
use anyhow::Context as _;
use clap::Args;
use futures::StreamExt as _;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel};
use std::collections::{HashMap, VecDeque};
use std::io::IsTerminal as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// The largest delta the bench draws: far beyond any real stock, and small enough
/// that the span of a delta range fits a `u64`.
const MAX_DELTA: i64 = 1_000_000_000_000_000;

/// A count of at least one.
fn positive(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(error) => Err(error.to_string()),
    }
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Requests to publish (duplicates included).
    #[arg(long, default_value_t = 10_000, value_parser = positive)]
    pub messages: usize,
    /// Distinct items to spread requests over.
    #[arg(long, default_value_t = 100, value_parser = positive)]
    pub items: usize,
    /// Share of requests (0..1) that go to the first item, the hot one.
    #[arg(long, default_value_t = 0.0)]
    pub hot_share: f64,
    /// Smallest delta (at least -1e15, so that a range of deltas stays countable).
    #[arg(long, default_value_t = -3, allow_negative_numbers = true, value_parser = clap::value_parser!(i64).range(-MAX_DELTA..=MAX_DELTA))]
    pub delta_min: i64,
    /// Largest delta (at most 1e15).
    #[arg(long, default_value_t = 2, allow_negative_numbers = true, value_parser = clap::value_parser!(i64).range(-MAX_DELTA..=MAX_DELTA))]
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
    #[arg(long, default_value_t = 500, value_parser = positive)]
    pub publish_window: usize,
    /// Seconds to wait for the last reply after the last publish.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
    /// Seed for the request mix, to repeat a run exactly.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The `user_id` property of every request: the publishing user's own name
    /// (RabbitMQ refuses any other), for a worker run with `QTY_PUBLISHERS`.
    #[arg(long)]
    pub user_id: Option<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// With --backlog: declare the partitioned topology (the workers must run
    /// with the same QTY_PARTITIONS), so the backlog waits in the partitions.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub partitions: Option<u16>,
}

pub async fn run(connections: &Connections, args: BenchArgs) -> anyhow::Result<Report> {
    if args.delta_min > args.delta_max {
        return Err(SettingError::new("--delta-min", "must not exceed --delta-max").into());
    }
    // Like every operator command, the bench uses a database `migrate` made.
    let pool = store::open_existing(connections.database_url()).await?;
    let mut items = Vec::with_capacity(args.items);
    for _ in 0..args.items {
        items.push(
            store::create_item(&pool, Uuid::new_v4(), args.start_qty)
                .await?
                .id,
        );
    }
    let planned = plan(&args, &items);

    let connection = broker::connect(&connections.broker, "qty-worker bench").await?;
    let publisher = connection.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let listener = connection.create_channel().await?;
    let reply_queue = broker::declare_private_queue(&listener).await?;
    let mut replies = broker::consume_without_acks(&listener, &reply_queue).await?;

    if args.backlog {
        let topology = crate::broker::Topology::new(
            connections.exchange(),
            connections.queue(),
            crate::settings::DEFAULT_DELIVERY_LIMIT,
        )
        .partitioned(args.partitions);
        topology.declare(&connection).await.context(
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
            connections.queue()
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
        let mut properties = BasicProperties::default()
            .with_message_id(short(&request.message_id))
            .with_reply_to(short(reply_queue))
            .with_content_type(short("application/json"))
            .with_headers(crate::broker::item_headers(request.item))
            .with_delivery_mode(2);
        if let Some(user) = &args.user_id {
            properties = properties.with_user_id(short(user));
        }
        sent_at
            .entry(request.message_id.clone())
            .or_default()
            .push_back(Instant::now());
        let confirm = channel
            .basic_publish(
                short(connections.exchange()),
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
                .context("a pending publish")?
                .context("publish not confirmed")?;
        }
    }
    while let Some(confirm) = pending.next().await {
        confirm.context("publish not confirmed")?;
    }
    Ok(sent_at)
}
