//! The UI with the keyboard only (issue 14: "readable and usable with the
//! keyboard"), in a real browser: headless Chromium driven over the
//! DevTools protocol (`--remote-debugging-pipe`: JSON messages on fds 3
//! and 4), keys sent as the browser's own input events. From node1's entry
//! point: Tab reaches the page links with a visible focus ring, Enter
//! opens a page and moves focus to its content, Tab reaches a VIP in the
//! table and keeps it across the page's refreshes, Enter opens the VIP's
//! detail, and the DNS search takes typed text and keeps its focus while
//! the results refresh.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cluster_tests::{spawn_in, wait_for, Cluster};
use serde_json::{json, Value};

const ENTRY: &str = "http://127.0.0.1:8080";
const VIP: &str = "web.marathon.l4lb.thisdcos.directory:80";

fn pipe() -> anyhow::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2(2) writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: both were just returned by pipe2 and nothing else owns them.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A browser driven over the DevTools protocol, attached to its page.
struct Browser {
    child: Child,
    to: std::fs::File,
    from: mpsc::Receiver<Value>,
    next: u64,
    session: String,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    fn launch(ns: &str, profile: &std::path::Path) -> anyhow::Result<Browser> {
        // fd 3: what the browser reads (our commands); fd 4: what it writes.
        let (cmd_read, cmd_write) = pipe()?;
        let (out_read, out_write) = pipe()?;
        let (cr, ow) = (cmd_read.as_raw_fd(), out_write.as_raw_fd());
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", ns, cluster_tests::chromium()])
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-dev-shm-usage",
                "--remote-debugging-pipe",
                "--window-size=1280,900",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: only fcntl(2) and dup2(2), async-signal-safe, between
        // fork and exec. Copied above 10 first: either end may itself be
        // 3 or 4 (dup2 onto itself would keep its close-on-exec).
        unsafe {
            command.pre_exec(move || {
                let (r, w) = (
                    libc::fcntl(cr, libc::F_DUPFD, 10),
                    libc::fcntl(ow, libc::F_DUPFD, 10),
                );
                if r < 0 || w < 0 || libc::dup2(r, 3) < 0 || libc::dup2(w, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn()?;
        drop((cmd_read, out_write));
        let (tx, rx) = mpsc::channel();
        let reader = std::fs::File::from(out_read);
        std::thread::spawn(move || {
            let mut r = BufReader::new(reader);
            let mut buf = Vec::new();
            while r.read_until(0, &mut buf).is_ok_and(|n| n > 0) {
                if buf.last() == Some(&0) {
                    buf.pop();
                }
                if let Ok(v) = serde_json::from_slice::<Value>(&buf) {
                    if tx.send(v).is_err() {
                        return;
                    }
                }
                buf.clear();
            }
        });
        let mut b = Browser {
            child,
            to: std::fs::File::from(cmd_write),
            from: rx,
            next: 0,
            session: String::new(),
        };
        let targets = b.call("Target.getTargets", json!({}))?;
        let page = targets["targetInfos"]
            .as_array()
            .and_then(|t| t.iter().find(|t| t["type"] == "page"))
            .and_then(|t| t["targetId"].as_str())
            .ok_or_else(|| anyhow::anyhow!("no page target: {targets}"))?
            .to_string();
        let attached = b.call(
            "Target.attachToTarget",
            json!({"targetId": page, "flatten": true}),
        )?;
        b.session = attached["sessionId"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("no session: {attached}"))?
            .to_string();
        Ok(b)
    }

    /// One command; its result (events in between are skipped).
    fn call(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        self.next += 1;
        let id = self.next;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if !self.session.is_empty() {
            msg["sessionId"] = json!(self.session);
        }
        let mut bytes = serde_json::to_vec(&msg)?;
        bytes.push(0);
        self.to.write_all(&bytes)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self
                .from
                .recv_timeout(left)
                .map_err(|e| anyhow::anyhow!("{method}: no answer from the browser ({e})"))?;
            if v["id"] == id {
                if let Some(err) = v.get("error") {
                    anyhow::bail!("{method}: {err}");
                }
                return Ok(v["result"].clone());
            }
        }
    }

    /// A JavaScript expression's value in the page.
    fn eval(&mut self, expr: &str) -> anyhow::Result<Value> {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true}),
        )?;
        if let Some(e) = r.get("exceptionDetails") {
            anyhow::bail!("{expr}: {e}");
        }
        Ok(r["result"]["value"].clone())
    }

    fn key(&mut self, key: &str, code: u32, text: Option<&str>) -> anyhow::Result<()> {
        let mut down = json!({"type": "keyDown", "key": key, "code": key,
            "windowsVirtualKeyCode": code, "nativeVirtualKeyCode": code});
        if let Some(t) = text {
            down["text"] = json!(t);
        }
        self.call("Input.dispatchKeyEvent", down)?;
        self.call(
            "Input.dispatchKeyEvent",
            json!({"type": "keyUp", "key": key, "code": key,
                "windowsVirtualKeyCode": code, "nativeVirtualKeyCode": code}),
        )?;
        Ok(())
    }

    fn tab(&mut self) -> anyhow::Result<()> {
        self.key("Tab", 9, None)
    }

    fn enter(&mut self) -> anyhow::Result<()> {
        self.key("Enter", 13, Some("\r"))
    }

    /// Presses Tab until the focused element satisfies `test` (a JS
    /// expression over `el`), at most `max` times; how many it took.
    fn tab_to(&mut self, test: &str, max: usize) -> anyhow::Result<usize> {
        let expr =
            format!("(() => {{ const el = document.activeElement; return !!el && ({test}); }})()");
        for n in 1..=max {
            self.tab()?;
            if self.eval(&expr)? == json!(true) {
                return Ok(n);
            }
        }
        let focused = self.eval("document.activeElement && document.activeElement.outerHTML")?;
        anyhow::bail!("{max} Tabs never reached `{test}`; focus is on {focused}")
    }

    fn wait_until(&mut self, what: &str, expr: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        // Mid-navigation the document may be half there: not yet.
        let guarded =
            format!("(() => {{ try {{ return !!({expr}); }} catch (_) {{ return false; }} }})()");
        loop {
            if self.eval(&guarded).is_ok_and(|v| v == json!(true)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                let text = self.eval("document.body.innerText")?;
                anyhow::bail!("never {what} ({expr}); the page says: {text}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the page's next refresh (its "Updated" line changes).
    fn next_refresh(&mut self) -> anyhow::Result<()> {
        let before = self.eval("document.querySelector('#updated').textContent")?;
        let before = before.as_str().unwrap_or_default().replace('\'', "");
        let deadline = Instant::now() + Duration::from_secs(10);
        // The line has a clock to the second: two refreshes apart differ.
        loop {
            let now = self.eval("document.querySelector('#updated').textContent")?;
            if now.as_str().unwrap_or_default() != before {
                return Ok(());
            }
            if Instant::now() > deadline {
                anyhow::bail!("the page did not refresh in 10 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn the_ui_is_usable_with_the_keyboard() -> anyhow::Result<()> {
    let httpi = env!("CARGO_BIN_EXE_skein-httpi");
    let mut c = Cluster::new(1)?;
    c.start(1, &[], &["--entry-listen", "0.0.0.0:8080"])?;
    let ip1 = c.node(1).ip.clone();
    let ns1 = c.node(1).netns.clone();
    let backend = format!("{ip1}:9000");
    let _b1 = spawn_in(&ns1, httpi, &[&backend, "web-1"])?;
    let body = format!(
        r#"{{"app":"/web","ip":"{ip1}","ports":[{{"port":9000,"labels":{{"VIP_0":"/web:80"}}}}]}}"#
    );
    assert_eq!(c.put_task(1, "web.1", &body)?.0, 201);
    wait_for("the VIP", Duration::from_secs(30), || {
        Ok(c.vip_address(1, VIP)?.map(|_| ()))
    })?;

    let mut b = Browser::launch(&ns1, &c.dir.path().join("chromium"))?;
    b.call("Page.navigate", json!({"url": format!("{ENTRY}/#/nodes")}))?;
    b.wait_until(
        "shows the nodes",
        "document.body.innerText.includes('node1') && document.body.innerText.includes('alive')",
    )?;

    // Tab to the navigation's "Service Addresses"; its focus ring shows.
    b.tab_to("el.dataset.page === 'vips'", 10)?;
    let ring = b.eval("getComputedStyle(document.activeElement).outlineStyle")?;
    assert_eq!(ring, json!("solid"), "the focused link has no visible ring");
    b.enter()?;
    // Focus moves to the page's content (the hash changes first, the
    // focus on the hashchange event after: wait for both).
    b.wait_until(
        "opens Service Addresses with focus on its content",
        &format!(
            "location.hash === '#/vips' && document.body.innerText.includes('{VIP}') \
             && document.activeElement.id === 'main'"
        ),
    )?;
    assert_eq!(
        b.eval("document.querySelector('nav a[aria-current=page]').dataset.page")?,
        json!("vips"),
        "the current page is marked for assistive technology"
    );

    // Tab to the VIP's link in the table; it keeps focus while the page
    // refreshes (twice), then Enter opens its detail.
    let on_vip = "el.getAttribute('href') && el.getAttribute('href').startsWith('#/vips/web')";
    b.tab_to(on_vip, 10)?;
    b.next_refresh()?;
    b.next_refresh()?;
    let still = b.eval(&format!(
        "(() => {{ const el = document.activeElement; return !!el && ({on_vip}); }})()"
    ))?;
    assert_eq!(
        still,
        json!(true),
        "a refresh took the focus off the VIP link"
    );
    b.enter()?;
    b.wait_until(
        "opens the VIP's detail",
        &format!(
            "location.hash.startsWith('#/vips/web') && document.body.innerText.includes('{backend}') \
             && document.activeElement.id === 'main'"
        ),
    )?;

    // DNS: Tab to the page link, Enter, Tab into the search, type; the
    // results follow and the field keeps its focus across refreshes.
    b.tab_to("el.dataset.page === 'dns'", 20)?;
    b.enter()?;
    b.wait_until(
        "opens DNS with focus on its content",
        "location.hash === '#/dns' && document.activeElement.id === 'main'",
    )?;
    b.tab_to("el.id === 'q'", 5)?;
    b.call("Input.insertText", json!({"text": "web.marathon.mesos"}))?;
    b.wait_until(
        "shows the searched record",
        "document.querySelector('#page').innerText.includes('web.marathon.mesos')",
    )?;
    b.next_refresh()?;
    assert_eq!(
        b.eval("document.activeElement.id")?,
        json!("q"),
        "the search lost its focus on refresh"
    );
    assert_eq!(
        b.eval("document.querySelector('#q').value")?,
        json!("web.marathon.mesos")
    );
    Ok(())
}
