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
