//! TLS for the local stack (`init --auth`): a throwaway CA and one certificate for
//! `localhost`/127.0.0.1 that every daemon and compute serves, and neon_local's own HTTPS client
//! that trusts only that CA.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

pub const CA_CERT: &str = "ca.crt";
pub const SERVER_CERT: &str = "server.crt";
pub const SERVER_KEY: &str = "server.key";

/// Writes `ca.crt`, `server.crt` and `server.key` (mode 600) into `dir`. The CA's private key
/// is never written: nothing else can be signed with it once this returns.
pub fn generate(dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca_key = KeyPair::generate().context("generating the CA key")?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).context("CA parameters")?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name.push(DnType::CommonName, "neon_local CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).context("signing the CA certificate")?;
    let issuer = Issuer::new(ca, ca_key);

    let key = KeyPair::generate().context("generating the server key")?;
    let mut server = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .context("server certificate parameters")?;
    server.distinguished_name.push(DnType::CommonName, "localhost");
    let server_cert = server.signed_by(&key, &issuer).context("signing the server certificate")?;

    fs::write(dir.join(CA_CERT), ca_cert.pem())?;
    fs::write(dir.join(SERVER_CERT), server_cert.pem())?;
    let key_path = dir.join(SERVER_KEY);
    fs::write(&key_path, key.serialize_pem())?;
    fs::set_permissions(&key_path, fs::Permissions::from_mode(0o600))?;
    Ok(())
}

/// ureq's TLS hook over rustls, trusting only the given roots (ureq's own rustls support would
/// switch on rustls's `ring` provider beside `aws-lc-rs` for the whole workspace, which makes
/// rustls's default-provider lookup in the S3 client fail).
struct RustlsForUreq(Arc<rustls::ClientConfig>);

struct TlsStream(rustls::StreamOwned<rustls::ClientConnection, Box<dyn ureq::ReadWrite>>);

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsStream")
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl ureq::ReadWrite for TlsStream {
    fn socket(&self) -> Option<&std::net::TcpStream> {
        self.0.sock.socket()
    }
}

impl ureq::TlsConnector for RustlsForUreq {
    fn connect(
        &self,
        dns_name: &str,
        mut io: Box<dyn ureq::ReadWrite>,
    ) -> Result<Box<dyn ureq::ReadWrite>, ureq::Error> {
        let invalid = |e: String| ureq::Error::from(std::io::Error::new(std::io::ErrorKind::InvalidInput, e));
        let name = utils::tls::server_name(dns_name).map_err(|e| invalid(e.to_string()))?;
        let mut conn = rustls::ClientConnection::new(self.0.clone(), name).map_err(|e| invalid(e.to_string()))?;
        // Handshake now, so a certificate problem is reported as such rather than as a failed read.
        while conn.is_handshaking() {
            conn.complete_io(&mut io).map_err(|e| {
                ureq::Error::from(std::io::Error::new(e.kind(), format!("TLS handshake with {dns_name}: {e}")))
            })?;
        }
        Ok(Box::new(TlsStream(rustls::StreamOwned::new(conn, io))))
    }
}

/// neon_local's HTTP client: HTTPS trusting only `ca` when given.
pub fn agent(ca: Option<&Path>) -> anyhow::Result<ureq::Agent> {
    let mut b = ureq::AgentBuilder::new();
    if let Some(ca) = ca {
        b = b.tls_connector(Arc::new(RustlsForUreq(utils::tls::client_config(ca)?)));
    }
    Ok(b.build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn generated_certificates_serve_https_to_the_agent_and_nothing_else_is_trusted() {
        let dir = tempfile::tempdir().expect("tempdir");
        generate(dir.path()).expect("generate");
        let mode = fs::metadata(dir.path().join(SERVER_KEY)).expect("key").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the key is for its owner only");
        // The daemons' own HTTPS server, with the generated identity.
        let tls = utils::http_server::tls_config(&dir.path().join(SERVER_CERT), &dir.path().join(SERVER_KEY))
            .expect("the generated identity loads");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let router = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let shutdown = tokio_util::sync::CancellationToken::new();
        tokio::spawn(utils::http_server::serve(listener, router, Some(tls), shutdown.clone()));
        let ca = dir.path().join(CA_CERT);
        let body = tokio::task::spawn_blocking(move || {
            let a = agent(Some(&ca)).expect("agent");
            let ok = a.get(&format!("https://127.0.0.1:{port}/")).call().expect("https").into_string().expect("body");
            let ok2 = a.get(&format!("https://localhost:{port}/")).call().expect("https by name").into_string();
            // An agent trusting another CA refuses the server.
            let other = tempfile::tempdir().expect("tempdir");
            generate(other.path()).expect("generate");
            let stranger = agent(Some(&other.path().join(CA_CERT))).expect("agent");
            let err = stranger.get(&format!("https://127.0.0.1:{port}/")).call().expect_err("unknown CA");
            (ok, ok2.expect("body"), err.to_string())
        })
        .await
        .expect("client");
        assert_eq!((body.0.as_str(), body.1.as_str()), ("ok", "ok"));
        assert!(body.2.contains("invalid peer certificate"), "{}", body.2);
        shutdown.cancel();
    }
}
