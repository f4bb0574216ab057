//! The long-run mode of the fault harness: two workers, a steady stream of
//! requests, and a fault of every kind in turn until the time is up. Prints
//! Jepsen-style counts and how long the system took to resume after each kind.
//!
//! ```sh
//! cargo run --release --features fault-injection --example chaos -- --messages 100000 --minutes 10
//! cargo run --release --features fault-injection --example chaos -- --partitions 8 --workers 3
//! ```
//!
//! With `--partitions`, the workers run as a partitioned fleet, the stream
//! carries the `item_id` header, a worker is also stopped (SIGTERM) and replaced
//! in turn, and the final check adds per-item order: each item's ledger order
//! must be its publish order.
//!
//! It runs on servers of its own, started in temporary directories on free ports
//! and removed at the end: a PostgreSQL primary with a synchronous standby, and a
//! 3-node RabbitMQ cluster. The workers reach every host and node through a TCP
//! proxy of the harness's, so links can be cut and stalled.

use clap::Parser;
use qty_test_support::faults::{Own, Scenario};
use qty_test_support::proxy::Proxy;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// Requests to publish over the run.
    #[arg(long, default_value_t = 100_000)]
    messages: usize,
    /// Length of the faulty part of the run.
    #[arg(long, default_value_t = 10)]
    minutes: u64,
    /// Items the requests are spread over.
    #[arg(long, default_value_t = 20)]
    items: usize,
    /// Run the workers partitioned (QTY_PARTITIONS) and check per-item order.
    #[arg(long)]
    partitions: Option<u16>,
    /// Workers at once.
    #[arg(long, default_value_t = 2)]
    workers: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillWorker,
    StopWorker,
    TerminateDbSessions,
    CloseBrokerConnections,
    CutBrokerLink,
    CutDatabaseLink,
    StallBrokerLink,
    StallDatabaseLink,
    RestartRabbitmq,
    RestartPostgres,
    Poison,
    ReadOnlyDatabase,
    Failover,
    LoseClusterNode,
}

const ROTATION: [Fault; 14] = [
    Fault::KillWorker,
    Fault::StopWorker,
    Fault::TerminateDbSessions,
    Fault::CutBrokerLink,
    Fault::CloseBrokerConnections,
    Fault::CutDatabaseLink,
    Fault::StallBrokerLink,
    Fault::Poison,
    Fault::StallDatabaseLink,
    Fault::RestartPostgres,
    Fault::RestartRabbitmq,
    Fault::ReadOnlyDatabase,
    Fault::LoseClusterNode,
    Fault::Failover,
];

/// Proxies in front of every PostgreSQL host and RabbitMQ node; the scenario's
/// own pair fronts the primary and the first node.
struct Links {
    databases: Vec<Proxy>,
    brokers: Vec<Proxy>,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    build_the_worker();
    let run_for = Duration::from_secs(args.minutes * 60);
    let own = Own {
        postgres: true,
        standby: true,
        rabbitmq_nodes: 3,
        hash_exchange: args.partitions.is_some(),
    };
    let Some(mut s) = Scenario::on("chaos", args.items, 1_000_000_000, own).await else {
        std::process::exit(1);
    };
    let standby = s.servers.standby.as_ref().expect("a standby").addr();
    let cluster = s.servers.rabbitmq.as_ref().expect("a cluster");
    let links = Links {
        databases: vec![Proxy::start(standby).await],
        brokers: vec![
            Proxy::start(cluster.node(1).addr()).await,
            Proxy::start(cluster.node(2).addr()).await,
        ],
    };
    s.worker_database_url = format!(
        "postgres://postgres@{},{}/{}?target_session_attrs=read-write&application_name=qty-worker-fault",
        s.pg_proxy.addr, links.databases[0].addr, s.names.database
    );
    s.worker_amqp_url = std::iter::once(&s.amqp_proxy)
        .chain(&links.brokers)
        .map(|proxy| format!("amqp://guest:guest@{}/%2f?heartbeat=2", proxy.addr))
        .collect::<Vec<_>>()
        .join(",");
    if let Some(partitions) = args.partitions {
        s.partitioned(partitions);
    }
    for _ in 0..args.workers {
        s.start_worker().await;
    }
    let mut live: Vec<usize> = (0..args.workers).collect();
    let rate = (args.messages as f64 / run_for.as_secs_f64()).ceil() as u64;
    let publisher = s.spawn_publisher(s.plan(args.messages, 42), rate);
    println!(
        "publishing {} requests at {rate}/s for {} min, {} workers{}",
        args.messages,
        args.minutes,
        args.workers,
        args.partitions
            .map(|p| format!(", {p} partitions"))
            .unwrap_or_default()
    );

    let started = Instant::now();
    let mut injected: BTreeMap<Fault, usize> = BTreeMap::new();
    let mut recovery: BTreeMap<Fault, Vec<Duration>> = BTreeMap::new();
    let mut turn = 0;
    while started.elapsed() + Duration::from_secs(20) < run_for && !publisher.is_finished() {
        let fault = ROTATION[turn % ROTATION.len()];
        turn += 1;
        inject(&mut s, &links, &mut live, fault, turn).await;
        *injected.entry(fault).or_default() += 1;
        let resumed = time_to_progress(&s, 20, Duration::from_secs(180)).await;
        recovery.entry(fault).or_default().push(resumed);
        println!(
            "{:>6.0}s  {fault:?}: progress again after {:.2}s",
            started.elapsed().as_secs_f64(),
            resumed.as_secs_f64()
        );
        tokio::time::sleep(Duration::from_secs(8)).await;
    }
    let retries = publisher.await.expect("publisher");
    let total = s.sent.len();
    let distinct = s
        .sent
        .iter()
        .map(|m| m.message_id.as_str())
        .collect::<std::collections::HashSet<_>>()
        .len();
    s.wait_recorded(distinct, Duration::from_secs(600)).await;
    let verdicts = s.finish().await;

    println!(
        "\n== chaos run: {:.1} min",
        started.elapsed().as_secs_f64() / 60.0
    );
    println!(
        "messages        {total} published ({retries} publishes retried), {} distinct",
        verdicts.messages
    );
    println!("replies         {}", verdicts.replies);
    println!("lost            {}", verdicts.lost);
    println!("applied twice   {}", verdicts.applied_twice);
    println!("unanswered      {}", verdicts.unanswered);
    if args.partitions.is_some() {
        println!("out of order    {} items", verdicts.items_out_of_order);
    }
    println!("faults injected:");
    for (fault, count) in &injected {
        let times = &recovery[fault];
        let worst = times.iter().max().copied().unwrap_or_default();
        let mean = times.iter().sum::<Duration>() / times.len().max(1) as u32;
        let name = format!("{fault:?}");
        println!(
            "  {name:<24} {count:>3}   recovery mean {:>6.2}s  max {:>6.2}s",
            mean.as_secs_f64(),
            worst.as_secs_f64()
        );
    }
    if verdicts.violations.is_empty() {
        println!("invariants      hold");
    } else {
        println!("invariants      BROKEN: {:#?}", verdicts.violations);
        std::process::exit(1);
    }
}

async fn inject(s: &mut Scenario, links: &Links, live: &mut Vec<usize>, fault: Fault, turn: usize) {
    let databases = || std::iter::once(&s.pg_proxy).chain(&links.databases);
    let brokers = || std::iter::once(&s.amqp_proxy).chain(&links.brokers);
    let nodes = s.servers.rabbitmq.as_ref().expect("a cluster").nodes.len();
    match fault {
        Fault::KillWorker => {
            let victim = live.remove(turn % live.len());
            s.kill_worker(victim);
            s.start_worker().await;
            live.push(s.workers.len() - 1);
        }
        Fault::StopWorker => {
            let victim = live.remove(turn % live.len());
            s.stop_worker(victim).await;
            s.start_worker().await;
            live.push(s.workers.len() - 1);
        }
        Fault::TerminateDbSessions => {
            s.terminate_db_sessions().await;
        }
        Fault::CloseBrokerConnections => {
            // The run's own cluster: the servers on the default ports are never touched.
            for node in 0..nodes {
                s.rabbitmq_node(node).close_all_connections("chaos");
            }
        }
        Fault::CutBrokerLink => brokers().for_each(Proxy::cut),
        Fault::CutDatabaseLink => databases().for_each(Proxy::cut),
        Fault::StallBrokerLink => {
            brokers().for_each(Proxy::stall);
            tokio::time::sleep(Duration::from_secs(6)).await;
            brokers().for_each(Proxy::resume);
        }
        Fault::StallDatabaseLink => {
            databases().for_each(Proxy::stall);
            tokio::time::sleep(Duration::from_secs(3)).await;
            databases().for_each(Proxy::resume);
        }
        Fault::RestartRabbitmq => s.rabbitmq_node(turn % nodes).restart(),
        Fault::LoseClusterNode => {
            let node = s.rabbitmq_node(turn % nodes);
            node.stop_app();
            tokio::time::sleep(Duration::from_secs(10)).await;
            node.start_app();
        }
        Fault::RestartPostgres => {
            s.primary().restart();
            let url = s.primary().url(&s.names.database);
            s.reconnect_pool(&url).await;
        }
        Fault::ReadOnlyDatabase => {
            let database = s.names.database.clone();
            s.primary().query(&format!(
                "alter database {database} set default_transaction_read_only = on"
            ));
            s.primary().query(&format!(
                "select pg_terminate_backend(pid) from pg_stat_activity where datname = '{database}'"
            ));
            tokio::time::sleep(Duration::from_secs(10)).await;
            s.primary().query(&format!(
                "alter database {database} reset default_transaction_read_only"
            ));
        }
        Fault::Failover => {
            // The primary dies, the standby is promoted, and the old primary is
            // rebuilt as the new one's standby, so the next failover can happen.
            let old = s.servers.primary.take().expect("a primary");
            let new = s.servers.standby.take().expect("a standby");
            old.stop_immediately();
            new.promote();
            old.rebuild_as_standby_of(&new);
            let url = new.url(&s.names.database);
            s.servers.primary = Some(new);
            s.servers.standby = Some(old);
            s.reconnect_pool(&url).await;
        }
        Fault::Poison => s.publish_poison(&format!("chaos-{turn}")).await,
    }
}

/// `cargo run --example` does not build the crate's binary, and a stale one
/// without `fault-injection` would not panic on the poison: build it now, with
/// this example's profile, before any worker starts.
fn build_the_worker() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let own_dir = std::env::current_exe().expect("own path");
    let release = own_dir.components().any(|c| c.as_os_str() == "release");
    let mut build = std::process::Command::new(cargo);
    build.args([
        "build",
        "--features",
        "fault-injection",
        "--bin",
        "qty-worker",
    ]);
    if release {
        build.arg("--release");
    }
    let status = build.status().expect("run cargo build");
    assert!(
        status.success(),
        "cannot build qty-worker with fault-injection"
    );
}

/// Time until the ledger has grown by `rows` from now.
async fn time_to_progress(s: &Scenario, rows: usize, within: Duration) -> Duration {
    let from = s.recorded().await;
    let started = Instant::now();
    while s.recorded().await < from + rows {
        assert!(started.elapsed() < within, "no progress within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}
