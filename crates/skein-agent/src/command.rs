//! Running `nft` and `ip` with a deadline: a hung command must not stall
//! a realizer forever (it is killed, and the driver retries).

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context};

/// How long `nft` or `ip` may take: a whole table of 10,000 VIPs loads in
/// about 1.3 s (docs/BENCHMARKS.md); anything near this is hung.
pub(crate) const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `program args`, feeding `stdin`; returns its stdout, or an error
/// with its stderr, or a timeout error after `timeout` (the process killed).
pub(crate) fn run(
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run `{program}` (is it installed?)"))?;
    let pid = child.id();
    let (done, finished) = mpsc::channel::<()>();
    // The watchdog kills the child if it outlives the deadline. The child
    // is only reaped by `wait_with_output` below, which happens before
    // `done` is sent, so the pid cannot belong to another process while the
    // watchdog may still use it... except in the instant between the reap
    // and the send, which the deadline's length makes moot.
    let watchdog = std::thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = finished.recv_timeout(timeout) {
            // SAFETY: kill(2) on our own child's pid; no memory involved.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
            return true;
        }
        false
    });
    let fed = match (stdin, child.stdin.take()) {
        (Some(text), Some(mut pipe)) => pipe.write_all(text.as_bytes()),
        _ => Ok(()),
    };
    let out = child.wait_with_output();
    let _ = done.send(());
    let killed = watchdog.join().unwrap_or(false);
    let full = format!("{program} {}", args.join(" "));
    if killed {
        bail!("`{full}` did not finish within {timeout:?}; killed");
    }
    let out = out.with_context(|| format!("`{full}`"))?;
    fed.with_context(|| format!("writing to `{full}`"))?;
    if !out.status.success() {
        bail!("{full}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_errors_and_input() {
        assert_eq!(run("echo", &["hi"], None, COMMAND_TIMEOUT).unwrap(), "hi\n");
        assert_eq!(
            run("cat", &[], Some("fed"), COMMAND_TIMEOUT).unwrap(),
            "fed",
            "stdin reaches the command"
        );
        let e = run(
            "sh",
            &["-c", "echo nope >&2; exit 3"],
            None,
            COMMAND_TIMEOUT,
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("nope"), "{e:#}");
        assert!(run("/nonexistent/skein-test", &[], None, COMMAND_TIMEOUT).is_err());
    }

    #[test]
    fn a_hung_command_is_killed_at_the_deadline() {
        let started = std::time::Instant::now();
        let e = run("sleep", &["30"], None, Duration::from_millis(200)).unwrap_err();
        assert!(format!("{e}").contains("did not finish"), "{e}");
        // Killed, not waited for: far less than the 30 s it asked for.
        assert!(started.elapsed() < Duration::from_secs(20));
    }
}
