//! The HTTP listener: `/metrics` (Prometheus text), `/healthz` (the process is
//! alive) and `/readyz` (contract §7: the database accepts writes, the consumer
//! runs and the topology exists; else 503 naming what is not ready).

use crate::health::Health;
use crate::metrics::Metrics;
use crate::parked::Waiting;
use crate::store::Database;
use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone)]
struct AppState {
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    db: Database,
    waiting: Arc<Waiting>,
}

/// How long `/readyz` waits for the database before calling it down.
const DATABASE_PROBE: Duration = Duration::from_secs(1);

/// Binds `addr` (port 0 picks a free port) and serves in the background.
/// Returns the bound address and the server task.
pub async fn serve(
    addr: SocketAddr,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    db: Database,
    waiting: Arc<Waiting>,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (set QTY_HTTP_ADDR)"))?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readiness))
        .with_state(AppState {
            health,
            metrics,
            db,
            waiting,
        });
    let task = tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(%error, "HTTP listener failed");
        }
    });
    Ok((bound, task))
}

async fn render_metrics(State(state): State<AppState>) -> impl IntoResponse {
    state
        .metrics
        .observe_pool(state.db.pool.size(), state.db.pool.num_idle());
    let (ready, _) = state.health.report();
    state.metrics.ready.set(i64::from(ready));
    let (requests, items, oldest) = state.waiting.gauges(std::time::Instant::now());
    state.metrics.parked_requests.set(requests as i64);
    state.metrics.parked_items.set(items as i64);
    state
        .metrics
        .parked_oldest_seconds
        .set(oldest.as_secs_f64());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

async fn readiness(State(state): State<AppState>) -> impl IntoResponse {
    // Probe rather than trust the last transaction: an idle worker would not
    // notice its database turning read-only, or its EXECUTE being revoked.
    // Before start-up has found the schema ready, what it found stands.
    if state.health.prepared() {
        let seen = state.db.writability(DATABASE_PROBE).await;
        state.health.set_database(seen);
    }
    let (ready, mut body) = state.health.report();
    // Readiness stays as it is: the worker serves everything else meanwhile.
    if let Some((requests, most)) = state.waiting.items() {
        let items: Vec<String> = most
            .iter()
            .map(|(item, n)| format!("{item} ({n})"))
            .collect();
        body.push_str(&format!(
            "parked: {requests} requests wait for items locked elsewhere: {}\n",
            items.join(", ")
        ));
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, body)
}
