//! `neon_auth`: Ed25519 keys and JWTs for the local stack and tests.
//!
//! - `neon_auth keygen <dir>`: writes `<dir>/private.pem` (0600) and `<dir>/public.pem`;
//! - `neon_auth token --private-key <file> --scope <scope> [--tenant-id <id>] [--exp-secs <n>]`:
//!   prints a token; `--exp-secs` may be negative (an expired token, for tests); default 1 year.

use std::path::PathBuf;

use anyhow::{bail, Context};
use utils::auth::{encode, now_unix_secs, write_keypair, Claims, Scope};

const USAGE: &str = "usage: neon_auth keygen <dir>\n       neon_auth token --private-key <file> --scope <tenant|pageserverapi|safekeeperdata|admin> [--tenant-id <id>] [--exp-secs <n>]";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("keygen") if args.len() == 2 => {
            let dir = PathBuf::from(&args[1]);
            write_keypair(&dir)?;
            println!("{}", dir.join("public.pem").display());
            Ok(())
        }
        Some("token") => {
            let (mut key, mut scope, mut tenant, mut exp_secs) = (None, None, None, 365 * 24 * 3600i64);
            let mut it = args[1..].iter();
            while let Some(flag) = it.next() {
                let value = it.next().with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
                match flag.as_str() {
                    "--private-key" => key = Some(PathBuf::from(value)),
                    "--scope" => scope = Some(value.parse::<Scope>().map_err(anyhow::Error::msg)?),
                    "--tenant-id" => tenant = Some(value.parse().map_err(|e| anyhow::anyhow!("--tenant-id: {e}"))?),
                    "--exp-secs" => exp_secs = value.parse().context("--exp-secs: not an integer")?,
                    other => bail!("unknown flag {other}\n{USAGE}"),
                }
            }
            let (Some(key), Some(scope)) = (key, scope) else {
                bail!("--private-key and --scope are required\n{USAGE}")
            };
            let pem = std::fs::read(&key).with_context(|| format!("reading {}", key.display()))?;
            let exp = (now_unix_secs() as i64 + exp_secs).max(1) as u64;
            println!("{}", encode(&pem, &Claims { scope, tenant_id: tenant, exp })?);
            Ok(())
        }
        _ => bail!("{USAGE}"),
    }
}
