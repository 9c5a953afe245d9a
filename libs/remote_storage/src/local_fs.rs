//! `LocalFs`: objects are files under a root directory.
//!
//! It is the default backend (`.neon/remote_storage/`), so it must be as crash-safe as S3 is
//! atomic: a put writes a temp file next to the target, fsyncs it, renames it over the target
//! and fsyncs the directory, so after a crash the key holds the old object or the new one.

use std::io;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use futures::StreamExt;
use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio_util::io::ReaderStream;

use crate::{
    finish_listing, ByteStream, DeleteFailure, Download, Listing, ListingMode, RemotePath, RemoteStorage,
    RemoteStorageError,
};

/// Marks in-flight temp files; keys containing it are refused so listings can skip temp files.
const TEMP_FILE_MARKER: &str = ".___temp.";

/// Chunk size of download streams.
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// A directory holding one file per object, at `root/<key>`.
#[derive(Clone, Debug)]
pub struct LocalFs {
    root: PathBuf,
}

impl LocalFs {
    /// Uses (and creates, if missing) `root`.
    pub fn new(root: PathBuf) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&root)
            .map_err(|e| anyhow::anyhow!("cannot create local remote storage root {}: {e}", root.display()))?;
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn object_path(&self, path: &RemotePath) -> PathBuf {
        self.root.join(path.as_str())
    }

    pub(crate) fn location(&self, path: &RemotePath) -> String {
        self.object_path(path).display().to_string()
    }

    /// Creates a uniquely named temp file next to `target`. Retries if a concurrent delete
    /// removes the freshly created parent directory before the file exists in it.
    async fn create_temp_file(&self, target: &Path) -> io::Result<(PathBuf, tokio::fs::File)> {
        let parent = target.parent().unwrap_or(&self.root);
        let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let mut attempts_left = 3;
        loop {
            tokio::fs::create_dir_all(parent).await?;
            let temp = parent.join(format!("{name}{TEMP_FILE_MARKER}{:016x}", rand::thread_rng().gen::<u64>()));
            match tokio::fs::OpenOptions::new().write(true).create_new(true).open(&temp).await {
                Ok(file) => return Ok((temp, file)),
                Err(e) if e.kind() == io::ErrorKind::NotFound && attempts_left > 0 => {
                    attempts_left -= 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// fsyncs the temp file, renames it over `target`, and fsyncs the directory so the rename
    /// itself survives a crash.
    async fn commit_temp_file(file: tokio::fs::File, temp: &Path, target: &Path) -> io::Result<()> {
        file.sync_all().await?;
        drop(file);
        tokio::fs::rename(temp, target).await?;
        if let Some(parent) = target.parent() {
            tokio::fs::File::open(parent).await?.sync_all().await?;
        }
        Ok(())
    }

    fn check_not_reserved(&self, op: &'static str, path: &RemotePath) -> Result<(), RemoteStorageError> {
        if path.as_str().contains(TEMP_FILE_MARKER) {
            return Err(RemoteStorageError::permanent(
                op,
                self.location(path),
                anyhow::anyhow!("keys containing {TEMP_FILE_MARKER:?} are reserved for LocalFs temp files"),
            ));
        }
        Ok(())
    }

    /// Removes now-empty directories from `path`'s parent up to (not including) the root, so
    /// deleted timelines do not leave directory skeletons behind. Stops at the first non-empty
    /// directory; a concurrent put recreates what it needs.
    async fn remove_empty_parents(&self, path: &Path) {
        let mut dir = path.parent();
        while let Some(d) = dir {
            if d == self.root || !d.starts_with(&self.root) {
                break;
            }
            if tokio::fs::remove_dir(d).await.is_err() {
                break;
            }
            dir = d.parent();
        }
    }
}

/// Collects keys (relative to `root`, `/`-separated) of all files under `dir`, skipping temp
/// files. Blocking: run it on the blocking pool.
fn walk_keys(root: &Path, dir: &Path, keys: &mut Vec<String>) -> io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotADirectory => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        let file_type = entry.file_type()?;
        if file_type.is_dir() {
            walk_keys(root, &path, keys)?;
            continue;
        }
        let is_file =
            file_type.is_file() || (file_type.is_symlink() && std::fs::metadata(&path).is_ok_and(|m| m.is_file()));
        if !is_file {
            continue;
        }
        let Ok(relative) = path.strip_prefix(root) else {
            continue;
        };
        let Some(relative) = relative.to_str() else {
            tracing::warn!("skipping non-UTF-8 file name {}", path.display());
            continue;
        };
        if relative.contains(TEMP_FILE_MARKER) {
            continue;
        }
        keys.push(relative.replace(std::path::MAIN_SEPARATOR, "/"));
    }
    Ok(())
}

#[async_trait]
impl RemoteStorage for LocalFs {
    async fn put(
        &self,
        path: &RemotePath,
        mut body: ByteStream,
        content_length_bytes: u64,
    ) -> Result<(), RemoteStorageError> {
        self.check_not_reserved("put", path)?;
        let target = self.object_path(path);
        let fail = |e: anyhow::Error| RemoteStorageError::permanent("put", self.location(path), e);

        let (temp, mut file) =
            self.create_temp_file(&target).await.map_err(|e| fail(anyhow::anyhow!("cannot create temp file: {e}")))?;
        let result = async {
            let mut written_bytes = 0u64;
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| anyhow::anyhow!("reading upload body: {e}"))?;
                written_bytes += chunk.len() as u64;
                if written_bytes > content_length_bytes {
                    anyhow::bail!("body is longer than the declared {content_length_bytes} bytes");
                }
                file.write_all(&chunk).await?;
            }
            if written_bytes != content_length_bytes {
                anyhow::bail!("body is {written_bytes} bytes, but {content_length_bytes} were declared");
            }
            file.flush().await?;
            Self::commit_temp_file(file, &temp, &target).await?;
            Ok(())
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&temp).await;
        }
        result.map_err(fail)
    }

    async fn get(&self, path: &RemotePath, range: Option<(u64, Option<u64>)>) -> Result<Download, RemoteStorageError> {
        let location = self.location(path);
        let not_found = || RemoteStorageError::NotFound { key: location.clone() };
        let fail = |e: io::Error| RemoteStorageError::permanent("get", location.clone(), e);

        let mut file = match tokio::fs::File::open(self.object_path(path)).await {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(not_found()),
            Err(e) => return Err(fail(e)),
        };
        let metadata = file.metadata().await.map_err(fail)?;
        // A directory is a "prefix" in S3 terms, not an object.
        if !metadata.is_file() {
            return Err(not_found());
        }
        let object_size_bytes = metadata.len();
        let (start, end) = match range {
            None => (0, object_size_bytes),
            Some((start, end)) => {
                let end = end.unwrap_or(u64::MAX).min(object_size_bytes);
                (start.min(end), end)
            }
        };
        if start > 0 {
            file.seek(io::SeekFrom::Start(start)).await.map_err(fail)?;
        }
        let content_length_bytes = end - start;
        let reader = file.take(content_length_bytes);
        Ok(Download {
            body: Box::pin(ReaderStream::with_capacity(reader, READ_CHUNK_BYTES)),
            content_length_bytes,
            object_size_bytes,
        })
    }

    async fn list(
        &self,
        prefix: Option<&RemotePath>,
        mode: ListingMode,
        max_keys: Option<usize>,
    ) -> Result<Listing, RemoteStorageError> {
        let mut list_prefix = prefix.map(|p| p.as_str().to_owned()).unwrap_or_default();
        if mode == ListingMode::WithDelimiter && !list_prefix.is_empty() {
            list_prefix.push('/');
        }
        // Only the directory containing the prefix's last component can hold matches.
        let walk_dir = match list_prefix.rfind('/') {
            Some(slash) => self.root.join(&list_prefix[..slash]),
            None => self.root.clone(),
        };
        let root = self.root.clone();
        let location = walk_dir.display().to_string();
        let filter_prefix = list_prefix.clone();
        let raw_keys = tokio::task::spawn_blocking(move || {
            let mut keys = Vec::new();
            walk_keys(&root, &walk_dir, &mut keys)?;
            keys.retain(|k| k.starts_with(&filter_prefix));
            Ok::<_, io::Error>(keys)
        })
        .await
        .map_err(|e| RemoteStorageError::permanent("list", location.clone(), e))?
        .map_err(|e| RemoteStorageError::permanent("list", location.clone(), e))?;
        Ok(finish_listing(raw_keys, Vec::new(), &list_prefix, mode, max_keys))
    }

    async fn delete(&self, path: &RemotePath) -> Result<(), RemoteStorageError> {
        let target = self.object_path(path);
        match tokio::fs::remove_file(&target).await {
            Ok(()) => {
                self.remove_empty_parents(&target).await;
                Ok(())
            }
            // Missing, or a directory (not an object): nothing to delete, like S3.
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(_) if tokio::fs::metadata(&target).await.is_ok_and(|m| m.is_dir()) => Ok(()),
            Err(e) => Err(RemoteStorageError::permanent("delete", self.location(path), e)),
        }
    }

    async fn delete_many(&self, paths: &[RemotePath]) -> Result<(), RemoteStorageError> {
        let mut failures = Vec::new();
        for path in paths {
            if let Err(e) = self.delete(path).await {
                failures.push(DeleteFailure { key: self.location(path), message: e.to_string() });
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(RemoteStorageError::DeleteFailed { storage: self.root.display().to_string(), failures })
        }
    }

    async fn copy(&self, from: &RemotePath, to: &RemotePath) -> Result<(), RemoteStorageError> {
        self.check_not_reserved("copy", to)?;
        let source = self.object_path(from);
        match tokio::fs::metadata(&source).await {
            Ok(m) if m.is_file() => {}
            Ok(_) => return Err(RemoteStorageError::NotFound { key: self.location(from) }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(RemoteStorageError::NotFound { key: self.location(from) })
            }
            Err(e) => return Err(RemoteStorageError::permanent("copy", self.location(from), e)),
        }
        let target = self.object_path(to);
        let fail = |e: anyhow::Error| {
            RemoteStorageError::permanent(
                "copy",
                self.location(from),
                e.context(format!("copying to {}", self.location(to))),
            )
        };
        let (temp, file) =
            self.create_temp_file(&target).await.map_err(|e| fail(anyhow::anyhow!("cannot create temp file: {e}")))?;
        let result = async {
            drop(file);
            tokio::fs::copy(&source, &temp).await?;
            let file = tokio::fs::OpenOptions::new().write(true).open(&temp).await?;
            Self::commit_temp_file(file, &temp, &target).await
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&temp).await;
        }
        result.map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                // The source vanished between the check and the copy.
                RemoteStorageError::NotFound { key: self.location(from) }
            } else {
                fail(e.into())
            }
        })
    }
}
