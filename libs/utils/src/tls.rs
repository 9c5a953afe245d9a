//! TLS settings shared by every listener (libpq, HTTP) and every client (libpq, HTTP) of the
//! stack (DESIGN D9): rustls with the aws-lc-rs provider, identities and trust anchors from PEM
//! files. Errors name the file and what is wrong with it, so an operator can fix the config.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("reading TLS certificates from {}: {e}", path.display()))?;
    if certs.is_empty() {
        bail!("{}: no PEM certificate in the file", path.display());
    }
    Ok(certs)
}

/// A server identity: a PEM certificate chain (server certificate first) and its PEM private key
/// (PKCS#8, PKCS#1 or SEC1). `alpn` lists the protocols offered (e.g. `http/1.1`), none for libpq.
pub fn server_config(cert_path: &Path, key_path: &Path, alpn: &[&[u8]]) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let certs = read_certs(cert_path)?;
    let key = PrivateKeyDer::from_pem_file(key_path)
        .map_err(|e| anyhow::anyhow!("reading the TLS private key from {}: {e}", key_path.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            anyhow::anyhow!("{} and {} do not make a usable TLS identity: {e}", cert_path.display(), key_path.display())
        })?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// A client that trusts only the CA certificates in `ca_path` (PEM) and checks the server's name
/// against its certificate: libpq's `sslmode=verify-full`.
pub fn client_config(ca_path: &Path) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs(ca_path)? {
        roots.add(cert).map_err(|e| anyhow::anyhow!("{}: not a usable CA certificate: {e}", ca_path.display()))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The name a client checks the server certificate against: a DNS name or an IP address.
pub fn server_name(host: &str) -> anyhow::Result<ServerName<'static>> {
    ServerName::try_from(host.to_string()).map_err(|e| anyhow::anyhow!("'{host}' is not a valid TLS server name: {e}"))
}

/// Client side of TLS for one trust store: what every client of the stack holds when a CA is
/// configured. `Debug` prints no key material (there is none: only public CA certificates).
#[derive(Clone)]
pub struct TlsConnector {
    config: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for TlsConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsConnector")
    }
}

impl TlsConnector {
    pub fn from_ca_file(ca_path: &Path) -> anyhow::Result<TlsConnector> {
        Ok(TlsConnector { config: client_config(ca_path)? })
    }

    /// Runs the handshake over `stream`, checking the certificate against `host`.
    pub async fn connect<S>(&self, host: &str, stream: S) -> std::io::Result<tokio_rustls::client::TlsStream<S>>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let name =
            server_name(host).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        tokio_rustls::TlsConnector::from(self.config.clone()).connect(name, stream).await
    }
}

#[doc(hidden)]
pub mod test_certs {
    //! For tests of every crate: a throwaway CA and a server certificate for
    //! `localhost`/127.0.0.1, made with the openssl CLI as an operator would.
    use std::path::{Path, PathBuf};
    use std::process::Command;

    pub struct Certs {
        pub ca: PathBuf,
        pub cert: PathBuf,
        pub key: PathBuf,
    }

    fn openssl(args: &[&str], dir: &Path) {
        let out = Command::new("openssl").args(args).current_dir(dir).output().expect("run openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    pub fn make(dir: &Path) -> Certs {
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        let mut ca = vec!["req", "-x509", "-days", "2", "-subj", "/CN=test CA", "-keyout", "ca.key", "-out", "ca.crt"];
        ca.extend(ec);
        openssl(&ca, dir);
        let mut csr = vec!["req", "-subj", "/CN=localhost", "-keyout", "server.key", "-out", "server.csr"];
        csr.extend(ec);
        openssl(&csr, dir);
        std::fs::write(dir.join("ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n").expect("write ext");
        openssl(
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                "ext",
                "-out",
                "server.crt",
            ],
            dir,
        );
        Certs { ca: dir.join("ca.crt"), cert: dir.join("server.crt"), key: dir.join("server.key") }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn client_verifies_the_server_against_the_ca_and_its_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = test_certs::make(dir.path());
        let acceptor = tokio_rustls::TlsAcceptor::from(server_config(&certs.cert, &certs.key, &[]).expect("server"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            loop {
                let (sock, _) = listener.accept().await.expect("accept");
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(mut tls) = acceptor.accept(sock).await {
                        let _ = tls.write_all(b"hello").await;
                        let _ = tls.shutdown().await;
                    }
                });
            }
        });
        let good = TlsConnector::from_ca_file(&certs.ca).expect("connector");
        for host in ["localhost", "127.0.0.1"] {
            let sock = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
            let mut tls = good.connect(host, sock).await.expect("handshake");
            let mut got = Vec::new();
            tls.read_to_end(&mut got).await.expect("read");
            assert_eq!(got, b"hello");
        }
        // A name the certificate does not carry is refused.
        let sock = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
        let err = good.connect("db.example.com", sock).await.expect_err("wrong name");
        assert!(err.to_string().contains("certificate"), "{err}");
        // A client trusting another CA refuses the server.
        let other_dir = tempfile::tempdir().expect("tempdir");
        let other = test_certs::make(other_dir.path());
        let stranger = TlsConnector::from_ca_file(&other.ca).expect("connector");
        let sock = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
        let err = stranger.connect("localhost", sock).await.expect_err("another CA");
        assert!(err.to_string().contains("invalid peer certificate"), "{err}");
    }

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = test_certs::make(dir.path());
        let other_dir = tempfile::tempdir().expect("tempdir");
        let other = test_certs::make(other_dir.path());
        let err = server_config(&certs.cert, &other.key, &[]).expect_err("mismatched key");
        assert!(err.to_string().contains("do not make a usable TLS identity"), "{err}");
        let err = server_config(&dir.path().join("missing.crt"), &certs.key, &[]).expect_err("missing");
        assert!(err.to_string().contains("missing.crt"), "{err}");
        std::fs::write(dir.path().join("empty.pem"), "").expect("write");
        let err = client_config(&dir.path().join("empty.pem")).expect_err("empty CA file");
        assert!(err.to_string().contains("no PEM certificate"), "{err}");
    }
}
