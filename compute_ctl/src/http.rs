//! compute_ctl's HTTP API: `GET /status`, `GET /metrics`, `POST /terminate`.

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio_util::sync::CancellationToken;

use crate::compute::{ComputeStatus, SharedStatus};

#[derive(Clone)]
struct AppState {
    status: SharedStatus,
    shutdown: CancellationToken,
}

pub fn router(status: SharedStatus, shutdown: CancellationToken) -> Router {
    Router::new()
        .route(
            "/status",
            get(|State(s): State<AppState>| async move { Json(s.status.lock().expect("status lock").clone()) }),
        )
        .route("/metrics", get(metrics))
        .route(
            "/terminate",
            post(|State(s): State<AppState>| async move {
                s.shutdown.cancel();
                Json(serde_json::json!({ "status": "terminating" }))
            }),
        )
        .with_state(AppState { status, shutdown })
}

async fn metrics(State(s): State<AppState>) -> String {
    let st: ComputeStatus = s.status.lock().expect("status lock").clone();
    let mut out = String::from("# HELP compute_ctl_up 1 while Postgres runs.\n# TYPE compute_ctl_up gauge\n");
    out.push_str(&format!("compute_ctl_up {}\n", (st.status == "running") as u8));
    out.push_str(
        "# HELP compute_ctl_start_step_ms Duration of each start step.\n# TYPE compute_ctl_start_step_ms gauge\n",
    );
    for (name, ms) in &st.timings_ms {
        out.push_str(&format!("compute_ctl_start_step_ms{{step=\"{name}\"}} {ms}\n"));
    }
    out
}
