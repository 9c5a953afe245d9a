//! Writing small files so that a crash leaves the old content or the new one, never a torn or
//! missing file: write a temp file, fsync it, rename it over the target, fsync the directory
//! (without the last step the rename itself may be lost).

use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Which step failed, on which file.
#[derive(Debug, thiserror::Error)]
#[error("{step} {}: {source}", path.display())]
pub struct DurableWriteError {
    pub step: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// Makes the directory's entries (a rename, a new or removed file) durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Replaces `path` with `bytes` through `temp` (in the same directory, so the rename is atomic).
pub fn replace_file(path: &Path, temp: &Path, bytes: &[u8]) -> Result<(), DurableWriteError> {
    fn err(step: &'static str, p: &Path) -> impl FnOnce(io::Error) -> DurableWriteError {
        let path = p.to_path_buf();
        move |source| DurableWriteError { step, path, source }
    }
    let mut f = std::fs::File::create(temp).map_err(err("creating", temp))?;
    f.write_all(bytes).map_err(err("writing", temp))?;
    f.sync_all().map_err(err("fsyncing", temp))?;
    drop(f);
    std::fs::rename(temp, path).map_err(err("renaming a temp file over", path))?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fsync_dir(dir).map_err(err("fsyncing the directory of", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_content_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, temp) = (dir.path().join("f.json"), dir.path().join("f.json.tmp"));
        replace_file(&path, &temp, b"one").expect("first write");
        replace_file(&path, &temp, b"two").expect("second write");
        assert_eq!(std::fs::read(&path).expect("read"), b"two");
        assert!(!temp.exists());
        // A failing step names itself and the file.
        let missing = dir.path().join("no/such/dir/f.json");
        let e = replace_file(&missing, &dir.path().join("no/such/dir/f.tmp"), b"x").expect_err("no directory");
        assert_eq!(e.step, "creating");
        assert!(e.to_string().contains("no/such/dir/f.tmp"), "{e}");
    }
}
