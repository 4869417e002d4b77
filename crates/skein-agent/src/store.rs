//! The data dir: what this node must not forget across a restart.
//!
//! - `tasks.json` and `tasks.journal`: this node's own tasks, because this
//!   node is their only writer. A task write is appended to the journal
//!   (one JSON line, fsynced) before it is acknowledged; the journal is
//!   folded into `tasks.json` (written whole, atomically) once it outgrows
//!   the snapshot, so a write costs one line, not the whole task list.
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
    journal: std::sync::Mutex<Journal>,
}

const TASKS_FILE: &str = "tasks.json";
const JOURNAL_FILE: &str = "tasks.journal";
/// The journal is folded into `tasks.json` once it is longer than this and
/// than twice the snapshot.
const JOURNAL_FOLD_MIN: u64 = 256 * 1024;

/// One task write, as a journal line.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum TaskOp {
    Put { id: String, spec: TaskSpec },
    Delete { id: String },
}

impl TaskOp {
    fn apply(&self, tasks: &mut BTreeMap<String, TaskSpec>) {
        match self {
            TaskOp::Put { id, spec } => {
                tasks.insert(id.clone(), spec.clone());
            }
            TaskOp::Delete { id } => {
                tasks.remove(id);
            }
        }
    }
}

#[derive(Default)]
struct Journal {
    /// Open for appending once the first line is written.
    file: Option<File>,
    /// Bytes in the journal.
    len: u64,
    /// Bytes of the last `tasks.json`.
    snapshot_len: u64,
}

impl Store {
    pub(crate) fn open(dir: &Path) -> anyhow::Result<Store> {
        fs::create_dir_all(dir)
            .with_context(|| format!("cannot create data dir {}", dir.display()))?;
        Ok(Store {
            dir: dir.to_path_buf(),
            journal: Default::default(),
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

    /// This node's tasks: the snapshot, then the journal replayed. A last
    /// line cut short (a crash while appending it, never acknowledged) is
    /// dropped; any other line that does not decode is an error, as a
    /// corrupt snapshot is: these are the only copy of this node's tasks.
    pub(crate) fn load_tasks(&self) -> anyhow::Result<BTreeMap<String, TaskSpec>> {
        let mut tasks: BTreeMap<String, TaskSpec> =
            read_json_or_default(&self.dir.join(TASKS_FILE))?;
        let path = self.dir.join(JOURNAL_FILE);
        let text = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let mut torn = false;
        let lines: Vec<&[u8]> = text.split(|&b| b == b'\n').collect();
        for (i, line) in lines.iter().enumerate() {
            if line.is_empty() {
                continue;
            }
            match serde_json::from_slice::<TaskOp>(line) {
                Ok(op) => op.apply(&mut tasks),
                // Only the last line can be cut short by a crash.
                Err(_) if i + 1 == lines.len() => torn = true,
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!(
                            "{} line {} is corrupt; move it away to start from {TASKS_FILE}",
                            path.display(),
                            i + 1
                        )
                    })
                }
            }
        }
        if torn {
            tracing::warn!(path = %path.display(), "dropping a task write cut short by a crash (it was never acknowledged)");
        }
        let mut journal = self
            .journal
            .lock()
            .map_err(|_| anyhow::anyhow!("journal lock poisoned"))?;
        if torn || !text.is_empty() {
            // Start the next journal from a snapshot of what was read.
            self.fold(&mut journal, &tasks)?;
        }
        journal.snapshot_len = fs::metadata(self.dir.join(TASKS_FILE)).map_or(0, |m| m.len());
        Ok(tasks)
    }

    /// Makes `op` on `current` (this node's tasks before it) durable: one
    /// fsynced journal line, or, when the journal has outgrown the
    /// snapshot, a new snapshot of the result. On error nothing changed.
    pub(crate) fn record_task(
        &self,
        op: &TaskOp,
        current: &BTreeMap<String, TaskSpec>,
    ) -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(op)?;
        line.push(b'\n');
        let mut journal = self
            .journal
            .lock()
            .map_err(|_| anyhow::anyhow!("journal lock poisoned"))?;
        let len = journal.len + line.len() as u64;
        if len > JOURNAL_FOLD_MIN.max(2 * journal.snapshot_len) {
            let mut next = current.clone();
            op.apply(&mut next);
            return self.fold(&mut journal, &next);
        }
        let path = self.dir.join(JOURNAL_FILE);
        if journal.file.is_none() {
            let file = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            journal.len = file.metadata().map_or(0, |m| m.len());
            journal.file = Some(file);
        }
        let before = journal.len;
        let Some(file) = journal.file.as_mut() else {
            anyhow::bail!("{} is not open", path.display());
        };
        if let Err(e) = file.write_all(&line).and_then(|()| file.sync_data()) {
            // A part of the line may be there: cut it, or the next line
            // would follow a broken one.
            let _ = file.set_len(before);
            journal.file = None;
            return Err(e).with_context(|| format!("cannot write {}", path.display()));
        }
        journal.len = before + line.len() as u64;
        Ok(())
    }

    /// Writes `tasks` as the snapshot, then empties the journal (a crash in
    /// between replays operations the snapshot holds already: harmless).
    fn fold(
        &self,
        journal: &mut Journal,
        tasks: &BTreeMap<String, TaskSpec>,
    ) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec_pretty(tasks)?;
        write_atomic(&self.dir.join(TASKS_FILE), &bytes)?;
        journal.snapshot_len = bytes.len() as u64;
        journal.file = None;
        let path = self.dir.join(JOURNAL_FILE);
        match File::create(&path).and_then(|f| f.sync_all()) {
            Ok(()) => journal.len = 0,
            Err(e) => {
                return Err(e).with_context(|| format!("cannot empty {}", path.display()));
            }
        }
        Ok(())
    }

    #[cfg(test)]
    pub(crate) fn save_tasks(&self, tasks: &BTreeMap<String, TaskSpec>) -> anyhow::Result<()> {
        let mut journal = self
            .journal
            .lock()
            .map_err(|_| anyhow::anyhow!("journal lock poisoned"))?;
        self.fold(&mut journal, tasks)
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

    fn spec(ip: u8) -> TaskSpec {
        serde_json::from_str(&format!(r#"{{"app":"/a","ip":"10.0.0.{ip}"}}"#)).expect("spec")
    }

    /// Issue 12: a task write appends one journal line instead of
    /// rewriting every task; whatever the writes and restarts, what is
    /// loaded is what was acknowledged.
    #[test]
    fn task_writes_are_journaled_and_survive_restarts() {
        use proptest::prelude::*;
        let ops = prop::collection::vec((0u8..6, any::<bool>(), 0u8..4, 0u8..10), 1..60);
        proptest!(ProptestConfig::with_cases(64), |(ops in ops)| {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut store = Store::open(dir.path()).expect("open");
            let mut own = store.load_tasks().expect("load");
            let mut model = BTreeMap::new();
            for (id, put, ip, reopen) in ops {
                let id = format!("t{id}");
                let op = if put {
                    TaskOp::Put { id: id.clone(), spec: spec(ip) }
                } else {
                    TaskOp::Delete { id: id.clone() }
                };
                store.record_task(&op, &own).expect("record");
                op.apply(&mut own);
                op.apply(&mut model);
                if reopen == 0 {
                    store = Store::open(dir.path()).expect("reopen");
                    own = store.load_tasks().expect("reload");
                    prop_assert_eq!(&own, &model);
                }
            }
            let again = Store::open(dir.path()).expect("reopen");
            prop_assert_eq!(again.load_tasks().expect("reload"), model);
        });
    }

    #[test]
    fn a_write_is_one_line_and_the_journal_is_folded_when_long() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let mut own = store.load_tasks().expect("load");
        for i in 0..3u8 {
            let op = TaskOp::Put {
                id: format!("t{i}"),
                spec: spec(i),
            };
            store.record_task(&op, &own).expect("record");
            op.apply(&mut own);
        }
        assert!(
            !dir.path().join(TASKS_FILE).exists(),
            "no snapshot rewritten per write"
        );
        let journal = fs::read_to_string(dir.path().join(JOURNAL_FILE)).expect("journal");
        assert_eq!(journal.lines().count(), 3);
        // Enough writes to outgrow the fold threshold: the journal is folded
        // into the snapshot and starts again.
        let mut i = 0u32;
        while fs::metadata(dir.path().join(TASKS_FILE)).is_err() {
            let op = TaskOp::Put {
                id: format!("many{i}"),
                spec: spec(1),
            };
            store.record_task(&op, &own).expect("record");
            op.apply(&mut own);
            i += 1;
            assert!(i < 100_000, "never folded");
        }
        assert!(
            fs::metadata(dir.path().join(JOURNAL_FILE))
                .expect("journal")
                .len()
                < 1024
        );
        let again = Store::open(dir.path()).expect("reopen");
        assert_eq!(again.load_tasks().expect("reload"), own);
    }

    #[test]
    fn a_torn_last_line_is_dropped_and_a_broken_middle_line_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let own = store.load_tasks().expect("load");
        let op = TaskOp::Put {
            id: "t1".into(),
            spec: spec(1),
        };
        store.record_task(&op, &own).expect("record");
        let path = dir.path().join(JOURNAL_FILE);
        let mut text = fs::read(&path).expect("journal");
        text.extend_from_slice(br#"{"put":{"id":"t2","sp"#);
        fs::write(&path, &text).expect("tear");
        let loaded = Store::open(dir.path())
            .expect("open")
            .load_tasks()
            .expect("torn tail dropped");
        assert_eq!(loaded.keys().collect::<Vec<_>>(), ["t1"]);
        // Folded at load: the torn line is gone for good.
        assert_eq!(fs::metadata(&path).expect("journal").len(), 0);
        fs::write(&path, b"{oops}\n{\"delete\":{\"id\":\"t1\"}}\n").expect("write");
        let err = Store::open(dir.path())
            .expect("open")
            .load_tasks()
            .expect_err("corrupt");
        assert!(format!("{err:#}").contains("line 1 is corrupt"), "{err:#}");
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
