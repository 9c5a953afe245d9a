//! `RemotePath`: the one key type every backend accepts.
//!
//! Keys are validated once, at construction, so backends never have to wonder whether a key can
//! escape the LocalFs root (`..`), map to two different S3 objects (`a//b` vs `a/b`), or mean
//! different things on disk and in a bucket (`./a`).

use std::fmt;

use serde::{Deserialize, Serialize};

/// S3 caps object keys at 1024 bytes; the bucket prefix takes part of that, so we leave room.
pub const REMOTE_PATH_LEN_BYTES_MAX: usize = 900;

/// A validated, relative object key: `/`-separated UTF-8 components, none of them empty, `.` or
/// `..`, no leading or trailing `/`, no NUL byte, at most [`REMOTE_PATH_LEN_BYTES_MAX`] bytes.
///
/// Ordering is byte-wise on the key string, which is the order S3 lists keys in.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RemotePath(String);

/// Why a string is not a valid [`RemotePath`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid remote path {path:?}: {reason}")]
pub struct InvalidRemotePath {
    pub path: String,
    pub reason: &'static str,
}

impl RemotePath {
    /// Validates `key` (e.g. `tenants/3a../timelines/7f../index_part.json`).
    pub fn new(key: &str) -> Result<Self, InvalidRemotePath> {
        validate(key)?;
        Ok(Self(key.to_owned()))
    }

    /// Builds a key from components, each of which must itself be a valid relative path.
    pub fn from_components<S: AsRef<str>>(components: &[S]) -> Result<Self, InvalidRemotePath> {
        let joined = components.iter().map(AsRef::as_ref).collect::<Vec<_>>().join("/");
        Self::new(&joined)
    }

    /// Appends `suffix` (one or more `/`-separated components) below this path.
    pub fn join(&self, suffix: &str) -> Result<Self, InvalidRemotePath> {
        Self::new(&format!("{}/{}", self.0, suffix))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The last component, e.g. the layer file name.
    pub fn object_name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or(&self.0)
    }

    /// The path without its last component; `None` for a single-component path.
    pub fn parent(&self) -> Option<RemotePath> {
        self.0.rsplit_once('/').map(|(parent, _)| RemotePath(parent.to_owned()))
    }

    /// The components of `self` below `prefix` (whole components only), if `prefix` is an
    /// ancestor of `self`.
    pub fn strip_prefix(&self, prefix: &RemotePath) -> Option<&str> {
        self.0.strip_prefix(prefix.as_str()).and_then(|rest| rest.strip_prefix('/'))
    }
}

fn validate(key: &str) -> Result<(), InvalidRemotePath> {
    let fail = |reason| Err(InvalidRemotePath { path: key.to_owned(), reason });
    if key.is_empty() {
        return fail("must not be empty");
    }
    if key.len() > REMOTE_PATH_LEN_BYTES_MAX {
        return fail("longer than 900 bytes");
    }
    if key.starts_with('/') {
        return fail("must be relative (no leading '/')");
    }
    if key.contains('\0') {
        return fail("must not contain a NUL byte");
    }
    for component in key.split('/') {
        match component {
            "" => return fail("must not contain empty components ('//' or a trailing '/')"),
            "." | ".." => return fail("must not contain '.' or '..' components"),
            _ => {}
        }
    }
    Ok(())
}

impl TryFrom<String> for RemotePath {
    type Error = InvalidRemotePath;

    fn try_from(key: String) -> Result<Self, Self::Error> {
        validate(&key)?;
        Ok(Self(key))
    }
}

impl From<RemotePath> for String {
    fn from(path: RemotePath) -> String {
        path.0
    }
}

impl std::str::FromStr for RemotePath {
    type Err = InvalidRemotePath;

    fn from_str(key: &str) -> Result<Self, Self::Err> {
        Self::new(key)
    }
}

impl fmt::Display for RemotePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RemotePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RemotePath({:?})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_keys() {
        for key in ["a", "a/b", "tenants/t1/timelines/x/index_part.json", "a b/ü.txt", ".hidden"] {
            let path = RemotePath::new(key).unwrap();
            assert_eq!(path.as_str(), key);
        }
    }

    #[test]
    fn rejects_invalid_keys() {
        let too_long = "a".repeat(REMOTE_PATH_LEN_BYTES_MAX + 1);
        for key in ["", "/a", "a/", "a//b", "../a", "a/../b", "a/./b", ".", "a\0b", too_long.as_str()] {
            let err = RemotePath::new(key).unwrap_err();
            assert_eq!(err.path, key);
            assert!(err.to_string().contains("invalid remote path"), "{err}");
        }
    }

    #[test]
    fn components() {
        let path = RemotePath::from_components(&["tenants", "t1", "layer"]).unwrap();
        assert_eq!(path.as_str(), "tenants/t1/layer");
        assert_eq!(path.object_name(), "layer");
        assert_eq!(path.parent().unwrap().as_str(), "tenants/t1");
        assert_eq!(RemotePath::new("x").unwrap().parent(), None);
        let tenants = RemotePath::new("tenants").unwrap();
        assert_eq!(path.strip_prefix(&tenants), Some("t1/layer"));
        assert_eq!(path.strip_prefix(&RemotePath::new("ten").unwrap()), None);
        assert_eq!(tenants.join("t2/x").unwrap().as_str(), "tenants/t2/x");
        assert!(tenants.join("../x").is_err());
    }

    #[test]
    fn serde_validates() {
        let path: RemotePath = serde_json::from_str("\"a/b\"").unwrap();
        assert_eq!(path.as_str(), "a/b");
        assert!(serde_json::from_str::<RemotePath>("\"/a\"").is_err());
        assert_eq!(serde_json::to_string(&path).unwrap(), "\"a/b\"");
    }
}
