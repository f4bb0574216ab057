//! The worker's Prometheus metrics (readiness itself lives in `health`). Each worker owns its own
//! registry (no process-global recorder), so several workers in one test process
//! report separately. Every family is there from the start, with a zero series
//! for each known label value (contract §7), so alerts see them before any event.

use crate::outcome::{Outcome, Verdict};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
    pub reason: &'static str,
}

/// The broker the worker is connected to (`qty_worker_broker_info`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BrokerLabels {
    pub product: String,
    pub version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DependencyLabels {
    pub dependency: &'static str,
}

/// Counters and gauges the flow updates, plus the registry that renders them.
pub struct Metrics {
    registry: Registry,
    adjustments: Family<OutcomeLabels, Counter>,
    pub replayed: Counter,
    pub redelivered: Counter,
    pub in_flight: Gauge,
    pub processing_seconds: Histogram,
    pub dependency_errors: Family<DependencyLabels, Counter>,
    pub requeued: Counter,
    pub batch_size: Histogram,
    pub reconnects: Family<DependencyLabels, Counter>,
    db_connections: Family<PoolLabels, Gauge>,
    pub parked: Counter,
    pub parked_requests: Gauge,
    pub parked_items: Gauge,
    pub lock_waits_timed_out: Counter,
    pub replies_unroutable: Counter,
    pub replies_refused: Counter,
    pub ready: Gauge,
    pub broker_blocked: Gauge,
    pub without_item_header: Counter,
    pub partitions_owned: Gauge,
    pub parked_oldest_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    broker_info: Family<BrokerLabels, Gauge>,
}

/// The dependencies `dependency_errors` and `reconnects` are labelled with.
pub const DEPENDENCIES: [&str; 2] = ["broker", "database"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub state: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("qty_worker");
        let adjustments = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "adjustments",
            "Requests answered, by outcome and reason (reason is empty unless rejected)",
            adjustments.clone(),
        );
        let replayed = Counter::default();
        registry.register(
            "duplicates_replayed",
            "Requests whose message_id was already in the ledger",
            replayed.clone(),
        );
        let redelivered = Counter::default();
        registry.register(
            "redeliveries",
            "Deliveries the broker marked as redelivered",
            redelivered.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "deliveries_in_flight",
            "Deliveries received and not yet settled",
            in_flight.clone(),
        );
        let processing_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "processing_seconds",
            "Time from receiving a delivery to its confirmed reply, when its ack is decided",
            processing_seconds.clone(),
        );
        let dependency_errors = Family::<DependencyLabels, Counter>::default();
        registry.register(
            "dependency_errors",
            "Transient failures talking to a dependency (broker or database)",
            dependency_errors.clone(),
        );
        let requeued = Counter::default();
        registry.register(
            "deliveries_requeued",
            "Deliveries handed back to the queue after a failure not caused by their content",
            requeued.clone(),
        );
        let batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 10));
        registry.register(
            "batch_size",
            "Requests carried by one database transaction",
            batch_size.clone(),
        );
        let reconnects = Family::<DependencyLabels, Counter>::default();
        registry.register(
            "reconnects",
            "Times a dependency came back after being lost",
            reconnects.clone(),
        );
        let db_connections = Family::<PoolLabels, Gauge>::default();
        registry.register(
            "db_connections",
            "PostgreSQL pool connections by state (busy, idle), as of the scrape",
            db_connections.clone(),
        );
        let parked = Counter::default();
        registry.register(
            "requests_parked",
            "Requests this worker parked in the database (acked, answered when judged): their item was locked elsewhere, or had requests parked before them",
            parked.clone(),
        );
        let parked_requests = Gauge::default();
        registry.register(
            "parked_requests",
            "Requests parked in the database for the fleet's queues, waiting for a locked item (as of the last look, every 2 s)",
            parked_requests.clone(),
        );
        let parked_items = Gauge::default();
        registry.register(
            "parked_items",
            "Items that parked requests wait for",
            parked_items.clone(),
        );
        let lock_waits_timed_out = Counter::default();
        registry.register(
            "lock_waits_timed_out",
            "Times an item (or message_id) stayed locked by someone else for the whole lock wait, and the request was parked",
            lock_waits_timed_out.clone(),
        );
        let replies_unroutable = Counter::default();
        registry.register(
            "replies_unroutable",
            "Replies the broker returned as unroutable (a reply_to naming no queue); the request was still acked",
            replies_unroutable.clone(),
        );
        for dependency in DEPENDENCIES {
            drop(dependency_errors.get_or_create(&DependencyLabels { dependency }));
            drop(reconnects.get_or_create(&DependencyLabels { dependency }));
        }
        for outcome in Outcome::all_labels() {
            drop(adjustments.get_or_create(&OutcomeLabels {
                outcome: outcome.name(),
                reason: outcome.reason().unwrap_or(""),
            }));
        }
        for state in ["busy", "idle"] {
            drop(db_connections.get_or_create(&PoolLabels { state }));
        }
        let replies_refused = Counter::default();
        registry.register(
            "replies_refused",
            "Replies the broker kept refusing (nack, e.g. a full reply_to queue) and that were given up; the request was still acked",
            replies_refused.clone(),
        );
        let parked_oldest_seconds = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "parked_oldest_seconds",
            "How long the oldest parked request has waited for its locked item (0 when none), as of the scrape",
            parked_oldest_seconds.clone(),
        );
        let ready = Gauge::default();
        registry.register(
            "ready",
            "1 while the worker is ready (what /readyz last found: database writable, consuming, topology there), else 0",
            ready.clone(),
        );
        let broker_blocked = Gauge::default();
        registry.register(
            "broker_blocked",
            "1 while RabbitMQ blocks one of the worker's connections from publishing (a memory or disk alarm), else 0",
            broker_blocked.clone(),
        );
        let without_item_header = Counter::default();
        registry.register(
            "requests_without_item_header",
            "Requests that carried no item_id header (partitioned, they all hash to one partition)",
            without_item_header.clone(),
        );
        let partitions_owned = Gauge::default();
        registry.register(
            "partitions_owned",
            "Partition queues this worker owns and consumes now (QTY_PARTITIONS; 0 unpartitioned)",
            partitions_owned.clone(),
        );
        // No series until the first connect: the version is not known before.
        let broker_info = Family::<BrokerLabels, Gauge>::default();
        registry.register(
            "broker_info",
            "1 for the product and version of the broker the worker last connected to (none before the first connect)",
            broker_info.clone(),
        );
        Metrics {
            broker_info,
            without_item_header,
            partitions_owned,
            broker_blocked,
            parked_oldest_seconds,
            replies_refused,
            ready,
            parked,
            parked_requests,
            parked_items,
            lock_waits_timed_out,
            replies_unroutable,
            reconnects,
            db_connections,
            batch_size,
            registry,
            adjustments,
            replayed,
            redelivered,
            in_flight,
            processing_seconds,
            dependency_errors,
            requeued,
        }
    }

    /// Shows `product` and `version` as the connected broker, in place of any
    /// other; says whether that changed what was shown.
    pub fn set_broker_info(&self, product: &str, version: &str) -> bool {
        let labels = BrokerLabels {
            product: product.to_owned(),
            version: version.to_owned(),
        };
        if self
            .broker_info
            .get(&labels)
            .is_some_and(|shown| shown.get() == 1)
        {
            return false;
        }
        self.broker_info.clear();
        self.broker_info.get_or_create(&labels).set(1);
        true
    }

    /// Counts one answered request under the labels its verdict dictates.
    pub fn record(&self, verdict: &Verdict) {
        self.adjustments
            .get_or_create(&OutcomeLabels {
                outcome: verdict.outcome.name(),
                reason: verdict.outcome.reason().unwrap_or(""),
            })
            .inc();
        if verdict.replayed {
            self.replayed.inc();
        }
    }

    pub fn dependency_error(&self, dependency: &'static str) {
        self.dependency_errors
            .get_or_create(&DependencyLabels { dependency })
            .inc();
    }

    pub fn reconnected(&self, dependency: &'static str) {
        self.reconnects
            .get_or_create(&DependencyLabels { dependency })
            .inc();
    }

    /// Records the pool's current size and idle count for the next render.
    pub fn observe_pool(&self, size: u32, idle: usize) {
        let idle = idle as i64;
        self.db_connections
            .get_or_create(&PoolLabels { state: "idle" })
            .set(idle);
        self.db_connections
            .get_or_create(&PoolLabels { state: "busy" })
            .set(i64::from(size) - idle);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}
