//! Serving an HTTP API (axum `Router`) the same way in every daemon (DESIGN D9): plain HTTP, or,
//! when a certificate is configured, HTTPS only — a plaintext client then fails its TLS
//! handshake and gets nothing. Handlers see the peer as `ConnectInfo<SocketAddr>` either way
//! (auth and audit lines name it), and the server stops accepting on `shutdown`, letting open
//! requests finish.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt;
use axum::Router;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// What [`tls_config`] returns, named here so daemons need no rustls dependency of their own.
pub use rustls::ServerConfig as TlsServerConfig;

/// A client that connects and then says nothing (or speaks too slowly) is dropped after this
/// long, so it cannot hold a task and a socket forever.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress at once. More connections wait in the kernel's accept queue, so a
/// flood of silent clients cannot make us hold an unbounded number of sockets.
const MAX_PENDING_HANDSHAKES: usize = 1024;

/// The TLS identity of an HTTP listener: the certificate chain and key as for libpq, offering
/// HTTP/1.1 (the only version our servers speak) by ALPN.
pub fn tls_config(cert_path: &Path, key_path: &Path) -> anyhow::Result<Arc<TlsServerConfig>> {
    crate::tls::server_config(cert_path, key_path, &[b"http/1.1"])
}

/// Serves `router` on `listener` until `shutdown` is cancelled and the open connections are
/// done. With `tls`, every connection must complete a TLS handshake first: HTTPS only.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<Arc<TlsServerConfig>>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let app = router.into_make_service_with_connect_info::<SocketAddr>();
    match tls {
        None => {
            let listener = listener.tap_io(|sock: &mut TcpStream| {
                let _ = sock.set_nodelay(true);
            });
            axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await
        }
        Some(config) => {
            let tls = TlsListener::spawn(listener, config, shutdown.clone())?;
            // `tap_io` (a no-op here: TlsListener sets TCP_NODELAY) is what gives any listener
            // whose address is a SocketAddr axum's `ConnectInfo<SocketAddr>`.
            let listener = tls.tap_io(|_: &mut TlsStream<TcpStream>| {});
            axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await
        }
    }
}

/// Accepts TCP connections and runs their TLS handshakes in tasks of their own, so one slow or
/// hostile client does not delay the others; finished handshakes are handed to axum.
struct TlsListener {
    ready: tokio::sync::mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local_addr: SocketAddr,
}

impl TlsListener {
    fn spawn(
        listener: TcpListener,
        config: Arc<TlsServerConfig>,
        shutdown: CancellationToken,
    ) -> io::Result<TlsListener> {
        let local_addr = listener.local_addr()?;
        let (tx, ready) = tokio::sync::mpsc::channel(64);
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let pending = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let permit = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    p = pending.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => return, // never closed
                    },
                };
                let (sock, peer) = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    // axum::serve would stop too if nobody took its connections any more.
                    _ = tx.closed() => return,
                    r = listener.accept() => match r {
                        Ok(x) => x,
                        Err(e) => {
                            // Usually running out of file descriptors: back off rather than spin.
                            warn!("HTTPS listener {local_addr}: accept failed: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                let _ = sock.set_nodelay(true);
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    let handshake = async {
                        let plaintext = looks_like_plaintext_http(&sock).await;
                        (plaintext, acceptor.accept(sock).await)
                    };
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, handshake).await {
                        Ok((_, Ok(stream))) => {
                            let _ = tx.send((stream, peer)).await;
                        }
                        // A plaintext client, a client that does not trust our CA, a port
                        // scanner: their problem, and not worth more than an info line.
                        Ok((true, Err(_))) => {
                            info!("HTTPS listener {local_addr}: {peer} sent plain HTTP: refused (use https://)")
                        }
                        Ok((false, Err(e))) => {
                            info!("HTTPS listener {local_addr}: TLS handshake with {peer} failed: {e}")
                        }
                        Err(_) => debug!(
                            "HTTPS listener {local_addr}: no TLS handshake from {peer} within {TLS_HANDSHAKE_TIMEOUT:?}"
                        ),
                    }
                });
            }
        });
        Ok(TlsListener { ready, local_addr })
    }
}

/// Whether the client's first byte is a letter, as in `GET /`, rather than a TLS record (0x16):
/// only to make the log line say what went wrong.
async fn looks_like_plaintext_http(sock: &TcpStream) -> bool {
    let mut first = [0u8; 1];
    matches!(sock.peek(&mut first).await, Ok(1) if first[0].is_ascii_uppercase())
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accept task stopped: we are shutting down, and axum's graceful shutdown
            // ends the serve loop; never hand out anything again.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local_addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{test_certs, TlsConnector};
    use axum::extract::ConnectInfo;
    use axum::routing::get;
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    fn router() -> Router {
        Router::new().route("/peer", get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.to_string() }))
    }

    /// One HTTP/1.1 request; returns the whole response (the server closes after it).
    async fn get_peer(mut stream: impl AsyncRead + AsyncWrite + Unpin) -> io::Result<String> {
        stream.write_all(b"GET /peer HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await?;
        let mut out = Vec::new();
        stream.read_to_end(&mut out).await?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    async fn start(tls: Option<Arc<TlsServerConfig>>) -> (u16, CancellationToken, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let shutdown = CancellationToken::new();
        let sd = shutdown.clone();
        let task = tokio::spawn(async move { serve(listener, router(), tls, sd).await.expect("serve") });
        (port, shutdown, task)
    }

    #[tokio::test]
    async fn https_only_when_a_certificate_is_given() {
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = test_certs::make(dir.path());
        let (port, shutdown, task) = start(Some(tls_config(&certs.cert, &certs.key).expect("tls"))).await;

        // A client that verifies us against the CA gets the answer, with its own address as
        // the handler saw it, over an http/1.1 ALPN session.
        let connector = TlsConnector::from_ca_file(&certs.ca).expect("connector");
        let sock = TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
        let local = sock.local_addr().expect("local addr");
        let tls = connector.connect("localhost", sock).await.expect("handshake");
        let response = get_peer(tls).await.expect("request");
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.ends_with(&local.to_string()), "ConnectInfo should be {local}: {response}");

        // Plaintext HTTP to the same port gets no HTTP answer.
        let sock = TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
        let response = get_peer(sock).await.unwrap_or_default();
        assert!(!response.contains("HTTP/1.1 200"), "plaintext was served: {response}");

        // A client that trusts another CA refuses us.
        let other_dir = tempfile::tempdir().expect("tempdir");
        let other = TlsConnector::from_ca_file(&test_certs::make(other_dir.path()).ca).expect("connector");
        let sock = TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
        assert!(other.connect("localhost", sock).await.is_err());

        // A silent client does not stop others from being served meanwhile.
        let _silent = TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
        let sock = TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
        let tls = connector.connect("localhost", sock).await.expect("handshake");
        assert!(get_peer(tls).await.expect("request").starts_with("HTTP/1.1 200"));

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), task).await.expect("stops on shutdown").expect("join");
    }

    /// The clock is paused: it jumps ahead whenever every task waits, so the 10 s pass at once.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_never_completes_the_handshake_is_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = test_certs::make(dir.path());
        let (port, shutdown, task) = start(Some(tls_config(&certs.cert, &certs.key).expect("tls"))).await;
        let mut silent = TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
        let t0 = tokio::time::Instant::now();
        let mut buf = [0u8; 16];
        // The server closes the connection (EOF, or a reset) without having sent anything.
        let n = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT * 3, silent.read(&mut buf))
            .await
            .expect("the silent client was never dropped")
            .unwrap_or(0);
        assert_eq!(n, 0, "a silent client got bytes");
        assert!(t0.elapsed() >= TLS_HANDSHAKE_TIMEOUT, "dropped after {:?}", t0.elapsed());
        shutdown.cancel();
        task.await.expect("join");
    }

    #[tokio::test]
    async fn plain_http_without_a_certificate() {
        let (port, shutdown, task) = start(None).await;
        let sock = TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
        let local = sock.local_addr().expect("local addr");
        let response = get_peer(sock).await.expect("request");
        assert!(response.starts_with("HTTP/1.1 200") && response.ends_with(&local.to_string()), "{response}");
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), task).await.expect("stops on shutdown").expect("join");
    }
}
