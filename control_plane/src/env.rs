//! The local environment: its config file, daemons and endpoints.

use std::collections::BTreeMap;
use std::fs;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use utils::{Lsn, TenantId, TimelineId};

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum StopMode {
    Fast,
    Immediate,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PageserverConf {
    pub pg_port: u16,
    pub http_port: u16,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SafekeeperConf {
    pub id: u32,
    pub pg_port: u16,
    pub http_port: u16,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EndpointConf {
    pub tenant_id: TenantId,
    pub timeline_id: TimelineId,
    pub branch: String,
    pub pg_port: u16,
    pub http_port: u16,
}

impl EndpointConf {
    pub fn connstr(&self) -> String {
        format!("postgresql://cloud_admin@127.0.0.1:{}/postgres", self.pg_port)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Config {
    pub pg_install: PathBuf,
    /// Added to every default port (`NEON_LOCAL_PORT_OFFSET` at init), to run beside another stack.
    #[serde(default)]
    pub port_offset: u16,
    /// First port tried for endpoints (`NEON_LOCAL_ENDPOINT_PORT_BASE` at init; default 55432
    /// plus the offset); their HTTP ports start at 3080 plus the offset.
    #[serde(default)]
    pub endpoint_port_base: Option<u16>,
    pub bin_dir: PathBuf,
    pub pageserver: PageserverConf,
    pub safekeepers: Vec<SafekeeperConf>,
    pub default_tenant: Option<TenantId>,
    /// tenant → branch name → timeline
    pub branches: BTreeMap<String, BTreeMap<String, TimelineId>>,
    pub endpoints: BTreeMap<String, EndpointConf>,
}

pub struct Env {
    pub dir: PathBuf,
    pub conf: Config,
}

/// A process neon_local starts and stops.
pub struct Daemon {
    pub name: String,
    pub dir: PathBuf,
    pub argv: Vec<String>,
    pub health_url: String,
    pub ports: Vec<u16>,
}

fn repo_dir() -> PathBuf {
    std::env::var_os("NEON_REPO_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(".neon"))
}

fn port_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

fn http_get(url: &str) -> anyhow::Result<serde_json::Value> {
    let r = ureq::get(url).timeout(Duration::from_secs(10)).call();
    match r {
        Ok(resp) => Ok(resp.into_json()?),
        Err(ureq::Error::Status(code, resp)) => bail!("{url}: {code}: {}", resp.into_string().unwrap_or_default()),
        Err(e) => bail!("{url}: {e}"),
    }
}

fn http_post(url: &str, body: serde_json::Value) -> anyhow::Result<serde_json::Value> {
    match ureq::post(url).timeout(Duration::from_secs(180)).send_json(body) {
        Ok(resp) => Ok(resp.into_json()?),
        Err(ureq::Error::Status(code, resp)) => {
            let text = resp.into_string().unwrap_or_default();
            let msg = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v.get("msg").and_then(|m| m.as_str()).map(str::to_string))
                .unwrap_or(text);
            bail!("{msg} (HTTP {code})")
        }
        Err(e) => bail!("{url}: {e}; is the daemon running? see 'neon_local status'"),
    }
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && fs::read_to_string(format!("/proc/{pid}/stat")).map(|s| !s.contains(") Z ")).unwrap_or(false)
}

impl Env {
    fn config_path(dir: &Path) -> PathBuf {
        dir.join("config.json")
    }

    pub fn init(num_safekeepers: u32, force: bool) -> anyhow::Result<Env> {
        let dir = repo_dir();
        if dir.exists() {
            if !force {
                bail!(
                    "{} already exists; use 'neon_local init --force' to replace it (its data is lost)",
                    dir.display()
                );
            }
            if let Ok(env) = Env::load() {
                let _ = env.stop_all(StopMode::Immediate);
            }
            fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        if num_safekeepers == 0 {
            bail!("--num-safekeepers must be at least 1");
        }
        let pg_install =
            std::env::var_os("PG_INSTALL_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("pg_install"));
        let pg_install = fs::canonicalize(&pg_install).with_context(|| {
            format!("Postgres build not found at {}: run postgres/build.sh or set PG_INSTALL_DIR", pg_install.display())
        })?;
        let bin_dir = std::env::current_exe()?.parent().context("binary directory")?.to_path_buf();
        for b in ["pageserver", "safekeeper", "compute_ctl"] {
            if !bin_dir.join(b).exists() {
                bail!(
                    "{b} not found next to neon_local in {}: run 'cargo build --workspace --bins'",
                    bin_dir.display()
                );
            }
        }
        let off: u16 = match std::env::var("NEON_LOCAL_PORT_OFFSET") {
            Ok(v) => v
                .parse()
                .ok()
                .filter(|&o: &u16| o <= 1500)
                .context("NEON_LOCAL_PORT_OFFSET must be a number 0..=1500")?,
            Err(_) => 0,
        };
        fs::create_dir_all(&dir)?;
        let conf = Config {
            pg_install,
            port_offset: off,
            endpoint_port_base: match std::env::var("NEON_LOCAL_ENDPOINT_PORT_BASE") {
                Ok(v) => Some(v.parse().context("NEON_LOCAL_ENDPOINT_PORT_BASE must be a port number")?),
                Err(_) => None,
            },
            bin_dir,
            pageserver: PageserverConf { pg_port: 64000 + off, http_port: 9898 + off },
            safekeepers: (1..=num_safekeepers)
                .map(|id| SafekeeperConf {
                    id,
                    pg_port: 5454 + off + id as u16 - 1,
                    http_port: 7676 + off + id as u16 - 1,
                })
                .collect(),
            default_tenant: None,
            branches: BTreeMap::new(),
            endpoints: BTreeMap::new(),
        };
        let env = Env { dir, conf };
        fs::create_dir_all(env.dir.join("pageserver"))?;
        let sks: Vec<String> = env.conf.safekeepers.iter().map(|s| format!("'127.0.0.1:{}'", s.pg_port)).collect();
        fs::write(
            env.dir.join("pageserver/pageserver.toml"),
            format!(
                "id = 1\nlisten_pg_addr = '127.0.0.1:{}'\nlisten_http_addr = '127.0.0.1:{}'\npg_distrib_dir = '{}'\nsafekeepers = [{}]\n",
                env.conf.pageserver.pg_port,
                env.conf.pageserver.http_port,
                env.conf.pg_install.display(),
                sks.join(", ")
            ),
        )?;
        fs::create_dir_all(env.dir.join("remote_storage"))?;
        env.save()?;
        Ok(env)
    }

    pub fn load() -> anyhow::Result<Env> {
        let dir = repo_dir();
        let path = Self::config_path(&dir);
        let text = fs::read_to_string(&path)
            .with_context(|| format!("no environment at {}: run 'neon_local init' first", dir.display()))?;
        let conf = serde_json::from_str(&text).with_context(|| format!("bad {}", path.display()))?;
        Ok(Env { dir, conf })
    }

    fn save(&self) -> anyhow::Result<()> {
        let path = Self::config_path(&self.dir);
        let tmp = path.with_extension("json.tmp");
        fs::write(&tmp, serde_json::to_string_pretty(&self.conf)?)?;
        fs::rename(&tmp, &path)?;
        Ok(())
    }

    fn bin(&self, name: &str) -> String {
        self.conf.bin_dir.join(name).display().to_string()
    }

    fn ps_http(&self) -> String {
        format!("http://127.0.0.1:{}", self.conf.pageserver.http_port)
    }

    pub fn pageserver_daemon(&self) -> Daemon {
        let dir = self.dir.join("pageserver");
        Daemon {
            name: "pageserver".into(),
            argv: vec![self.bin("pageserver"), "--workdir".into(), dir.display().to_string()],
            dir,
            health_url: format!("{}/v1/status", self.ps_http()),
            ports: vec![self.conf.pageserver.pg_port, self.conf.pageserver.http_port],
        }
    }

    pub fn safekeeper_daemon(&self, id: u32) -> anyhow::Result<Daemon> {
        let sk = self.conf.safekeepers.iter().find(|s| s.id == id).with_context(|| {
            format!("safekeeper {id} does not exist; this environment has {}", self.conf.safekeepers.len())
        })?;
        let dir = self.dir.join(format!("safekeepers/sk{id}"));
        let peers: Vec<String> =
            self.conf.safekeepers.iter().filter(|s| s.id != id).map(|s| format!("127.0.0.1:{}", s.pg_port)).collect();
        let mut argv = vec![
            self.bin("safekeeper"),
            "--id".into(),
            id.to_string(),
            "--datadir".into(),
            dir.join("data").display().to_string(),
            "--listen-pg".into(),
            format!("127.0.0.1:{}", sk.pg_port),
            "--listen-http".into(),
            format!("127.0.0.1:{}", sk.http_port),
        ];
        if !peers.is_empty() {
            argv.push("--peers".into());
            argv.push(peers.join(","));
        }
        Ok(Daemon {
            name: format!("safekeeper {id}"),
            dir,
            argv,
            health_url: format!("http://127.0.0.1:{}/v1/status", sk.http_port),
            ports: vec![sk.pg_port, sk.http_port],
        })
    }

    fn read_pid(d: &Daemon) -> Option<u32> {
        fs::read_to_string(d.dir.join("pid")).ok()?.trim().parse().ok().filter(|&p| pid_alive(p))
    }

    pub fn daemon_status(&self, d: &Daemon) -> String {
        match Self::read_pid(d) {
            Some(pid) => {
                let healthy = ureq::get(&d.health_url).timeout(Duration::from_secs(2)).call().is_ok();
                format!(
                    "{}: running (pid {pid}, ports {:?}, {})",
                    d.name,
                    d.ports,
                    if healthy { "healthy" } else { "NOT answering" }
                )
            }
            None => format!("{}: stopped (ports {:?})", d.name, d.ports),
        }
    }

    pub fn start_daemon(&self, d: &Daemon) -> anyhow::Result<()> {
        if let Some(pid) = Self::read_pid(d) {
            println!("{} already running (pid {pid})", d.name);
            return Ok(());
        }
        for &p in &d.ports {
            if !port_free(p) {
                bail!(
                    "port {p} for {} is in use by another process; stop it or change the port in {}",
                    d.name,
                    Self::config_path(&self.dir).display()
                );
            }
        }
        fs::create_dir_all(&d.dir)?;
        let log_path = d.dir.join("log");
        let log = fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
        let mut cmd = Command::new(&d.argv[0]);
        cmd.args(&d.argv[1..]).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log).process_group(0);
        let child = cmd.spawn().with_context(|| format!("starting {}", d.name))?;
        fs::write(d.dir.join("pid"), child.id().to_string())?;
        print!("starting {} (pid {}, waiting for {})...", d.name, child.id(), d.health_url);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if ureq::get(&d.health_url).timeout(Duration::from_secs(1)).call().is_ok() {
                println!(" ok");
                return Ok(());
            }
            if !pid_alive(child.id()) || Instant::now() > deadline {
                println!(" failed");
                let log = fs::read_to_string(&log_path).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(10).collect::<Vec<_>>().into_iter().rev().collect();
                bail!("{} did not become healthy; last lines of {}:\n{}", d.name, log_path.display(), tail.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn stop_daemon(&self, d: &Daemon, mode: StopMode) -> anyhow::Result<()> {
        let Some(pid) = Self::read_pid(d) else {
            println!("{} is not running", d.name);
            return Ok(());
        };
        // Daemons run in their own process group: an immediate stop kills the group, so a
        // compute's Postgres goes with its compute_ctl.
        let group = format!("-{pid}");
        match mode {
            StopMode::Fast => {
                let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
            }
            StopMode::Immediate => {
                let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
            }
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while pid_alive(pid) {
            if Instant::now() > deadline {
                let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Whatever is left of the group (a compute's Postgres while it shuts down) must not
        // keep the ports.
        let deadline = Instant::now() + Duration::from_secs(30);
        while d.ports.iter().any(|&p| !port_free(p)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = fs::remove_file(d.dir.join("pid"));
        println!("stopped {}", d.name);
        Ok(())
    }

    pub fn start_all(&self) -> anyhow::Result<()> {
        for sk in &self.conf.safekeepers {
            self.start_daemon(&self.safekeeper_daemon(sk.id)?)?;
        }
        self.start_daemon(&self.pageserver_daemon())
    }

    pub fn stop_all(&self, mode: StopMode) -> anyhow::Result<()> {
        for name in self.conf.endpoints.keys() {
            self.stop_daemon(&self.endpoint_daemon(name)?, mode)?;
        }
        self.stop_daemon(&self.pageserver_daemon(), mode)?;
        for sk in &self.conf.safekeepers {
            self.stop_daemon(&self.safekeeper_daemon(sk.id)?, mode)?;
        }
        Ok(())
    }

    pub fn print_status(&self) -> anyhow::Result<()> {
        println!("{}", self.daemon_status(&self.pageserver_daemon()));
        for sk in &self.conf.safekeepers {
            println!("{}", self.daemon_status(&self.safekeeper_daemon(sk.id)?));
        }
        for (name, ep) in &self.conf.endpoints {
            println!("{} ({})", self.daemon_status(&self.endpoint_daemon(name)?), ep.connstr());
        }
        Ok(())
    }

    fn tenant(&self, t: Option<TenantId>) -> anyhow::Result<TenantId> {
        t.or(self.conf.default_tenant).context(
            "no tenant given and no default tenant; run 'neon_local tenant create --set-default' or pass --tenant-id",
        )
    }

    fn timeline_of(&self, tenant: TenantId, branch: &str) -> anyhow::Result<TimelineId> {
        self.conf
            .branches
            .get(&tenant.to_string())
            .and_then(|b| b.get(branch))
            .copied()
            .with_context(|| format!("branch '{branch}' does not exist; see 'neon_local timeline list'"))
    }

    fn create_sk_timelines(&self, tenant: TenantId, timeline: TimelineId, start_lsn: Lsn) -> anyhow::Result<()> {
        for sk in &self.conf.safekeepers {
            http_post(
                &format!("http://127.0.0.1:{}/v1/tenant/{tenant}/timeline", sk.http_port),
                serde_json::json!({ "timeline_id": timeline, "start_lsn": start_lsn, "pg_version": 150018 }),
            )
            .with_context(|| format!("creating timeline {timeline} on safekeeper {}", sk.id))?;
        }
        Ok(())
    }

    pub fn create_tenant(
        &mut self,
        t: Option<TenantId>,
        tl: Option<TimelineId>,
        set_default: bool,
    ) -> anyhow::Result<(TenantId, TimelineId)> {
        let t = t.unwrap_or_else(TenantId::generate);
        let tl = tl.unwrap_or_else(TimelineId::generate);
        http_post(&format!("{}/v1/tenant", self.ps_http()), serde_json::json!({ "tenant_id": t }))?;
        let info = http_post(
            &format!("{}/v1/tenant/{t}/timeline", self.ps_http()),
            serde_json::json!({ "new_timeline_id": tl }),
        )?;
        let lsn: Lsn = info["last_record_lsn"].as_str().context("no last_record_lsn")?.parse()?;
        self.create_sk_timelines(t, tl, lsn)?;
        self.conf.branches.entry(t.to_string()).or_default().insert("main".into(), tl);
        if set_default || self.conf.default_tenant.is_none() {
            self.conf.default_tenant = Some(t);
        }
        self.save()?;
        Ok((t, tl))
    }

    pub fn list_tenants(&self) -> anyhow::Result<()> {
        let v = http_get(&format!("{}/v1/tenant", self.ps_http()))?;
        for t in v.as_array().into_iter().flatten() {
            let id = t["id"].as_str().unwrap_or("?");
            let default = self.conf.default_tenant.map(|d| d.to_string()) == Some(id.to_string());
            println!("{id} ({} timelines){}", t["timelines"], if default { " default" } else { "" });
        }
        Ok(())
    }

    pub fn branch(
        &mut self,
        tenant: Option<TenantId>,
        name: &str,
        ancestor: &str,
        lsn: Option<Lsn>,
    ) -> anyhow::Result<(TimelineId, Lsn)> {
        let t = self.tenant(tenant)?;
        if self.conf.branches.get(&t.to_string()).is_some_and(|b| b.contains_key(name)) {
            bail!("branch '{name}' already exists; see 'neon_local timeline list'");
        }
        let parent = self.timeline_of(t, ancestor)?;
        let tl = TimelineId::generate();
        // Without an LSN, branch at what the safekeepers have committed: everything a client
        // saw acknowledged (the pageserver waits until it has ingested that far).
        let lsn = match lsn {
            Some(l) => Some(l),
            None => self.committed_lsn(t, parent),
        };
        let mut body = serde_json::json!({ "new_timeline_id": tl, "ancestor_timeline_id": parent });
        if let Some(l) = lsn {
            body["ancestor_start_lsn"] = serde_json::json!(l);
        }
        let info = http_post(&format!("{}/v1/tenant/{t}/timeline", self.ps_http()), body)?;
        let start: Lsn = info["last_record_lsn"].as_str().context("no last_record_lsn")?.parse()?;
        self.create_sk_timelines(t, tl, start)?;
        self.conf.branches.entry(t.to_string()).or_default().insert(name.into(), tl);
        self.save()?;
        Ok((tl, start))
    }

    /// The highest commit LSN the safekeepers report for a timeline, if any answers.
    fn committed_lsn(&self, tenant: TenantId, timeline: TimelineId) -> Option<Lsn> {
        self.conf
            .safekeepers
            .iter()
            .filter_map(|sk| {
                http_get(&format!("http://127.0.0.1:{}/v1/tenant/{tenant}/timeline/{timeline}", sk.http_port)).ok()
            })
            .filter_map(|v| v["commit_lsn"].as_str().and_then(|s| s.parse().ok()))
            .max()
    }

    pub fn list_timelines(&self, tenant: Option<TenantId>) -> anyhow::Result<()> {
        let t = self.tenant(tenant)?;
        let infos = http_get(&format!("{}/v1/tenant/{t}/timeline", self.ps_http()))?;
        let names: BTreeMap<String, String> = self
            .conf
            .branches
            .get(&t.to_string())
            .map(|b| b.iter().map(|(n, tl)| (tl.to_string(), n.clone())).collect())
            .unwrap_or_default();
        for i in infos.as_array().into_iter().flatten() {
            let id = i["timeline_id"].as_str().unwrap_or("?");
            let name = names.get(id).cloned().unwrap_or_else(|| "(unnamed)".into());
            let parent = i["ancestor_timeline_id"].as_str().map(|p| {
                format!(
                    " <- {} at {}",
                    names.get(p).cloned().unwrap_or(p.to_string()),
                    i["ancestor_lsn"].as_str().unwrap_or("?")
                )
            });
            println!("{name} [{id}] at {}{}", i["last_record_lsn"].as_str().unwrap_or("?"), parent.unwrap_or_default());
        }
        Ok(())
    }

    fn endpoint_dir(&self, name: &str) -> PathBuf {
        self.dir.join("endpoints").join(name)
    }

    pub fn endpoint_daemon(&self, name: &str) -> anyhow::Result<Daemon> {
        let ep = self
            .conf
            .endpoints
            .get(name)
            .with_context(|| format!("endpoint '{name}' does not exist; see 'neon_local endpoint list'"))?;
        let dir = self.endpoint_dir(name);
        Ok(Daemon {
            name: format!("endpoint {name}"),
            argv: vec![
                self.bin("compute_ctl"),
                "run".into(),
                "--spec".into(),
                dir.join("spec.json").display().to_string(),
                "--pgdata".into(),
                dir.join("pgdata").display().to_string(),
                "--pg-install".into(),
                self.conf.pg_install.display().to_string(),
                "--http-addr".into(),
                format!("127.0.0.1:{}", ep.http_port),
            ],
            health_url: format!("http://127.0.0.1:{}/status", ep.http_port),
            ports: vec![ep.pg_port, ep.http_port],
            dir,
        })
    }

    pub fn create_endpoint(
        &mut self,
        name: &str,
        tenant: Option<TenantId>,
        branch: &str,
        pg_port: Option<u16>,
        http_port: Option<u16>,
    ) -> anyhow::Result<EndpointConf> {
        if self.conf.endpoints.contains_key(name) {
            bail!("endpoint '{name}' already exists; see 'neon_local endpoint list'");
        }
        if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') || name.is_empty() {
            bail!("endpoint name '{name}' may only hold letters, digits, '-' and '_'");
        }
        let t = self.tenant(tenant)?;
        let tl = self.timeline_of(t, branch)?;
        if let Some((other, _)) = self.conf.endpoints.iter().find(|(_, e)| e.timeline_id == tl) {
            bail!("branch '{branch}' already has endpoint '{other}': a branch has one primary; create a branch for another one");
        }
        let used: Vec<u16> = self.conf.endpoints.values().flat_map(|e| [e.pg_port, e.http_port]).collect();
        // The first port not taken by another endpoint and free right now.
        let pick = |given: Option<u16>, base: u16, other: Option<u16>| -> u16 {
            given.unwrap_or_else(|| {
                (base..base.saturating_add(1000))
                    .find(|p| !used.contains(p) && Some(*p) != other && port_free(*p))
                    .unwrap_or(base)
            })
        };
        let ep = EndpointConf {
            tenant_id: t,
            timeline_id: tl,
            branch: branch.into(),
            pg_port: pick(pg_port, self.conf.endpoint_port_base.unwrap_or(55432 + self.conf.port_offset), None),
            http_port: pick(
                http_port,
                self.conf.endpoint_port_base.map_or(3080 + self.conf.port_offset, |b| b.saturating_add(500)),
                pg_port,
            ),
        };
        let spec = serde_json::json!({
            "tenant_id": t,
            "timeline_id": tl,
            "pageserver": format!("127.0.0.1:{}", self.conf.pageserver.pg_port),
            "safekeepers": self.conf.safekeepers.iter().map(|s| format!("127.0.0.1:{}", s.pg_port)).collect::<Vec<_>>(),
            "mode": "primary",
            "pg_port": ep.pg_port,
        });
        let dir = self.endpoint_dir(name);
        fs::create_dir_all(&dir)?;
        fs::write(dir.join("spec.json"), serde_json::to_string_pretty(&spec)?)?;
        self.conf.endpoints.insert(name.into(), ep.clone());
        self.save()?;
        Ok(ep)
    }

    pub fn start_endpoint(&self, name: &str) -> anyhow::Result<String> {
        let d = self.endpoint_daemon(name)?;
        self.start_daemon(&d)?;
        // compute_ctl answers /status at once; wait until Postgres runs.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let st = http_get(&d.health_url).ok();
            match st.as_ref().and_then(|s| s["status"].as_str()) {
                Some("running") => break,
                Some("failed") => bail!(
                    "endpoint '{name}' failed to start: {}; see {}",
                    st.as_ref().and_then(|s| s["error"].as_str()).unwrap_or("?"),
                    d.dir.join("log").display()
                ),
                _ => {}
            }
            if Self::read_pid(&d).is_none() || Instant::now() > deadline {
                bail!("endpoint '{name}' did not start; see {}", d.dir.join("log").display());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(self.conf.endpoints[name].connstr())
    }

    pub fn stop_endpoint(&mut self, name: &str, mode: StopMode, destroy: bool) -> anyhow::Result<()> {
        let d = self.endpoint_daemon(name)?;
        self.stop_daemon(&d, mode)?;
        if destroy {
            fs::remove_dir_all(&d.dir).ok();
            self.conf.endpoints.remove(name);
            self.save()?;
            println!("endpoint '{name}' destroyed");
        }
        Ok(())
    }

    pub fn list_endpoints(&self) -> anyhow::Result<()> {
        for (name, ep) in &self.conf.endpoints {
            let running = Self::read_pid(&self.endpoint_daemon(name)?).is_some();
            println!("{name}\tbranch {}\t{}\t{}", ep.branch, if running { "running" } else { "stopped" }, ep.connstr());
        }
        Ok(())
    }
}
