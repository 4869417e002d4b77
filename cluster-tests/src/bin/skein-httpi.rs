//! A test backend, like the seed article's `httpi`: answers every HTTP
//! request on TCP `ADDR` with its own NAME, and every UDP datagram on the
//! same address with NAME too, so a test can tell which backend a VIP chose.
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
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 {
                    break;
                }
                seen.extend_from_slice(&buf[..n]);
                if seen.windows(4).any(|w| w == b"\r\n\r\n") || seen.len() > 16 * 1024 {
                    break;
                }
            }
            let body = format!("{name}\n");
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        });
    }
    Ok(())
}
