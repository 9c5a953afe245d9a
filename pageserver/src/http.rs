//! The pageserver's HTTP management API.
//!
//! - `GET /v1/status`
//! - `GET|POST /v1/tenant`, `GET /v1/tenant/{tenant_id}`
//! - `GET|POST /v1/tenant/{tenant_id}/timeline`, `GET /v1/tenant/{tenant_id}/timeline/{timeline_id}`
//! - `POST /v1/tenant/{tenant_id}/attach` (download a tenant from remote storage and load it)
//! - `DELETE /v1/tenant/{tenant_id}/timeline/{timeline_id}/layer/{layer_file_name}` (evict the
//!   layer's local file; it must be in remote storage; reads download it again)
//! - `PUT /v1/tenant/{tenant_id}/timeline/{timeline_id}/checkpoint[?wait_until_uploaded=true]`
//!   (flush the open layer; optionally wait until remote storage has it)
//! - `GET /v1/tenant/{tenant_id}/timeline/{timeline_id}/get_lsn_by_timestamp?timestamp=<RFC 3339>`
//!   (the LSN at which the timeline looked as at that time; see
//!   [`Timeline::find_lsn_by_timestamp`])
//! - `GET /v1/tenant/{tenant_id}/timeline/{timeline_id}/lsn_leases` (the unexpired LSN leases,
//!   `[{"lsn": "0/16B5A50", "valid_until": <Unix ms>}]`, by LSN; read-only, so a tenant token
//!   may read its own)
//! - `GET|PUT /v1/tenant/{tenant_id}/config` (the tenant's settings; PUT replaces its overrides
//!   with the JSON object given, e.g. `{"pitr_interval": "1h"}`)
//! - `PUT /v1/tenant/{tenant_id}/timeline/{timeline_id}/compact[?force=true]` and `.../do_gc`
//!   (run compaction or GC now; the answer says what they did)
//! - `DELETE /v1/tenant/{tenant_id}/timeline/{timeline_id}` (no child branches allowed) and
//!   `DELETE /v1/tenant/{tenant_id}`: local and remote data removed
//! - `GET /metrics` (Prometheus text: per timeline LSNs, layers, upload queue and failures)
//!
//! With `http_auth_type = 'NeonJWT'` every route but `/v1/status` and `/metrics` needs
//! `Authorization: Bearer <jwt>` (see [`access`]): checked before any handler runs, so a refused
//! request does nothing. Refusals and every mutating request are audit lines.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use pageserver_api::models::{LsnByTimestamp, TenantCreateRequest, TenantInfo, TimelineCreateRequest, TimelineInfo};
use postgres_ffi::TimestampTz;
use utils::auth::{audit, check_scope, check_tenant_permission, parse_bearer, JwtAuth, Outcome, Scope};
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

/// A body that is not the expected JSON: 413 if it is over [`MAX_REQUEST_BODY_BYTES`], else 400.
fn json_rejection(e: JsonRejection, what: &str) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("{what}: the body is over the {MAX_REQUEST_BODY_BYTES}-byte limit of this API"),
        )
    } else {
        bad(format!("bad {what}: {}", e.body_text()))
    }
}

type QueryParams = Result<Query<std::collections::HashMap<String, String>>, QueryRejection>;

/// The boolean query parameter `name` (`true`/`false`, absent = false).
fn bool_param(query: QueryParams, name: &str) -> Result<bool, ApiError> {
    let Query(params) = query.map_err(|e| bad(format!("bad query string: {}", e.body_text())))?;
    match params.get(name).map(String::as_str) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(bad(format!("{name}={other}: use true or false"))),
    }
}

/// Runs blocking timeline work off the runtime; a failure (or a panic) is a 500 with its message.
async fn run_blocking<T: Send + 'static, E: std::fmt::Display + Send + 'static>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, ApiError> {
    let internal = |msg: String| ApiError(StatusCode::INTERNAL_SERVER_ERROR, msg);
    tokio::task::spawn_blocking(f).await.map_err(|e| internal(e.to_string()))?.map_err(|e| internal(e.to_string()))
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
    let status = tl.remote_client().map(|r| r.status());
    let layers = tl.historic_layers();
    TimelineInfo {
        tenant_id: tl.tenant_id(),
        timeline_id: tl.timeline_id(),
        ancestor_timeline_id: md.ancestor_timeline,
        ancestor_lsn: md.ancestor_timeline.map(|_| md.ancestor_lsn),
        last_record_lsn: tl.get_last_record_lsn(),
        disk_consistent_lsn: tl.get_disk_consistent_lsn(),
        remote_consistent_lsn: status.as_ref().map_or(Lsn::INVALID, |s| s.remote_consistent_lsn),
        initdb_lsn: md.initdb_lsn,
        pg_version: md.pg_version,
        upload_queue_len: status.as_ref().map(|s| s.queue_len),
        last_upload_error: status.and_then(|s| s.last_error),
        latest_gc_cutoff_lsn: md.latest_gc_cutoff_lsn,
        layer_count: layers.len(),
        l0_delta_count: layers.iter().filter(|l| l.is_l0()).count(),
        image_layer_count: layers.iter().filter(|l| !l.is_delta()).count(),
        layer_bytes: layers.iter().map(|l| l.file_size_bytes).sum(),
    }
}

/// What a route needs.
#[derive(Debug, PartialEq, Eq)]
pub enum Access {
    /// No token: `/v1/status`, `/metrics` (ids and LSNs only, no data).
    Open,
    /// A `tenant` token for this tenant, or `pageserverapi`/`admin`: reads of the tenant, its
    /// config and timelines, timeline create, get_lsn_by_timestamp.
    Tenant(TenantId),
    /// `pageserverapi`/`admin`: tenant list/create/delete/attach, config change, timeline
    /// delete, compaction, GC, checkpoint, layer eviction, and anything unknown.
    Management,
}

const MANAGEMENT_SCOPES: &[Scope] = &[Scope::PageServerApi, Scope::Admin];

/// Classifies a request by method and path (before routing: unknown paths need management).
pub fn access(method: &Method, path: &str) -> Access {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segs.as_slice() {
        ["v1", "status"] | ["metrics"] if method == Method::GET => Access::Open,
        ["v1", "tenant", t, rest @ ..] if !rest.is_empty() || method == Method::GET => {
            let Ok(tenant) = t.parse::<TenantId>() else { return Access::Management };
            if matches!((method, rest), (&Method::GET, _) | (&Method::POST, ["timeline"])) {
                Access::Tenant(tenant)
            } else {
                Access::Management
            }
        }
        _ => Access::Management,
    }
}

/// Checks the token before the handler runs; audits refusals and mutations.
async fn auth_middleware(State(auth): State<Option<Arc<JwtAuth>>>, req: Request, next: Next) -> Response {
    let peer = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let operation = method.to_string();
    let needs = access(&method, &path);
    let mut scope = None;
    if let (Some(auth), false) = (&auth, needs == Access::Open) {
        let header = req.headers().get(AUTHORIZATION).map(|v| v.to_str().unwrap_or(""));
        let checked = parse_bearer(header).and_then(|tok| auth.decode(tok)).and_then(|claims| {
            scope = Some(claims.scope);
            match &needs {
                Access::Tenant(t) => check_tenant_permission(&claims, *t, MANAGEMENT_SCOPES),
                _ => check_scope(&claims, MANAGEMENT_SCOPES),
            }
        });
        if let Err(e) = checked {
            audit("pageserver", peer, scope, &operation, &path, Outcome::Denied, e.reason());
            let code = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::UNAUTHORIZED);
            return ApiError(code, e.to_string()).into_response();
        }
    }
    let resp = next.run(req).await;
    if method != Method::GET {
        let status = resp.status();
        audit("pageserver", peer, scope, &operation, &path, Outcome::Allowed, status.as_str());
    }
    resp
}

/// Largest request body the API accepts (its bodies are small JSON objects); larger ones get 413
/// before any handler runs.
pub const MAX_REQUEST_BODY_BYTES: usize = 256 * 1024;

/// Requests in flight per tenant, bounded by `http_tenant_concurrency_limit`.
pub struct TenantLimits {
    permits: usize,
    semaphores: std::sync::Mutex<std::collections::HashMap<TenantId, Arc<tokio::sync::Semaphore>>>,
}

impl TenantLimits {
    pub fn new(permits: usize) -> TenantLimits {
        TenantLimits { permits, semaphores: std::sync::Mutex::new(std::collections::HashMap::new()) }
    }

    fn semaphore(&self, tenant: TenantId) -> Arc<tokio::sync::Semaphore> {
        let mut map = self.semaphores.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(map.entry(tenant).or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(self.permits))))
    }
}

/// Refuses a tenant's request with 429 while `permits` of its requests are in flight.
async fn tenant_limit_middleware(State(limits): State<Arc<TenantLimits>>, req: Request, next: Next) -> Response {
    let segs: Vec<&str> = req.uri().path().trim_matches('/').split('/').collect();
    let tenant = match segs.as_slice() {
        ["v1", "tenant", t, ..] => t.parse::<TenantId>().ok(),
        _ => None,
    };
    let Some(tenant) = tenant else { return next.run(req).await };
    let Ok(_permit) = limits.semaphore(tenant).try_acquire_owned() else {
        return ApiError(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "tenant {tenant} has {} API requests in flight (http_tenant_concurrency_limit); retry when one finishes",
                limits.permits
            ),
        )
        .into_response();
    };
    next.run(req).await
}

pub fn router(mgr: Arc<TenantManager>) -> Router {
    let auth = mgr.conf.http_auth.clone();
    let limits = Arc::new(TenantLimits::new(mgr.conf.http_tenant_concurrency_limit));
    Router::new()
        .route(
            "/v1/status",
            get(|State(m): State<Arc<TenantManager>>| async move { Json(serde_json::json!({ "id": m.conf.id })) }),
        )
        .route("/metrics", get(metrics))
        .route("/v1/tenant", get(list_tenants).post(create_tenant))
        .route("/v1/tenant/{tenant_id}", get(get_tenant).delete(delete_tenant))
        .route("/v1/tenant/{tenant_id}/config", get(get_tenant_config).put(set_tenant_config))
        .route("/v1/tenant/{tenant_id}/attach", post(attach_tenant))
        .route("/v1/tenant/{tenant_id}/timeline", get(list_timelines).post(create_timeline))
        .route("/v1/tenant/{tenant_id}/timeline/{timeline_id}", get(get_timeline).delete(delete_timeline))
        .route("/v1/tenant/{tenant_id}/timeline/{timeline_id}/compact", put(compact))
        .route("/v1/tenant/{tenant_id}/timeline/{timeline_id}/do_gc", put(do_gc))
        .route("/v1/tenant/{tenant_id}/timeline/{timeline_id}/checkpoint", put(checkpoint))
        .route("/v1/tenant/{tenant_id}/timeline/{timeline_id}/layer/{layer_name}", delete(evict_layer))
        .route("/v1/tenant/{tenant_id}/timeline/{timeline_id}/get_lsn_by_timestamp", get(get_lsn_by_timestamp))
        .route("/v1/tenant/{tenant_id}/timeline/{timeline_id}/lsn_leases", get(lsn_leases))
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such route".into()) })
        .with_state(mgr)
        .layer(axum::middleware::from_fn_with_state(limits, tenant_limit_middleware))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_REQUEST_BODY_BYTES))
        // Outermost: nothing runs for a request whose token is refused.
        .layer(axum::middleware::from_fn_with_state(auth, auth_middleware))
}

/// Prometheus text exposition of every timeline's state.
async fn metrics(State(m): State<Arc<TenantManager>>) -> impl IntoResponse {
    type Metric = (&'static str, &'static str, fn(&TimelineInfo) -> u64);
    const METRICS: &[Metric] = &[
        ("pageserver_last_record_lsn_bytes", "End of the last ingested WAL record.", |i| i.last_record_lsn.0),
        ("pageserver_disk_consistent_lsn_bytes", "What local layer files cover.", |i| i.disk_consistent_lsn.0),
        ("pageserver_remote_consistent_lsn_bytes", "What the uploaded index covers.", |i| i.remote_consistent_lsn.0),
        ("pageserver_gc_cutoff_lsn_bytes", "Reads and branches below this LSN are refused.", |i| {
            i.latest_gc_cutoff_lsn.0
        }),
        ("pageserver_layers", "Layer files (local and remote-only).", |i| i.layer_count as u64),
        ("pageserver_l0_deltas", "L0 delta layers waiting for compaction.", |i| i.l0_delta_count as u64),
        ("pageserver_layer_bytes", "Bytes of the layer files.", |i| i.layer_bytes),
        ("pageserver_upload_queue_length", "Uploads scheduled and not done.", |i| {
            i.upload_queue_len.unwrap_or(0) as u64
        }),
        ("pageserver_upload_failing", "1 while the upload at the head of the queue keeps failing.", |i| {
            u64::from(i.last_upload_error.is_some())
        }),
    ];
    let infos: Vec<TimelineInfo> =
        m.list_tenants().iter().flat_map(|t| t.timelines()).map(|tl| timeline_info(&tl)).collect();
    let mut out = String::new();
    for (name, help, value) in METRICS {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n"));
        for i in &infos {
            out.push_str(&format!(
                "{name}{{tenant_id=\"{}\",timeline_id=\"{}\"}} {}\n",
                i.tenant_id,
                i.timeline_id,
                value(i)
            ));
        }
    }
    ([("content-type", "text/plain; version=0.0.4")], out)
}

async fn list_tenants(State(m): State<Arc<TenantManager>>) -> Json<Vec<TenantInfo>> {
    Json(m.list_tenants().iter().map(|t| TenantInfo { id: t.id, timelines: t.timelines().len() }).collect())
}

async fn create_tenant(
    State(m): State<Arc<TenantManager>>,
    body: Result<Json<TenantCreateRequest>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Json(req) = body.map_err(|e| json_rejection(e, "tenant create request"))?;
    let id = req.tenant_id.unwrap_or_else(TenantId::generate);
    m.create_tenant(id, req.config).await?;
    Ok((StatusCode::CREATED, Json(serde_json::json!({ "id": id }))))
}

async fn get_tenant(State(m): State<Arc<TenantManager>>, Path(t): Path<String>) -> Result<impl IntoResponse, ApiError> {
    let t = m.get_tenant(tenant_id(&t)?)?;
    Ok(Json(TenantInfo { id: t.id, timelines: t.timelines().len() }))
}

async fn delete_tenant(
    State(m): State<Arc<TenantManager>>,
    Path(t): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    m.delete_tenant(tenant_id(&t)?).await?;
    Ok(StatusCode::OK)
}

fn tenant_config_json(t: &crate::tenant_mgr::Tenant) -> serde_json::Value {
    serde_json::json!({ "tenant_specific_overrides": t.overrides(), "effective_config": t.conf().to_map() })
}

async fn get_tenant_config(
    State(m): State<Arc<TenantManager>>,
    Path(t): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let t = m.get_tenant(tenant_id(&t)?)?;
    Ok(Json(tenant_config_json(&t)))
}

/// Replaces the tenant's overrides with the object given (values as strings or numbers).
async fn set_tenant_config(
    State(m): State<Arc<TenantManager>>,
    Path(t): Path<String>,
    body: Result<Json<std::collections::BTreeMap<String, serde_json::Value>>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let id = tenant_id(&t)?;
    let Json(raw) =
        body.map_err(|e| json_rejection(e, "tenant config (send a JSON object like {\"pitr_interval\": \"1h\"})"))?;
    let mut overrides = std::collections::BTreeMap::new();
    for (k, v) in raw {
        let v = match v {
            serde_json::Value::String(s) => s,
            serde_json::Value::Number(n) => n.to_string(),
            other => return Err(bad(format!("{k}: expected a string or a number, got {other}"))),
        };
        overrides.insert(k, v);
    }
    m.set_tenant_config(id, overrides).await?;
    let tenant = m.get_tenant(id)?;
    Ok(Json(tenant_config_json(&tenant)))
}

async fn delete_timeline(
    State(m): State<Arc<TenantManager>>,
    Path((t, tl)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    m.delete_timeline(tenant_id(&t)?, timeline_id(&tl)?).await?;
    Ok(StatusCode::OK)
}

/// `?force=true`: compact any two L0s and create images wherever a delta lies above them.
async fn compact(
    State(m): State<Arc<TenantManager>>,
    Path((t, tl)): Path<(String, String)>,
    query: QueryParams,
) -> Result<impl IntoResponse, ApiError> {
    let tl = m.get_timeline(tenant_id(&t)?, timeline_id(&tl)?)?;
    let force = bool_param(query, "force")?;
    let result = run_blocking(move || tl.compact(force)).await?;
    Ok(Json(result))
}

async fn do_gc(
    State(m): State<Arc<TenantManager>>,
    Path((t, tl)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    let tl = m.get_timeline(tenant_id(&t)?, timeline_id(&tl)?)?;
    let result = run_blocking(move || tl.gc(std::time::SystemTime::now())).await?;
    Ok(Json(result))
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
    let Json(req) = body.map_err(|e| json_rejection(e, "timeline create request"))?;
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

async fn lsn_leases(
    State(m): State<Arc<TenantManager>>,
    Path((t, tl)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    let tl = m.get_timeline(tenant_id(&t)?, timeline_id(&tl)?)?;
    let leases: Vec<serde_json::Value> = tl
        .lease_list(std::time::SystemTime::now())
        .into_iter()
        .map(|(lsn, until)| {
            let millis = until.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
            serde_json::json!({ "lsn": lsn, "valid_until": millis as u64 })
        })
        .collect();
    Ok(Json(leases))
}

/// `?wait_until_uploaded=true`: also wait (up to 5 minutes) until the upload queue is empty,
/// so `remote_consistent_lsn` covers the checkpoint.
async fn checkpoint(
    State(m): State<Arc<TenantManager>>,
    Path((t, tl)): Path<(String, String)>,
    query: QueryParams,
) -> Result<impl IntoResponse, ApiError> {
    let tl = m.get_timeline(tenant_id(&t)?, timeline_id(&tl)?)?;
    let wait_uploaded = bool_param(query, "wait_until_uploaded")?;
    let tl2 = tl.clone();
    run_blocking(move || tl2.checkpoint()).await?;
    if wait_uploaded {
        let Some(remote) = tl.remote_client() else {
            return Err(bad("wait_until_uploaded: this pageserver has no remote storage configured"));
        };
        if let Err(status) = remote.wait_uploaded(std::time::Duration::from_secs(300)).await {
            return Err(ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "uploads not done after 5 minutes: {} queued, last error: {}",
                    status.queue_len,
                    status.last_error.as_deref().unwrap_or("none")
                ),
            ));
        }
    }
    Ok(Json(timeline_info(&tl)))
}

/// Evicts a layer's local file (it must be in remote storage); reads download it again.
async fn evict_layer(
    State(m): State<Arc<TenantManager>>,
    Path((t, tl, layer)): Path<(String, String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    let tl = m.get_timeline(tenant_id(&t)?, timeline_id(&tl)?)?;
    let evicted = tokio::task::spawn_blocking(move || tl.evict_layer(&layer))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| match e {
            crate::tenant::timeline::TimelineError::Invalid(msg) => bad(msg),
            other => ApiError(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
        })?;
    Ok(Json(serde_json::json!({ "evicted": evicted })))
}

async fn attach_tenant(
    State(m): State<Arc<TenantManager>>,
    Path(t): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let t = m.attach_tenant(tenant_id(&t)?).await?;
    Ok((StatusCode::CREATED, Json(TenantInfo { id: t.id, timelines: t.timelines().len() })))
}

async fn get_lsn_by_timestamp(
    State(m): State<Arc<TenantManager>>,
    Path((t, tl)): Path<(String, String)>,
    query: Result<Query<std::collections::HashMap<String, String>>, QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    const USAGE: &str = "pass ?timestamp=<RFC 3339 time>, e.g. ?timestamp=2024-05-01T12:00:00.5Z";
    let tl = m.get_timeline(tenant_id(&t)?, timeline_id(&tl)?)?;
    let Query(params) = query.map_err(|e| bad(format!("bad query string: {}; {USAGE}", e.body_text())))?;
    let raw = params.get("timestamp").ok_or_else(|| bad(format!("missing timestamp parameter: {USAGE}")))?;
    let timestamp = parse_rfc3339(raw).map_err(|e| bad(format!("timestamp '{raw}': {e}; {USAGE}")))?;
    let tl2 = tl.clone();
    let found = tokio::task::spawn_blocking(move || tl2.find_lsn_by_timestamp(timestamp))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("looking up timestamp {raw} on timeline {}: {e}", tl.timeline_id()),
            )
        })?;
    Ok(Json(LsnByTimestamp { lsn: found.lsn(), kind: found.kind().to_string() }))
}

/// Postgres's epoch (2000-01-01) in Unix seconds.
const POSTGRES_EPOCH_UNIX_SECS: i64 = 946_684_800;

/// Parses an RFC 3339 time (`2024-05-01T12:00:00Z`, `2024-05-01 12:00:00.123456+02:00`) into a
/// Postgres `TimestampTz` (µs since 2000-01-01 UTC). Fractions beyond microseconds are cut.
/// A space where the offset's `+` belongs is taken as `+` (an unescaped `+` in a URL query
/// decodes to a space).
pub fn parse_rfc3339(s: &str) -> Result<TimestampTz, String> {
    let b = s.as_bytes();
    let num = |range: std::ops::Range<usize>, what: &str| -> Result<i64, String> {
        let part = b.get(range).filter(|p| p.iter().all(u8::is_ascii_digit));
        part.and_then(|p| std::str::from_utf8(p).ok()?.parse::<i64>().ok()).ok_or_else(|| format!("bad {what}"))
    };
    let sep = |i: usize, want: &[u8]| b.get(i).is_some_and(|c| want.contains(c));
    if !(sep(4, b"-") && sep(7, b"-") && sep(10, b"Tt ") && sep(13, b":") && sep(16, b":")) {
        return Err("not of the form YYYY-MM-DDTHH:MM:SS[.fraction](Z|+HH:MM|-HH:MM)".to_string());
    }
    let (year, month, day) = (num(0..4, "year")?, num(5..7, "month")?, num(8..10, "day")?);
    let (hour, minute, second) = (num(11..13, "hour")?, num(14..16, "minute")?, num(17..19, "second")?);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let month_days = [31, if leap { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    if !(1..=12).contains(&month) || day < 1 || day > month_days[month as usize - 1] {
        return Err(format!("{year:04}-{month:02}-{day:02} is not a date"));
    }
    if hour > 23 || minute > 59 || second > 60 {
        return Err(format!("{hour:02}:{minute:02}:{second:02} is not a time of day"));
    }
    let mut i = 19;
    let mut micros = 0i64;
    if sep(i, b".") {
        let digits = b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 {
            return Err("a '.' must be followed by digits".to_string());
        }
        for k in 0..6 {
            micros = micros * 10 + b.get(i + 1 + k).filter(|_| k < digits).map_or(0, |c| i64::from(c - b'0'));
        }
        i += 1 + digits;
    }
    let offset_secs = match &b[i..] {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-' | b' '), h1, h2, b':', m1, m2] => {
            let hm = [*h1, *h2, *m1, *m2];
            if !hm.iter().all(u8::is_ascii_digit) {
                return Err("bad UTC offset".to_string());
            }
            let (h, m) = (i64::from((h1 - b'0') * 10 + (h2 - b'0')), i64::from((m1 - b'0') * 10 + (m2 - b'0')));
            if h > 23 || m > 59 {
                return Err("bad UTC offset".to_string());
            }
            if *sign == b'-' {
                -(h * 3600 + m * 60)
            } else {
                h * 3600 + m * 60
            }
        }
        _ => return Err("missing or bad UTC offset (Z, +HH:MM or -HH:MM) after the time".to_string()),
    };
    // Days from 1970-01-01 to the date (Howard Hinnant's days_from_civil).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let unix_secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_secs;
    Ok((unix_secs - POSTGRES_EPOCH_UNIX_SECS) * 1_000_000 + micros)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_access() {
        let t: TenantId = "0123456789abcdef0123456789abcdef".parse().unwrap();
        let tl = "fedcba9876543210fedcba9876543210";
        let tenant = |m: Method, p: &str| assert_eq!(access(&m, p), Access::Tenant(t), "{m} {p}");
        let mgmt = |m: Method, p: &str| assert_eq!(access(&m, p), Access::Management, "{m} {p}");
        assert_eq!(access(&Method::GET, "/v1/status"), Access::Open);
        assert_eq!(access(&Method::GET, "/metrics"), Access::Open);
        mgmt(Method::POST, "/v1/status");
        tenant(Method::GET, &format!("/v1/tenant/{t}"));
        tenant(Method::GET, &format!("/v1/tenant/{t}/config"));
        tenant(Method::GET, &format!("/v1/tenant/{t}/timeline"));
        tenant(Method::POST, &format!("/v1/tenant/{t}/timeline"));
        tenant(Method::GET, &format!("/v1/tenant/{t}/timeline/{tl}/get_lsn_by_timestamp"));
        tenant(Method::GET, &format!("/v1/tenant/{t}/timeline/{tl}/lsn_leases"));
        mgmt(Method::GET, "/v1/tenant");
        mgmt(Method::POST, "/v1/tenant");
        mgmt(Method::DELETE, &format!("/v1/tenant/{t}"));
        mgmt(Method::PUT, &format!("/v1/tenant/{t}/config"));
        mgmt(Method::POST, &format!("/v1/tenant/{t}/attach"));
        mgmt(Method::DELETE, &format!("/v1/tenant/{t}/timeline/{tl}"));
        for op in ["compact", "do_gc", "checkpoint"] {
            mgmt(Method::PUT, &format!("/v1/tenant/{t}/timeline/{tl}/{op}"));
        }
        mgmt(Method::DELETE, &format!("/v1/tenant/{t}/timeline/{tl}/layer/x"));
        // A tenant id that does not parse, or an unknown path, needs a management token.
        mgmt(Method::GET, "/v1/tenant/not-hex/timeline");
        mgmt(Method::GET, "/v2/anything");
    }

    #[test]
    fn rfc3339() {
        assert_eq!(parse_rfc3339("2000-01-01T00:00:00Z"), Ok(0));
        assert_eq!(parse_rfc3339("2000-01-01T00:00:01.5Z"), Ok(1_500_000));
        assert_eq!(parse_rfc3339("2000-01-01t02:00:00.0000019+02:00"), Ok(1));
        assert_eq!(parse_rfc3339("2000-01-01 02:00:00 02:00"), Ok(0), "a '+' decoded to a space");
        assert_eq!(parse_rfc3339("1999-12-31T23:00:00-01:00"), Ok(0));
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Ok(-POSTGRES_EPOCH_UNIX_SECS * 1_000_000));
        // A leap day, checked against `date -u -d 2024-02-29T12:34:56Z +%s`.
        assert_eq!(
            parse_rfc3339("2024-02-29T12:34:56.789012Z").unwrap(),
            (1_709_210_096 - POSTGRES_EPOCH_UNIX_SECS) * 1_000_000 + 789_012
        );
        for bad in [
            "",
            "2024-02-30T00:00:00Z",
            "2023-02-29T00:00:00Z",
            "2024-13-01T00:00:00Z",
            "2024-01-01T24:00:00Z",
            "2024-01-01T00:00:00",
            "2024-01-01T00:00:00.Z",
            "2024-01-01T00:00:00+2:00",
            "2024-01-01T00:00:00Zjunk",
            "yesterday",
            "2024-01-01T00:00:00+ab:00",
        ] {
            assert!(parse_rfc3339(bad).is_err(), "{bad}");
        }
    }
}
