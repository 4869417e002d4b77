//! `skein httpi`: the demo app of the seed article (Marathon's "httpi",
//! an HTTP server answering pi to ten decimals), so the compose cluster's
//! labs need nothing but the skein image. Any request gets the same answer;
//! a thread per connection is plenty for a demo and keeps it dependency-free.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use anyhow::Context;

pub(crate) const PI: &str = "3.1415926536";

fn answer(stream: TcpStream, name: &str) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut stream = stream;
    // One request per connection: read the head, answer, close.
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    let body = format!("{PI}\n");
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         X-Instance: {name}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

pub(crate) fn serve(listen: SocketAddr, name: &str) -> anyhow::Result<()> {
    let listener =
        TcpListener::bind(listen).with_context(|| format!("cannot listen on {listen}"))?;
    eprintln!("httpi {name} listening on {listen}");
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let name = name.to_string();
        std::thread::spawn(move || {
            let _ = answer(stream, &name);
        });
    }
    Ok(())
}
