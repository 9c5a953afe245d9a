//! Proposer state machine, without I/O.
//!
//! The driver reports connections, acceptor messages and WAL (`Event`) and carries out what the
//! proposer asks for (`Action`): sending messages, fetching WAL it lacks, telling Postgres how
//! far WAL is committed.
//!
//! Election (DESIGN D7): greet every acceptor; once a quorum answered, take term = highest term
//! seen + 1 and ask for votes; with a quorum of votes, the donor is the voter with the highest
//! (last log term, flush LSN); the new term starts at the donor's flush LSN (the epoch start),
//! and its history is the donor's plus `(term, epoch start)`. Each acceptor is told where its WAL
//! diverges from that history, truncates there and receives the rest. The commit LSN is the
//! quorum-th highest flush LSN among acceptors following this term, and only counts once it
//! reaches the epoch start (a leader commits older WAL only by committing its own term's start).

use std::collections::BTreeMap;

use bytes::Bytes;
use safekeeper_api::proto::{
    AcceptorMessage, AppendRequest, ProposerElected, ProposerGreeting, ProposerMessage, VoteRequest, VoteResponse,
    PROTOCOL_VERSION,
};
use safekeeper_api::{Term, TermHistory, TermLsn};
use utils::{Lsn, TenantId, TimelineId};

/// Rules that can be switched off to prove the simulator catches their absence. Never set
/// outside tests.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, Default)]
pub struct BrokenRules {
    /// Pick the donor by flush LSN alone, ignoring the last log term.
    pub donor_by_flush_only: bool,
}

#[derive(Clone, Debug)]
pub struct ProposerConfig {
    pub proposer_id: [u8; 16],
    pub tenant_id: TenantId,
    pub timeline_id: TimelineId,
    pub system_id: u64,
    pub pg_version: u32,
    pub wal_seg_size: u32,
    pub n_acceptors: usize,
    /// `sync-safekeepers`: elect, bring a quorum up to date, commit the epoch start, stop.
    pub sync_only: bool,
    /// Most WAL sent to one acceptor and not yet acknowledged.
    pub max_inflight_bytes: u64,
    /// Most WAL kept in memory for acceptors that lag; older WAL is fetched again when needed.
    pub max_buffered_bytes: u64,
    /// Largest WAL payload of one AppendRequest.
    pub max_append_bytes: u64,
    #[doc(hidden)]
    pub broken_rules: BrokenRules,
}

impl ProposerConfig {
    pub fn quorum(&self) -> usize {
        self.n_acceptors / 2 + 1
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Connected(usize),
    Disconnected(usize),
    Message(usize, AcceptorMessage),
    /// WAL bytes starting at `start`: new WAL from Postgres, or what a `FetchWal` asked for.
    Wal {
        start: Lsn,
        data: Bytes,
    },
    /// The last `FetchWal` could not be served; a source will be chosen again.
    FetchFailed,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Send(usize, ProposerMessage),
    /// Acceptor `i` misbehaved: drop the connection and reconnect later.
    Reconnect(usize),
    /// This proposer leads `term`; new WAL must start at `epoch_start_lsn`.
    Elected {
        term: Term,
        epoch_start_lsn: Lsn,
        donor: usize,
        history: TermHistory,
    },
    /// WAL `[from, to)` is needed and not buffered: read it from acceptor `source` (with our
    /// term, which it still holds) and deliver it with `Event::Wal`. Only committed WAL leaves
    /// the buffer, so a quorum has it; `source` follows this term and its flush LSN reaches
    /// `to`, or is the donor for WAL below the epoch start.
    FetchWal {
        from: Lsn,
        to: Lsn,
        source: usize,
    },
    /// WAL below this LSN is durable on a quorum: tell Postgres (write = flush = this).
    Committed(Lsn),
    /// sync-safekeepers finished: a compute may start at this LSN.
    SyncDone(Lsn),
    /// An acceptor has seen a higher term: another proposer owns the timeline. Stop.
    Superseded {
        term: Term,
        acceptor: usize,
    },
}

#[derive(Clone, Debug)]
struct Stream {
    /// Next LSN to send.
    next_lsn: Lsn,
    /// Acknowledged flush LSN; valid once `acked`.
    flush_lsn: Lsn,
    commit_lsn: Lsn,
    sent_commit_lsn: Lsn,
    /// The acceptor answered ProposerElected (its flush LSN counts from then on).
    acked: bool,
}

#[derive(Clone, Debug)]
enum Slot {
    Offline,
    /// Greeting sent, waiting for the answer.
    Greeting,
    Greeted,
    /// Vote requested, waiting.
    Voting,
    Streaming(Stream),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    Campaign,
    Voting,
    Leader { epoch_start_lsn: Lsn, donor: usize, timeline_start_lsn: Lsn },
    Stopped,
}

pub struct Proposer {
    cfg: ProposerConfig,
    phase: Phase,
    term: Term,
    max_term_seen: Term,
    slots: Vec<Slot>,
    /// Votes for `term`, kept across reconnects: a vote is durable on the acceptor.
    votes: BTreeMap<usize, VoteResponse>,
    history: TermHistory,
    commit_lsn: Lsn,
    truncate_lsn: Lsn,
    /// Buffered WAL `[buf_start, buf_start + buf.len())`.
    buf_start: Lsn,
    buf: Vec<u8>,
    fetch_pending: Option<(Lsn, Lsn)>,
}

impl Proposer {
    pub fn new(cfg: ProposerConfig) -> Self {
        assert!(cfg.n_acceptors >= 1);
        assert!(cfg.max_append_bytes >= 1);
        let n = cfg.n_acceptors;
        Proposer {
            cfg,
            phase: Phase::Campaign,
            term: 0,
            max_term_seen: 0,
            slots: vec![Slot::Offline; n],
            votes: BTreeMap::new(),
            history: TermHistory::empty(),
            commit_lsn: Lsn::INVALID,
            truncate_lsn: Lsn::INVALID,
            buf_start: Lsn::INVALID,
            buf: Vec::new(),
            fetch_pending: None,
        }
    }

    pub fn term(&self) -> Term {
        self.term
    }

    pub fn commit_lsn(&self) -> Lsn {
        self.commit_lsn
    }

    pub fn history(&self) -> &TermHistory {
        &self.history
    }

    pub fn is_leader(&self) -> bool {
        matches!(self.phase, Phase::Leader { .. })
    }

    pub fn is_stopped(&self) -> bool {
        self.phase == Phase::Stopped
    }

    pub fn epoch_start_lsn(&self) -> Option<Lsn> {
        match self.phase {
            Phase::Leader { epoch_start_lsn, .. } => Some(epoch_start_lsn),
            _ => None,
        }
    }

    /// End of the WAL this proposer holds (where new WAL must continue).
    pub fn wal_end_lsn(&self) -> Lsn {
        self.buf_start + self.buf.len() as u64
    }

    pub fn handle(&mut self, ev: Event) -> Vec<Action> {
        let mut out = Vec::new();
        if self.phase == Phase::Stopped {
            return out;
        }
        match ev {
            Event::Connected(i) => {
                self.slots[i] = Slot::Greeting;
                out.push(Action::Send(i, ProposerMessage::Greeting(self.greeting())));
            }
            Event::Disconnected(i) => self.slots[i] = Slot::Offline,
            Event::Message(i, msg) => self.on_message(i, msg, &mut out),
            Event::Wal { start, data } => {
                self.add_wal(start, &data);
                self.pump_all(&mut out);
            }
            Event::FetchFailed => {
                self.fetch_pending = None;
                self.pump_all(&mut out);
            }
        }
        out
    }

    fn greeting(&self) -> ProposerGreeting {
        ProposerGreeting {
            protocol_version: PROTOCOL_VERSION,
            pg_version: self.cfg.pg_version,
            proposer_id: self.cfg.proposer_id,
            system_id: self.cfg.system_id,
            tenant_id: self.cfg.tenant_id,
            timeline_id: self.cfg.timeline_id,
            wal_seg_size: self.cfg.wal_seg_size,
        }
    }

    fn stop(&mut self, term: Term, acceptor: usize, out: &mut Vec<Action>) {
        self.phase = Phase::Stopped;
        out.push(Action::Superseded { term, acceptor });
    }

    fn on_message(&mut self, i: usize, msg: AcceptorMessage, out: &mut Vec<Action>) {
        match (msg, &self.slots[i]) {
            (AcceptorMessage::Greeting(g), Slot::Greeting) => {
                self.max_term_seen = self.max_term_seen.max(g.term);
                self.slots[i] = Slot::Greeted;
                match self.phase {
                    Phase::Campaign => {
                        let greeted = self.slots.iter().filter(|s| matches!(s, Slot::Greeted)).count();
                        if greeted >= self.cfg.quorum() {
                            self.term = self.max_term_seen + 1;
                            self.phase = Phase::Voting;
                            for j in 0..self.slots.len() {
                                if matches!(self.slots[j], Slot::Greeted) {
                                    self.request_vote(j, out);
                                }
                            }
                        }
                    }
                    Phase::Voting | Phase::Leader { .. } => self.request_vote(i, out),
                    Phase::Stopped => {}
                }
            }
            (AcceptorMessage::Vote(v), Slot::Voting) => {
                if v.term > self.term {
                    return self.stop(v.term, i, out);
                }
                match self.phase {
                    Phase::Voting => {
                        if !v.vote_given {
                            // Another proposer took this term first.
                            return self.stop(v.term, i, out);
                        }
                        self.votes.insert(i, v);
                        self.slots[i] = Slot::Greeted;
                        if self.votes.len() >= self.cfg.quorum() {
                            self.become_leader(out);
                        }
                    }
                    Phase::Leader { .. } => {
                        // A (re)connected acceptor: its answer says where its WAL stands.
                        if v.term == self.term {
                            self.start_streaming(i, &v, out);
                        }
                    }
                    Phase::Campaign | Phase::Stopped => {}
                }
            }
            (AcceptorMessage::Append(a), Slot::Streaming(_)) => {
                if a.term > self.term {
                    return self.stop(a.term, i, out);
                }
                if a.term < self.term {
                    out.push(Action::Reconnect(i));
                    self.slots[i] = Slot::Offline;
                    return;
                }
                if let Slot::Streaming(s) = &mut self.slots[i] {
                    s.flush_lsn = if s.acked { s.flush_lsn.max(a.flush_lsn) } else { a.flush_lsn };
                    s.commit_lsn = s.commit_lsn.max(a.commit_lsn);
                    s.acked = true;
                }
                self.update_commit(out);
                self.update_truncate_lsn();
                self.trim_buffer();
                self.pump_all(out);
                self.check_sync_done(out);
            }
            (msg, _) => {
                // An answer we did not ask for (or a stale one): the stream is out of step.
                tracing::warn!("acceptor {i} sent an unexpected {msg:?}; reconnecting");
                out.push(Action::Reconnect(i));
                self.slots[i] = Slot::Offline;
            }
        }
    }

    fn request_vote(&mut self, i: usize, out: &mut Vec<Action>) {
        self.slots[i] = Slot::Voting;
        out.push(Action::Send(
            i,
            ProposerMessage::VoteRequest(VoteRequest { term: self.term, proposer_id: self.cfg.proposer_id }),
        ));
    }

    fn become_leader(&mut self, out: &mut Vec<Action>) {
        let key = |v: &VoteResponse| {
            if self.cfg.broken_rules.donor_by_flush_only {
                (0, v.flush_lsn)
            } else {
                (v.term_history.last_log_term(v.flush_lsn), v.flush_lsn)
            }
        };
        let (&donor, dv) = self
            .votes
            .iter()
            .max_by(|a, b| key(a.1).cmp(&key(b.1)).then(b.0.cmp(a.0)))
            .expect("a quorum of votes is not empty");
        let epoch_start_lsn = dv.flush_lsn;
        let timeline_start_lsn = dv.timeline_start_lsn;
        let mut history = dv.term_history.up_to(epoch_start_lsn);
        history.0.push(TermLsn { term: self.term, lsn: epoch_start_lsn });
        debug_assert!(history.validate().is_ok(), "bad history {history}");
        self.history = history;
        self.buf_start = epoch_start_lsn;
        self.buf.clear();
        self.phase = Phase::Leader { epoch_start_lsn, donor, timeline_start_lsn };
        out.push(Action::Elected { term: self.term, epoch_start_lsn, donor, history: self.history.clone() });
        let voters: Vec<(usize, VoteResponse)> = self.votes.iter().map(|(&i, v)| (i, v.clone())).collect();
        for (i, v) in voters {
            if matches!(self.slots[i], Slot::Greeted) {
                self.start_streaming(i, &v, out);
            }
        }
        self.check_sync_done(out);
    }

    fn start_streaming(&mut self, i: usize, v: &VoteResponse, out: &mut Vec<Action>) {
        let Phase::Leader { timeline_start_lsn, .. } = self.phase else { return };
        let start = match self.history.highest_common_point(&v.term_history, v.flush_lsn) {
            Some(lsn) => lsn,
            // No WAL at all: continue from where it is.
            None if v.term_history.0.is_empty() => v.flush_lsn,
            // Nothing in common: everything it has must go.
            None => timeline_start_lsn,
        };
        out.push(Action::Send(
            i,
            ProposerMessage::Elected(ProposerElected {
                term: self.term,
                start_streaming_at: start,
                term_history: self.history.clone(),
                timeline_start_lsn,
            }),
        ));
        self.slots[i] = Slot::Streaming(Stream {
            next_lsn: start,
            flush_lsn: start,
            commit_lsn: Lsn::INVALID,
            sent_commit_lsn: Lsn::INVALID,
            acked: false,
        });
        self.pump(i, out);
    }

    fn add_wal(&mut self, start: Lsn, data: &[u8]) {
        if !self.is_leader() || data.is_empty() {
            return;
        }
        let end = start + data.len() as u64;
        let (bs, be) = (self.buf_start, self.wal_end_lsn());
        if start <= be && end > be {
            // Extends the buffer upwards (new WAL, or a fetch overlapping the tail).
            self.buf.extend_from_slice(&data[(be - start) as usize..]);
        }
        if start < bs && end >= bs {
            // Extends it downwards (fetched older WAL).
            let mut v = data[..(bs - start) as usize].to_vec();
            v.extend_from_slice(&self.buf);
            self.buf = v;
            self.buf_start = start;
        }
        if let Some((from, _)) = self.fetch_pending {
            if self.buf_start <= from {
                self.fetch_pending = None;
            }
        }
    }

    /// Drops buffered WAL no acceptor still needs. Never drops uncommitted WAL: that may exist
    /// nowhere else but in Postgres. Committed WAL is on a quorum and can be fetched back.
    fn trim_buffer(&mut self) {
        let end = self.wal_end_lsn();
        let mut target = self.commit_lsn;
        for s in &self.slots {
            match s {
                Slot::Streaming(st) if st.acked => target = target.min(st.flush_lsn),
                // An acceptor we cannot see may need anything: keep it while within limits.
                _ => target = target.min(self.buf_start),
            }
        }
        if end - self.buf_start.min(end) > self.cfg.max_buffered_bytes {
            // Over the limit: drop committed WAL beyond what fits; lagging acceptors fetch it.
            target = target.max(Lsn(end.0.saturating_sub(self.cfg.max_buffered_bytes))).min(self.commit_lsn);
        }
        if target > self.buf_start {
            let cut = (target.min(end) - self.buf_start) as usize;
            self.buf.drain(..cut);
            self.buf_start += cut as u64;
        }
    }

    /// Bytes of WAL held in memory.
    pub fn buffered_bytes(&self) -> u64 {
        self.buf.len() as u64
    }

    /// False when `max_buffered_bytes` of uncommitted WAL are buffered: the driver should stop
    /// reading from Postgres until a quorum catches up (backpressure instead of unbounded memory
    /// or dropping WAL that exists nowhere else). Committed WAL never blocks reading: it is
    /// dropped beyond the limit (lagging acceptors fetch it from up-to-date ones), so memory
    /// stays below twice the limit.
    pub fn wants_more_wal(&self) -> bool {
        let end = self.wal_end_lsn();
        let uncommitted = end - self.commit_lsn.max(self.buf_start).min(end);
        uncommitted < self.cfg.max_buffered_bytes
    }

    /// An acceptor to read WAL up to the buffer start from: one following this term whose flush
    /// reaches it (its WAL is ours), else the donor while nothing above the epoch start has left
    /// the buffer (the donor holds everything below the epoch start).
    fn fetch_source(&self, requester: usize, epoch_start_lsn: Lsn, donor: usize) -> Option<usize> {
        let to = self.buf_start;
        let up_to_date = self.slots.iter().enumerate().find_map(|(j, s)| match s {
            Slot::Streaming(st) if st.acked && j != requester && st.flush_lsn >= to => Some(j),
            _ => None,
        });
        up_to_date.or((to <= epoch_start_lsn && donor != requester).then_some(donor))
    }

    fn pump_all(&mut self, out: &mut Vec<Action>) {
        for i in 0..self.slots.len() {
            self.pump(i, out);
        }
    }

    /// Sends acceptor `i` the WAL it lacks (within the in-flight limit) and the commit LSN.
    fn pump(&mut self, i: usize, out: &mut Vec<Action>) {
        let Phase::Leader { epoch_start_lsn, donor, .. } = self.phase else { return };
        let buf_end = self.wal_end_lsn();
        loop {
            let Slot::Streaming(s) = &mut self.slots[i] else { return };
            if s.next_lsn < self.buf_start {
                // Fetched WAL is prepended to the buffer, so it must reach the buffer start.
                let (from, to) = (s.next_lsn, self.buf_start);
                if self.fetch_pending.is_none() {
                    if let Some(source) = self.fetch_source(i, epoch_start_lsn, donor) {
                        self.fetch_pending = Some((from, to));
                        out.push(Action::FetchWal { from, to, source });
                    }
                }
                return;
            }
            let inflight = s.next_lsn - s.flush_lsn.min(s.next_lsn);
            let room = self.cfg.max_inflight_bytes.saturating_sub(inflight);
            let avail = buf_end.checked_sub(s.next_lsn).unwrap_or(0);
            let n = avail.min(room).min(self.cfg.max_append_bytes);
            if n == 0 {
                if s.acked && s.sent_commit_lsn < self.commit_lsn {
                    // Heartbeat carrying the new commit LSN.
                    s.sent_commit_lsn = self.commit_lsn;
                    let at = s.next_lsn;
                    out.push(Action::Send(i, ProposerMessage::Append(self.append(at, Bytes::new()))));
                }
                return;
            }
            let off = (s.next_lsn - self.buf_start) as usize;
            let data = Bytes::copy_from_slice(&self.buf[off..off + n as usize]);
            let begin = s.next_lsn;
            s.next_lsn = begin + n;
            s.sent_commit_lsn = self.commit_lsn;
            out.push(Action::Send(i, ProposerMessage::Append(self.append(begin, data))));
        }
    }

    fn append(&self, begin: Lsn, wal: Bytes) -> AppendRequest {
        AppendRequest {
            term: self.term,
            begin_lsn: begin,
            end_lsn: begin + wal.len() as u64,
            commit_lsn: self.commit_lsn,
            truncate_lsn: self.truncate_lsn,
            wal,
        }
    }

    fn update_commit(&mut self, out: &mut Vec<Action>) {
        let Phase::Leader { epoch_start_lsn, .. } = self.phase else { return };
        let mut flushes: Vec<Lsn> = self
            .slots
            .iter()
            .filter_map(|s| match s {
                Slot::Streaming(st) if st.acked => Some(st.flush_lsn),
                _ => None,
            })
            .collect();
        if flushes.len() < self.cfg.quorum() {
            return;
        }
        flushes.sort_unstable_by(|a, b| b.cmp(a));
        let quorum_lsn = flushes[self.cfg.quorum() - 1];
        if quorum_lsn >= epoch_start_lsn && quorum_lsn > self.commit_lsn {
            self.commit_lsn = quorum_lsn;
            out.push(Action::Committed(quorum_lsn));
        }
    }

    fn update_truncate_lsn(&mut self) {
        let mut min_flush = Lsn::MAX;
        for s in &self.slots {
            match s {
                Slot::Streaming(st) if st.acked => min_flush = min_flush.min(st.flush_lsn),
                _ => return, // an acceptor we cannot see may still need WAL from its peers
            }
        }
        let lsn = min_flush.min(self.commit_lsn);
        if lsn > self.truncate_lsn {
            self.truncate_lsn = lsn;
        }
    }

    fn check_sync_done(&mut self, out: &mut Vec<Action>) {
        if !self.cfg.sync_only {
            return;
        }
        let Phase::Leader { epoch_start_lsn, .. } = self.phase else { return };
        if self.commit_lsn < epoch_start_lsn {
            return;
        }
        let synced =
            self.slots.iter().filter(|s| matches!(s, Slot::Streaming(st) if st.commit_lsn >= epoch_start_lsn)).count();
        if synced >= self.cfg.quorum() {
            self.phase = Phase::Stopped;
            out.push(Action::SyncDone(epoch_start_lsn));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safekeeper_api::proto::{AcceptorGreeting, AppendResponse, PageserverFeedback};

    fn cfg() -> ProposerConfig {
        ProposerConfig {
            proposer_id: [1; 16],
            tenant_id: TenantId([1; 16]),
            timeline_id: TimelineId([2; 16]),
            system_id: 7,
            pg_version: 150018,
            wal_seg_size: 16 << 20,
            n_acceptors: 3,
            sync_only: false,
            max_inflight_bytes: 1 << 20,
            max_buffered_bytes: 1000,
            max_append_bytes: 100,
            broken_rules: BrokenRules::default(),
        }
    }

    /// Elects the proposer with acceptors 0 and 1 (acceptor 2 stays offline).
    fn elected() -> Proposer {
        let mut p = Proposer::new(cfg());
        for i in 0..2 {
            p.handle(Event::Connected(i));
            p.handle(Event::Message(i, AcceptorMessage::Greeting(AcceptorGreeting { node_id: i as u64, term: 0 })));
        }
        for i in 0..2 {
            p.handle(Event::Message(
                i,
                AcceptorMessage::Vote(VoteResponse {
                    term: 1,
                    vote_given: true,
                    flush_lsn: Lsn(0x1000),
                    truncate_lsn: Lsn(0),
                    term_history: TermHistory::empty(),
                    timeline_start_lsn: Lsn(0x1000),
                }),
            ));
        }
        assert!(p.is_leader());
        p
    }

    fn ack(p: &mut Proposer, i: usize, flush: Lsn) {
        p.handle(Event::Message(
            i,
            AcceptorMessage::Append(AppendResponse {
                term: 1,
                flush_lsn: flush,
                commit_lsn: flush,
                pageserver_feedback: PageserverFeedback::default(),
            }),
        ));
    }

    /// With an acceptor offline the buffer fills; once a quorum has flushed it, reading resumes
    /// and committed WAL beyond the limit is dropped: backpressure never deadlocks.
    #[test]
    fn backpressure_releases_once_a_quorum_commits() {
        let mut p = elected();
        p.handle(Event::Wal { start: Lsn(0x1000), data: Bytes::from(vec![0u8; 1000]) });
        assert!(!p.wants_more_wal(), "1000 uncommitted bytes fill the buffer");
        let end = Lsn(0x1000 + 1000);
        ack(&mut p, 0, end);
        ack(&mut p, 1, end);
        assert_eq!(p.commit_lsn(), end);
        assert!(p.wants_more_wal(), "committed WAL must not hold back reading");
        for k in 1..5u64 {
            p.handle(Event::Wal { start: end + (k - 1) * 500, data: Bytes::from(vec![0u8; 500]) });
            let e = end + k * 500;
            ack(&mut p, 0, e);
            ack(&mut p, 1, e);
            assert!(p.wants_more_wal());
            assert!(p.buffered_bytes() <= 2 * 1000, "buffer grew to {}", p.buffered_bytes());
        }
    }
}
