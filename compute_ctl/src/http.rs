//! compute_ctl's HTTP API: `GET /status`, `GET /metrics`, `POST /terminate`.
//!
//! With `--auth-public-key-path`, every route needs `Authorization: Bearer <jwt>` of scope
//! `admin` or a `tenant` token for this compute's tenant, checked before the handler runs;
//! refusals and `/terminate` are audit lines.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio_util::sync::CancellationToken;
use utils::auth::{audit, check_tenant_permission, parse_bearer, JwtAuth, Outcome, Scope};
use utils::TenantId;

use crate::compute::{ComputeStatus, SharedStatus};

#[derive(Clone)]
struct AppState {
    status: SharedStatus,
    shutdown: CancellationToken,
}

/// Token check for this compute's tenant.
#[derive(Clone)]
pub struct HttpAuth {
    pub jwt: Arc<JwtAuth>,
    pub tenant_id: TenantId,
}

async fn auth_middleware(State(auth): State<Option<HttpAuth>>, req: Request, next: Next) -> Response {
    let peer = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let mut scope = None;
    if let Some(auth) = &auth {
        let header = req.headers().get(AUTHORIZATION).map(|v| v.to_str().unwrap_or(""));
        let checked = parse_bearer(header).and_then(|tok| auth.jwt.decode(tok)).and_then(|claims| {
            scope = Some(claims.scope);
            check_tenant_permission(&claims, auth.tenant_id, &[Scope::Admin])
        });
        if let Err(e) = checked {
            audit("compute_ctl", peer, scope, method.as_str(), &path, Outcome::Denied, e.reason());
            let code = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::UNAUTHORIZED);
            return (code, Json(serde_json::json!({ "msg": e.to_string() }))).into_response();
        }
    }
    let resp = next.run(req).await;
    if method != Method::GET {
        audit("compute_ctl", peer, scope, method.as_str(), &path, Outcome::Allowed, resp.status().as_str());
    }
    resp
}

pub fn router(status: SharedStatus, shutdown: CancellationToken, auth: Option<HttpAuth>) -> Router {
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
        .layer(axum::middleware::from_fn_with_state(auth, auth_middleware))
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
