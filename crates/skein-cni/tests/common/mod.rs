//! Helpers shared by the integration tests.

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// A directory under the system temp dir, removed on drop (also when the
/// test panics).
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "skein-cni-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(crate) fn netconf(data_dir: &Path, bridge: &str, subnet: &str, gateway: &str) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "dcos",
        "type": "skein-cni",
        "bridge": bridge,
        "subnet": subnet,
        "gateway": gateway,
        "mtu": 1420,
        "dataDir": data_dir,
    })
    .to_string()
}

/// Runs `cmd` (the plugin, possibly behind `ip netns exec`) with a clean
/// CNI environment plus `env`, feeding `stdin`.
pub(crate) fn run_plugin(mut cmd: Command, env: &[(&str, &str)], stdin: &str) -> Output {
    for var in [
        "CNI_COMMAND",
        "CNI_CONTAINERID",
        "CNI_NETNS",
        "CNI_IFNAME",
        "CNI_ARGS",
        "CNI_PATH",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn skein-cni");
    // A plugin that rejects its environment exits without reading stdin;
    // the broken pipe is then expected.
    if let Some(mut pipe) = child.stdin.take() {
        let _ = pipe.write_all(stdin.as_bytes());
    }
    child.wait_with_output().expect("wait skein-cni")
}

pub(crate) fn plugin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_skein-cni"))
}

pub(crate) fn stdout_json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {:?}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

pub(crate) fn describe(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
