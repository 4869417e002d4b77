//! The data dir: what this node must not forget across a restart.
//!
//! - `tasks.json`: this node's own tasks. Written (and fsynced) before a
//!   task write is acknowledged, because this node is their only writer.
//! - `replica.postcard`: the signed state of every node as gossip last
//!   held it, so that a whole-cluster restart starts from what everyone
//!   knew (only a cache: a missing or damaged file means a colder start;
//!   a damaged one is moved aside to `replica.postcard.corrupt`, kept for
//!   a look, rather than overwritten by the next save).
//! - `generation`: the last gossip generation used, so a restart always
//!   picks a higher one even if the clock went backwards.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use skein_state::TaskSpec;

const REPLICA_FILE: &str = "replica.postcard";
const REPLICA_CORRUPT: &str = "replica.postcard.corrupt";

pub(crate) struct Store {
    dir: PathBuf,
}

impl Store {
    pub(crate) fn open(dir: &Path) -> anyhow::Result<Store> {
        fs::create_dir_all(dir)
            .with_context(|| format!("cannot create data dir {}", dir.display()))?;
        Ok(Store {
            dir: dir.to_path_buf(),
        })
    }

    /// Next generation: above the stored one and, normally, the clock.
    pub(crate) fn next_generation(&self, now_ms: u64) -> anyhow::Result<u64> {
        let path = self.dir.join("generation");
        let last = match fs::read_to_string(&path) {
            Ok(s) => s
                .trim()
                .parse::<u64>()
                .with_context(|| format!("{} is not a number", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let next = now_ms.max(last.saturating_add(1));
        write_atomic(&path, next.to_string().as_bytes())?;
        Ok(next)
    }

    pub(crate) fn load_tasks(&self) -> anyhow::Result<BTreeMap<String, TaskSpec>> {
        read_json_or_default(&self.dir.join("tasks.json"))
    }

    pub(crate) fn save_tasks(&self, tasks: &BTreeMap<String, TaskSpec>) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec_pretty(tasks)?;
        write_atomic(&self.dir.join("tasks.json"), &bytes)
    }

    /// This node's overlay lease claims (pool name → claim), kept so that a
    /// restarted node reclaims the same subnet and VTEP address.
    pub(crate) fn load_leases(&self) -> anyhow::Result<BTreeMap<String, skein_overlay::Claim>> {
        read_json_or_default(&self.dir.join("leases.json"))
    }

    pub(crate) fn save_leases(
        &self,
        leases: &BTreeMap<String, skein_overlay::Claim>,
    ) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec_pretty(leases)?;
        write_atomic(&self.dir.join("leases.json"), &bytes)
    }

    /// The signed state of every node as gossip last held it. A missing or
    /// unreadable file is only a colder start: gossip brings it all back.
    /// One this version cannot read is moved aside (replacing an earlier
    /// one) and logged, so that the evidence survives the next save.
    pub(crate) fn load_gossip_state(&self) -> Vec<u8> {
        let path = self.dir.join(REPLICA_FILE);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) => {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), error = %e, "cannot read the persisted replica; starting without it");
                }
                return Vec::new();
            }
        };
        match skein_gossip::check_persisted(&bytes) {
            Ok(()) => bytes,
            Err(why) => {
                let aside = self.dir.join(REPLICA_CORRUPT);
                match fs::rename(&path, &aside) {
                    Ok(()) => tracing::warn!(
                        error = %why,
                        moved_to = %aside.display(),
                        "persisted replica unreadable; moved aside, starting without it"
                    ),
                    Err(e) => tracing::warn!(
                        error = %why,
                        rename_error = %e,
                        "persisted replica unreadable and could not be moved aside; starting without it"
                    ),
                }
                Vec::new()
            }
        }
    }

    pub(crate) fn save_gossip_state(&self, bytes: &[u8]) -> anyhow::Result<()> {
        write_atomic(&self.dir.join(REPLICA_FILE), bytes)
    }

    /// Records a generation the node moved to while running (it met a newer
    /// life of itself), so the next start goes above it.
    pub(crate) fn save_generation(&self, generation: u64) -> anyhow::Result<()> {
        write_atomic(
            &self.dir.join("generation"),
            generation.to_string().as_bytes(),
        )
    }
}

fn read_json_or_default<T: serde::de::DeserializeOwned + Default>(
    path: &Path,
) -> anyhow::Result<T> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is corrupt; move it away to start fresh", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Write to a temporary file, fsync it, rename it over the target and fsync
/// the directory: after this returns, a crash leaves the old or the new
/// content, never a torn file, and the new content survives power loss.
///
/// A failure before the rename (a full disk, say) removes the temporary
/// file and leaves the old content: the write did not happen. Once the
/// rename is done the new content is what the file holds, so a failure to
/// fsync the directory after it is logged, not reported as a failed write
/// (the caller would otherwise tell its client "not saved" about data that
/// a restart will read back).
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    let written = (|| -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", path.display()));
    }
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        tracing::warn!(path = %path.display(), error = %e, "written, but the directory could not be synced");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_always_increases_and_tasks_roundtrip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let g1 = store.next_generation(1000).expect("g1");
        let g2 = store.next_generation(10).expect("g2"); // clock went backwards
        assert!(g2 > g1);
        let mut tasks = BTreeMap::new();
        tasks.insert(
            "t1".to_string(),
            serde_json::from_str::<TaskSpec>(r#"{"app":"/a","ip":"10.0.0.1"}"#).expect("spec"),
        );
        store.save_tasks(&tasks).expect("save");
        assert_eq!(store.load_tasks().expect("load"), tasks);
        fs::write(dir.path().join("tasks.json"), b"{oops").expect("write");
        let err = store.load_tasks().expect_err("corrupt").to_string();
        assert!(err.contains("corrupt"), "{err}");
    }

    /// Issue 12: an unreadable replica cache is a colder start, and is kept
    /// (moved aside), not overwritten by the next save.
    #[test]
    fn a_corrupt_replica_cache_is_moved_aside() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        assert!(store.load_gossip_state().is_empty(), "none yet");
        let garbage = b"\x01\xff\xff\xff\xff\xffnot a replica".to_vec();
        fs::write(dir.path().join(REPLICA_FILE), &garbage).expect("write");
        assert!(store.load_gossip_state().is_empty());
        assert!(!dir.path().join(REPLICA_FILE).exists(), "moved away");
        assert_eq!(
            fs::read(dir.path().join(REPLICA_CORRUPT)).expect("kept"),
            garbage
        );
        // A readable one is returned as it is and stays.
        let good = postcard::to_allocvec(&(1u8, Vec::<skein_proto::wire::OriginData>::new()))
            .expect("encode");
        store.save_gossip_state(&good).expect("save");
        assert_eq!(store.load_gossip_state(), good);
        assert!(dir.path().join(REPLICA_FILE).exists());
    }

    /// Issue 12, finding 7: a full disk. Needs root to mount a tiny tmpfs;
    /// run by `scripts/test` with the other root-only tests.
    #[test]
    #[ignore = "needs root (mounts a small filesystem)"]
    fn a_full_disk_fails_the_write_and_leaves_the_old_file_and_no_temporary() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mnt = dir.path().join("small");
        fs::create_dir(&mnt).expect("mkdir");
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
            .arg(&mnt)
            .status()
            .expect("mount");
        assert!(mounted.success(), "mounting a tmpfs (root?)");
        struct Unmount(PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg(&self.0).status();
            }
        }
        let _guard = Unmount(mnt.clone());
        let store = Store::open(&mnt).expect("open");
        let mut tasks = BTreeMap::new();
        let spec: TaskSpec = serde_json::from_str(r#"{"app":"/a","ip":"10.0.0.1"}"#).expect("spec");
        tasks.insert("t1".to_string(), spec.clone());
        store.save_tasks(&tasks).expect("a small write fits");
        // Far more than 64 KiB of tasks: the disk fills mid-write.
        let mut big = tasks.clone();
        for i in 0..2000 {
            big.insert(format!("task-{i}"), spec.clone());
        }
        let err = store.save_tasks(&big).expect_err("the disk is full");
        assert!(format!("{err:#}").contains("tasks.json"), "{err:#}");
        assert_eq!(store.load_tasks().expect("old file intact"), tasks);
        let leftovers: Vec<_> = fs::read_dir(&mnt)
            .expect("readdir")
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "tmp"))
            .collect();
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
        // Space freed, the next write succeeds.
        store.save_tasks(&tasks).expect("write after the failure");
    }
}
