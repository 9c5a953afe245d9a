//! Postgres refuses to run as root. When we are root, every Postgres process (initdb, redo,
//! compute) runs as an unprivileged OS user: `$PG_OS_USER`, default `postgres`.

use std::io;
use std::path::Path;
use std::process::Command;

/// The user Postgres processes run as, when we are root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgOsUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

fn id_of(flag: &str, name: &str) -> io::Result<u32> {
    let out = Command::new("id").args([flag, name]).output()?;
    if !out.status.success() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("OS user '{name}' not found: create it (scripts/install-deps.sh does) or set PG_OS_USER"),
        ));
    }
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("id {flag} {name}: {e}")))
}

impl PgOsUser {
    /// `Some(user)` when we run as root, `None` otherwise (Postgres then runs as us).
    pub fn resolve() -> io::Result<Option<PgOsUser>> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc_geteuid() } != 0 {
            return Ok(None);
        }
        let name = std::env::var("PG_OS_USER").unwrap_or_else(|_| "postgres".to_string());
        Ok(Some(PgOsUser { uid: id_of("-u", &name)?, gid: id_of("-g", &name)?, name }))
    }

    /// Hands `path` and everything below it to this user.
    pub fn chown_recursive(&self, path: &Path) -> io::Result<()> {
        std::os::unix::fs::lchown(path, Some(self.uid), Some(self.gid))?;
        if path.is_dir() && !path.is_symlink() {
            for e in std::fs::read_dir(path)? {
                self.chown_recursive(&e?.path())?;
            }
        }
        Ok(())
    }
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// A command that runs `program` as `user` (via setpriv, which execs: the pid is the program's),
/// or directly when `user` is `None`.
pub fn command_as(user: Option<&PgOsUser>, program: &Path) -> Command {
    match user {
        Some(u) => {
            let mut c = Command::new("setpriv");
            c.arg(format!("--reuid={}", u.uid))
                .arg(format!("--regid={}", u.gid))
                .arg("--init-groups")
                .arg("--")
                .arg(program);
            c
        }
        None => Command::new(program),
    }
}
