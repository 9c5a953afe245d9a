//! The safekeeper's HTTP management API.
//!
//! - `GET /v1/status`
//! - `POST /v1/tenant/{tenant_id}/timeline` (body: `TimelineCreateRequest`)
//! - `GET|DELETE /v1/tenant/{tenant_id}/timeline/{timeline_id}`
//! - `GET /v1/tenant/{tenant_id}/timeline/{timeline_id}/digest?from_lsn=X/Y&until_lsn=X/Y`
//!   (SHA-256 of the WAL in the range; WAL removed locally is read from remote storage)
//! - `GET /metrics` (Prometheus text)
//!
//! With `--http-auth-type NeonJWT` every route but `/v1/status` and `/metrics` needs
//! `Authorization: Bearer <jwt>`: `safekeeperdata`, `admin`, or for `/v1/tenant/{id}/...` a
//! `tenant` token for that tenant. Checked before any handler runs; refusals and mutating
//! requests are audit lines.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use safekeeper_api::models::{SafekeeperStatus, TimelineCreateRequest, WalDigest};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use utils::auth::{audit, check_scope, check_tenant_permission, parse_bearer, JwtAuth, Outcome, Scope};
use utils::{Lsn, TenantId, TimelineId};

use crate::timeline::{GlobalTimelines, TimelineError};
use crate::wal_backup::read_wal_any;

/// An error answer: status code and a JSON `{"msg": ...}` body.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "msg": self.1 }))).into_response()
    }
}

impl From<TimelineError> for ApiError {
    fn from(e: TimelineError) -> Self {
        let code = match &e {
            TimelineError::NotFound { .. } => StatusCode::NOT_FOUND,
            TimelineError::AlreadyExists { .. } => StatusCode::CONFLICT,
            TimelineError::Invalid(_) => StatusCode::BAD_REQUEST,
            TimelineError::Io(..) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(code, e.to_string())
    }
}

fn bad_request(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

fn parse_ids(tenant: &str, timeline: Option<&str>) -> Result<(TenantId, Option<TimelineId>), ApiError> {
    let t = tenant.parse().map_err(|e| bad_request(format!("{e}")))?;
    let tl = timeline.map(|s| s.parse()).transpose().map_err(|e| bad_request(format!("{e}")))?;
    Ok((t, tl))
}

const PRIVILEGED_SCOPES: &[Scope] = &[Scope::SafekeeperData, Scope::Admin];

/// Checks the token before the handler runs; audits refusals and mutations.
async fn auth_middleware(State(auth): State<Option<Arc<JwtAuth>>>, req: Request, next: Next) -> Response {
    let peer = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let open = method == Method::GET && matches!(segs.as_slice(), ["v1", "status"] | ["metrics"]);
    let tenant = match segs.as_slice() {
        ["v1", "tenant", t, ..] => t.parse::<TenantId>().ok(),
        _ => None,
    };
    let mut scope = None;
    if let (Some(auth), false) = (&auth, open) {
        let header = req.headers().get(AUTHORIZATION).map(|v| v.to_str().unwrap_or(""));
        let checked = parse_bearer(header).and_then(|tok| auth.decode(tok)).and_then(|claims| {
            scope = Some(claims.scope);
            match tenant {
                Some(t) => check_tenant_permission(&claims, t, PRIVILEGED_SCOPES),
                None => check_scope(&claims, PRIVILEGED_SCOPES),
            }
        });
        if let Err(e) = checked {
            audit("safekeeper", peer, scope, method.as_str(), &path, Outcome::Denied, e.reason());
            let code = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::UNAUTHORIZED);
            return ApiError(code, e.to_string()).into_response();
        }
    }
    let resp = next.run(req).await;
    if method != Method::GET {
        audit("safekeeper", peer, scope, method.as_str(), &path, Outcome::Allowed, resp.status().as_str());
    }
    resp
}

pub fn router(timelines: Arc<GlobalTimelines>, auth: Option<Arc<JwtAuth>>) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/tenant/{tenant_id}/timeline", axum::routing::post(create_timeline))
        .route("/v1/tenant/{tenant_id}/timeline/{timeline_id}", get(get_timeline).delete(delete_timeline))
        .route("/v1/tenant/{tenant_id}/timeline/{timeline_id}/digest", get(digest))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            ApiError(StatusCode::NOT_FOUND, "no such route; see the safekeeper's HTTP API in its docs".into())
        })
        .with_state(timelines)
        .layer(axum::middleware::from_fn_with_state(auth, auth_middleware))
}

async fn status(State(tls): State<Arc<GlobalTimelines>>) -> Json<SafekeeperStatus> {
    Json(SafekeeperStatus { id: tls.node_id, timelines: tls.list().len() })
}

async fn create_timeline(
    State(tls): State<Arc<GlobalTimelines>>,
    Path(tenant): Path<String>,
    body: Result<Json<TimelineCreateRequest>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let (tenant_id, _) = parse_ids(&tenant, None)?;
    let Json(req) = body.map_err(|e| bad_request(format!("bad timeline create request: {}", e.body_text())))?;
    let tl = tokio::task::spawn_blocking(move || tls.create(tenant_id, &req))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok((StatusCode::CREATED, Json(tl.status())))
}

async fn get_timeline(
    State(tls): State<Arc<GlobalTimelines>>,
    Path((t, tl)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    let (tenant_id, timeline_id) = parse_ids(&t, Some(&tl))?;
    let tl = tls.get(tenant_id, timeline_id.expect("given"))?;
    Ok(Json(tl.status()))
}

async fn delete_timeline(
    State(tls): State<Arc<GlobalTimelines>>,
    Path((t, tl)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    let (tenant_id, timeline_id) = parse_ids(&t, Some(&tl))?;
    let timeline_id = timeline_id.expect("given");
    let existed = tokio::task::spawn_blocking(move || tls.delete(tenant_id, timeline_id))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    if !existed {
        return Err(TimelineError::NotFound { tenant_id, timeline_id }.into());
    }
    Ok(Json(serde_json::json!({ "deleted": true })))
}

#[derive(Deserialize)]
struct DigestQuery {
    from_lsn: String,
    until_lsn: String,
}

async fn digest(
    State(tls): State<Arc<GlobalTimelines>>,
    Path((t, tl)): Path<(String, String)>,
    Query(q): Query<DigestQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let (tenant_id, timeline_id) = parse_ids(&t, Some(&tl))?;
    let tl = tls.get(tenant_id, timeline_id.expect("given"))?;
    let from: Lsn = q.from_lsn.parse().map_err(|e| bad_request(format!("from_lsn: {e}")))?;
    let until: Lsn = q.until_lsn.parse().map_err(|e| bad_request(format!("until_lsn: {e}")))?;
    if until < from {
        return Err(bad_request(format!("until_lsn {until} is before from_lsn {from}")));
    }
    let flush = tl.status().flush_lsn;
    if until > flush {
        return Err(bad_request(format!("until_lsn {until} is beyond this safekeeper's WAL end {flush}")));
    }
    // WAL no longer on local disk is read from remote storage, so every safekeeper can digest the
    // same range however much it has removed.
    let remote = tls.remote().cloned();
    let mut h = Sha256::new();
    let mut pos = from;
    let mut cache = None;
    while pos < until {
        let to = Lsn(until.0.min(pos.0 + (1 << 20)));
        let data = read_wal_any(&tl, remote.as_ref(), pos, to, &mut cache)
            .await
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("reading WAL {pos}..{to}: {e:#}")))?;
        h.update(&data);
        pos += data.len() as u64;
    }
    let sha256 = hex::encode(h.finalize());
    Ok(Json(WalDigest { from_lsn: from, until_lsn: until, sha256 }))
}

async fn metrics(State(tls): State<Arc<GlobalTimelines>>) -> impl IntoResponse {
    let mut out = String::new();
    out.push_str("# HELP safekeeper_timelines Timelines held by this safekeeper.\n# TYPE safekeeper_timelines gauge\n");
    let list = tls.list();
    out.push_str(&format!("safekeeper_timelines {}\n", list.len()));
    out.push_str("# HELP safekeeper_flush_lsn_bytes End of durable WAL.\n# TYPE safekeeper_flush_lsn_bytes gauge\n");
    let mut commit = String::from(
        "# HELP safekeeper_commit_lsn_bytes Committed WAL end.\n# TYPE safekeeper_commit_lsn_bytes gauge\n",
    );
    let mut term = String::from("# HELP safekeeper_term Current term.\n# TYPE safekeeper_term gauge\n");
    let mut backup = String::from(
        "# HELP safekeeper_backup_lsn_bytes End of the WAL offloaded to remote storage.\n# TYPE safekeeper_backup_lsn_bytes gauge\n",
    );
    for tl in list {
        let s = tl.status();
        let labels = format!("tenant_id=\"{}\",timeline_id=\"{}\"", s.tenant_id, s.timeline_id);
        out.push_str(&format!("safekeeper_flush_lsn_bytes{{{labels}}} {}\n", s.flush_lsn.0));
        commit.push_str(&format!("safekeeper_commit_lsn_bytes{{{labels}}} {}\n", s.commit_lsn.0));
        term.push_str(&format!("safekeeper_term{{{labels}}} {}\n", s.term));
        backup.push_str(&format!("safekeeper_backup_lsn_bytes{{{labels}}} {}\n", s.backup_lsn.0));
    }
    out.push_str(&commit);
    out.push_str(&term);
    out.push_str(&backup);
    ([("content-type", "text/plain; version=0.0.4")], out)
}
