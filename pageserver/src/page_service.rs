//! The page service: the pageserver's libpq endpoint for computes.
//!
//! - `pagestream <tenant_id> <timeline_id>`: COPY BOTH of `pageserver_api::pagestream` requests
//!   and responses (GetPage@LSN, Nblocks, Exists, DbSize, GetSlruSegment);
//! - `basebackup <tenant_id> <timeline_id> [lsn [prev_lsn]]`: COPY OUT of a compute start tarball
//!   (DESIGN D4);
//! - `fullbackup <tenant_id> <timeline_id> [lsn [prev_lsn]]`: the same with every relation file;
//!   `readonly` in place of `prev_lsn` serves any LSN to a compute that never writes WAL;
//! - `basebackup <tenant_id> <timeline_id> standby [min_lsn]`: a hot standby's start tarball, at
//!   the timeline's latest running-xacts record once `min_lsn` is ingested (see
//!   `basebackup::write_standby_basebackup`);
//! - `lease lsn <tenant_id> <timeline_id> <lsn>`: keep the history at `lsn` readable for the
//!   tenant's `lsn_lease_length` (GC leaves it alone); one row, `valid_until` in Unix
//!   milliseconds. A compute leases its start LSN and renews the lease while it runs; a
//!   basebackup leases its LSN too.
//!
//! `prev_lsn` is the start of the record ending at `lsn` (the backup's checkpoint record's
//! `xl_prev`). The timeline knows it at its last record LSN and at the end of every commit
//! record (the LSNs `get_lsn_by_timestamp` returns; see `Timeline::get_prev_record_lsn_at`),
//! and a branch made at either knows it at its start; elsewhere a caller that knows it (from the
//! WAL) passes it.
//!
//! A request waits (bounded) until ingest has reached its LSN; errors travel back as
//! pagestream Error responses naming what was asked, and the stream stays usable. A malformed
//! request ends the stream with an ErrorResponse (the session goes on). Failures that are the
//! pageserver's own (a damaged layer file, a failed redo) are also logged as errors.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::stream::{FuturesOrdered, StreamExt};
use pageserver_api::pagestream::{PagestreamRequest, PagestreamResponse, RelTagWire, SlruKind as WireSlruKind};
use postgres_ffi::slru::SlruKind;
use postgres_ffi::RelTag;
use pq_proto::{CopyMessage, FieldDescription, PostgresBackend, QueryError, QueryHandler, SqlState, UserError};
use tracing::{debug, error};
use utils::auth::{audit, check_scope, check_tenant_permission, AuthError, Claims, Outcome, Scope};
use utils::{Lsn, TenantId, TimelineId};

use crate::basebackup::{write_basebackup, write_standby_basebackup, BackupKind, BasebackupError};
use crate::pgdatadir_mapping::DatadirError;
use crate::tenant::timeline::Timeline;
use crate::tenant_mgr::TenantManager;

/// Tablespace of `pg_database_size`'s relations (pg_default).
const DEFAULT_TABLESPACE_OID: u32 = 1663;

pub struct PageServiceHandler {
    pub mgr: Arc<TenantManager>,
    /// With `pg_auth_type = 'NeonJWT'`: the session's token claims (set at login); every
    /// command naming a tenant is checked against them before it does anything.
    pub claims: Option<Arc<Mutex<Option<Claims>>>>,
    pub peer: Option<SocketAddr>,
}

fn user_err(code: SqlState, msg: impl Into<String>) -> QueryError {
    QueryError::User(UserError::new(code, msg))
}

fn rel(w: RelTagWire) -> RelTag {
    RelTag { spcnode: w.spcnode, dbnode: w.dbnode, relnode: w.relnode, forknum: w.forknum }
}

impl PageServiceHandler {
    pub fn new(mgr: Arc<TenantManager>, peer: Option<SocketAddr>) -> Self {
        PageServiceHandler { mgr, claims: None, peer }
    }

    /// A `tenant` token for this tenant, or `pageserverapi`/`admin`; refusals are audited.
    fn check_tenant(&self, tenant: TenantId, command: &str) -> Result<(), QueryError> {
        let Some(slot) = &self.claims else { return Ok(()) };
        let claims = slot.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let checked = match &claims {
            Some(c) => check_tenant_permission(c, tenant, &[Scope::PageServerApi, Scope::Admin]),
            None => Err(AuthError::Missing),
        };
        checked.map_err(|e| {
            let object = format!("tenant {tenant}");
            audit("pageserver", self.peer, claims.map(|c| c.scope), command, &object, Outcome::Denied, e.reason());
            QueryError::User(pq_proto::jwt::auth_user_error(&e))
        })
    }

    fn timeline(&self, tenant: &str, timeline: &str) -> Result<Arc<Timeline>, QueryError> {
        let t: TenantId = tenant.parse().map_err(|e| user_err(SqlState::INVALID_PARAMETER_VALUE, format!("{e}")))?;
        let tl: TimelineId =
            timeline.parse().map_err(|e| user_err(SqlState::INVALID_PARAMETER_VALUE, format!("{e}")))?;
        self.mgr.get_timeline(t, tl).map_err(|e| user_err(SqlState::UNDEFINED_OBJECT, e.to_string()))
    }
}

impl QueryHandler for PageServiceHandler {
    async fn process_query(&mut self, pgb: &mut PostgresBackend, query: &str) -> Result<(), QueryError> {
        let words: Vec<&str> = query.trim().trim_end_matches(';').split_whitespace().collect();
        if self.claims.is_some() {
            // Every command names its tenant: check it before anything else happens.
            let tenant = match words.as_slice() {
                ["lease", "lsn", t, ..] => Some(*t),
                [_, t, ..] => Some(*t),
                _ => None,
            };
            if let Some(t) = tenant.and_then(|t| t.parse::<TenantId>().ok()) {
                self.check_tenant(t, words[0])?;
            } else {
                let slot = self.claims.as_ref().map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).clone());
                // No tenant named: only management tokens go on (to the usage error).
                if let Some(Some(c)) = slot {
                    check_scope(&c, &[Scope::PageServerApi, Scope::Admin])
                        .map_err(|e| QueryError::User(pq_proto::jwt::auth_user_error(&e)))?;
                }
            }
        }
        match words.as_slice() {
            ["pagestream", tenant, timeline] => {
                let tl = self.timeline(tenant, timeline)?;
                pagestream(pgb, tl, self.mgr.conf.wait_lsn_timeout).await
            }
            ["basebackup", tenant, timeline, "standby", rest @ ..] if rest.len() <= 1 => {
                let tl = self.timeline(tenant, timeline)?;
                if let Some(s) = rest.first() {
                    // Not below what the caller has seen committed: wait for it to be ingested.
                    let lsn = s.parse::<Lsn>().map_err(|e| user_err(SqlState::INVALID_PARAMETER_VALUE, e.to_string()))?;
                    tl.wait_lsn(lsn, self.mgr.conf.wait_lsn_timeout)
                        .await
                        .map_err(|e| user_err(SqlState::INVALID_PARAMETER_VALUE, e.to_string()))?;
                }
                standby_basebackup(pgb, tl).await
            }
            ["lease", "lsn", tenant, timeline, lsn] => {
                let tl = self.timeline(tenant, timeline)?;
                let lsn = lsn.parse::<Lsn>().map_err(|e| user_err(SqlState::INVALID_PARAMETER_VALUE, e.to_string()))?;
                let until = tl
                    .lease_lsn(lsn, tl.conf().lsn_lease_length)
                    .map_err(|e| user_err(SqlState::INVALID_PARAMETER_VALUE, e.to_string()))?;
                let millis = until.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
                pgb.write_row_set(&[FieldDescription::text("valid_until")], [[Some(millis.to_string())]]).await?;
                Ok(())
            }
            [cmd @ ("basebackup" | "fullbackup"), tenant, timeline, rest @ ..] if rest.len() <= 2 => {
                let tl = self.timeline(tenant, timeline)?;
                let parse = |s: &str| {
                    s.parse::<Lsn>().map_err(|e| user_err(SqlState::INVALID_PARAMETER_VALUE, e.to_string()))
                };
                let lsn = match rest.first() {
                    Some(s) if *s != "latest" => Some(parse(s)?),
                    _ => None,
                };
                // "readonly": for a compute that never continues the WAL (a static endpoint), an
                // unknown previous record is fine: Postgres does not check the checkpoint
                // record's xl_prev, so it is written as 0/0.
                let readonly = rest.get(1) == Some(&"readonly");
                let prev_lsn = if readonly { None } else { rest.get(1).map(|s| parse(s)).transpose()? };
                if prev_lsn.is_some() && lsn.is_none() {
                    return Err(user_err(SqlState::INVALID_PARAMETER_VALUE, "prev_lsn needs an explicit lsn"));
                }
                let kind = if *cmd == "fullbackup" { BackupKind::Full } else { BackupKind::Compute };
                basebackup(pgb, tl, lsn, prev_lsn, readonly, kind, self.mgr.conf.wait_lsn_timeout).await
            }
            _ => Err(user_err(
                SqlState::FEATURE_NOT_SUPPORTED,
                format!(
                    "pageserver does not understand '{}': use pagestream, basebackup or fullbackup <tenant_id> <timeline_id> [lsn [prev_lsn]], basebackup <tenant_id> <timeline_id> standby [min_lsn], or lease lsn <tenant_id> <timeline_id> <lsn>",
                    query.chars().take(80).collect::<String>()
                ),
            )),
        }
    }
}

/// Requests of one pagestream connection handled at once: a compute pipelines its GetPage
/// requests (read-ahead), and they are served concurrently, answered in request order.
const PAGESTREAM_MAX_CONCURRENT_REQUESTS: usize = 32;

async fn pagestream(pgb: &mut PostgresBackend, tl: Arc<Timeline>, wait: std::time::Duration) -> Result<(), QueryError> {
    pgb.start_copy_both().await?;
    let mut in_flight = FuturesOrdered::new();
    let mut client_done = false;
    loop {
        if client_done && in_flight.is_empty() {
            pgb.finish_copy("COPY 0").await?;
            return Ok(());
        }
        tokio::select! {
            // Answers first, in request order; reading is cancel-safe (bytes stay buffered).
            biased;
            Some(resp) = in_flight.next(), if !in_flight.is_empty() => {
                let resp: PagestreamResponse = resp;
                pgb.write_copy_data(&resp.encode()).await?;
                pgb.flush().await?;
            }
            msg = pgb.read_copy_message(), if !client_done && in_flight.len() < PAGESTREAM_MAX_CONCURRENT_REQUESTS => {
                match msg? {
                    CopyMessage::Data(data) => match PagestreamRequest::decode(&data) {
                        Ok(req) => {
                            let tl = tl.clone();
                            in_flight.push_back(async move { handle_request(&tl, req, wait).await });
                        }
                        // A malformed request cannot be matched to an id; answer and end the stream.
                        Err(e) => {
                            return Err(user_err(SqlState::PROTOCOL_VIOLATION, format!("bad pagestream request: {e}")))
                        }
                    },
                    CopyMessage::Done => client_done = true,
                    CopyMessage::Fail(m) => {
                        return Err(user_err(SqlState::QUERY_CANCELED, format!("client aborted: {m}")))
                    }
                }
            }
        }
    }
}

async fn handle_request(tl: &Arc<Timeline>, req: PagestreamRequest, wait: std::time::Duration) -> PagestreamResponse {
    let request_id = req.request_id();
    let lsn = match &req {
        PagestreamRequest::Exists { lsn, .. }
        | PagestreamRequest::Nblocks { lsn, .. }
        | PagestreamRequest::GetPage { lsn, .. }
        | PagestreamRequest::DbSize { lsn, .. }
        | PagestreamRequest::GetSlruSegment { lsn, .. } => *lsn,
    };
    if let Err(e) = tl.wait_lsn(lsn, wait).await {
        return PagestreamResponse::Error { request_id, message: e.to_string() };
    }
    let tl = tl.clone();
    let tl_id = tl.timeline_id();
    let r = tokio::task::spawn_blocking(move || -> Result<PagestreamResponse, DatadirError> {
        Ok(match req {
            PagestreamRequest::Exists { rel: r, .. } => {
                PagestreamResponse::Exists { request_id, exists: tl.get_rel_exists(rel(r), lsn)? }
            }
            PagestreamRequest::Nblocks { rel: r, .. } => {
                PagestreamResponse::Nblocks { request_id, n_blocks: tl.get_rel_size(rel(r), lsn)? }
            }
            PagestreamRequest::GetPage { rel: r, blkno, .. } => {
                PagestreamResponse::Page { request_id, page: tl.get_rel_page_at_lsn(rel(r), blkno, lsn)? }
            }
            PagestreamRequest::DbSize { dbnode, .. } => PagestreamResponse::DbSize {
                request_id,
                db_size_bytes: tl.get_db_size(DEFAULT_TABLESPACE_OID, dbnode, lsn)? as i64,
            },
            PagestreamRequest::GetSlruSegment { kind, segno, .. } => {
                let kind = match kind {
                    WireSlruKind::Clog => SlruKind::Clog,
                    WireSlruKind::MultiXactMembers => SlruKind::MultiXactMembers,
                    WireSlruKind::MultiXactOffsets => SlruKind::MultiXactOffsets,
                };
                PagestreamResponse::SlruSegment { request_id, segment: tl.get_slru_segment(kind, segno, lsn)? }
            }
        })
    })
    .await;
    match r {
        Ok(Ok(resp)) => resp,
        Ok(Err(e)) => {
            // A damaged layer file or a failed redo is the pageserver's problem: log it where
            // operators look. A request for something that does not exist is the client's.
            if e.is_server_fault() {
                error!("pagestream request {request_id} on timeline {tl_id} at {lsn} failed: {e}");
            } else {
                debug!("pagestream request {request_id} failed: {e}");
            }
            PagestreamResponse::Error { request_id, message: e.to_string() }
        }
        Err(e) => PagestreamResponse::Error { request_id, message: format!("internal error: {e}") },
    }
}

/// A hot standby's start tarball at the timeline's latest running-xacts record.
async fn standby_basebackup(pgb: &mut PostgresBackend, tl: Arc<Timeline>) -> Result<(), QueryError> {
    let tar = tokio::task::spawn_blocking(move || {
        let mut buf = Vec::new();
        write_standby_basebackup(&mut buf, &tl, BackupKind::Compute).map(|_| buf)
    })
    .await
    .map_err(|e| user_err(SqlState::INTERNAL_ERROR, e.to_string()))?
    .map_err(|e| user_err(SqlState::INTERNAL_ERROR, format!("standby basebackup: {e}")))?;
    send_tar(pgb, tar).await
}

async fn send_tar(pgb: &mut PostgresBackend, tar: Vec<u8>) -> Result<(), QueryError> {
    pgb.start_copy_out().await?;
    for chunk in Bytes::from(tar).chunks(64 * 1024) {
        pgb.write_copy_data(chunk).await?;
    }
    pgb.finish_copy("COPY 0").await?;
    Ok(())
}

async fn basebackup(
    pgb: &mut PostgresBackend,
    tl: Arc<Timeline>,
    lsn: Option<Lsn>,
    prev_lsn: Option<Lsn>,
    readonly: bool,
    kind: BackupKind,
    wait: std::time::Duration,
) -> Result<(), QueryError> {
    let lsn = match lsn {
        Some(l) => {
            tl.wait_lsn(l, wait).await.map_err(|e| user_err(SqlState::INVALID_PARAMETER_VALUE, e.to_string()))?;
            l
        }
        None => tl.get_last_record_lsn(),
    };
    // The compute will read at this LSN: keep it readable until its compute_ctl renews the lease.
    tl.lease_lsn(lsn, tl.conf().lsn_lease_length)
        .map_err(|e| user_err(SqlState::INVALID_PARAMETER_VALUE, format!("basebackup at {lsn}: {e}")))?;
    let tl_id = tl.timeline_id();
    let tar: Vec<u8> = tokio::task::spawn_blocking(move || {
        // Known at the last record and at commit ends (e.g. an LSN from get_lsn_by_timestamp).
        let prev = prev_lsn.or_else(|| tl.get_prev_record_lsn_at(lsn)).or(readonly.then_some(Lsn::INVALID));
        let mut buf = Vec::new();
        write_basebackup(&mut buf, &tl, lsn, prev, kind).map(|_| buf)
    })
    .await
    .map_err(|e| user_err(SqlState::INTERNAL_ERROR, e.to_string()))?
    .map_err(|e| {
        let server_fault = match &e {
            BasebackupError::Read { source, .. } => source.is_server_fault(),
            BasebackupError::Corrupt { .. } => true,
            BasebackupError::InvalidRequest { .. } | BasebackupError::Io { .. } => false,
        };
        if server_fault {
            error!("{kind:?} backup of timeline {tl_id} at {lsn} failed: {e}");
        }
        user_err(SqlState::INTERNAL_ERROR, format!("basebackup at {lsn}: {e}"))
    })?;
    send_tar(pgb, tar).await
}
