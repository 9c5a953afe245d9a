//! TLS for the libpq listeners (DESIGN D9): a rustls [`TlsAcceptor`] from PEM files, which the
//! backend uses when a client sends SSLRequest.

use std::io;
use std::path::Path;
use std::sync::Arc;

use crate::backend::{BoxFuture, BoxedStream, TlsAcceptor};

/// Server side of TLS with one certificate chain and key.
pub struct RustlsAcceptor {
    inner: tokio_rustls::TlsAcceptor,
}

impl RustlsAcceptor {
    /// Reads a PEM certificate chain (server certificate first) and a PEM private key (PKCS#8,
    /// PKCS#1 or SEC1). Errors name the file and what is wrong with it.
    pub fn from_pem_files(cert_path: &Path, key_path: &Path) -> anyhow::Result<RustlsAcceptor> {
        let config = utils::tls::server_config(cert_path, key_path, &[])?;
        Ok(RustlsAcceptor { inner: tokio_rustls::TlsAcceptor::from(config) })
    }
}

/// A daemon's TLS identity on both its listeners, loaded once from one certificate and key:
/// libpq (answers SSLRequest) and HTTP (ALPN `http/1.1`).
pub struct ListenerTls {
    pub pg: Arc<RustlsAcceptor>,
    pub http: Arc<utils::http_server::TlsServerConfig>,
}

impl ListenerTls {
    pub fn from_pem_files(cert_path: &Path, key_path: &Path) -> anyhow::Result<ListenerTls> {
        let http = utils::http_server::tls_config(cert_path, key_path)?;
        // The same identity without ALPN: libpq clients before Postgres 17 offer none.
        let mut pg = (*http).clone();
        pg.alpn_protocols.clear();
        Ok(ListenerTls { pg: Arc::new(RustlsAcceptor { inner: tokio_rustls::TlsAcceptor::from(Arc::new(pg)) }), http })
    }
}

impl std::fmt::Debug for RustlsAcceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RustlsAcceptor")
    }
}

impl TlsAcceptor for RustlsAcceptor {
    fn accept(&self, stream: BoxedStream) -> BoxFuture<'static, io::Result<BoxedStream>> {
        let acceptor = self.inner.clone();
        Box::pin(async move {
            let tls = acceptor.accept(stream).await?;
            Ok(Box::new(tls) as BoxedStream)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{BackendConfig, PostgresBackend, QueryHandler, TrustAuth};
    use crate::QueryError;
    use std::process::Command;

    /// A self-signed certificate for `localhost` (the openssl CLI, as an operator would make one).
    fn self_signed(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
        let (cert, key) = (dir.join("server.crt"), dir.join("server.key"));
        let out = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
            .args(["-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("run openssl");
        assert!(out.status.success(), "openssl: {}", String::from_utf8_lossy(&out.stderr));
        (cert, key)
    }

    struct Echo;
    impl QueryHandler for Echo {
        async fn process_query(&mut self, pgb: &mut PostgresBackend, query: &str) -> Result<(), QueryError> {
            pgb.write_row_set(&[crate::FieldDescription::text("q")], [[Some(query.to_string())]]).await?;
            Ok(())
        }
    }

    #[tokio::test]
    async fn sslrequest_upgrades_to_tls_and_queries_travel_encrypted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = self_signed(dir.path());
        let acceptor = Arc::new(RustlsAcceptor::from_pem_files(&cert, &key).expect("acceptor"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server = tokio::spawn(async move {
            for _ in 0..2 {
                let (sock, _) = listener.accept().await.expect("accept");
                let config =
                    BackendConfig { tls: Some(acceptor.clone() as Arc<dyn TlsAcceptor>), ..BackendConfig::default() };
                let pgb = PostgresBackend::new(sock, config);
                let _ = pgb.run(&TrustAuth, &mut Echo).await;
            }
        });
        // psql with sslmode=verify-full against the certificate, and with sslmode=disable.
        let psql = std::env::var("PG_INSTALL_DIR").map(|d| Path::new(&d).join("bin/psql")).ok().filter(|p| p.exists());
        let Some(psql) = psql.or_else(|| {
            let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../pg_install/bin/psql");
            p.exists().then_some(p)
        }) else {
            eprintln!("no psql (run postgres/build.sh): skipping the client half");
            server.abort();
            return;
        };
        let run = |mode: &str| {
            let conninfo =
                format!("host=localhost port={port} user=u dbname=d sslmode={mode} sslrootcert={}", cert.display());
            let psql = psql.clone();
            async move {
                let out = tokio::process::Command::new(psql)
                    .args(["-XAt", "-c", "select 1", &conninfo])
                    .env("PGCONNECT_TIMEOUT", "10")
                    .output()
                    .await
                    .expect("run psql");
                (
                    out.status.success(),
                    String::from_utf8_lossy(&out.stdout).trim().to_string(),
                    String::from_utf8_lossy(&out.stderr).to_string(),
                )
            }
        };
        let (ok, stdout, stderr) = run("verify-full").await;
        assert!(ok && stdout == "select 1", "TLS: {stdout} {stderr}");
        let (ok, stdout, stderr) = run("disable").await;
        assert!(ok && stdout == "select 1", "plaintext: {stdout} {stderr}");
        server.await.expect("server");
        // A certificate and key that do not belong together are refused, naming the files.
        let other = tempfile::tempdir().expect("tempdir");
        let (_, other_key) = self_signed(other.path());
        let err = RustlsAcceptor::from_pem_files(&cert, &other_key).expect_err("mismatched key");
        assert!(err.to_string().contains("do not make a usable TLS identity"), "{err}");
        let err = RustlsAcceptor::from_pem_files(&dir.path().join("missing.crt"), &key).expect_err("missing file");
        assert!(err.to_string().contains("missing.crt"), "{err}");
    }
}
