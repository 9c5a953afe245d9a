//! The page service: the pageserver's libpq endpoint for computes.
//!
//! - `pagestream <tenant_id> <timeline_id>`: COPY BOTH of `pageserver_api::pagestream` requests
//!   and responses (GetPage@LSN, Nblocks, Exists, DbSize, GetSlruSegment);
//! - `basebackup <tenant_id> <timeline_id> [lsn]`: COPY OUT of a compute start tarball (DESIGN D4);
//! - `fullbackup <tenant_id> <timeline_id> [lsn]`: the same with every relation file.
//!
//! A request waits (bounded) until ingest has reached its LSN; errors travel back as
//! pagestream Error responses naming what was asked, and the stream stays usable.

use std::sync::Arc;

use bytes::Bytes;
use pageserver_api::pagestream::{PagestreamRequest, PagestreamResponse, RelTagWire, SlruKind as WireSlruKind};
use postgres_ffi::slru::SlruKind;
use postgres_ffi::RelTag;
use pq_proto::{CopyMessage, PostgresBackend, QueryError, QueryHandler, SqlState, UserError};
use tracing::debug;
use utils::{Lsn, TenantId, TimelineId};

use crate::basebackup::{write_basebackup, BackupKind};
use crate::tenant::timeline::Timeline;
use crate::tenant_mgr::TenantManager;

/// Tablespace of `pg_database_size`'s relations (pg_default).
const DEFAULT_TABLESPACE_OID: u32 = 1663;

pub struct PageServiceHandler {
    pub mgr: Arc<TenantManager>,
}

fn user_err(code: SqlState, msg: impl Into<String>) -> QueryError {
    QueryError::User(UserError::new(code, msg))
}

fn rel(w: RelTagWire) -> RelTag {
    RelTag { spcnode: w.spcnode, dbnode: w.dbnode, relnode: w.relnode, forknum: w.forknum }
}

impl PageServiceHandler {
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
        match words.as_slice() {
            ["pagestream", tenant, timeline] => {
                let tl = self.timeline(tenant, timeline)?;
                pagestream(pgb, tl, self.mgr.conf.wait_lsn_timeout).await
            }
            [cmd @ ("basebackup" | "fullbackup"), tenant, timeline, rest @ ..] if rest.len() <= 1 => {
                let tl = self.timeline(tenant, timeline)?;
                let lsn = match rest.first() {
                    Some(s) if *s != "latest" => Some(
                        s.parse::<Lsn>().map_err(|e| user_err(SqlState::INVALID_PARAMETER_VALUE, e.to_string()))?,
                    ),
                    _ => None,
                };
                let kind = if *cmd == "fullbackup" { BackupKind::Full } else { BackupKind::Compute };
                basebackup(pgb, tl, lsn, kind, self.mgr.conf.wait_lsn_timeout).await
            }
            _ => Err(user_err(
                SqlState::FEATURE_NOT_SUPPORTED,
                format!(
                    "pageserver does not understand '{}': use pagestream, basebackup or fullbackup <tenant_id> <timeline_id>",
                    query.chars().take(80).collect::<String>()
                ),
            )),
        }
    }
}

async fn pagestream(pgb: &mut PostgresBackend, tl: Arc<Timeline>, wait: std::time::Duration) -> Result<(), QueryError> {
    pgb.start_copy_both().await?;
    loop {
        let data = match pgb.read_copy_message().await? {
            CopyMessage::Data(d) => d,
            CopyMessage::Done => {
                pgb.finish_copy("COPY 0").await?;
                return Ok(());
            }
            CopyMessage::Fail(m) => return Err(user_err(SqlState::QUERY_CANCELED, format!("client aborted: {m}"))),
        };
        let resp = match PagestreamRequest::decode(&data) {
            Ok(req) => handle_request(&tl, req, wait).await,
            // A malformed request cannot be matched to an id; answer and end the stream.
            Err(e) => return Err(user_err(SqlState::PROTOCOL_VIOLATION, format!("bad pagestream request: {e}"))),
        };
        pgb.write_copy_data(&resp.encode()).await?;
        pgb.flush().await?;
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
    let r = tokio::task::spawn_blocking(move || -> Result<PagestreamResponse, String> {
        Ok(match req {
            PagestreamRequest::Exists { rel: r, .. } => PagestreamResponse::Exists {
                request_id,
                exists: tl.get_rel_exists(rel(r), lsn).map_err(|e| e.to_string())?,
            },
            PagestreamRequest::Nblocks { rel: r, .. } => PagestreamResponse::Nblocks {
                request_id,
                n_blocks: tl.get_rel_size(rel(r), lsn).map_err(|e| e.to_string())?,
            },
            PagestreamRequest::GetPage { rel: r, blkno, .. } => PagestreamResponse::Page {
                request_id,
                page: tl.get_rel_page_at_lsn(rel(r), blkno, lsn).map_err(|e| e.to_string())?,
            },
            PagestreamRequest::DbSize { dbnode, .. } => PagestreamResponse::DbSize {
                request_id,
                db_size_bytes: tl.get_db_size(DEFAULT_TABLESPACE_OID, dbnode, lsn).map_err(|e| e.to_string())? as i64,
            },
            PagestreamRequest::GetSlruSegment { kind, segno, .. } => {
                let kind = match kind {
                    WireSlruKind::Clog => SlruKind::Clog,
                    WireSlruKind::MultiXactMembers => SlruKind::MultiXactMembers,
                    WireSlruKind::MultiXactOffsets => SlruKind::MultiXactOffsets,
                };
                PagestreamResponse::SlruSegment {
                    request_id,
                    segment: tl.get_slru_segment(kind, segno, lsn).map_err(|e| e.to_string())?,
                }
            }
        })
    })
    .await;
    match r {
        Ok(Ok(resp)) => resp,
        Ok(Err(message)) => {
            debug!("pagestream request {request_id} failed: {message}");
            PagestreamResponse::Error { request_id, message }
        }
        Err(e) => PagestreamResponse::Error { request_id, message: format!("internal error: {e}") },
    }
}

async fn basebackup(
    pgb: &mut PostgresBackend,
    tl: Arc<Timeline>,
    lsn: Option<Lsn>,
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
    let prev = if lsn == tl.get_last_record_lsn() { tl.get_prev_record_lsn() } else { None };
    let tar: Vec<u8> = tokio::task::spawn_blocking(move || {
        let mut buf = Vec::new();
        write_basebackup(&mut buf, &tl, lsn, prev, kind).map(|_| buf)
    })
    .await
    .map_err(|e| user_err(SqlState::INTERNAL_ERROR, e.to_string()))?
    .map_err(|e| user_err(SqlState::INTERNAL_ERROR, format!("basebackup at {lsn}: {e}")))?;
    pgb.start_copy_out().await?;
    for chunk in Bytes::from(tar).chunks(64 * 1024) {
        pgb.write_copy_data(chunk).await?;
    }
    pgb.finish_copy("COPY 0").await?;
    Ok(())
}
