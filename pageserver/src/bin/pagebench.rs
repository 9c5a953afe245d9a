//! `pagebench`: a GetPage@LSN load generator for the page service.
//!
//! Each client opens its own `pagestream <tenant> <timeline>` connection (COPY BOTH) and sends
//! GetPage requests for random blocks of the given relations (uniform over all their blocks),
//! keeping `--pipeline-depth` requests in flight, for `--duration-s` seconds. `--scan` instead
//! reads every block once, split between the clients (a warm-up pass). The summary is one JSON
//! object on stdout: requests, pages/s, latency percentiles (µs, from sending a request to
//! receiving its answer), errors. Any error answer makes the tool exit non-zero.
//!
//! ```text
//! pagebench --page-service 127.0.0.1:64000 --http 127.0.0.1:9898 \
//!     --tenant-id <t> --timeline-id <tl> --relations 1663/5/16397,1663/5/16405 \
//!     --clients 4 --duration-s 10
//! ```

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use clap::Parser;
use pageserver_api::pagestream::{PagestreamRequest, PagestreamResponse, RelTagWire, BLCKSZ};
use postgres_client::{Client, ConnectConfig, CopyBothReader, CopyBothWriter};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use utils::{Lsn, TenantId, TimelineId};

#[derive(Parser, Debug, Clone)]
#[command(about = "GetPage@LSN load generator for the pageserver's page service")]
struct Args {
    /// The page service (libpq) address, host:port.
    #[arg(long)]
    page_service: String,
    /// The pageserver's HTTP API, host:port: asked for `last_record_lsn` when `--lsn` is not given.
    #[arg(long)]
    http: Option<String>,
    #[arg(long)]
    tenant_id: TenantId,
    #[arg(long)]
    timeline_id: TimelineId,
    /// LSN to read at (X/Y); default: the timeline's `last_record_lsn` from `--http`.
    #[arg(long)]
    lsn: Option<Lsn>,
    /// Relations to read, `spcnode/dbnode/relnode[/forknum]`, comma separated. Relations with no
    /// blocks are skipped; a relation that does not exist is an error.
    #[arg(long, value_delimiter = ',', required = true)]
    relations: Vec<String>,
    /// Concurrent clients, one connection each.
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// How long to send random requests.
    #[arg(long, default_value_t = 10.0)]
    duration_s: f64,
    /// Requests in flight per connection (1: pure request/response latency).
    #[arg(long, default_value_t = 1)]
    pipeline_depth: usize,
    /// Read every block of the relations once (split between the clients) instead of random
    /// blocks for `--duration-s`: a warm-up pass.
    #[arg(long)]
    scan: bool,
    /// Seed of the clients' random block choices (client i uses seed + i).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// User name sent at connection startup.
    #[arg(long, default_value = "pagebench")]
    user: String,
    /// PEM CA certificate of the page service: connect over TLS only, verify-full.
    #[arg(long)]
    ssl_ca_file: Option<std::path::PathBuf>,
    /// Token for a page service that checks them (`pg_auth_type = 'NeonJWT'`).
    #[arg(long, env = "NEON_AUTH_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

/// A relation to read and its size at the LSN.
#[derive(Clone, Debug)]
struct Rel {
    tag: RelTagWire,
    nblocks: u32,
}

/// The blocks a client reads: random ones (uniform over all blocks) until a deadline, or a
/// fixed range of the concatenated relations, in order.
#[derive(Clone)]
enum Work {
    Random { duration: Duration },
    Scan { from: u64, to: u64 },
}

#[derive(Default)]
struct ClientResult {
    latencies_us: Vec<u32>,
    errors: u64,
    zero_pages: u64,
    first_error: Option<String>,
}

fn parse_rel(s: &str) -> anyhow::Result<RelTagWire> {
    let parts: Vec<&str> = s.trim().split('/').collect();
    if !(3..=4).contains(&parts.len()) {
        bail!("relation '{s}': expected spcnode/dbnode/relnode[/forknum]");
    }
    let n = |i: usize| parts[i].parse::<u32>().with_context(|| format!("relation '{s}': '{}'", parts[i]));
    let forknum = if parts.len() == 4 { n(3)? } else { 0 };
    if forknum > 3 {
        bail!("relation '{s}': fork number {forknum} (valid: 0..=3)");
    }
    Ok(RelTagWire { spcnode: n(0)?, dbnode: n(1)?, relnode: n(2)?, forknum: forknum as u8 })
}

/// `GET path` over plain HTTP/1.1; the body of a 2xx answer.
async fn http_get(addr: &str, path: &str) -> anyhow::Result<String> {
    let addr = addr.trim_start_matches("http://").trim_end_matches('/');
    let mut sock = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
        .await
        .with_context(|| format!("connecting to {addr} timed out"))?
        .with_context(|| format!("connecting to {addr}"))?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: application/json\r\n\r\n");
    sock.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), sock.read_to_end(&mut raw))
        .await
        .with_context(|| format!("GET {path} from {addr} timed out"))??;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| anyhow!("malformed HTTP answer from {addr}"))?;
    let status: u16 = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked { dechunk(body)? } else { body.to_string() };
    if !(200..300).contains(&status) {
        bail!("GET {path} from {addr}: HTTP {status}: {body}");
    }
    Ok(body)
}

fn dechunk(mut s: &str) -> anyhow::Result<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = s.split_once("\r\n").ok_or_else(|| anyhow!("bad chunked HTTP body"))?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)?;
        if size == 0 {
            return Ok(out);
        }
        out.push_str(rest.get(..size).ok_or_else(|| anyhow!("truncated chunked HTTP body"))?);
        s = rest.get(size + 2..).ok_or_else(|| anyhow!("truncated chunked HTTP body"))?;
    }
}

async fn last_record_lsn(http: &str, tenant: TenantId, timeline: TimelineId) -> anyhow::Result<Lsn> {
    let body = http_get(http, &format!("/v1/tenant/{tenant}/timeline/{timeline}")).await?;
    let v: serde_json::Value = serde_json::from_str(&body).with_context(|| format!("timeline info: {body}"))?;
    let s = v["last_record_lsn"].as_str().ok_or_else(|| anyhow!("no last_record_lsn in {body}"))?;
    s.parse::<Lsn>().map_err(|e| anyhow!("last_record_lsn '{s}': {e}"))
}

async fn connect(args: &Args) -> anyhow::Result<(CopyBothReader, CopyBothWriter)> {
    let (host, port) =
        args.page_service.rsplit_once(':').ok_or_else(|| anyhow!("--page-service: expected host:port"))?;
    let mut cfg = ConnectConfig::new(host, port.parse::<u16>().context("--page-service port")?, args.user.clone());
    cfg.password = args.token.clone();
    if let Some(ca) = &args.ssl_ca_file {
        cfg.tls = Some(utils::tls::TlsConnector::from_ca_file(ca).context("--ssl-ca-file")?);
    }
    let client = Client::connect(&cfg).await?;
    Ok(client.copy_both(&format!("pagestream {} {}", args.tenant_id, args.timeline_id)).await?)
}

/// One request and its answer, on an idle stream.
async fn roundtrip(
    r: &mut CopyBothReader,
    w: &mut CopyBothWriter,
    req: PagestreamRequest,
) -> anyhow::Result<PagestreamResponse> {
    w.send(&req.encode()).await?;
    let data = r.next().await?.ok_or_else(|| anyhow!("the pageserver ended the stream"))?;
    Ok(PagestreamResponse::decode(&data)?)
}

/// The relations' sizes at `lsn`; empty ones are dropped.
async fn sizes(args: &Args, rels: &[RelTagWire], lsn: Lsn) -> anyhow::Result<Vec<Rel>> {
    let (mut r, mut w) = connect(args).await?;
    let mut out = Vec::new();
    for (i, rel) in rels.iter().enumerate() {
        let id = i as u64;
        match roundtrip(&mut r, &mut w, PagestreamRequest::Nblocks { request_id: id, lsn, rel: *rel }).await? {
            PagestreamResponse::Nblocks { n_blocks, .. } if n_blocks > 0 => {
                out.push(Rel { tag: *rel, nblocks: n_blocks })
            }
            PagestreamResponse::Nblocks { .. } => eprintln!("pagebench: skipping empty relation {rel:?}"),
            PagestreamResponse::Error { message, .. } => bail!("Nblocks of {rel:?} at {lsn}: {message}"),
            other => bail!("unexpected answer to Nblocks: {other:?}"),
        }
    }
    w.done().await?;
    while r.next().await?.is_some() {}
    Ok(out)
}

/// Block number `i` of the relations laid end to end.
fn locate(rels: &[Rel], mut i: u64) -> (RelTagWire, u32) {
    for r in rels {
        if i < r.nblocks as u64 {
            return (r.tag, i as u32);
        }
        i -= r.nblocks as u64;
    }
    unreachable!("block index beyond the relations' total size")
}

async fn run_client(
    args: Arc<Args>,
    rels: Arc<Vec<Rel>>,
    lsn: Lsn,
    work: Work,
    idx: usize,
    start: Arc<tokio::sync::Barrier>,
) -> anyhow::Result<ClientResult> {
    // Everyone meets at the barrier, also a client that could not connect.
    let conn = connect(&args).await;
    start.wait().await;
    let (mut reader, mut writer) = conn?;
    let deadline = Instant::now()
        + match work {
            Work::Random { duration } => duration,
            Work::Scan { .. } => Duration::ZERO,
        };
    let total: u64 = rels.iter().map(|r| r.nblocks as u64).sum();
    let mut rng = StdRng::seed_from_u64(args.seed.wrapping_add(idx as u64));
    let mut res = ClientResult::default();
    let mut next_scan = match work {
        Work::Scan { from, .. } => from,
        Work::Random { .. } => 0,
    };
    let mut in_flight: VecDeque<(u64, Instant)> = VecDeque::with_capacity(args.pipeline_depth);
    let mut next_id: u64 = 0;
    loop {
        // Fill the pipeline unless the run is over.
        while in_flight.len() < args.pipeline_depth {
            let block = match work {
                Work::Random { .. } => {
                    if Instant::now() >= deadline {
                        break;
                    }
                    rng.gen_range(0..total)
                }
                Work::Scan { to, .. } => {
                    if next_scan >= to {
                        break;
                    }
                    next_scan += 1;
                    next_scan - 1
                }
            };
            let (rel, blkno) = locate(&rels, block);
            let req = PagestreamRequest::GetPage { request_id: next_id, lsn, rel, blkno };
            let sent = Instant::now();
            writer.send(&req.encode()).await?;
            in_flight.push_back((next_id, sent));
            next_id += 1;
        }
        let Some((id, sent)) = in_flight.pop_front() else { break };
        let data: Bytes = reader.next().await?.ok_or_else(|| anyhow!("the pageserver ended the stream"))?;
        let elapsed = sent.elapsed();
        match PagestreamResponse::decode(&data)? {
            PagestreamResponse::Page { request_id, page } if request_id == id => {
                debug_assert_eq!(page.len(), BLCKSZ);
                if page.iter().all(|&b| b == 0) {
                    res.zero_pages += 1;
                }
                res.latencies_us.push(elapsed.as_micros().min(u32::MAX as u128) as u32);
            }
            PagestreamResponse::Error { request_id, message } if request_id == id => {
                res.errors += 1;
                res.first_error.get_or_insert(message);
            }
            other => bail!("answer out of order or of the wrong kind (expected request {id}): {other:?}"),
        }
    }
    writer.done().await?;
    while reader.next().await?.is_some() {}
    Ok(res)
}

fn percentile(sorted: &[u32], q: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

async fn run(args: Args) -> anyhow::Result<bool> {
    if args.clients == 0 || args.pipeline_depth == 0 {
        bail!("--clients and --pipeline-depth must be at least 1");
    }
    let rel_tags: Vec<RelTagWire> = args.relations.iter().map(|s| parse_rel(s)).collect::<Result<_, _>>()?;
    let lsn = match (args.lsn, &args.http) {
        (Some(l), _) => l,
        (None, Some(http)) => last_record_lsn(http, args.tenant_id, args.timeline_id).await?,
        (None, None) => bail!("give --lsn or --http (to read the timeline's last_record_lsn)"),
    };
    let rels = sizes(&args, &rel_tags, lsn).await?;
    let total: u64 = rels.iter().map(|r| r.nblocks as u64).sum();
    if total == 0 {
        bail!("the relations have no blocks at {lsn}");
    }
    let args = Arc::new(args);
    let rels = Arc::new(rels);
    let start = Arc::new(tokio::sync::Barrier::new(args.clients + 1));
    let duration = Duration::from_secs_f64(args.duration_s.max(0.0));
    let mut tasks = Vec::new();
    for i in 0..args.clients {
        let work = if args.scan {
            Work::Scan {
                from: total * i as u64 / args.clients as u64,
                to: total * (i as u64 + 1) / args.clients as u64,
            }
        } else {
            Work::Random { duration }
        };
        tasks.push(tokio::spawn(run_client(args.clone(), rels.clone(), lsn, work, i, start.clone())));
    }
    // The clock starts when every client is connected.
    start.wait().await;
    let t0 = Instant::now();
    let mut results = Vec::new();
    let mut failures = Vec::new();
    for t in tasks {
        match t.await {
            Ok(Ok(r)) => results.push(r),
            Ok(Err(e)) => failures.push(format!("{e:#}")),
            Err(e) => failures.push(format!("client task: {e}")),
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();

    let mut lat: Vec<u32> = Vec::with_capacity(results.iter().map(|r| r.latencies_us.len()).sum());
    let (mut errors, mut zero_pages, mut first_error) = (failures.len() as u64, 0u64, failures.first().cloned());
    for r in results {
        lat.extend_from_slice(&r.latencies_us);
        errors += r.errors;
        zero_pages += r.zero_pages;
        if first_error.is_none() {
            first_error = r.first_error;
        }
    }
    lat.sort_unstable();
    let n = lat.len() as u64;
    let mean = if n > 0 { lat.iter().map(|&v| v as f64).sum::<f64>() / n as f64 } else { 0.0 };
    let summary = serde_json::json!({
        "mode": if args.scan { "scan" } else { "random" },
        "lsn": lsn.to_string(),
        "relations": rels.len(),
        "total_blocks": total,
        "clients": args.clients,
        "pipeline_depth": args.pipeline_depth,
        "elapsed_s": elapsed,
        "requests": n + errors,
        "pages": n,
        "zero_pages": zero_pages,
        "errors": errors,
        "first_error": first_error,
        "pages_per_s": if elapsed > 0.0 { n as f64 / elapsed } else { 0.0 },
        "mb_per_s": if elapsed > 0.0 { (n as f64 * BLCKSZ as f64) / 1e6 / elapsed } else { 0.0 },
        "latency_us": {
            "min": lat.first().copied().unwrap_or(0),
            "mean": mean,
            "p50": percentile(&lat, 0.50),
            "p90": percentile(&lat, 0.90),
            "p99": percentile(&lat, 0.99),
            "p99_9": percentile(&lat, 0.999),
            "max": lat.last().copied().unwrap_or(0),
        },
    });
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(errors == 0)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let ok = rt.block_on(run(args))?;
    if !ok {
        eprintln!("pagebench: some requests failed (see \"errors\" and \"first_error\")");
        std::process::exit(1);
    }
    Ok(())
}
