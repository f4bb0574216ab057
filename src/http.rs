//! The HTTP listener: `/metrics` (Prometheus text), `/healthz` (the process is
//! alive) and `/readyz` (the database answers and the consumer is running).

use crate::metrics::{Health, Metrics};
use crate::store;
use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use sqlx::PgPool;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone)]
struct AppState {
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    pool: PgPool,
}

/// How long `/readyz` waits for the database before calling it down.
const DATABASE_PROBE: Duration = Duration::from_secs(1);

/// Binds `addr` (port 0 picks a free port) and serves in the background.
/// Returns the bound address and the server task.
pub async fn serve(
    addr: SocketAddr,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    pool: PgPool,
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
            pool,
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
        .observe_pool(state.pool.size(), state.pool.num_idle());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

async fn readiness(State(state): State<AppState>) -> impl IntoResponse {
    // Probe rather than trust the last query: an idle worker would not notice.
    let database = store::ping(&state.pool, DATABASE_PROBE).await;
    state.health.set_database(database);
    let broker = state.health.consuming();
    let status = if database && broker {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = format!(
        "database: {}\nbroker: {}\n",
        if database { "up" } else { "down" },
        if broker { "consuming" } else { "down" }
    );
    (status, body)
}
