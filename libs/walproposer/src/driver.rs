//! Runs a `Proposer` against real safekeepers and a real Postgres.
//!
//! Tasks: one per safekeeper (connect with backoff, `START_WAL_PUSH`, forward messages both
//! ways), one reading WAL from Postgres once elected (`START_REPLICATION SLOT walproposer`), and
//! short-lived fetches of older WAL from the donor safekeeper. All of them talk to the central
//! loop, which owns the proposer, through one channel. A connection carries a generation number
//! so that events of a connection already replaced are ignored.

use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use postgres_client::{Client, ConnectConfig, CopyBothReader, CopyBothWriter};
use safekeeper_api::proto::AcceptorMessage;
use safekeeper_api::replication::{pg_now_us, FeedbackMessage, ReplicationMessage};
use safekeeper_api::Term;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use utils::{Lsn, TenantId, TimelineId};

use crate::proposer::{Action, BrokenRules, Event, Proposer, ProposerConfig};

/// Name of the synchronous standby Postgres waits for, and of its replication slot.
pub const WALPROPOSER_NAME: &str = "walproposer";

#[derive(Clone, Debug)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl std::str::FromStr for HostPort {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (h, p) = s.rsplit_once(':').ok_or_else(|| format!("'{s}' is not host:port"))?;
        let port = p.parse().map_err(|_| format!("'{s}': bad port '{p}'"))?;
        Ok(HostPort { host: h.to_string(), port })
    }
}

impl std::fmt::Display for HostPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// The local Postgres whose WAL we propose.
#[derive(Clone, Debug)]
pub struct PostgresSource {
    pub addr: HostPort,
    pub user: String,
}

/// `Debug` never shows `safekeeper_password`.
#[derive(Clone)]
pub struct DriverConfig {
    pub safekeepers: Vec<HostPort>,
    pub tenant_id: TenantId,
    pub timeline_id: TimelineId,
    /// `None`: sync-safekeepers (elect, sync a quorum, print the start LSN, stop).
    pub postgres: Option<PostgresSource>,
    /// Known in sync mode from the timeline; read from Postgres otherwise. 0 = unknown.
    pub system_id: u64,
    pub pg_version: u32,
    pub wal_seg_size: u32,
    /// Password (a JWT when auth is on) for safekeeper connections.
    pub safekeeper_password: Option<String>,
    /// TLS-only safekeeper connections, each checked against this CA (verify-full).
    pub safekeeper_tls: Option<utils::tls::TlsConnector>,
    pub reconnect_backoff_max: Duration,
}

impl std::fmt::Debug for DriverConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DriverConfig")
            .field("safekeepers", &self.safekeepers)
            .field("tenant_id", &self.tenant_id)
            .field("timeline_id", &self.timeline_id)
            .field("postgres", &self.postgres)
            .field("system_id", &self.system_id)
            .field("pg_version", &self.pg_version)
            .field("wal_seg_size", &self.wal_seg_size)
            .field("safekeeper_password", &self.safekeeper_password.as_ref().map(|_| "<redacted>"))
            .field("safekeeper_tls", &self.safekeeper_tls.is_some())
            .field("reconnect_backoff_max", &self.reconnect_backoff_max)
            .finish()
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// sync-safekeepers finished: start a compute at this LSN.
    Synced(Lsn),
    /// Shut down on request.
    Stopped,
}

enum SkEvent {
    Connected(mpsc::Sender<Bytes>),
    Message(AcceptorMessage),
    Disconnected(String),
}

enum DriverEvent {
    Sk { i: usize, generation: u64, ev: SkEvent },
    Wal { start: Lsn, data: Bytes },
    PostgresFailed(String),
    FetchFailed(String),
}

/// Runs the walproposer until it is superseded (an error), finishes syncing, or `shutdown`.
pub async fn run(cfg: DriverConfig, shutdown: CancellationToken) -> anyhow::Result<Outcome> {
    let mut cfg = cfg;
    if cfg.safekeepers.is_empty() {
        bail!("no safekeepers configured");
    }
    if let Some(pg) = &cfg.postgres {
        let (system_id, pos) = identify_system(pg).await?;
        info!("Postgres at {} has system id {system_id}, WAL flushed up to {pos}", pg.addr);
        cfg.system_id = system_id;
    }
    let proposer_id: [u8; 16] = TimelineId::generate().0;
    let mut proposer = Proposer::new(ProposerConfig {
        proposer_id,
        tenant_id: cfg.tenant_id,
        timeline_id: cfg.timeline_id,
        system_id: cfg.system_id,
        pg_version: cfg.pg_version,
        wal_seg_size: cfg.wal_seg_size,
        n_acceptors: cfg.safekeepers.len(),
        sync_only: cfg.postgres.is_none(),
        max_inflight_bytes: 16 * 1024 * 1024,
        max_buffered_bytes: 256 * 1024 * 1024,
        max_append_bytes: safekeeper_api::proto::MAX_APPEND_BYTES as u64,
        broken_rules: BrokenRules::default(),
    });
    let stop = shutdown.child_token();
    let _stop_tasks = stop.clone().drop_guard();
    let (ev_tx, mut ev_rx) = mpsc::channel::<DriverEvent>(4096);
    let mut senders: Vec<Option<(u64, mpsc::Sender<Bytes>)>> = vec![None; cfg.safekeepers.len()];
    for (i, sk) in cfg.safekeepers.iter().enumerate() {
        tokio::spawn(safekeeper_task(i, sk.clone(), cfg.clone(), ev_tx.clone(), stop.clone()));
    }
    let (commit_tx, commit_rx) = watch::channel(Lsn::INVALID);
    // Backpressure: the Postgres reader pauses while the proposer's buffer is full.
    let (pause_tx, pause_rx) = watch::channel(false);
    let mut pg_started = false;

    loop {
        let ev = tokio::select! {
            _ = shutdown.cancelled() => return Ok(Outcome::Stopped),
            ev = ev_rx.recv() => ev.expect("the driver holds a sender"),
        };
        let pev = match ev {
            DriverEvent::Sk { i, generation, ev } => match ev {
                SkEvent::Connected(tx) => {
                    senders[i] = Some((generation, tx));
                    Some(Event::Connected(i))
                }
                SkEvent::Message(m) if senders[i].as_ref().is_some_and(|(g, _)| *g == generation) => {
                    Some(Event::Message(i, m))
                }
                SkEvent::Disconnected(why) if senders[i].as_ref().is_some_and(|(g, _)| *g == generation) => {
                    warn!("safekeeper {} disconnected: {why}", cfg.safekeepers[i]);
                    senders[i] = None;
                    Some(Event::Disconnected(i))
                }
                _ => None,
            },
            DriverEvent::Wal { start, data } => Some(Event::Wal { start, data }),
            DriverEvent::PostgresFailed(e) => bail!("reading WAL from Postgres failed: {e}"),
            DriverEvent::FetchFailed(e) => {
                warn!("fetching WAL from a safekeeper failed, will retry: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
                Some(Event::FetchFailed)
            }
        };
        let Some(pev) = pev else { continue };
        let actions = proposer.handle(pev);
        let pause = !proposer.wants_more_wal();
        pause_tx.send_if_modified(|p| std::mem::replace(p, pause) != pause);
        for action in actions {
            match action {
                Action::Send(i, msg) => {
                    if let Some((_, tx)) = &senders[i] {
                        // The channel is bounded by the proposer's in-flight limit; a closed
                        // one means the connection is going away and will report it.
                        let _ = tx.send(msg.encode()).await;
                    }
                }
                Action::Reconnect(i) => senders[i] = None,
                Action::Elected { term, epoch_start_lsn, donor, history } => {
                    info!(
                        "elected in term {term}; WAL continues at {epoch_start_lsn}; donor {}; history {history}",
                        cfg.safekeepers[donor]
                    );
                    if let (Some(pg), false) = (&cfg.postgres, pg_started) {
                        pg_started = true;
                        tokio::spawn(postgres_wal_task(
                            pg.clone(),
                            epoch_start_lsn,
                            ev_tx.clone(),
                            commit_rx.clone(),
                            pause_rx.clone(),
                            stop.clone(),
                        ));
                    }
                }
                Action::FetchWal { from, to, source } => {
                    info!("fetching WAL {from}..{to} from safekeeper {}", cfg.safekeepers[source]);
                    spawn_fetch(&cfg, source, proposer.term(), from, to, ev_tx.clone(), stop.clone());
                }
                Action::Committed(lsn) => {
                    let _ = commit_tx.send(lsn);
                }
                Action::SyncDone(lsn) => {
                    info!("safekeepers synced: a quorum holds and has committed WAL up to {lsn}");
                    return Ok(Outcome::Synced(lsn));
                }
                Action::Superseded { term, acceptor } => {
                    bail!(
                        "safekeeper {} has term {term}, higher than ours ({}): another compute now owns timeline {}/{}; stopping",
                        cfg.safekeepers[acceptor],
                        proposer.term(),
                        cfg.tenant_id,
                        cfg.timeline_id
                    );
                }
            }
        }
    }
}

fn sk_connect_config(cfg: &DriverConfig, sk: &HostPort) -> ConnectConfig {
    let mut c = ConnectConfig::new(sk.host.clone(), sk.port, "walproposer");
    c.password = cfg.safekeeper_password.clone();
    c.tls = cfg.safekeeper_tls.clone();
    c.options =
        vec![("tenant_id".into(), cfg.tenant_id.to_string()), ("timeline_id".into(), cfg.timeline_id.to_string())];
    c.connect_timeout = Duration::from_secs(5);
    c
}

async fn safekeeper_task(
    i: usize,
    sk: HostPort,
    cfg: DriverConfig,
    events: mpsc::Sender<DriverEvent>,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    let mut generation = 0u64;
    loop {
        generation += 1;
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            r = safekeeper_session(i, generation, &sk, &cfg, &events) => r,
        };
        let why = match result {
            Ok(()) => "connection closed".to_string(),
            Err(e) => format!("{e:#}"),
        };
        let connected_once = events.send(DriverEvent::Sk { i, generation, ev: SkEvent::Disconnected(why) }).await;
        if connected_once.is_err() {
            return;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(cfg.reconnect_backoff_max);
    }
}

async fn safekeeper_session(
    i: usize,
    generation: u64,
    sk: &HostPort,
    cfg: &DriverConfig,
    events: &mpsc::Sender<DriverEvent>,
) -> anyhow::Result<()> {
    let client = Client::connect(&sk_connect_config(cfg, sk)).await?;
    let (mut reader, mut writer) = client.copy_both("START_WAL_PUSH").await?;
    let (tx, mut rx) = mpsc::channel::<Bytes>(1024);
    events.send(DriverEvent::Sk { i, generation, ev: SkEvent::Connected(tx) }).await?;
    let send_loop = async {
        while let Some(msg) = rx.recv().await {
            writer.send(&msg).await?;
        }
        anyhow::Ok(()) // the driver dropped us: reconnect
    };
    let recv_loop = async {
        loop {
            let Some(data) = reader.next().await? else { bail!("safekeeper ended the stream") };
            let msg = AcceptorMessage::decode(&data).with_context(|| format!("bad message from safekeeper {sk}"))?;
            events.send(DriverEvent::Sk { i, generation, ev: SkEvent::Message(msg) }).await?;
        }
    };
    tokio::select! {
        r = send_loop => r,
        r = recv_loop => r,
    }
}

fn pg_connect_config(pg: &PostgresSource) -> ConnectConfig {
    let mut c = ConnectConfig::new(pg.addr.host.clone(), pg.addr.port, pg.user.clone());
    c.replication = Some("true".into());
    c.application_name = Some(WALPROPOSER_NAME.into());
    c
}

async fn identify_system(pg: &PostgresSource) -> anyhow::Result<(u64, Lsn)> {
    let mut c = Client::connect(&pg_connect_config(pg)).await?;
    let rows = c.simple_query("IDENTIFY_SYSTEM").await?;
    let row = rows.first().context("IDENTIFY_SYSTEM returned no row")?;
    let system_id = row.first().cloned().flatten().context("no systemid")?.parse().context("bad systemid")?;
    let pos: Lsn = row.get(2).cloned().flatten().context("no xlogpos")?.parse()?;
    Ok((system_id, pos))
}

/// Streams WAL from the local Postgres into the proposer and reports the commit LSN back as
/// the standby's write/flush/apply position, which releases committing backends.
async fn postgres_wal_task(
    pg: PostgresSource,
    start: Lsn,
    events: mpsc::Sender<DriverEvent>,
    commit: watch::Receiver<Lsn>,
    pause: watch::Receiver<bool>,
    stop: CancellationToken,
) {
    let r = tokio::select! {
        _ = stop.cancelled() => return,
        r = postgres_wal_stream(&pg, start, &events, commit, pause) => r,
    };
    if let Err(e) = r {
        let _ = events.send(DriverEvent::PostgresFailed(format!("{e:#}"))).await;
    }
}

async fn postgres_wal_stream(
    pg: &PostgresSource,
    start: Lsn,
    events: &mpsc::Sender<DriverEvent>,
    mut commit: watch::Receiver<Lsn>,
    mut pause: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut c = Client::connect(&pg_connect_config(pg)).await?;
    // The slot keeps WAL in Postgres that the safekeepers have not committed yet. Look before
    // creating it, so Postgres does not log an error for an existing slot.
    let slot = c.simple_query(&format!("READ_REPLICATION_SLOT {WALPROPOSER_NAME}")).await?;
    let exists = slot.first().and_then(|r| r.first().cloned().flatten()).is_some();
    if !exists {
        if let Err(e) =
            c.simple_query(&format!("CREATE_REPLICATION_SLOT {WALPROPOSER_NAME} PHYSICAL RESERVE_WAL")).await
        {
            if e.sqlstate() != Some("42710") {
                return Err(e).context("creating the walproposer replication slot");
            }
        }
    }
    let (mut reader, mut writer) =
        c.copy_both(&format!("START_REPLICATION SLOT {WALPROPOSER_NAME} PHYSICAL {start}")).await?;
    info!("streaming WAL from Postgres at {} from {start}", pg.addr);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let paused = *pause.borrow_and_update();
        let reply = tokio::select! {
            msg = reader.next(), if !paused => {
                let Some(data) = msg? else { bail!("Postgres ended the replication stream") };
                match ReplicationMessage::decode(&data)? {
                    ReplicationMessage::XLogData { wal_start, data, .. } => {
                        events.send(DriverEvent::Wal { start: wal_start, data }).await?;
                        false
                    }
                    ReplicationMessage::Keepalive { reply_requested, .. } => reply_requested,
                }
            }
            r = commit.changed() => { r?; true }
            r = pause.changed() => { r?; false }
            _ = tick.tick() => true,
        };
        if reply {
            let lsn = *commit.borrow();
            let status = FeedbackMessage::StandbyStatus {
                write_lsn: lsn,
                flush_lsn: lsn,
                apply_lsn: lsn,
                send_time_us: pg_now_us(),
                reply_requested: false,
            };
            writer.send(&status.encode()).await?;
        }
    }
}

fn spawn_fetch(
    cfg: &DriverConfig,
    source: usize,
    term: Term,
    from: Lsn,
    to: Lsn,
    events: mpsc::Sender<DriverEvent>,
    stop: CancellationToken,
) {
    let sk = cfg.safekeepers[source].clone();
    let conn = sk_connect_config(cfg, &sk);
    tokio::spawn(async move {
        let r = tokio::select! {
            _ = stop.cancelled() => return,
            r = fetch_wal(conn, term, from, to, &events) => r,
        };
        if let Err(e) = r {
            let _ = events.send(DriverEvent::FetchFailed(format!("from {sk}: {e:#}"))).await;
        }
    });
}

/// Reads WAL `[from, to)` from a safekeeper, which serves it only while its term is `term`:
/// then its WAL below our epoch start is exactly what it voted with.
async fn fetch_wal(
    mut conn: ConnectConfig,
    term: Term,
    from: Lsn,
    to: Lsn,
    events: &mpsc::Sender<DriverEvent>,
) -> anyhow::Result<()> {
    conn.replication = Some("true".into());
    let c = Client::connect(&conn).await?;
    let (mut reader, _writer): (CopyBothReader, CopyBothWriter) =
        c.copy_both(&format!("START_REPLICATION PHYSICAL {from} TERM {term}")).await?;
    let mut pos = from;
    while pos < to {
        let Some(data) = reader.next().await? else { bail!("stream ended at {pos}, wanted up to {to}") };
        if let ReplicationMessage::XLogData { wal_start, data, .. } = ReplicationMessage::decode(&data)? {
            if wal_start != pos {
                bail!("got WAL at {wal_start}, expected {pos}");
            }
            let take = data.len().min((to - pos) as usize);
            events.send(DriverEvent::Wal { start: pos, data: data.slice(..take) }).await?;
            pos += take as u64;
        }
    }
    Ok(())
}
