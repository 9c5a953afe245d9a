//! The safekeeper's libpq endpoint: one `SafekeeperHandler` per connection.
//!
//! Commands:
//! - `START_WAL_PUSH`: a walproposer's stream of proposer messages (COPY BOTH);
//! - `IDENTIFY_SYSTEM`, `START_REPLICATION [SLOT s] [PHYSICAL] X/Y [TIMELINE n] [TERM t]`: WAL for
//!   readers (pageserver, standby computes, peers, a proposer fetching from its donor);
//! - `TIMELINE_STATUS`: term, flush and commit LSN, for a compute's fast start.
//!
//! The timeline comes from the startup options: `-c tenant_id=<hex> -c timeline_id=<hex>`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use std::time::Duration;

use pq_proto::{CopyMessage, FieldDescription, PostgresBackend, QueryError, QueryHandler, SqlState, UserError};
use safekeeper_api::proto::ProposerMessage;
use safekeeper_api::replication::{pg_now_us, FeedbackMessage, ReplicationMessage};
use safekeeper_api::Term;
use tracing::{debug, info, warn};
use utils::auth::{audit, check_tenant_permission, AuthError, Claims, Outcome, Scope};
use utils::{Lsn, TenantId, TimelineId};

use crate::acceptor::AcceptorError;
use crate::timeline::{GlobalTimelines, Timeline};
use crate::wal_backup::{read_wal_any, WalBackup};

/// Most WAL sent in one XLogData message.
const MAX_SEND_BYTES: u64 = 128 * 1024;
/// Keepalive period of an idle WAL sender (Postgres's wal_receiver_timeout is 60 s).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);

pub struct SafekeeperHandler {
    pub timelines: Arc<GlobalTimelines>,
    /// With `--pg-auth-type NeonJWT`: the session's token claims; the connection's tenant is
    /// checked against them before any command runs (`safekeeperdata`, `admin`, or a
    /// `tenant` token for that tenant).
    pub claims: Option<Arc<Mutex<Option<Claims>>>>,
    pub peer: Option<SocketAddr>,
}

/// The user name the pageserver's WAL receiver connects as.
const PAGESERVER_USER: &str = "pageserver";

fn user_err(code: SqlState, msg: impl Into<String>) -> QueryError {
    QueryError::User(UserError::new(code, msg))
}

/// A parsed command.
#[derive(Debug, PartialEq, Eq)]
enum Command {
    StartWalPush,
    IdentifySystem,
    TimelineStatus,
    StartReplication { start_lsn: Lsn, term: Option<Term> },
}

fn parse_command(query: &str) -> Result<Command, QueryError> {
    let q = query.trim().trim_end_matches(';').trim();
    let words: Vec<&str> = q.split_whitespace().collect();
    let upper: Vec<String> = words.iter().map(|w| w.to_ascii_uppercase()).collect();
    match upper.first().map(String::as_str) {
        Some("START_WAL_PUSH") if words.len() == 1 => Ok(Command::StartWalPush),
        Some("IDENTIFY_SYSTEM") if words.len() == 1 => Ok(Command::IdentifySystem),
        Some("TIMELINE_STATUS") if words.len() == 1 => Ok(Command::TimelineStatus),
        Some("START_REPLICATION") => {
            let mut i = 1;
            if upper.get(i).map(String::as_str) == Some("SLOT") {
                i += 2; // slots are not kept: readers report their position in feedback
            }
            if upper.get(i).map(String::as_str) == Some("PHYSICAL") {
                i += 1;
            }
            let bad = || user_err(SqlState::SYNTAX_ERROR, format!("cannot parse '{q}': expected START_REPLICATION [SLOT s] [PHYSICAL] X/Y [TIMELINE n] [TERM t]"));
            let start_lsn: Lsn = words.get(i).ok_or_else(bad)?.parse().map_err(|_| bad())?;
            i += 1;
            let mut term = None;
            while i < words.len() {
                match upper[i].as_str() {
                    "TIMELINE" => {
                        let tli = words.get(i + 1).ok_or_else(bad)?;
                        if *tli != "1" {
                            return Err(user_err(SqlState::FEATURE_NOT_SUPPORTED, format!("only Postgres timeline 1 exists here, not {tli}")));
                        }
                    }
                    "TERM" => term = Some(words.get(i + 1).ok_or_else(bad)?.parse().map_err(|_| bad())?),
                    _ => return Err(bad()),
                }
                i += 2;
            }
            Ok(Command::StartReplication { start_lsn, term })
        }
        _ => Err(user_err(
            SqlState::FEATURE_NOT_SUPPORTED,
            format!("safekeeper does not support '{}': use START_WAL_PUSH, IDENTIFY_SYSTEM, START_REPLICATION or TIMELINE_STATUS", q.chars().take(80).collect::<String>()),
        )),
    }
}

impl SafekeeperHandler {
    fn timeline(&self, pgb: &PostgresBackend) -> Result<Arc<Timeline>, QueryError> {
        let params = pgb.startup_params().ok_or_else(|| user_err(SqlState::PROTOCOL_VIOLATION, "no startup packet"))?;
        let get = |name: &str| -> Result<String, QueryError> {
            params.option(name).map(|s| s.to_string()).ok_or_else(|| {
                user_err(
                    SqlState::INVALID_PARAMETER_VALUE,
                    format!("connect with options '-c tenant_id=<hex> -c timeline_id=<hex>': {name} is missing"),
                )
            })
        };
        let tenant_id: TenantId =
            get("tenant_id")?.parse().map_err(|e| user_err(SqlState::INVALID_PARAMETER_VALUE, format!("{e}")))?;
        let timeline_id: TimelineId =
            get("timeline_id")?.parse().map_err(|e| user_err(SqlState::INVALID_PARAMETER_VALUE, format!("{e}")))?;
        if let Some(slot) = &self.claims {
            let claims = slot.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let checked = match &claims {
                Some(c) => check_tenant_permission(c, tenant_id, &[Scope::SafekeeperData, Scope::Admin]),
                None => Err(AuthError::Missing),
            };
            if let Err(e) = checked {
                let object = format!("timeline {tenant_id}/{timeline_id}");
                audit("safekeeper", self.peer, claims.map(|c| c.scope), "libpq", &object, Outcome::Denied, e.reason());
                return Err(QueryError::User(pq_proto::jwt::auth_user_error(&e)));
            }
        }
        self.timelines.get(tenant_id, timeline_id).map_err(|e| user_err(SqlState::UNDEFINED_OBJECT, e.to_string()))
    }
}

impl QueryHandler for SafekeeperHandler {
    async fn process_query(&mut self, pgb: &mut PostgresBackend, query: &str) -> Result<(), QueryError> {
        let cmd = parse_command(query)?;
        let tl = self.timeline(pgb)?;
        match cmd {
            Command::StartWalPush => receive_wal(pgb, tl).await,
            Command::IdentifySystem => {
                let st = tl.status();
                pgb.write_row_set(
                    &[
                        FieldDescription::text("systemid"),
                        FieldDescription::int4("timeline"),
                        FieldDescription::text("xlogpos"),
                        FieldDescription::text("dbname"),
                    ],
                    [[Some(st.system_id.to_string()), Some("1".to_string()), Some(st.commit_lsn.to_string()), None]],
                )
                .await?;
                Ok(())
            }
            Command::TimelineStatus => {
                let st = tl.status();
                pgb.write_row_set(
                    &[
                        FieldDescription::int8("term"),
                        FieldDescription::text("flush_lsn"),
                        FieldDescription::text("commit_lsn"),
                        FieldDescription::text("timeline_start_lsn"),
                        FieldDescription::text("last_log_term"),
                        // For peers' WAL offload (uploader election, removal horizon).
                        FieldDescription::int8("node_id"),
                        FieldDescription::text("wal_start_lsn"),
                        FieldDescription::text("backup_lsn"),
                        FieldDescription::text("remote_consistent_lsn"),
                    ],
                    [[
                        Some(st.term.to_string()),
                        Some(st.flush_lsn.to_string()),
                        Some(st.commit_lsn.to_string()),
                        Some(st.timeline_start_lsn.to_string()),
                        Some(st.term_history.last_log_term(st.flush_lsn).to_string()),
                        Some(self.timelines.node_id.0.to_string()),
                        Some(st.wal_start_lsn.to_string()),
                        Some(st.backup_lsn.to_string()),
                        Some(st.remote_consistent_lsn.to_string()),
                    ]],
                )
                .await?;
                Ok(())
            }
            Command::StartReplication { start_lsn, term } => {
                // The pageserver's progress reports count as remote-consistent LSNs; a hot standby's
                // (any other reader) do not.
                let is_pageserver = pgb.startup_params().is_some_and(|p| p.user() == PAGESERVER_USER);
                let remote = self.timelines.remote().cloned();
                send_wal(pgb, tl, remote, start_lsn, term, is_pageserver).await
            }
        }
    }
}

/// Runs a walproposer's stream: each proposer message is handled (written and fsynced when it
/// carries WAL) before its answer is sent.
async fn receive_wal(pgb: &mut PostgresBackend, tl: Arc<Timeline>) -> Result<(), QueryError> {
    pgb.start_copy_both().await?;
    info!("walproposer connected to timeline {}/{}", tl.tenant_id, tl.timeline_id);
    let mut pending: Option<ProposerMessage> = None;
    // The stream ended (or failed) while we were gathering a batch: finish after it.
    let mut ended: Option<Result<(), QueryError>> = None;
    loop {
        if let Some(end) = ended.take() {
            end?;
            pgb.finish_copy("COPY 0").await?;
            return Ok(());
        }
        let msg = match pending.take() {
            Some(m) => m,
            None => match read_proposer_message(pgb).await? {
                Some(m) => m,
                None => {
                    pgb.finish_copy("COPY 0").await?;
                    return Ok(());
                }
            },
        };
        let tl2 = tl.clone();
        let reply = match msg {
            ProposerMessage::Append(first) => {
                // Take every append the proposer already pipelined, so they share one fsync.
                let mut batch = vec![first];
                let mut batch_bytes = batch[0].wal.len();
                while batch_bytes < MAX_BATCH_BYTES {
                    match pgb.read_copy_message().now_or_never() {
                        Some(Ok(CopyMessage::Data(d))) => match decode_proposer_message(&d)? {
                            ProposerMessage::Append(a) => {
                                batch_bytes += a.wal.len();
                                batch.push(a);
                            }
                            other => {
                                pending = Some(other);
                                break;
                            }
                        },
                        Some(Ok(CopyMessage::Done)) => {
                            ended = Some(Ok(()));
                            break;
                        }
                        Some(Ok(CopyMessage::Fail(m))) => {
                            ended = Some(Err(user_err(SqlState::QUERY_CANCELED, format!("walproposer aborted: {m}"))));
                            break;
                        }
                        Some(Err(e)) => {
                            ended = Some(Err(e.into()));
                            break;
                        }
                        None => break,
                    }
                }
                tokio::task::spawn_blocking(move || tl2.process_appends(&batch).map(Some)).await
            }
            other => tokio::task::spawn_blocking(move || tl2.process(&other)).await,
        }
        .map_err(|e| user_err(SqlState::INTERNAL_ERROR, format!("WAL receiver task failed: {e}")))?;
        match reply {
            Ok(Some(r)) => {
                pgb.write_copy_data(&r.encode()).await?;
                pgb.flush().await?;
            }
            Ok(None) => {}
            Err(AcceptorError::Protocol(e)) => {
                warn!("timeline {}/{}: refusing proposer message: {e}", tl.tenant_id, tl.timeline_id);
                return Err(user_err(SqlState::PROTOCOL_VIOLATION, e));
            }
            Err(AcceptorError::Io(e)) => {
                tracing::error!("timeline {}/{}: storage failed: {e}", tl.tenant_id, tl.timeline_id);
                return Err(user_err(SqlState::INTERNAL_ERROR, format!("safekeeper storage failed: {e}")));
            }
        }
    }
}

/// Most WAL handled with one fsync.
const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;

fn decode_proposer_message(data: &bytes::Bytes) -> Result<ProposerMessage, QueryError> {
    ProposerMessage::decode(data)
        .map_err(|e| user_err(SqlState::PROTOCOL_VIOLATION, format!("bad proposer message: {e}")))
}

/// The next proposer message; `None` when the proposer ended the stream.
async fn read_proposer_message(pgb: &mut PostgresBackend) -> Result<Option<ProposerMessage>, QueryError> {
    match pgb.read_copy_message().await? {
        CopyMessage::Data(d) => decode_proposer_message(&d).map(Some),
        CopyMessage::Done => Ok(None),
        CopyMessage::Fail(m) => Err(user_err(SqlState::QUERY_CANCELED, format!("walproposer aborted the stream: {m}"))),
    }
}

/// Streams WAL from `start_lsn`: up to the commit LSN for ordinary readers; up to the flush LSN
/// for a proposer fetching from its donor (`term` given), and only while our term is `term`.
/// WAL below what is on local disk comes from remote storage (offloaded segments are committed
/// and never change, so they serve a fetch for any term).
async fn send_wal(
    pgb: &mut PostgresBackend,
    tl: Arc<Timeline>,
    remote: Option<Arc<WalBackup>>,
    mut start_lsn: Lsn,
    term: Option<Term>,
    is_pageserver: bool,
) -> Result<(), QueryError> {
    let st = tl.status();
    let seg = tl.wal_seg_size_bytes();
    // With remote storage, WAL from the timeline start is available; without, only what is local.
    let first = if remote.is_some() { st.timeline_start_lsn } else { st.local_start_lsn };
    if start_lsn < first && start_lsn.0 / seg == first.0 / seg {
        // A Postgres standby asks for whole segments; the first one of a timeline is partial
        // here, and what precedes the timeline's start is not needed by any reader of it.
        start_lsn = first;
    }
    if start_lsn < first {
        return Err(user_err(
            SqlState::INVALID_PARAMETER_VALUE,
            format!("requested WAL at {start_lsn} is before this safekeeper's first WAL at {first}"),
        ));
    }
    if start_lsn < st.wal_start_lsn && remote.is_none() {
        return Err(user_err(
            SqlState::INVALID_PARAMETER_VALUE,
            format!(
                "requested WAL at {start_lsn} was removed from this safekeeper (its WAL starts at {}) and no remote \
                 storage is configured to read it from",
                st.wal_start_lsn
            ),
        ));
    }
    if let Some(t) = term {
        if st.term != t {
            return Err(user_err(
                SqlState::INVALID_PARAMETER_VALUE,
                format!("term is {} now, not {t}: the WAL may have changed", st.term),
            ));
        }
    }
    pgb.start_copy_both().await?;
    debug!("WAL sender for {}/{} from {start_lsn}", tl.tenant_id, tl.timeline_id);
    let mut positions = tl.positions();
    let mut pos = start_lsn;
    let mut keepalive = tokio::time::interval(KEEPALIVE_INTERVAL);
    let mut remote_cache = None;
    loop {
        let p = *positions.borrow_and_update();
        if let Some(t) = term {
            if p.term != t {
                return Err(user_err(
                    SqlState::INVALID_PARAMETER_VALUE,
                    format!("term moved to {} while streaming for term {t}", p.term),
                ));
            }
        }
        let end = if term.is_some() { p.flush_lsn } else { p.commit_lsn };
        if pos < end {
            let to = Lsn(end.0.min(pos.0 + MAX_SEND_BYTES));
            let data = read_wal_any(&tl, remote.as_ref(), pos, to, &mut remote_cache)
                .await
                .map_err(|e| user_err(SqlState::INTERNAL_ERROR, format!("reading WAL {pos}..{to}: {e:#}")))?;
            let to = pos + data.len() as u64;
            let msg = ReplicationMessage::XLogData { wal_start: pos, wal_end: end, send_time_us: pg_now_us(), data };
            pgb.write_copy_data(&msg.encode()).await?;
            pgb.flush().await?;
            pos = to;
            continue;
        }
        tokio::select! {
            m = pgb.read_copy_message() => match m? {
                CopyMessage::Data(d) => handle_feedback(&tl, &d, is_pageserver),
                CopyMessage::Done => {
                    pgb.finish_copy("COPY 0").await?;
                    return Ok(());
                }
                CopyMessage::Fail(m) => return Err(user_err(SqlState::QUERY_CANCELED, format!("reader aborted: {m}"))),
            },
            r = positions.changed() => {
                if r.is_err() {
                    return Err(user_err(SqlState::ADMIN_SHUTDOWN, "timeline was deleted"));
                }
            }
            _ = keepalive.tick() => {
                let k = ReplicationMessage::Keepalive { wal_end: end, send_time_us: pg_now_us(), reply_requested: false };
                pgb.write_copy_data(&k.encode()).await?;
                pgb.flush().await?;
            }
        }
    }
}

fn handle_feedback(tl: &Timeline, data: &[u8], is_pageserver: bool) {
    match FeedbackMessage::decode(data) {
        // The pageserver reports its remote-consistent LSN in the apply field.
        Ok(FeedbackMessage::StandbyStatus { apply_lsn, .. }) if is_pageserver => {
            tl.update_remote_consistent_lsn(apply_lsn)
        }
        Ok(FeedbackMessage::StandbyStatus { .. }) => {}
        Ok(FeedbackMessage::HotStandby { .. }) => {}
        Err(e) => debug!("ignoring unknown feedback from a WAL reader: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse() {
        assert_eq!(parse_command("START_WAL_PUSH").unwrap(), Command::StartWalPush);
        assert_eq!(parse_command(" identify_system; ").unwrap(), Command::IdentifySystem);
        assert_eq!(
            parse_command("START_REPLICATION SLOT x PHYSICAL 0/3000000 TIMELINE 1").unwrap(),
            Command::StartReplication { start_lsn: Lsn(0x3000000), term: None }
        );
        assert_eq!(
            parse_command("START_REPLICATION PHYSICAL 1/10 TERM 7").unwrap(),
            Command::StartReplication { start_lsn: Lsn(0x1_0000_0010), term: Some(7) }
        );
        for bad in [
            "START_REPLICATION",
            "START_REPLICATION PHYSICAL zz",
            "START_REPLICATION 0/1 TIMELINE 2",
            "DROP TABLE x",
            "START_WAL_PUSH now",
        ] {
            assert!(parse_command(bad).is_err(), "{bad}");
        }
    }
}
