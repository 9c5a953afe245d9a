//! JWT authentication shared by the daemons (DESIGN D9, issue 8 item 1).
//!
//! Tokens are JWTs signed with Ed25519 (`alg: EdDSA`). Their claims are a [`Scope`], the tenant
//! id for `tenant` scope, and `exp` (Unix seconds; required, no leeway). A daemon verifies them
//! against one or more public keys (PEM, SPKI "PUBLIC KEY"), given as a file or a directory of
//! files, so a key can be rotated: add the new public key beside the old one, hand out tokens
//! signed with the new key, then remove the old one.
//!
//! Failures are [`AuthError`]s with a distinct reason each; their `Display` never contains the
//! token. [`audit`] writes the one structured log line per auth failure or privileged operation.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::TenantId;

/// What a token lets its holder do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// One tenant's data: page service, its timelines, its computes. Needs `tenant_id`.
    Tenant,
    /// The pageserver's management API (what a control plane or neon_local uses).
    #[serde(rename = "pageserverapi")]
    PageServerApi,
    /// Safekeeper data and APIs for every tenant (what the pageserver uses to read WAL).
    #[serde(rename = "safekeeperdata")]
    SafekeeperData,
    /// Everything.
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Tenant => "tenant",
            Scope::PageServerApi => "pageserverapi",
            Scope::SafekeeperData => "safekeeperdata",
            Scope::Admin => "admin",
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "tenant" => Scope::Tenant,
            "pageserverapi" => Scope::PageServerApi,
            "safekeeperdata" => Scope::SafekeeperData,
            "admin" => Scope::Admin,
            other => {
                return Err(format!("unknown scope '{other}': use tenant, pageserverapi, safekeeperdata or admin"))
            }
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub scope: Scope,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<TenantId>,
    /// Expiry, Unix seconds.
    pub exp: u64,
}

/// Why a request was refused. The messages name the reason and never the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no token: send 'Authorization: Bearer <jwt>' (HTTP) or the JWT as the password (libpq)")]
    Missing,
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("token signature does not verify against any configured public key")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token scope '{have}' does not allow this: needs {need}")]
    WrongScope { have: Scope, need: String },
    #[error("token is for tenant {have}, not tenant {want}")]
    OtherTenant { have: String, want: TenantId },
}

impl AuthError {
    /// A short machine-readable reason for audit lines.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed(_) => "malformed",
            AuthError::BadSignature => "bad_signature",
            AuthError::Expired => "expired",
            AuthError::WrongScope { .. } => "wrong_scope",
            AuthError::OtherTenant { .. } => "other_tenant",
        }
    }

    /// 401 for "who are you?" failures, 403 for a valid token that does not reach the object.
    pub fn http_status(&self) -> u16 {
        match self {
            AuthError::WrongScope { .. } | AuthError::OtherTenant { .. } => 403,
            _ => 401,
        }
    }
}

/// Verifies tokens against the configured public keys.
pub struct JwtAuth {
    keys: Vec<DecodingKey>,
    validation: Validation,
}

impl std::fmt::Debug for JwtAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JwtAuth({} public keys)", self.keys.len())
    }
}

impl JwtAuth {
    pub fn new(keys: Vec<DecodingKey>) -> anyhow::Result<Self> {
        anyhow::ensure!(!keys.is_empty(), "no public keys to verify tokens with");
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.leeway = 0;
        validation.validate_aud = false;
        Ok(JwtAuth { keys, validation })
    }

    /// One PEM public key file, or every file in a directory (sorted by name; rotation).
    pub fn from_key_path(path: &Path) -> anyhow::Result<Self> {
        let meta = std::fs::metadata(path).with_context(|| format!("auth public key path {}", path.display()))?;
        let files = if meta.is_dir() {
            let mut files = Vec::new();
            for e in std::fs::read_dir(path).with_context(|| format!("reading {}", path.display()))? {
                let p = e?.path();
                if p.is_file() {
                    files.push(p);
                }
            }
            files.sort();
            files
        } else {
            vec![path.to_path_buf()]
        };
        let mut keys = Vec::new();
        for f in &files {
            let pem = std::fs::read(f).with_context(|| format!("reading public key {}", f.display()))?;
            keys.push(
                DecodingKey::from_ed_pem(&pem)
                    .with_context(|| format!("{}: not an Ed25519 public key in PEM", f.display()))?,
            );
        }
        JwtAuth::new(keys).with_context(|| format!("auth public key path {}", path.display()))
    }

    /// Checks signature (against every key) and expiry.
    pub fn decode(&self, token: &str) -> Result<Claims, AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        let token = token.trim();
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let mut last = AuthError::BadSignature;
        for key in &self.keys {
            match jsonwebtoken::decode::<Claims>(token, key, &self.validation) {
                Ok(data) => {
                    if data.claims.scope == Scope::Tenant && data.claims.tenant_id.is_none() {
                        return Err(AuthError::Malformed("tenant scope without tenant_id".into()));
                    }
                    return Ok(data.claims);
                }
                Err(e) => match e.kind() {
                    ErrorKind::InvalidSignature => last = AuthError::BadSignature,
                    // The signature verified (it is checked first): the claims are what's wrong.
                    ErrorKind::ExpiredSignature => return Err(AuthError::Expired),
                    ErrorKind::InvalidAlgorithm => return Err(AuthError::Malformed("algorithm is not EdDSA".into())),
                    ErrorKind::Json(_) | ErrorKind::MissingRequiredClaim(_) => {
                        return Err(AuthError::Malformed(format!("bad claims: {e}")))
                    }
                    _ => return Err(AuthError::Malformed(e.to_string())),
                },
            }
        }
        Err(last)
    }
}

/// The token's scope must be one of `allowed`.
pub fn check_scope(claims: &Claims, allowed: &[Scope]) -> Result<(), AuthError> {
    if allowed.contains(&claims.scope) {
        Ok(())
    } else {
        Err(AuthError::WrongScope { have: claims.scope, need: scope_list(allowed) })
    }
}

/// A `tenant` token for exactly `tenant_id`, or a token of one of the `privileged` scopes.
pub fn check_tenant_permission(claims: &Claims, tenant_id: TenantId, privileged: &[Scope]) -> Result<(), AuthError> {
    match claims.scope {
        Scope::Tenant => match claims.tenant_id {
            Some(t) if t == tenant_id => Ok(()),
            other => Err(AuthError::OtherTenant {
                have: other.map_or_else(|| "none".to_string(), |t| t.to_string()),
                want: tenant_id,
            }),
        },
        s if privileged.contains(&s) => Ok(()),
        s => Err(AuthError::WrongScope {
            have: s,
            need: format!("a tenant token for {tenant_id} or {}", scope_list(privileged)),
        }),
    }
}

fn scope_list(scopes: &[Scope]) -> String {
    scopes.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" or ")
}

/// The bearer token of an `Authorization` header value.
pub fn parse_bearer(header: Option<&str>) -> Result<&str, AuthError> {
    let Some(v) = header else { return Err(AuthError::Missing) };
    let v = v.trim();
    match v.split_once(' ') {
        Some((kind, tok)) if kind.eq_ignore_ascii_case("bearer") && !tok.trim().is_empty() => Ok(tok.trim()),
        _ => Err(AuthError::Malformed("Authorization header is not 'Bearer <jwt>'".into())),
    }
}

/// Outcome of an audited action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    Denied,
}

/// One structured audit line (target `audit`): time (the log line's), source address, scope,
/// operation, object, outcome and `detail` (the refusal reason, or the answer's status).
/// Callers pass the claims' scope, never the token.
pub fn audit(
    service: &str,
    peer: Option<std::net::SocketAddr>,
    scope: Option<Scope>,
    operation: &str,
    object: &str,
    outcome: Outcome,
    detail: &str,
) {
    let peer = peer.map_or_else(|| "unknown".to_string(), |p| p.to_string());
    let scope = scope.map_or("none", Scope::as_str);
    match outcome {
        Outcome::Allowed => tracing::info!(
            target: "audit",
            service,
            peer = %peer,
            scope,
            operation,
            object,
            outcome = "allowed",
            detail,
            "audit"
        ),
        Outcome::Denied => tracing::warn!(
            target: "audit",
            service,
            peer = %peer,
            scope,
            operation,
            object,
            outcome = "denied",
            detail,
            "audit"
        ),
    }
}

pub fn now_unix_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Signs claims with a PKCS#8 PEM Ed25519 private key (neon_local, tests).
pub fn encode(private_key_pem: &[u8], claims: &Claims) -> anyhow::Result<String> {
    let key = EncodingKey::from_ed_pem(private_key_pem).context("not an Ed25519 private key in PEM (PKCS#8)")?;
    jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), claims, &key).context("signing token")
}

/// A new Ed25519 key pair as (PKCS#8 private key PEM, SPKI public key PEM).
pub fn generate_keypair() -> anyhow::Result<(String, String)> {
    use ring::signature::KeyPair;
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| anyhow::anyhow!("key generation"))?;
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
        .map_err(|_| anyhow::anyhow!("generated key does not parse"))?;
    // SubjectPublicKeyInfo for Ed25519 (RFC 8410): a fixed 12-byte prefix and the 32-byte key.
    let mut spki = vec![0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];
    spki.extend_from_slice(pair.public_key().as_ref());
    Ok((pem("PRIVATE KEY", pkcs8.as_ref()), pem("PUBLIC KEY", &spki)))
}

fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Writes `private.pem` (mode 0600) and `public.pem` into `dir`.
pub fn write_keypair(dir: &Path) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (private, public) = generate_keypair()?;
    let path = dir.join("private.pem");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(private.as_bytes())?;
    std::fs::write(dir.join("public.pem"), public)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant() -> TenantId {
        "0123456789abcdef0123456789abcdef".parse().unwrap()
    }

    fn claims(scope: Scope, tenant_id: Option<TenantId>, exp_in: i64) -> Claims {
        Claims { scope, tenant_id, exp: (now_unix_secs() as i64 + exp_in) as u64 }
    }

    fn auth_from(publics: &[&str]) -> JwtAuth {
        let dir = tempfile::tempdir().unwrap();
        for (i, p) in publics.iter().enumerate() {
            std::fs::write(dir.path().join(format!("key{i}.pem")), p).unwrap();
        }
        JwtAuth::from_key_path(dir.path()).unwrap()
    }

    #[test]
    fn each_failure_reason() {
        let (private, public) = generate_keypair().unwrap();
        let (other_private, _) = generate_keypair().unwrap();
        let auth = auth_from(&[&public]);
        let t = tenant();
        let valid = encode(private.as_bytes(), &claims(Scope::Tenant, Some(t), 600)).unwrap();
        let c = auth.decode(&valid).unwrap();
        assert_eq!((c.scope, c.tenant_id), (Scope::Tenant, Some(t)));
        check_tenant_permission(&c, t, &[Scope::Admin]).unwrap();

        assert_eq!(auth.decode(""), Err(AuthError::Missing));
        assert!(matches!(auth.decode("not.a.jwt"), Err(AuthError::Malformed(_))));
        assert!(matches!(auth.decode("garbage"), Err(AuthError::Malformed(_))));
        let expired = encode(private.as_bytes(), &claims(Scope::Admin, None, -5)).unwrap();
        assert_eq!(auth.decode(&expired), Err(AuthError::Expired));
        let forged = encode(other_private.as_bytes(), &claims(Scope::Admin, None, 600)).unwrap();
        assert_eq!(auth.decode(&forged), Err(AuthError::BadSignature));
        // A valid signature over changed claims does not verify.
        let parts: Vec<&str> = valid.split('.').collect();
        let admin_payload = {
            use base64::Engine;
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(serde_json::to_vec(&claims(Scope::Admin, None, 600)).unwrap())
        };
        assert_eq!(auth.decode(&format!("{}.{}.{}", parts[0], admin_payload, parts[2])), Err(AuthError::BadSignature));
        // A tenant token without a tenant id is malformed.
        let no_tenant = encode(private.as_bytes(), &claims(Scope::Tenant, None, 600)).unwrap();
        assert!(matches!(auth.decode(&no_tenant), Err(AuthError::Malformed(_))));

        let sk = auth.decode(&encode(private.as_bytes(), &claims(Scope::SafekeeperData, None, 600)).unwrap()).unwrap();
        let e = check_scope(&sk, &[Scope::PageServerApi, Scope::Admin]).unwrap_err();
        assert_eq!(e.reason(), "wrong_scope");
        assert_eq!(e.http_status(), 403);
        assert!(matches!(check_tenant_permission(&sk, t, &[Scope::Admin]), Err(AuthError::WrongScope { .. })));
        let other: TenantId = "ffffffffffffffffffffffffffffffff".parse().unwrap();
        let e = check_tenant_permission(&c, other, &[Scope::Admin]).unwrap_err();
        assert_eq!(e.reason(), "other_tenant");
        for err in [AuthError::Missing, AuthError::BadSignature, AuthError::Expired, e] {
            assert!(!err.to_string().contains(&valid), "{err}");
        }
    }

    #[test]
    fn rotation_with_two_keys() {
        let (old_private, old_public) = generate_keypair().unwrap();
        let (new_private, new_public) = generate_keypair().unwrap();
        let both = auth_from(&[&old_public, &new_public]);
        let old_tok = encode(old_private.as_bytes(), &claims(Scope::Admin, None, 600)).unwrap();
        let new_tok = encode(new_private.as_bytes(), &claims(Scope::Admin, None, 600)).unwrap();
        assert!(both.decode(&old_tok).is_ok());
        assert!(both.decode(&new_tok).is_ok());
        // Expired under the second key is still "expired", not "bad signature".
        let exp = encode(new_private.as_bytes(), &claims(Scope::Admin, None, -5)).unwrap();
        assert_eq!(both.decode(&exp), Err(AuthError::Expired));
        let new_only = auth_from(&[&new_public]);
        assert_eq!(new_only.decode(&old_tok), Err(AuthError::BadSignature));
        assert!(new_only.decode(&new_tok).is_ok());
    }

    /// The cost of a check (once per HTTP request or libpq connection): `cargo test -p utils
    /// --lib auth::tests::decode_cost -- --nocapture`.
    #[test]
    fn decode_cost() {
        let (private, public) = generate_keypair().unwrap();
        let auth = auth_from(&[&public]);
        let tok = encode(private.as_bytes(), &claims(Scope::Tenant, Some(tenant()), 600)).unwrap();
        let n = 2000;
        let started = std::time::Instant::now();
        for _ in 0..n {
            auth.decode(&tok).unwrap();
        }
        // A figure to read, not a bound to assert (timings are not test outcomes here).
        let per = started.elapsed() / n;
        println!("token check: {per:?} each ({n} checks)");
    }

    #[test]
    fn key_files_and_bearer() {
        let dir = tempfile::tempdir().unwrap();
        write_keypair(dir.path()).unwrap();
        let auth = JwtAuth::from_key_path(&dir.path().join("public.pem")).unwrap();
        let private = std::fs::read(dir.path().join("private.pem")).unwrap();
        let tok = encode(&private, &claims(Scope::PageServerApi, None, 60)).unwrap();
        assert_eq!(auth.decode(&tok).unwrap().scope, Scope::PageServerApi);
        assert!(JwtAuth::from_key_path(&dir.path().join("private.pem")).is_err());
        assert!(JwtAuth::from_key_path(&dir.path().join("missing.pem")).is_err());
        let empty = tempfile::tempdir().unwrap();
        assert!(JwtAuth::from_key_path(empty.path()).is_err());
        assert_eq!(parse_bearer(Some("Bearer abc")), Ok("abc"));
        assert_eq!(parse_bearer(None), Err(AuthError::Missing));
        assert!(matches!(parse_bearer(Some("Basic abc")), Err(AuthError::Malformed(_))));
    }
}
