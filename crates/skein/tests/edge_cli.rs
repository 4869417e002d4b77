//! `skein edge` as a process: one per state dir, and `skein edge status`
//! against a running one.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn edge(state: &std::path::Path, routes: &std::path::Path, stats_port: u16) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_skein"));
    c.args([
        "edge",
        "--bind",
        "127.0.0.1",
        "--http-port",
        "0",
        "--https-port",
        "0",
    ])
    .args(["--stats-port", &stats_port.to_string()])
    .arg("--routes-file")
    .arg(routes)
    .arg("--state-dir")
    .arg(state)
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    c
}

#[test]
fn a_second_edge_on_one_state_dir_refuses_naming_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.json");
    std::fs::write(
        &routes,
        r#"{"backends": [], "http_routes": [], "problems": []}"#,
    )
    .unwrap();
    let stats_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let first = Killed(edge(dir.path(), &routes, stats_port).spawn().unwrap());
    let pid = first.0.id();
    // Wait for its stats port (it holds the lock before it listens).
    let deadline = Instant::now() + Duration::from_secs(20);
    let url = format!("http://127.0.0.1:{stats_port}");
    loop {
        let out = Command::new(env!("CARGO_BIN_EXE_skein"))
            .args(["edge", "status", "--stats-url", &url])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() && text.contains("routes version 1") {
            assert!(text.contains(&format!("edge pid {pid}")), "{text}");
            assert!(text.contains("marathon_http_in"), "{text}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the first edge never answered: {text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut second = edge(dir.path(), &routes, 0).spawn().unwrap();
    let status = second.wait().unwrap();
    let mut err = String::new();
    second
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!status.success());
    assert!(
        err.contains(&format!("another `skein edge` (pid {pid}) is running")),
        "{err}"
    );
}

/// A TCP server thread: greets with `srv\n`, then echoes.
fn echo_server() -> std::net::SocketAddr {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            std::thread::spawn(move || {
                if s.write_all(b"srv\n").is_err() {
                    return;
                }
                let mut buf = [0u8; 256];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn status_text(stats_port: u16) -> Option<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_skein"))
        .args([
            "edge",
            "status",
            "--stats-url",
            &format!("http://127.0.0.1:{stats_port}"),
        ])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn wait_for(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn take_over_hands_the_listeners_to_a_new_edge_without_closing_a_port() {
    use std::io::{BufRead, BufReader, Write};
    let dir = tempfile::tempdir().unwrap();
    let server = echo_server();
    let port = free_port();
    let routes = dir.path().join("routes.json");
    std::fs::write(
        &routes,
        format!(
            r#"{{"backends": [{{"name": "echo_{port}", "app": "/echo", "port_index": 0, "service_port": {port}, "bind_port": {port},
            "groups": ["external"], "label_port": null, "bind_addr": null, "mode": "tcp", "vhosts": [], "path": null, "proxypass_path": null,
            "balance": "roundrobin", "sticky": false, "redirect_to_https": false, "ssl_certs": [], "backend_weight": 0, "auth": null,
            "servers": [{{"name": "n1_{ip}_{sp}", "addr": "{server}", "node": "n1", "task": "t1", "state": "up"}}]}}],
            "http_routes": [], "problems": []}}"#,
            ip = server.ip(),
            sp = server.port(),
        ),
    )
    .unwrap();
    let stats_port = free_port();
    let mut old_cmd = edge(dir.path(), &routes, stats_port);
    old_cmd.args(["--drain-timeout-s", "3", "--service-ports", "1-65535"]);
    let old = Killed(old_cmd.spawn().unwrap());
    let old_pid = old.0.id();
    wait_for("the old edge", Duration::from_secs(20), || {
        status_text(stats_port).is_some_and(|t| t.contains("routes version 1"))
    });
    let mut long = BufReader::new(std::net::TcpStream::connect(("127.0.0.1", port)).unwrap());
    let mut line = String::new();
    long.read_line(&mut line).unwrap();
    assert_eq!(line, "srv\n");

    // Clients keep connecting while the new edge takes over.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let refused = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let served = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let prober = {
        let (stop, refused, served) = (stop.clone(), refused.clone(), served.clone());
        std::thread::spawn(move || {
            use std::sync::atomic::Ordering::SeqCst;
            while !stop.load(SeqCst) {
                match std::net::TcpStream::connect(("127.0.0.1", port)) {
                    Ok(s) => {
                        let mut r = BufReader::new(s);
                        let mut l = String::new();
                        if r.read_line(&mut l).is_ok() && l == "srv\n" {
                            served.fetch_add(1, SeqCst);
                        } else {
                            refused.fetch_add(1, SeqCst);
                        }
                    }
                    Err(_) => {
                        refused.fetch_add(1, SeqCst);
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    let mut new_cmd = edge(dir.path(), &routes, stats_port);
    new_cmd.args(["--take-over", "--service-ports", "1-65535"]);
    let new = Killed(new_cmd.spawn().unwrap());
    let new_pid = new.0.id();
    wait_for(
        "the new edge on the stats port",
        Duration::from_secs(20),
        || {
            status_text(stats_port).is_some_and(|t| {
                t.contains(&format!("edge pid {new_pid}")) && t.contains("routes version 1")
            })
        },
    );
    // The old edge's connection still works while it drains...
    long.get_mut().write_all(b"ping\n").unwrap();
    line.clear();
    long.read_line(&mut line).unwrap();
    assert_eq!(line, "ping\n");
    // ...and it exits (after its drain time, this connection being open).
    let mut old = old;
    let exited = old.0.wait().unwrap();
    assert!(exited.success(), "{exited:?}");
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    prober.join().unwrap();
    assert_eq!(
        refused.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "a connection was refused or cut during the handover"
    );
    assert!(served.load(std::sync::atomic::Ordering::SeqCst) > 10);
    let pid_file = std::fs::read_to_string(dir.path().join("skein-edge.pid")).unwrap();
    assert_eq!(pid_file.trim(), new_pid.to_string());
    assert_ne!(old_pid, new_pid);
    drop(new);
}
