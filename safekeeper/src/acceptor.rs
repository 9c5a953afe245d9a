//! The acceptor: the safekeeper's half of the consensus protocol, as a state machine with its
//! storage behind a trait, so the same code runs in the daemon (files, fsync) and in the
//! deterministic simulator (memory that loses what was not synced).
//!
//! Rules (DESIGN D7):
//! - a vote is given, and persisted before it is answered, only for a term higher than any seen;
//! - `ProposerElected` truncates the WAL where it diverges from the leader's (never below the
//!   commit LSN) and adopts the leader's term history;
//! - appends are accepted only from the current term's leader, written, fsynced, then answered
//!   with the flush LSN;
//! - the commit LSN only grows and never passes the flush LSN.
//!
//! Every message is checked completely before anything is written, so a rejected message changes
//! nothing on disk.

use std::io;

use safekeeper_api::proto::{
    AcceptorGreeting, AcceptorMessage, AppendRequest, AppendResponse, PageserverFeedback, ProposerElected,
    ProposerGreeting, ProposerMessage, VoteRequest, VoteResponse,
};
use utils::Lsn;

use crate::state::TimelinePersistentState;

/// Where the acceptor keeps its state and WAL.
pub trait AcceptorStorage {
    /// Durably replaces the stored state (atomic: old or new, never a mix).
    fn persist_state(&mut self, state: &TimelinePersistentState) -> io::Result<()>;
    /// Writes WAL at `lsn`, which must be `write_lsn()`. Not durable until `flush_wal`.
    fn write_wal(&mut self, lsn: Lsn, data: &[u8]) -> io::Result<()>;
    /// Makes everything written durable.
    fn flush_wal(&mut self) -> io::Result<()>;
    /// Durably removes WAL at and above `end_lsn`.
    fn truncate_wal(&mut self, end_lsn: Lsn) -> io::Result<()>;
    /// End of the WAL written so far.
    fn write_lsn(&self) -> Lsn;
    /// End of the durable WAL, at a record boundary: a partial record at the tail is not
    /// counted, so what we report (and a proposer may count as committed, or start a new term
    /// at) is always the end of a whole record.
    fn flush_lsn(&self) -> Lsn;
}

#[derive(Debug, thiserror::Error)]
pub enum AcceptorError {
    /// The proposer broke the protocol; nothing was changed. The connection should be closed.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// Storage failed; the acceptor's in-memory view may be ahead of disk and must be reloaded.
    #[error("storage error: {0}")]
    Io(#[from] io::Error),
}

fn violation<T>(msg: String) -> Result<T, AcceptorError> {
    Err(AcceptorError::Protocol(msg))
}

pub struct Acceptor<S: AcceptorStorage> {
    node_id: u64,
    state: TimelinePersistentState,
    /// The commit LSN in the last persisted state (the in-memory one may be ahead).
    persisted_commit_lsn: Lsn,
    storage: S,
    /// Latest progress reported by the WAL reader, passed on to the proposer.
    pub pageserver_feedback: PageserverFeedback,
}

impl<S: AcceptorStorage> Acceptor<S> {
    /// Opens an acceptor on loaded state and storage (whose WAL end was already recovered).
    pub fn new(node_id: u64, mut state: TimelinePersistentState, storage: S) -> Self {
        // A torn WAL tail cut at load time may leave the commit LSN above the WAL end.
        state.commit_lsn = state.commit_lsn.min(storage.flush_lsn());
        let persisted_commit_lsn = state.commit_lsn;
        Acceptor { node_id, state, persisted_commit_lsn, storage, pageserver_feedback: PageserverFeedback::default() }
    }

    pub fn state(&self) -> &TimelinePersistentState {
        &self.state
    }

    pub fn storage(&self) -> &S {
        &self.storage
    }

    pub fn storage_mut(&mut self) -> &mut S {
        &mut self.storage
    }

    pub fn flush_lsn(&self) -> Lsn {
        self.storage.flush_lsn()
    }

    pub fn commit_lsn(&self) -> Lsn {
        self.state.commit_lsn
    }

    /// Handles one proposer message; `Ok(None)` means no answer is due.
    pub fn process(&mut self, msg: &ProposerMessage) -> Result<Option<AcceptorMessage>, AcceptorError> {
        match msg {
            ProposerMessage::Greeting(g) => self.on_greeting(g).map(Some),
            ProposerMessage::VoteRequest(v) => self.on_vote_request(v).map(Some),
            ProposerMessage::Elected(e) => self.on_elected(e).map(Some),
            ProposerMessage::Append(a) => self.on_append(a).map(Some),
        }
    }

    fn on_greeting(&mut self, g: &ProposerGreeting) -> Result<AcceptorMessage, AcceptorError> {
        let s = &self.state;
        if g.tenant_id != s.tenant_id || g.timeline_id != s.timeline_id {
            return violation(format!(
                "greeting for {}/{} reached timeline {}/{}",
                g.tenant_id, g.timeline_id, s.tenant_id, s.timeline_id
            ));
        }
        if s.server.pg_version != 0 && g.pg_version / 10000 != s.server.pg_version / 10000 {
            return violation(format!(
                "proposer runs Postgres {} but the timeline was created for {}",
                g.pg_version, s.server.pg_version
            ));
        }
        if g.wal_seg_size != s.server.wal_seg_size {
            return violation(format!(
                "proposer uses {}-byte WAL segments, the timeline {}",
                g.wal_seg_size, s.server.wal_seg_size
            ));
        }
        // A proposer that does not know the system id (sync-safekeepers) sends 0.
        if s.server.system_id != 0 && g.system_id != 0 && g.system_id != s.server.system_id {
            return violation(format!(
                "proposer's system id {} differs from the timeline's {}",
                g.system_id, s.server.system_id
            ));
        }
        if s.server.system_id == 0 && g.system_id != 0 {
            let mut next = self.state.clone();
            next.server.system_id = g.system_id;
            if next.server.pg_version == 0 {
                next.server.pg_version = g.pg_version;
            }
            self.persist(next)?;
        }
        Ok(AcceptorMessage::Greeting(AcceptorGreeting { node_id: self.node_id, term: self.state.term }))
    }

    fn on_vote_request(&mut self, v: &VoteRequest) -> Result<AcceptorMessage, AcceptorError> {
        // A term belongs to one proposer: granting it again to the same one (after a
        // reconnect) is safe; granting it to anyone else is not.
        let vote_given =
            v.term > self.state.term || (v.term == self.state.term && v.proposer_id == self.state.proposer_id);
        if v.term > self.state.term {
            let mut next = self.state.clone();
            next.term = v.term;
            next.proposer_id = v.proposer_id;
            self.persist(next)?; // durable before we answer
        }
        Ok(AcceptorMessage::Vote(VoteResponse {
            term: self.state.term,
            vote_given,
            flush_lsn: self.storage.flush_lsn(),
            truncate_lsn: self.state.peer_horizon_lsn,
            term_history: self.state.term_history.clone(),
            timeline_start_lsn: self.state.timeline_start_lsn,
        }))
    }

    fn on_elected(&mut self, e: &ProposerElected) -> Result<AcceptorMessage, AcceptorError> {
        if e.term < self.state.term {
            return Ok(self.append_response()); // stale leader: our higher term tells it so
        }
        e.term_history.validate().map_err(AcceptorError::Protocol)?;
        match e.term_history.last() {
            Some(last) if last.term == e.term => {}
            _ => {
                return violation(format!(
                    "ProposerElected for term {} carries history {} not ending in that term",
                    e.term, e.term_history
                ))
            }
        }
        let flush_lsn = self.storage.flush_lsn();
        let start = e.start_streaming_at;
        if start < self.state.commit_lsn {
            return violation(format!(
                "ProposerElected asks to truncate at {start}, below the commit LSN {}",
                self.state.commit_lsn
            ));
        }
        if start > flush_lsn {
            return violation(format!(
                "ProposerElected starts streaming at {start}, beyond our WAL end {flush_lsn}: that would leave a gap"
            ));
        }
        if start < self.state.local_start_lsn {
            return violation(format!(
                "ProposerElected starts at {start}, below this safekeeper's first WAL at {}",
                self.state.local_start_lsn
            ));
        }
        // If we already follow this term, all our WAL came from this leader and agrees with it:
        // a repeated ProposerElected (reconnect, duplicate) must not cut WAL a quorum may count.
        let same_term = self.state.term_history.last().is_some_and(|l| l.term == e.term);
        if !same_term && self.storage.write_lsn() > start {
            // Truncate first, then adopt the history: a crash in between leaves less WAL under
            // the old history, which is still true.
            self.storage.truncate_wal(start)?;
        }
        let mut next = self.state.clone();
        next.term = e.term;
        next.term_history = e.term_history.clone();
        self.persist(next)?;
        Ok(self.append_response())
    }

    fn on_append(&mut self, a: &AppendRequest) -> Result<AcceptorMessage, AcceptorError> {
        self.process_appends(std::slice::from_ref(a))
    }

    /// Handles consecutive AppendRequests with one fsync: each is checked and written, then the
    /// WAL is flushed once and one answer (carrying the flush LSN after all of them) is due.
    /// The daemon batches what a proposer pipelined; the rules are those of single appends.
    pub fn process_appends(&mut self, batch: &[AppendRequest]) -> Result<AcceptorMessage, AcceptorError> {
        let Some(last) = batch.last() else { return Ok(self.append_response()) };
        let mut wrote = false;
        for a in batch {
            if a.term < self.state.term {
                if wrote {
                    self.storage.flush_wal()?;
                }
                return Ok(self.append_response()); // superseded leader
            }
            if self.state.term_history.last().map(|l| l.term) != Some(a.term) {
                return violation(format!(
                    "AppendRequest for term {} before ProposerElected of that term (our term {})",
                    a.term, self.state.term
                ));
            }
            if a.end_lsn.checked_sub(a.begin_lsn) != Some(a.wal.len() as u64) {
                return violation(format!(
                    "AppendRequest {}..{} carries {} bytes",
                    a.begin_lsn,
                    a.end_lsn,
                    a.wal.len()
                ));
            }
            let write_lsn = self.storage.write_lsn();
            if a.begin_lsn > write_lsn {
                return violation(format!(
                    "AppendRequest starts at {} but our WAL ends at {write_lsn}: gap",
                    a.begin_lsn
                ));
            }
            if a.end_lsn > write_lsn {
                // Bytes below write_lsn were already received from this leader (a resend).
                let skip = (write_lsn - a.begin_lsn) as usize;
                self.storage.write_wal(write_lsn, &a.wal[skip..])?;
                wrote = true;
            }
        }
        if wrote {
            self.storage.flush_wal()?;
        }
        let flush_lsn = self.storage.flush_lsn();
        let commit = batch.iter().map(|a| a.commit_lsn).max().unwrap_or_default().min(flush_lsn);
        if commit > self.state.commit_lsn {
            self.state.commit_lsn = commit;
        }
        let horizon = last.truncate_lsn.min(self.state.commit_lsn);
        if horizon > self.state.peer_horizon_lsn {
            self.state.peer_horizon_lsn = horizon;
        }
        // Persisting the commit LSN with every append would double the fsyncs, and it can be
        // learned again from the proposer or peers: persist it when it enters a new segment;
        // the daemon also calls `persist_if_dirty` now and then and on shutdown.
        let seg = self.state.server.wal_seg_size.max(1) as u64;
        if self.state.commit_lsn.segment_number(seg) != self.persisted_commit_lsn.segment_number(seg) {
            self.persist(self.state.clone())?;
        }
        Ok(self.append_response())
    }

    fn append_response(&self) -> AcceptorMessage {
        AcceptorMessage::Append(AppendResponse {
            term: self.state.term,
            flush_lsn: self.storage.flush_lsn(),
            commit_lsn: self.state.commit_lsn,
            pageserver_feedback: self.pageserver_feedback,
        })
    }

    /// Persists `next` and makes it the current state.
    fn persist(&mut self, next: TimelinePersistentState) -> Result<(), AcceptorError> {
        assert!(next.term >= self.state.term, "term must never go back ({} -> {})", self.state.term, next.term);
        self.storage.persist_state(&next)?;
        self.persisted_commit_lsn = next.commit_lsn;
        self.state = next;
        Ok(())
    }

    /// Records the WAL reader's progress (from START_REPLICATION feedback).
    pub fn update_remote_consistent_lsn(&mut self, lsn: Lsn) {
        if lsn > self.state.remote_consistent_lsn {
            self.state.remote_consistent_lsn = lsn;
        }
    }

    /// Records that WAL below `lsn` is in remote storage, durably: WAL removal trusts it.
    /// Capped at the commit LSN: only whole committed segments are offloaded, and removal
    /// must never reach WAL that is not committed here.
    pub fn update_backup_lsn(&mut self, lsn: Lsn) -> Result<(), AcceptorError> {
        let lsn = lsn.min(self.state.commit_lsn);
        if lsn <= self.state.backup_lsn {
            return Ok(());
        }
        let mut next = self.state.clone();
        next.backup_lsn = lsn;
        self.persist(next)
    }

    /// Persists in-memory-only fields (commit LSN, horizons), e.g. on shutdown.
    pub fn persist_now(&mut self) -> Result<(), AcceptorError> {
        self.persist(self.state.clone())
    }

    /// Persists the state if the commit LSN moved since it was last written.
    pub fn persist_if_dirty(&mut self) -> Result<bool, AcceptorError> {
        if self.state.commit_lsn == self.persisted_commit_lsn {
            return Ok(false);
        }
        self.persist_now()?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use safekeeper_api::{TermHistory, TermLsn};
    use utils::{TenantId, TimelineId};

    use super::*;
    use crate::mem_storage::MemStorage;
    use crate::state::ServerInfo;

    const START: Lsn = Lsn(0x1000);

    fn acceptor() -> Acceptor<MemStorage> {
        let st = TimelinePersistentState::new(
            TenantId([1; 16]),
            TimelineId([2; 16]),
            ServerInfo { pg_version: 150018, system_id: 0, wal_seg_size: 16 << 20 },
            START,
        );
        Acceptor::new(1, st.clone(), MemStorage::new(st))
    }

    fn greeting() -> ProposerMessage {
        ProposerMessage::Greeting(ProposerGreeting {
            protocol_version: 1,
            pg_version: 150018,
            proposer_id: [9; 16],
            system_id: 77,
            tenant_id: TenantId([1; 16]),
            timeline_id: TimelineId([2; 16]),
            wal_seg_size: 16 << 20,
        })
    }

    fn history(v: &[(u64, u64)]) -> TermHistory {
        TermHistory(v.iter().map(|&(term, lsn)| TermLsn { term, lsn: Lsn(lsn) }).collect())
    }

    fn append(term: u64, begin: u64, data: &[u8], commit: u64) -> ProposerMessage {
        ProposerMessage::Append(AppendRequest {
            term,
            begin_lsn: Lsn(begin),
            end_lsn: Lsn(begin + data.len() as u64),
            commit_lsn: Lsn(commit),
            truncate_lsn: Lsn(0),
            wal: Bytes::copy_from_slice(data),
        })
    }

    /// Greets, wins term `term` and becomes leader at START.
    fn lead(a: &mut Acceptor<MemStorage>, term: u64) {
        a.process(&greeting()).unwrap();
        a.process(&ProposerMessage::VoteRequest(VoteRequest { term, proposer_id: [9; 16] })).unwrap();
        a.process(&ProposerMessage::Elected(ProposerElected {
            term,
            start_streaming_at: START,
            term_history: history(&[(term, START.0)]),
            timeline_start_lsn: START,
        }))
        .unwrap();
    }

    #[test]
    fn vote_only_for_higher_terms_and_persist_first() {
        let mut a = acceptor();
        let vote = |a: &mut Acceptor<MemStorage>, term, id| match a
            .process(&ProposerMessage::VoteRequest(VoteRequest { term, proposer_id: [id; 16] }))
            .unwrap()
        {
            Some(AcceptorMessage::Vote(v)) => v,
            other => panic!("{other:?}"),
        };
        assert!(vote(&mut a, 3, 1).vote_given);
        assert_eq!(a.storage().state.term, 3, "the vote is durable before the answer");
        assert!(vote(&mut a, 3, 1).vote_given, "the same proposer may ask again");
        assert!(!vote(&mut a, 3, 2).vote_given, "another proposer may not get the same term");
        assert!(!vote(&mut a, 2, 2).vote_given);
        assert_eq!(a.state().term, 3);
    }

    #[test]
    fn append_writes_flushes_and_caps_commit() {
        let mut a = acceptor();
        lead(&mut a, 1);
        let r = a.process(&append(1, START.0, b"hello", START.0 + 100)).unwrap();
        let Some(AcceptorMessage::Append(r)) = r else { panic!() };
        assert_eq!(r.flush_lsn, START + 5);
        assert_eq!(a.storage().durable_wal(START, START + 5), Some(&b"hello"[..]));
        assert_eq!(r.commit_lsn, START + 5, "commit capped by flush");
        // A resend of bytes we have is harmless; commit never goes back.
        a.process(&append(1, START.0 + 2, b"llo!", START.0 + 1)).unwrap();
        assert_eq!(a.flush_lsn(), START + 6);
        assert_eq!(a.commit_lsn(), START + 5);
    }

    #[test]
    fn elected_truncates_divergent_tail_but_never_committed_wal() {
        let mut a = acceptor();
        lead(&mut a, 1);
        a.process(&append(1, START.0, &[1; 100], START.0 + 40)).unwrap();
        a.process(&ProposerMessage::VoteRequest(VoteRequest { term: 2, proposer_id: [8; 16] })).unwrap();
        // Below the commit LSN: refused, nothing changes.
        let before = a.storage().clone();
        let bad = ProposerMessage::Elected(ProposerElected {
            term: 2,
            start_streaming_at: START + 10,
            term_history: history(&[(1, START.0), (2, START.0 + 10)]),
            timeline_start_lsn: START,
        });
        assert!(matches!(a.process(&bad), Err(AcceptorError::Protocol(_))));
        assert_eq!(a.storage().wal, before.wal);
        assert_eq!(a.storage().state, before.state);
        // At a point above commit: WAL cut there, history adopted.
        let ok = ProposerMessage::Elected(ProposerElected {
            term: 2,
            start_streaming_at: START + 60,
            term_history: history(&[(1, START.0), (2, START.0 + 60)]),
            timeline_start_lsn: START,
        });
        a.process(&ok).unwrap();
        assert_eq!(a.flush_lsn(), START + 60);
        assert_eq!(a.state().term_history, history(&[(1, START.0), (2, START.0 + 60)]));
        // The same ProposerElected again after more appends must not cut them.
        a.process(&append(2, START.0 + 60, &[2; 30], 0)).unwrap();
        a.process(&ok).unwrap();
        assert_eq!(a.flush_lsn(), START + 90);
    }

    /// Malformed, out-of-order and wrong-term messages: an error or a refusal, and the disk is
    /// exactly as before.
    #[test]
    fn bad_messages_change_nothing_on_disk() {
        let mut a = acceptor();
        lead(&mut a, 5);
        a.process(&append(5, START.0, &[7; 50], START.0 + 20)).unwrap();
        let bad: Vec<ProposerMessage> = vec![
            // Wrong timeline.
            ProposerMessage::Greeting(ProposerGreeting {
                timeline_id: TimelineId([3; 16]),
                ..match greeting() {
                    ProposerMessage::Greeting(g) => g,
                    _ => unreachable!(),
                }
            }),
            // Another cluster's WAL.
            ProposerMessage::Greeting(ProposerGreeting {
                system_id: 78,
                ..match greeting() {
                    ProposerMessage::Greeting(g) => g,
                    _ => unreachable!(),
                }
            }),
            // Append of a term whose leader we never accepted (out of order).
            append(6, START.0 + 50, b"x", 0),
            // Append leaving a gap.
            append(5, START.0 + 60, b"x", 0),
            // Elected whose history does not end in its term.
            ProposerMessage::Elected(ProposerElected {
                term: 6,
                start_streaming_at: START + 30,
                term_history: history(&[(5, START.0)]),
                timeline_start_lsn: START,
            }),
            // Elected beyond our WAL end.
            ProposerMessage::Elected(ProposerElected {
                term: 6,
                start_streaming_at: START + 80,
                term_history: history(&[(5, START.0), (6, START.0 + 80)]),
                timeline_start_lsn: START,
            }),
        ];
        for m in bad {
            let before = a.storage().clone();
            let r = a.process(&m);
            assert!(matches!(r, Err(AcceptorError::Protocol(_))), "{} should be refused, got {r:?}", m.name());
            assert_eq!(a.storage().wal, before.wal, "{} changed WAL", m.name());
            assert_eq!(a.storage().state, before.state, "{} changed state", m.name());
        }
        // A stale leader's append is answered with our higher term and writes nothing.
        let before = a.storage().clone();
        let r = a.process(&append(4, START.0 + 50, b"zz", 0)).unwrap();
        assert!(matches!(r, Some(AcceptorMessage::Append(AppendResponse { term: 5, .. }))));
        assert_eq!(a.storage().wal, before.wal);
    }

    #[test]
    fn commit_is_capped_after_a_torn_tail() {
        let mut a = acceptor();
        lead(&mut a, 1);
        a.process(&append(1, START.0, &[1; 100], START.0 + 100)).unwrap();
        a.process(&append(1, START.0 + 100, &[], START.0 + 100)).unwrap();
        assert!(a.persist_if_dirty().unwrap(), "the commit LSN moved, so it is written");
        assert!(!a.persist_if_dirty().unwrap(), "and only once");
        assert_eq!(a.storage().state.commit_lsn, START + 100);
        // Simulate a restart that found only 80 valid bytes.
        let mut disk = a.storage().clone();
        disk.wal.truncate(80);
        disk.durable_len = 80;
        let b = Acceptor::new(1, disk.state.clone(), disk);
        assert_eq!(b.commit_lsn(), START + 80);
    }
}
