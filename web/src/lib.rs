//! The node's HTTP listener: Prometheus metrics at `/metrics` (text exposition format 0.0.4),
//! node-local figures a scraper sums over the cluster. What is reported comes from the
//! [`MetricSource`]s the node binary hands over (the outbound queue, the raft host, the IMAP
//! header cache); this crate knows none of them.

// A session's future nests the service's router and mail futures deep; computing its
// layout needs more than the default 128 query levels.
#![recursion_limit = "256"]

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::routing::get;
use service::metrics::{Exposition, MetricSource};

/// The figures served, in the order they are written.
type Sources = Arc<Vec<Arc<dyn MetricSource>>>;

/// Serves HTTP on `addr` until the process ends; returns the bound address.
pub async fn listen(
    sources: Vec<Arc<dyn MetricSource>>,
    addr: SocketAddr,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("http: cannot listen on {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new()
        .route("/metrics", get(metrics))
        .with_state(Arc::new(sources));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("http listener stopped: {e}");
        }
    });
    Ok(bound)
}

async fn metrics(State(sources): State<Sources>) -> impl axum::response::IntoResponse {
    // Sources may read local state machines: off the async workers.
    let text = tokio::task::spawn_blocking(move || {
        let mut out = Exposition::default();
        for source in sources.iter() {
            source.write_metrics(&mut out);
        }
        out.into_text()
    })
    .await
    .unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
}
