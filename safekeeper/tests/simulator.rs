//! Deterministic simulation of the consensus protocol (DESIGN D10).
//!
//! Acceptors (the real `Acceptor` on `MemStorage`) and proposers (the real `Proposer`) exchange
//! messages under a seeded scheduler that delays and reorders them across connections, drops
//! connections (messages already sent may still arrive late), duplicates messages, crashes and
//! restarts acceptors (losing unsynced WAL, or failing in the middle of a message), and starts
//! competing proposers. After every step it checks:
//! - every commit a proposer acknowledged is held, byte for byte, by a quorum of acceptors'
//!   durable WAL, and no two acknowledgements disagree;
//! - no two acceptors hold different WAL below their common commit LSN;
//! - an acceptor's durable term never goes back.
//!
//! WAL bytes are a function of (term, LSN), so any divergence between terms shows up in the
//! bytes. A failing seed prints the command that replays it.

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safekeeper::acceptor::{Acceptor, AcceptorError};
use safekeeper::mem_storage::MemStorage;
use safekeeper::state::{ServerInfo, TimelinePersistentState};
use safekeeper_api::proto::{AcceptorMessage, ProposerMessage};
use safekeeper_api::{Term, TermHistory};
use utils::{Lsn, TenantId, TimelineId};
use walproposer::proposer::{Action, BrokenRules, Event, Proposer, ProposerConfig};

const TIMELINE_START: Lsn = Lsn(0x1000);
const TENANT: TenantId = TenantId([1; 16]);
const TIMELINE: TimelineId = TimelineId([2; 16]);

/// The WAL byte a proposer of `term` writes at `lsn`.
fn wal_byte(term: Term, lsn: Lsn) -> u8 {
    let mut x = term.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ lsn.0;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x as u8
}

/// Expected WAL bytes `[from, to)` for a given history.
fn expected_wal(h: &TermHistory, from: Lsn, to: Lsn) -> Vec<u8> {
    (from.0..to.0).map(|x| wal_byte(h.term_at(Lsn(x)).unwrap_or(0), Lsn(x))).collect()
}

#[derive(Clone, Copy, Debug)]
pub struct SimConfig {
    pub n_acceptors: usize,
    pub max_proposers: usize,
    pub steps: usize,
    pub broken: BrokenRules,
}

struct AcceptorNode {
    live: Option<Acceptor<MemStorage>>,
    /// Disk while crashed.
    disk: MemStorage,
    durable_term: Term,
}

impl AcceptorNode {
    fn disk(&self) -> &MemStorage {
        self.live.as_ref().map_or(&self.disk, |a| a.storage())
    }

    fn commit_lsn(&self) -> Lsn {
        self.live.as_ref().map_or(self.disk.state.commit_lsn.min(self.disk.flush_lsn()), |a| a.commit_lsn())
    }
}

use safekeeper::acceptor::AcceptorStorage;

struct ProposerNode {
    p: Proposer,
    /// Connection id per acceptor.
    conns: Vec<Option<u64>>,
    /// WAL this proposer's "Postgres" generated, from the epoch start.
    own_wal: Vec<u8>,
    epoch_start: Lsn,
    fetches: Vec<(Lsn, Lsn)>,
}

struct Conn {
    proposer: usize,
    acceptor: usize,
    alive: bool,
    to_acceptor: VecDeque<ProposerMessage>,
    to_proposer: VecDeque<AcceptorMessage>,
}

pub struct Sim {
    cfg: SimConfig,
    rng: StdRng,
    acceptors: Vec<AcceptorNode>,
    proposers: Vec<ProposerNode>,
    conns: BTreeMap<u64, Conn>,
    next_conn: u64,
    /// Bytes every acknowledged commit vouches for, from TIMELINE_START.
    committed: Vec<u8>,
    pub acks: u64,
    pub log: Vec<String>,
}

fn quorum(n: usize) -> usize {
    n / 2 + 1
}

impl Sim {
    pub fn new(seed: u64, cfg: SimConfig) -> Self {
        let server = ServerInfo { pg_version: 150018, system_id: 7, wal_seg_size: 16 << 20 };
        let acceptors = (0..cfg.n_acceptors)
            .map(|_| {
                let st = TimelinePersistentState::new(TENANT, TIMELINE, server.clone(), TIMELINE_START);
                AcceptorNode {
                    live: Some(Acceptor::new(0, st.clone(), MemStorage::new(st.clone()))),
                    disk: MemStorage::new(st),
                    durable_term: 0,
                }
            })
            .collect();
        Sim {
            cfg,
            rng: StdRng::seed_from_u64(seed),
            acceptors,
            proposers: Vec::new(),
            conns: BTreeMap::new(),
            next_conn: 1,
            committed: Vec::new(),
            acks: 0,
            log: Vec::new(),
        }
    }

    fn note(&mut self, s: String) {
        if self.log.len() < 5000 {
            self.log.push(s);
        }
    }

    fn spawn_proposer(&mut self) {
        let idx = self.proposers.len();
        let cfg = ProposerConfig {
            proposer_id: [idx as u8 + 1; 16],
            tenant_id: TENANT,
            timeline_id: TIMELINE,
            system_id: 7,
            pg_version: 150018,
            wal_seg_size: 16 << 20,
            n_acceptors: self.cfg.n_acceptors,
            sync_only: self.rng.gen_bool(0.2),
            max_inflight_bytes: 600,
            max_buffered_bytes: 400,
            max_append_bytes: 100,
            broken_rules: self.cfg.broken,
        };
        self.note(format!("spawn proposer {idx} sync_only={}", cfg.sync_only));
        self.proposers.push(ProposerNode {
            p: Proposer::new(cfg),
            conns: vec![None; self.cfg.n_acceptors],
            own_wal: Vec::new(),
            epoch_start: Lsn(0),
            fetches: Vec::new(),
        });
    }

    fn alive_proposers(&self) -> usize {
        self.proposers.iter().filter(|p| !p.p.is_stopped()).count()
    }

    fn proposer_event(&mut self, pi: usize, ev: Event) -> Result<(), String> {
        let actions = self.proposers[pi].p.handle(ev);
        for a in actions {
            match a {
                Action::Send(ai, msg) => {
                    if let Some(cid) = self.proposers[pi].conns[ai] {
                        if let Some(c) = self.conns.get_mut(&cid) {
                            c.to_acceptor.push_back(msg);
                        }
                    }
                }
                Action::Reconnect(ai) => self.drop_conn_of(pi, ai, false),
                Action::Elected { term, epoch_start_lsn, donor, history } => {
                    self.note(format!(
                        "proposer {pi} elected term {term} at {epoch_start_lsn} donor {donor} history {history}"
                    ));
                    self.proposers[pi].epoch_start = epoch_start_lsn;
                }
                Action::FetchWal { from, to, .. } => self.proposers[pi].fetches.push((from, to)),
                Action::Committed(lsn) | Action::SyncDone(lsn) => {
                    let h = self.proposers[pi].p.history().clone();
                    self.note(format!("proposer {pi} acked {lsn} (term {})", self.proposers[pi].p.term()));
                    self.record_ack(lsn, &h)?;
                }
                Action::Superseded { term, acceptor } => {
                    self.note(format!("proposer {pi} superseded by term {term} (acceptor {acceptor})"));
                    for ai in 0..self.cfg.n_acceptors {
                        self.drop_conn_of(pi, ai, true);
                    }
                }
            }
        }
        Ok(())
    }

    fn record_ack(&mut self, lsn: Lsn, h: &TermHistory) -> Result<(), String> {
        self.acks += 1;
        let expected = expected_wal(h, TIMELINE_START, lsn);
        let common = expected.len().min(self.committed.len());
        if expected[..common] != self.committed[..common] {
            return Err(format!("acknowledged commit {lsn} (history {h}) contradicts an earlier acknowledged commit"));
        }
        if expected.len() > self.committed.len() {
            self.committed = expected;
        }
        Ok(())
    }

    fn drop_conn_of(&mut self, pi: usize, ai: usize, proposer_stopped: bool) {
        if let Some(cid) = self.proposers[pi].conns[ai].take() {
            self.kill_conn(cid);
            if !proposer_stopped {
                // The proposer learns of it at once; the acceptor side may still get late messages.
                let _ = self.proposers[pi].p.handle(Event::Disconnected(ai));
            }
        }
    }

    /// Marks a connection dead: answers are lost; requests already sent may still arrive.
    fn kill_conn(&mut self, cid: u64) {
        let keep_late = self.rng.gen_bool(0.5);
        if let Some(c) = self.conns.get_mut(&cid) {
            c.alive = false;
            c.to_proposer.clear();
            if !keep_late {
                c.to_acceptor.clear();
            }
        }
    }

    fn crash_acceptor(&mut self, ai: usize) {
        let Some(a) = self.acceptors[ai].live.take() else { return };
        self.acceptors[ai].disk = a.storage().crash();
        self.note(format!("crash acceptor {ai} (durable flush {})", self.acceptors[ai].disk.flush_lsn()));
        let cids: Vec<u64> = self.conns.iter().filter(|(_, c)| c.acceptor == ai).map(|(&id, _)| id).collect();
        for cid in cids {
            let pi = self.conns[&cid].proposer;
            if let Some(c) = self.conns.get_mut(&cid) {
                c.to_acceptor.clear();
            }
            if self.proposers[pi].conns[ai] == Some(cid) {
                self.drop_conn_of(pi, ai, self.proposers[pi].p.is_stopped());
            }
            self.conns.remove(&cid);
        }
    }

    fn restart_acceptor(&mut self, ai: usize) {
        if self.acceptors[ai].live.is_some() {
            return;
        }
        let disk = self.acceptors[ai].disk.clone();
        let state = disk.state.clone();
        self.note(format!("restart acceptor {ai} term {} flush {}", state.term, disk.flush_lsn()));
        self.acceptors[ai].live = Some(Acceptor::new(ai as u64, state, disk));
    }

    fn deliver_to_acceptor(&mut self, cid: u64) -> Result<(), String> {
        let (ai, alive, msg) = {
            let c = self.conns.get_mut(&cid).expect("conn");
            let Some(msg) = c.to_acceptor.front().cloned() else { return Ok(()) };
            // Sometimes deliver a message twice.
            if !self.rng.gen_bool(0.03) {
                c.to_acceptor.pop_front();
            }
            (c.acceptor, c.alive, msg)
        };
        let Some(acc) = self.acceptors[ai].live.as_mut() else { return Ok(()) };
        match acc.process(&msg) {
            Ok(Some(reply)) => {
                if alive {
                    self.conns.get_mut(&cid).expect("conn").to_proposer.push_back(reply);
                }
            }
            Ok(None) => {}
            Err(AcceptorError::Protocol(e)) => {
                self.note(format!("acceptor {ai} rejects {}: {e}", msg.name()));
                let pi = self.conns[&cid].proposer;
                if self.proposers[pi].conns[ai] == Some(cid) {
                    self.drop_conn_of(pi, ai, false);
                }
            }
            Err(AcceptorError::Io(e)) => {
                self.note(format!("acceptor {ai} storage failed during {}: {e}", msg.name()));
                self.crash_acceptor(ai);
            }
        }
        self.check_term(ai)
    }

    fn check_term(&mut self, ai: usize) -> Result<(), String> {
        let t = self.acceptors[ai].disk().state.term;
        if t < self.acceptors[ai].durable_term {
            return Err(format!(
                "acceptor {ai}: durable term went back from {} to {t}",
                self.acceptors[ai].durable_term
            ));
        }
        self.acceptors[ai].durable_term = t;
        Ok(())
    }

    fn deliver_to_proposer(&mut self, cid: u64) -> Result<(), String> {
        let c = self.conns.get_mut(&cid).expect("conn");
        let Some(msg) = c.to_proposer.pop_front() else { return Ok(()) };
        let (pi, ai) = (c.proposer, c.acceptor);
        if self.proposers[pi].conns[ai] != Some(cid) {
            return Ok(());
        }
        self.proposer_event(pi, Event::Message(ai, msg))
    }

    fn serve_fetches(&mut self, pi: usize) -> Result<(), String> {
        let fetches = std::mem::take(&mut self.proposers[pi].fetches);
        let mut left = Vec::new();
        for (from, to) in fetches {
            let epoch = self.proposers[pi].epoch_start;
            let data = if from >= epoch {
                let node = &self.proposers[pi];
                let a = (from - epoch) as usize;
                let b = ((to - epoch) as usize).min(node.own_wal.len());
                (a < b).then(|| node.own_wal[a..b].to_vec())
            } else {
                // From any acceptor whose WAL agrees with the proposer's history up to `to`.
                let h = self.proposers[pi].p.history().clone();
                self.acceptors.iter().filter_map(|n| n.live.as_ref()).find_map(|a| {
                    let st = a.state();
                    let agrees = h.highest_common_point(&st.term_history, a.flush_lsn()).is_some_and(|c| c >= to);
                    if agrees {
                        a.storage().durable_wal(from, to).map(|w| w.to_vec())
                    } else {
                        None
                    }
                })
            };
            match data {
                Some(d) => self.proposer_event(pi, Event::Wal { start: from, data: Bytes::from(d) })?,
                None => left.push((from, to)),
            }
        }
        self.proposers[pi].fetches.extend(left);
        Ok(())
    }

    fn generate_wal(&mut self, pi: usize) -> Result<(), String> {
        let node = &self.proposers[pi];
        if !node.p.is_leader() || node.p.is_stopped() {
            return Ok(());
        }
        let start = node.epoch_start + node.own_wal.len() as u64;
        let term = node.p.term();
        let n = self.rng.gen_range(1..120u64);
        let data: Vec<u8> = (0..n).map(|i| wal_byte(term, start + i)).collect();
        self.proposers[pi].own_wal.extend_from_slice(&data);
        self.proposer_event(pi, Event::Wal { start, data: Bytes::from(data) })
    }

    fn connect(&mut self, pi: usize, ai: usize) -> Result<(), String> {
        if self.proposers[pi].conns[ai].is_some()
            || self.proposers[pi].p.is_stopped()
            || self.acceptors[ai].live.is_none()
        {
            return Ok(());
        }
        let cid = self.next_conn;
        self.next_conn += 1;
        self.conns.insert(
            cid,
            Conn {
                proposer: pi,
                acceptor: ai,
                alive: true,
                to_acceptor: VecDeque::new(),
                to_proposer: VecDeque::new(),
            },
        );
        self.proposers[pi].conns[ai] = Some(cid);
        self.proposer_event(pi, Event::Connected(ai))
    }

    fn step(&mut self, faults: bool) -> Result<(), String> {
        let r = self.rng.gen_range(0..100);
        let n = self.cfg.n_acceptors;
        match r {
            0..=54 => {
                // Deliver the next message of a random connection and direction.
                let ids: Vec<u64> = self
                    .conns
                    .iter()
                    .filter(|(_, c)| !c.to_acceptor.is_empty() || !c.to_proposer.is_empty())
                    .map(|(&id, _)| id)
                    .collect();
                if ids.is_empty() {
                    return Ok(());
                }
                let cid = ids[self.rng.gen_range(0..ids.len())];
                let c = &self.conns[&cid];
                let to_acc = !c.to_acceptor.is_empty() && (c.to_proposer.is_empty() || self.rng.gen_bool(0.5));
                if to_acc {
                    self.deliver_to_acceptor(cid)?;
                } else {
                    self.deliver_to_proposer(cid)?;
                }
            }
            55..=69 => {
                for pi in 0..self.proposers.len() {
                    if self.rng.gen_bool(0.5) {
                        self.generate_wal(pi)?;
                    }
                }
            }
            70..=79 => {
                let (pi, ai) = (self.rng.gen_range(0..self.proposers.len().max(1)), self.rng.gen_range(0..n));
                if pi < self.proposers.len() {
                    self.connect(pi, ai)?;
                }
            }
            80..=84 => {
                for pi in 0..self.proposers.len() {
                    self.serve_fetches(pi)?;
                }
            }
            85..=87 if faults => {
                // Drop a connection.
                let ids: Vec<u64> = self.conns.iter().filter(|(_, c)| c.alive).map(|(&id, _)| id).collect();
                if !ids.is_empty() {
                    let cid = ids[self.rng.gen_range(0..ids.len())];
                    let (pi, ai) = (self.conns[&cid].proposer, self.conns[&cid].acceptor);
                    if self.proposers[pi].conns[ai] == Some(cid) {
                        self.drop_conn_of(pi, ai, false);
                    }
                }
            }
            88..=89 if faults => {
                let ai = self.rng.gen_range(0..n);
                if self.rng.gen_bool(0.5) {
                    self.crash_acceptor(ai);
                } else if let Some(a) = self.acceptors[ai].live.as_mut() {
                    // Fail a few storage calls from now: a crash in the middle of a message.
                    a.storage_mut().ops_left = Some(self.rng.gen_range(0..3));
                }
            }
            90..=94 => {
                let ai = self.rng.gen_range(0..n);
                self.restart_acceptor(ai);
            }
            95..=99
                if self.alive_proposers() < self.cfg.max_proposers
                    && self.proposers.len() < 4 * self.cfg.max_proposers
                    && (self.proposers.is_empty() || faults) =>
            {
                self.spawn_proposer();
            }
            _ => {}
        }
        // Remove fully drained dead connections.
        self.conns.retain(|_, c| c.alive || !c.to_acceptor.is_empty());
        self.check_invariants()
    }

    fn check_invariants(&self) -> Result<(), String> {
        let n = self.cfg.n_acceptors;
        let end = TIMELINE_START + self.committed.len() as u64;
        if !self.committed.is_empty() {
            let holders = self
                .acceptors
                .iter()
                .filter(|a| a.disk().durable_wal(TIMELINE_START, end) == Some(&self.committed[..]))
                .count();
            if holders < quorum(n) {
                return Err(format!("acknowledged WAL up to {end} is held by only {holders} of {n} acceptors"));
            }
        }
        for i in 0..n {
            let ci = self.acceptors[i].commit_lsn();
            for j in i + 1..n {
                let c = ci.min(self.acceptors[j].commit_lsn());
                let (a, b) = (self.acceptors[i].disk(), self.acceptors[j].disk());
                if let (Some(x), Some(y)) = (a.durable_wal(TIMELINE_START, c), b.durable_wal(TIMELINE_START, c)) {
                    if x != y {
                        return Err(format!("acceptors {i} and {j} differ below their common commit LSN {c}"));
                    }
                }
            }
        }
        Ok(())
    }

    /// Runs the schedule: faults for most of it, then a calm tail.
    pub fn run(&mut self) -> Result<(), String> {
        self.spawn_proposer();
        let calm_from = self.cfg.steps * 4 / 5;
        for step in 0..self.cfg.steps {
            let faults = step < calm_from;
            if !faults && step == calm_from {
                for ai in 0..self.cfg.n_acceptors {
                    self.restart_acceptor(ai);
                }
            }
            self.step(faults).map_err(|e| format!("step {step}: {e}"))?;
        }
        Ok(())
    }
}

fn run_seed(seed: u64, cfg: SimConfig) -> Result<u64, String> {
    let mut sim = Sim::new(seed, cfg);
    match sim.run() {
        Ok(()) => Ok(sim.acks),
        Err(e) => {
            let tail: Vec<&String> = sim.log.iter().rev().take(30).collect();
            Err(format!(
                "seed {seed} with {cfg:?}: {e}\nlast events (newest first):\n  {}\nreplay: SIM_SEED={seed} SIM_ACCEPTORS={} cargo test -p safekeeper --test simulator replay -- --nocapture",
                tail.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n  "),
                cfg.n_acceptors
            ))
        }
    }
}

fn run_many(seeds: std::ops::Range<u64>, cfg: SimConfig) -> Result<(u64, u64), String> {
    let (mut acks, mut seeds_with_acks) = (0, 0);
    for seed in seeds {
        let a = run_seed(seed, cfg)?;
        acks += a;
        seeds_with_acks += (a > 0) as u64;
    }
    Ok((acks, seeds_with_acks))
}

fn cfg(n_acceptors: usize) -> SimConfig {
    SimConfig { n_acceptors, max_proposers: 3, steps: 1000, broken: BrokenRules::default() }
}

#[test]
fn simulate_3_acceptors() {
    let seeds = 10_000;
    let (acks, with) = run_many(0..seeds, cfg(3)).unwrap_or_else(|e| panic!("{e}"));
    println!("3 acceptors: {seeds} seeds, {acks} acknowledged commits, {with} seeds with commits");
    // The schedule must let the protocol make progress, or the checks prove nothing.
    assert!(with > seeds / 2, "only {with} of {seeds} seeds committed anything");
}

#[test]
fn simulate_5_acceptors() {
    let seeds = 10_000;
    let (acks, with) = run_many(100_000..100_000 + seeds, cfg(5)).unwrap_or_else(|e| panic!("{e}"));
    println!("5 acceptors: {seeds} seeds, {acks} acknowledged commits, {with} seeds with commits");
    assert!(with > seeds / 2, "only {with} of {seeds} seeds committed anything");
}

fn finds_violation(broken: BrokenRules) -> Option<String> {
    for seed in 0..20_000 {
        for n in [3, 5] {
            if let Err(e) = run_seed(seed, SimConfig { broken, ..cfg(n) }) {
                return Some(e);
            }
        }
    }
    None
}

#[test]
fn catches_donor_chosen_by_flush_lsn_alone() {
    let e = finds_violation(BrokenRules { donor_by_flush_only: true })
        .expect("the simulator must catch a donor chosen by flush LSN alone");
    println!("{e}");
}

/// `SIM_SEED=N [SIM_ACCEPTORS=3] cargo test -p safekeeper --test simulator replay -- --nocapture`
#[test]
fn replay() {
    let Ok(seed) = std::env::var("SIM_SEED") else { return };
    let seed: u64 = seed.parse().expect("SIM_SEED must be a number");
    let n: usize = std::env::var("SIM_ACCEPTORS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let mut sim = Sim::new(seed, cfg(n));
    let r = sim.run();
    for l in &sim.log {
        println!("{l}");
    }
    r.unwrap();
}

/// Long soak: `SIM_SOAK_SEEDS=1000000 cargo test --release -p safekeeper --test simulator soak -- --ignored`
#[test]
#[ignore]
fn soak() {
    let seeds: u64 = std::env::var("SIM_SOAK_SEEDS").ok().and_then(|v| v.parse().ok()).unwrap_or(200_000);
    for n in [3, 5] {
        let (acks, with) = run_many(1_000_000..1_000_000 + seeds, SimConfig { steps: 1500, ..cfg(n) })
            .unwrap_or_else(|e| panic!("{e}"));
        println!("{n} acceptors: {seeds} seeds, {acks} acks, {with} seeds with commits");
    }
}
