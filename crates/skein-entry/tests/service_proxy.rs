//! `/service/<name>/` as a client sees it, on loopback with real sockets:
//! the entry point's proxy (`service::proxy`) behind the API's HTTP server,
//! in front of raw TCP backends. A refused backend is skipped for the next,
//! the prefix is stripped, the cluster's credential is not passed on, and a
//! WebSocket upgrade becomes a tunnel both ways.

use std::net::SocketAddr;

use axum::extract::Request;
use axum::routing::any;
use axum::Router;
use skein_entry::service::{proxy, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Reads one request head.
async fn read_head(s: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).await.expect("read");
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).to_string()
}

/// A backend: answers an upgrade with 101 and then `ws:<what it got>`
/// for every read; any other request with the request head it saw.
async fn backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let head = read_head(&mut s).await;
                if head.to_lowercase().contains("upgrade: websocket") {
                    let _ = s
                        .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")
                        .await;
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        let mut out = b"ws:".to_vec();
                        out.extend_from_slice(&buf[..n]);
                        if s.write_all(&out).await.is_err() {
                            break;
                        }
                    }
                } else {
                    let body = head.replace("\r\n", "\n");
                    let _ = s
                        .write_all(
                            format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                                body.len()
                            )
                            .as_bytes(),
                        )
                        .await;
                }
            });
        }
    });
    addr
}

/// The entry point's service route for `backends` (the first refuses).
async fn entry(backends: Vec<SocketAddr>) -> SocketAddr {
    let app = Router::new().route(
        "/service/{*rest}",
        any(move |req: Request| {
            let target = Target {
                app: "/dash".into(),
                backends: backends.clone(),
            };
            async move {
                let cx = skein_entry::service::ProxyContext {
                    token: "secret".into(),
                    tunnels: std::sync::Arc::new(tokio::sync::Semaphore::new(4)),
                };
                proxy(&cx, target, "dashboard", 0, None, req).await
            }
        }),
    );
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(skein_api::serve(l, app, std::future::pending()));
    addr
}

/// A port nothing listens on.
async fn refused() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    l.local_addr().expect("addr")
}

#[tokio::test]
async fn requests_skip_a_refused_backend_and_lose_the_prefix_and_the_token() {
    let dead = refused().await;
    let live = backend().await;
    let entry = entry(vec![dead, live]).await;
    let mut s = TcpStream::connect(entry).await.expect("connect");
    s.write_all(b"GET /service/dashboard/api/x?y=1 HTTP/1.1\r\nHost: e\r\nAuthorization: token=secret\r\nCookie: a=1; dcos-acs-auth-cookie=s\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.expect("read");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let seen = answer.to_lowercase();
    assert!(seen.contains("get /api/x?y=1 http/1.1"), "{answer}");
    assert!(!seen.contains("authorization"), "{answer}");
    assert!(
        seen.contains("cookie: a=1") && !seen.contains("dcos-acs-auth-cookie"),
        "{answer}"
    );
    assert!(
        seen.contains("x-forwarded-prefix: /service/dashboard"),
        "{answer}"
    );
}

#[tokio::test]
async fn no_backend_accepting_is_a_502() {
    let entry = entry(vec![refused().await, refused().await]).await;
    let mut s = TcpStream::connect(entry).await.expect("connect");
    s.write_all(b"GET /service/dashboard/ HTTP/1.1\r\nHost: e\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.expect("read");
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    assert!(answer.contains("tried 2"), "{answer}");
}

#[tokio::test]
async fn websockets_become_a_tunnel() {
    let entry = entry(vec![refused().await, backend().await]).await;
    let mut s = TcpStream::connect(entry).await.expect("connect");
    s.write_all(b"GET /service/dashboard/ws HTTP/1.1\r\nHost: e\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        .await
        .expect("write");
    let head = read_head(&mut s).await.to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    let mut buf = [0u8; 64];
    for msg in ["hello", "again"] {
        s.write_all(msg.as_bytes()).await.expect("write");
        let n = s.read(&mut buf).await.expect("read");
        assert_eq!(&buf[..n], format!("ws:{msg}").as_bytes());
    }
}
