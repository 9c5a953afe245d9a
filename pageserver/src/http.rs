//! The pageserver's HTTP management API.
//!
//! - `GET /v1/status`
//! - `GET|POST /v1/tenant`, `GET /v1/tenant/{tenant_id}`
//! - `GET|POST /v1/tenant/{tenant_id}/timeline`, `GET /v1/tenant/{tenant_id}/timeline/{timeline_id}`
//! - `PUT /v1/tenant/{tenant_id}/timeline/{timeline_id}/checkpoint` (flush the open layer)

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use pageserver_api::models::{TenantCreateRequest, TenantInfo, TimelineCreateRequest, TimelineInfo};
use utils::{Lsn, TenantId, TimelineId};

use crate::tenant::timeline::Timeline;
use crate::tenant_mgr::{TenantManager, TenantMgrError};

pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "msg": self.1 }))).into_response()
    }
}

impl From<TenantMgrError> for ApiError {
    fn from(e: TenantMgrError) -> Self {
        let code = match &e {
            TenantMgrError::TenantNotFound(_) | TenantMgrError::TimelineNotFound(..) => StatusCode::NOT_FOUND,
            TenantMgrError::AlreadyExists(_) => StatusCode::CONFLICT,
            TenantMgrError::BadRequest(_) => StatusCode::BAD_REQUEST,
            TenantMgrError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(code, e.to_string())
    }
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

fn tenant_id(s: &str) -> Result<TenantId, ApiError> {
    s.parse().map_err(|e| bad(format!("{e}")))
}

fn timeline_id(s: &str) -> Result<TimelineId, ApiError> {
    s.parse().map_err(|e| bad(format!("{e}")))
}

pub fn timeline_info(tl: &Timeline) -> TimelineInfo {
    let md = tl.metadata();
    TimelineInfo {
        tenant_id: tl.tenant_id(),
        timeline_id: tl.timeline_id(),
        ancestor_timeline_id: md.ancestor_timeline,
        ancestor_lsn: md.ancestor_timeline.map(|_| md.ancestor_lsn),
        last_record_lsn: tl.get_last_record_lsn(),
        disk_consistent_lsn: tl.get_disk_consistent_lsn(),
        remote_consistent_lsn: Lsn::INVALID,
        initdb_lsn: md.initdb_lsn,
        pg_version: md.pg_version,
    }
}

pub fn router(mgr: Arc<TenantManager>) -> Router {
    Router::new()
        .route(
            "/v1/status",
            get(|State(m): State<Arc<TenantManager>>| async move { Json(serde_json::json!({ "id": m.conf.id })) }),
        )
        .route("/v1/tenant", get(list_tenants).post(create_tenant))
        .route("/v1/tenant/{tenant_id}", get(get_tenant))
        .route("/v1/tenant/{tenant_id}/timeline", get(list_timelines).post(create_timeline))
        .route("/v1/tenant/{tenant_id}/timeline/{timeline_id}", get(get_timeline))
        .route("/v1/tenant/{tenant_id}/timeline/{timeline_id}/checkpoint", put(checkpoint))
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such route".into()) })
        .with_state(mgr)
}

async fn list_tenants(State(m): State<Arc<TenantManager>>) -> Json<Vec<TenantInfo>> {
    Json(m.list_tenants().iter().map(|t| TenantInfo { id: t.id, timelines: t.timelines().len() }).collect())
}

async fn create_tenant(
    State(m): State<Arc<TenantManager>>,
    body: Result<Json<TenantCreateRequest>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Json(req) = body.map_err(|e| bad(format!("bad tenant create request: {}", e.body_text())))?;
    if !req.config.is_empty() {
        return Err(bad(format!(
            "per-tenant settings are not supported yet (got {:?}); configure defaults in pageserver.toml",
            req.config.keys().collect::<Vec<_>>()
        )));
    }
    let id = req.tenant_id.unwrap_or_else(TenantId::generate);
    m.create_tenant(id)?;
    Ok((StatusCode::CREATED, Json(serde_json::json!({ "id": id }))))
}

async fn get_tenant(State(m): State<Arc<TenantManager>>, Path(t): Path<String>) -> Result<impl IntoResponse, ApiError> {
    let t = m.get_tenant(tenant_id(&t)?)?;
    Ok(Json(TenantInfo { id: t.id, timelines: t.timelines().len() }))
}

async fn list_timelines(
    State(m): State<Arc<TenantManager>>,
    Path(t): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let t = m.get_tenant(tenant_id(&t)?)?;
    Ok(Json(t.timelines().iter().map(|tl| timeline_info(tl)).collect::<Vec<_>>()))
}

async fn create_timeline(
    State(m): State<Arc<TenantManager>>,
    Path(t): Path<String>,
    body: Result<Json<TimelineCreateRequest>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let t = tenant_id(&t)?;
    let Json(req) = body.map_err(|e| bad(format!("bad timeline create request: {}", e.body_text())))?;
    if let Some(v) = req.pg_version {
        if v != 15 && v / 10000 != 15 {
            return Err(bad(format!("Postgres version {v} is not supported; use 15")));
        }
    }
    let ancestor = match (req.ancestor_timeline_id, req.ancestor_start_lsn) {
        (Some(a), lsn) => Some((a, lsn)),
        (None, Some(_)) => return Err(bad("ancestor_start_lsn needs ancestor_timeline_id")),
        (None, None) => None,
    };
    let tl = m.create_timeline(t, req.new_timeline_id, ancestor).await?;
    Ok((StatusCode::CREATED, Json(timeline_info(&tl))))
}

async fn get_timeline(
    State(m): State<Arc<TenantManager>>,
    Path((t, tl)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    let tl = m.get_timeline(tenant_id(&t)?, timeline_id(&tl)?)?;
    Ok(Json(timeline_info(&tl)))
}

async fn checkpoint(
    State(m): State<Arc<TenantManager>>,
    Path((t, tl)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    let tl = m.get_timeline(tenant_id(&t)?, timeline_id(&tl)?)?;
    let tl2 = tl.clone();
    tokio::task::spawn_blocking(move || tl2.checkpoint())
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(Json(timeline_info(&tl)))
}
