//! A test backend, like the seed article's `httpi`: answers every HTTP
//! request on TCP `ADDR` with its own NAME, and every UDP datagram on the
//! same address with NAME too, so a test can tell which backend a VIP chose.
//! HTTP answers also say the request's path (`X-Path`) and the
//! `X-Forwarded-For` it carried (`X-Seen-Forwarded-For`), for proxy tests.
//! A TCP connection that starts with `ECHO\n` instead stays open and gets
//! `NAME` back for every line it sends (a long-lived connection).
//!
//!   skein-httpi 10.77.0.2:9896 backend-a

use std::io::{Read, Write};
use std::net::{TcpListener, UdpSocket};

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(addr), Some(name)) = (args.next(), args.next()) else {
        eprintln!("usage: skein-httpi ADDR NAME");
        std::process::exit(2);
    };
    let udp = UdpSocket::bind(&addr)?;
    let udp_name = name.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((_, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(udp_name.as_bytes(), from);
        }
    });
    let listener = TcpListener::bind(&addr)?;
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let name = name.clone();
        std::thread::spawn(move || {
            // Read the request head (or whatever arrives first); the
            // answer does not depend on it.
            let mut buf = [0u8; 4096];
            let mut seen = Vec::new();
            let mut first = [0u8; 5];
            if stream.peek(&mut first).is_ok_and(|n| n == 5) && &first == b"ECHO\n" {
                echo(stream, &name);
                return;
            }
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 {
                    break;
                }
                seen.extend_from_slice(&buf[..n]);
                if seen.windows(4).any(|w| w == b"\r\n\r\n") || seen.len() > 16 * 1024 {
                    break;
                }
            }
            // What the request looked like, for tests of proxies: its path
            // and the client address a proxy says it forwarded for.
            let head = String::from_utf8_lossy(&seen);
            let path = head
                .lines()
                .next()
                .and_then(|l| l.split(' ').nth(1))
                .unwrap_or("")
                .to_string();
            let forwarded = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("x-forwarded-for")
                        .then(|| v.trim().to_string())
                })
                .unwrap_or_default();
            let body = format!("{name}\n");
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Path: {path}\r\nX-Seen-Forwarded-For: {forwarded}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        });
    }
    Ok(())
}

/// Answers every line with the backend's name until the peer closes.
fn echo(mut stream: std::net::TcpStream, name: &str) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            return;
        }
        let lines = buf[..n].iter().filter(|&&b| b == b'\n').count();
        for _ in 0..lines {
            if stream.write_all(format!("{name}\n").as_bytes()).is_err() {
                return;
            }
        }
    }
}
