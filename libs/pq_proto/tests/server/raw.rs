//! A hand-written client: COPY OUT/BOTH streams, encryption negotiation, cancel requests, and
//! malformed input over a real socket.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use pq_proto::{
    BackendConfig, BoxFuture, BoxedStream, CancelKey, FeMessage, FeStartupPacket, MessageLimits, SessionEnd,
    TlsAcceptor,
};
use tokio::io::AsyncWriteExt;

use crate::harness::{tags, RawClient, RawMessage, TestAuth, TestServer};

const USER: &[(&str, &str)] = &[("user", "raw")];

async fn trust_server() -> TestServer {
    TestServer::start(TestAuth::Trust, BackendConfig::default()).await
}

#[tokio::test]
async fn copy_out_streams_rows_then_done() {
    let mut server = trust_server().await;
    let mut client = RawClient::login(server.addr, USER).await;
    let n = 1000;
    let msgs = client.query(&format!("COPYOUT {n}")).await;
    assert_eq!(msgs[0].tag, b'H', "CopyOutResponse first");
    assert_eq!(&msgs[0].body[..], b"\0\0\0", "text format, no columns");
    let data: Vec<&RawMessage> = msgs.iter().filter(|m| m.tag == b'd').collect();
    assert_eq!(data.len(), n);
    assert_eq!(&data[999].body[..], b"row 999\n");
    let tail = tags(&msgs[msgs.len() - 3..]);
    assert_eq!(tail, "cCZ");
    assert_eq!(msgs[msgs.len() - 2].cstr(), "COPY 1000");
    client.send(FeMessage::Terminate).await;
    assert_eq!(server.next_result().await, Ok(SessionEnd::Terminated));
}

#[tokio::test]
async fn copy_both_echoes_and_session_continues() {
    let mut server = trust_server().await;
    let mut client = RawClient::login(server.addr, USER).await;
    client.send(FeMessage::Query("COPYBOTH".into())).await;
    let start = client.recv_expect().await;
    assert_eq!(start.tag, b'W');
    for i in 0..100u32 {
        let payload = Bytes::from(vec![i as u8; i as usize * 37]);
        client.send(FeMessage::CopyData(payload.clone())).await;
        let echo = client.recv_expect().await;
        assert_eq!((echo.tag, echo.body), (b'd', payload));
    }
    // Sync/Flush in the middle of COPY are ignored, as in Postgres.
    client.send(FeMessage::Flush).await;
    client.send(FeMessage::CopyDone).await;
    let msgs = client.recv_until_ready().await;
    assert_eq!(tags(&msgs), "cCZ");
    assert_eq!(msgs[1].cstr(), "COPY 100");

    // Still usable, and a client-side CopyFail becomes the handler's error.
    assert_eq!(tags(&client.query("select x").await), "TDCZ");
    client.send(FeMessage::Query("COPYBOTH".into())).await;
    assert_eq!(client.recv_expect().await.tag, b'W');
    client.send(FeMessage::CopyFail("changed my mind".into())).await;
    let msgs = client.recv_until_ready().await;
    assert_eq!(tags(&msgs), "EZ");
    assert_eq!(msgs[0].error_field(b'C').as_deref(), Some("57014"));
    assert_eq!(msgs[0].error_field(b'M').as_deref(), Some("COPY aborted by client: changed my mind"));
    // Leftover CopyData after the server ended COPY is ignored.
    client.send(FeMessage::CopyData(Bytes::from_static(b"late"))).await;
    assert_eq!(tags(&client.query("select y").await), "TDCZ");

    // Disconnecting in the middle of COPY BOTH is a clean end.
    client.send(FeMessage::Query("COPYBOTH".into())).await;
    assert_eq!(client.recv_expect().await.tag, b'W');
    drop(client);
    assert_eq!(server.next_result().await, Ok(SessionEnd::ClientDisconnected));
}

#[tokio::test]
async fn notices_empty_queries_and_negotiation() {
    let mut server = trust_server().await;
    // Protocol 3.2 and a _pq_ option: answered with NegotiateProtocolVersion, then login.
    let mut client = RawClient::connect(server.addr).await;
    client.send_startup(2, &[("user", "raw"), ("_pq_.fancy", "1")]).await;
    let msgs = client.recv_until_ready().await;
    assert_eq!(msgs[0].tag, b'v');
    assert_eq!(&msgs[0].body[..], b"\0\0\0\0\0\0\0\x01_pq_.fancy\0");
    assert_eq!(msgs[1].tag, b'R');
    assert!(msgs.iter().any(|m| m.tag == b'S'), "ParameterStatus sent");

    let msgs = client.query("NOTICE").await;
    assert_eq!(tags(&msgs), "NCZ");
    assert_eq!(msgs[0].error_field(b'S').as_deref(), Some("NOTICE"));
    assert_eq!(tags(&client.query("").await), "IZ");
    assert_eq!(tags(&client.query(";;").await), "IZ");
    client.send(FeMessage::Terminate).await;
    assert_eq!(server.next_result().await, Ok(SessionEnd::Terminated));
}

#[tokio::test]
async fn ssl_and_gss_refused_then_plaintext_startup() {
    let mut server = trust_server().await;
    let mut client = RawClient::connect(server.addr).await;
    let mut buf = BytesMut::new();
    FeStartupPacket::GssEncRequest.write(&mut buf).unwrap();
    client.send_raw(&buf).await;
    assert_eq!(client.recv_byte().await, b'N');
    buf.clear();
    FeStartupPacket::SslRequest.write(&mut buf).unwrap();
    client.send_raw(&buf).await;
    assert_eq!(client.recv_byte().await, b'N');
    client.send_startup(0, USER).await;
    assert_eq!(tags(&client.recv_until_ready().await)[..1], *"R");
    client.send(FeMessage::Terminate).await;
    assert_eq!(server.next_result().await, Ok(SessionEnd::Terminated));

    // A third negotiation attempt is a protocol violation.
    let mut client = RawClient::connect(server.addr).await;
    for _ in 0..3 {
        buf.clear();
        FeStartupPacket::SslRequest.write(&mut buf).unwrap();
        client.send_raw(&buf).await;
    }
    assert_eq!(client.recv_byte().await, b'N');
    assert_eq!(client.recv_byte().await, b'N');
    let err = client.recv_expect().await;
    assert_eq!(err.error_field(b'C').as_deref(), Some("08P01"));
    assert!(server.next_result().await.is_err());
}

/// A stand-in for TLS: says yes and passes the stream through, counting upgrades. Shows where a
/// real acceptor (rustls) plugs in.
struct PassThroughTls {
    upgrades: AtomicUsize,
}

impl TlsAcceptor for PassThroughTls {
    fn accept(&self, stream: BoxedStream) -> BoxFuture<'static, std::io::Result<BoxedStream>> {
        self.upgrades.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move { Ok(stream) })
    }
}

#[tokio::test]
async fn tls_acceptor_slot_is_used_for_ssl_request() {
    let tls = Arc::new(PassThroughTls { upgrades: AtomicUsize::new(0) });
    let config = BackendConfig { tls: Some(tls.clone()), ..BackendConfig::default() };
    let mut server = TestServer::start(TestAuth::Trust, config).await;
    let mut client = RawClient::connect(server.addr).await;
    let mut buf = BytesMut::new();
    FeStartupPacket::SslRequest.write(&mut buf).unwrap();
    client.send_raw(&buf).await;
    assert_eq!(client.recv_byte().await, b'S');
    client.send_startup(0, USER).await;
    assert_eq!(client.recv_until_ready().await[0].tag, b'R');
    assert_eq!(tls.upgrades.load(Ordering::SeqCst), 1);
    client.send(FeMessage::Terminate).await;
    assert_eq!(server.next_result().await, Ok(SessionEnd::Terminated));

    // Plaintext bytes piggybacked on the SSLRequest are refused (CVE-2021-23214).
    let mut client = RawClient::connect(server.addr).await;
    buf.clear();
    FeStartupPacket::SslRequest.write(&mut buf).unwrap();
    buf.put_slice(b"\0\0\0\x08junk");
    client.send_raw(&buf).await;
    let err = client.recv_expect().await;
    assert_eq!(err.tag, b'E');
    assert!(err.error_field(b'M').is_some_and(|m| m.contains("unencrypted data after SSL request")));
    assert!(server.next_result().await.is_err());
}

#[tokio::test]
async fn cancel_request_is_reported_to_the_caller() {
    let mut server = trust_server().await;
    let mut client = RawClient::connect(server.addr).await;
    let key = CancelKey { process_id: 1234, secret_key: 5678 };
    let mut buf = BytesMut::new();
    FeStartupPacket::CancelRequest(key).write(&mut buf).unwrap();
    client.send_raw(&buf).await;
    assert_eq!(server.next_result().await, Ok(SessionEnd::CancelRequested(key)));
    assert!(client.recv().await.is_none(), "connection closed");
}

/// After a bad connection, the listener must still serve a good one.
async fn assert_still_serving(server: &mut TestServer) {
    let mut client = RawClient::login(server.addr, USER).await;
    assert_eq!(tags(&client.query("select alive").await), "TDCZ");
    client.send(FeMessage::Terminate).await;
    assert_eq!(server.next_result().await, Ok(SessionEnd::Terminated));
}

#[tokio::test]
async fn malformed_input_ends_only_that_session() {
    let mut server = trust_server().await;

    // Oversized length field on a query: FATAL 08P01, then close.
    let mut client = RawClient::login(server.addr, USER).await;
    client.send_raw(&[b'Q', 0x7f, 0xff, 0xff, 0xff]).await;
    let err = client.recv_expect().await;
    assert_eq!(err.tag, b'E');
    assert_eq!(err.error_field(b'S').as_deref(), Some("FATAL"));
    assert_eq!(err.error_field(b'C').as_deref(), Some("08P01"));
    assert!(client.recv().await.is_none());
    let result = server.next_result().await;
    assert!(result.as_ref().is_err_and(|e| e.contains("exceeds the limit")), "{result:?}");
    assert_still_serving(&mut server).await;

    // Garbage tag.
    let mut client = RawClient::login(server.addr, USER).await;
    client.send_raw(b"!garbage").await;
    let err = client.recv_expect().await;
    assert!(err.error_field(b'M').is_some_and(|m| m.contains("invalid frontend message type 0x21")));
    assert!(client.recv().await.is_none());
    assert!(server.next_result().await.is_err());
    assert_still_serving(&mut server).await;

    // Negative length.
    let mut client = RawClient::login(server.addr, USER).await;
    client.send_raw(&[b'd', 0xff, 0xff, 0xff, 0xf0]).await;
    assert_eq!(client.recv_expect().await.error_field(b'C').as_deref(), Some("08P01"));
    assert!(server.next_result().await.is_err());

    // Oversized startup packet, and one too small.
    for header in [[0x7f, 0xff, 0xff, 0xff], [0, 0, 0, 4]] {
        let mut client = RawClient::connect(server.addr).await;
        client.send_raw(&header).await;
        let err = client.recv_expect().await;
        assert_eq!(err.error_field(b'C').as_deref(), Some("08P01"));
        assert!(server.next_result().await.is_err());
    }

    // Bad startup options: reported with 42601.
    let mut client = RawClient::connect(server.addr).await;
    let mut buf = BytesMut::new();
    buf.put_i32(0);
    buf.put_u32(196608);
    buf.put_slice(b"user\0u\0options\0-c novalue\0\0");
    let len = buf.len() as i32;
    buf[..4].copy_from_slice(&len.to_be_bytes());
    client.send_raw(&buf).await;
    let err = client.recv_expect().await;
    assert_eq!(err.error_field(b'C').as_deref(), Some("42601"));
    assert!(server.next_result().await.is_err());

    // A password message after login is a protocol violation.
    let mut client = RawClient::login(server.addr, USER).await;
    client.send(FeMessage::PasswordMessage(Bytes::from_static(b"x\0"))).await;
    assert_eq!(client.recv_expect().await.error_field(b'C').as_deref(), Some("08P01"));
    assert!(server.next_result().await.is_err());

    assert_still_serving(&mut server).await;
}

#[tokio::test]
async fn disconnects_at_any_point_are_clean() {
    let mut server = trust_server().await;

    // Connect and leave (health checks do this).
    drop(RawClient::connect(server.addr).await);
    assert_eq!(server.next_result().await, Ok(SessionEnd::ClientDisconnected));

    // EOF in the middle of the startup packet.
    let mut client = RawClient::connect(server.addr).await;
    client.send_raw(&[0, 0, 0, 40, 0, 3]).await;
    client.stream.shutdown().await.unwrap();
    assert_eq!(server.next_result().await, Ok(SessionEnd::ClientDisconnected));

    // EOF in the middle of a message.
    let mut client = RawClient::login(server.addr, USER).await;
    client.send_raw(b"Q\0\0\0\x20sel").await;
    client.stream.shutdown().await.unwrap();
    assert_eq!(server.next_result().await, Ok(SessionEnd::ClientDisconnected));

    // EOF between messages.
    let client = RawClient::login(server.addr, USER).await;
    drop(client);
    assert_eq!(server.next_result().await, Ok(SessionEnd::ClientDisconnected));

    // Connection reset (RST via zero linger) while the server waits for a password.
    let mut pw_server = TestServer::start(TestAuth::Password, BackendConfig::default()).await;
    let mut client = RawClient::connect(pw_server.addr).await;
    client.send_startup(0, USER).await;
    let ask = client.recv_expect().await;
    assert_eq!((ask.tag, &ask.body[..]), (b'R', &[0, 0, 0, 3][..]));
    client.stream.set_zero_linger().unwrap();
    drop(client);
    assert_eq!(pw_server.next_result().await, Ok(SessionEnd::ClientDisconnected));

    // Reset in the middle of a query stream.
    let mut client = RawClient::login(server.addr, USER).await;
    client.send_raw(b"Q\0\0\0").await;
    client.stream.set_zero_linger().unwrap();
    drop(client);
    assert_eq!(server.next_result().await, Ok(SessionEnd::ClientDisconnected));

    assert_still_serving(&mut server).await;
}

#[tokio::test]
async fn copy_data_has_a_larger_limit_than_queries() {
    let config = BackendConfig {
        limits: MessageLimits { max_message_size_bytes: 1 << 10, max_copy_data_size_bytes: 1 << 20 },
        ..BackendConfig::default()
    };
    let mut server = TestServer::start(TestAuth::Trust, config).await;
    let mut client = RawClient::login(server.addr, USER).await;
    client.send(FeMessage::Query("COPYBOTH".into())).await;
    assert_eq!(client.recv_expect().await.tag, b'W');
    let big = Bytes::from(vec![0xab; 1 << 20]);
    client.send(FeMessage::CopyData(big.clone())).await;
    assert_eq!(client.recv_expect().await.body, big);
    client.send(FeMessage::CopyDone).await;
    assert_eq!(tags(&client.recv_until_ready().await), "cCZ");

    // One byte over the CopyData limit. Only the header is sent: the server must refuse from
    // the length field alone (and unread body bytes would make the kernel reset the socket).
    client.send(FeMessage::Query("COPYBOTH".into())).await;
    assert_eq!(client.recv_expect().await.tag, b'W');
    let mut header = vec![b'd'];
    header.extend_from_slice(&((1i32 << 20) + 1 + 4).to_be_bytes());
    client.send_raw(&header).await;
    let err = client.recv_expect().await;
    assert_eq!(err.error_field(b'C').as_deref(), Some("08P01"));
    assert!(server.next_result().await.is_err());

    // A query over the message limit.
    let mut client = RawClient::login(server.addr, USER).await;
    client.send(FeMessage::Query(format!("select {}", "x".repeat(1 << 10)))).await;
    let err = client.recv_expect().await;
    assert!(err
        .error_field(b'M')
        .is_some_and(|m| m.contains("message 'Q' of 1032 bytes exceeds the limit of 1024 bytes")));
    let result = server.next_result().await;
    assert!(result.is_err(), "{result:?}");
}
