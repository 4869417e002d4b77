//! One edge per state dir: a pid file held under an exclusive `flock`.
//!
//! Two edges on one node would fight over the same ports and each serve
//! half the connections (Marathon-LB's pile-ups of HAProxy processes);
//! the second one refuses to start and names the first. The lock dies
//! with the process, so a crash never leaves a stale lock behind.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// Held while the edge runs.
#[derive(Debug)]
pub struct PidLock {
    _file: File,
    pub path: PathBuf,
}

/// Takes `<dir>/skein-edge.pid`, writing this process's pid into it.
pub fn acquire(dir: &Path) -> anyhow::Result<PidLock> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the state dir {}", dir.display()))?;
    let path = dir.join("skein-edge.pid");
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: flock on a file descriptor this function owns.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let pid = text.trim();
            anyhow::bail!(
                "another `skein edge` (pid {}) is running with state dir {}; stop it, or give this one another --state-dir",
                if pid.is_empty() { "unknown" } else { pid },
                dir.display()
            );
        }
        return Err(err).with_context(|| format!("cannot lock {}", path.display()));
    }
    file.set_len(0)?;
    file.seek(SeekFrom::Start(0))?;
    writeln!(file, "{}", std::process::id())?;
    file.flush()?;
    Ok(PidLock { _file: file, path })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_pid() {
        let dir = tempfile::tempdir().unwrap();
        let first = acquire(dir.path()).unwrap();
        let written = std::fs::read_to_string(&first.path).unwrap();
        assert_eq!(written.trim(), std::process::id().to_string());
        // flock locks belong to the open file description: a second open
        // in the same process conflicts like another process would.
        let err = acquire(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(first);
        acquire(dir.path()).unwrap();
    }
}
