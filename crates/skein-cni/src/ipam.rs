//! Container addresses: which one a container gets ([`choose`], pure) and
//! where that is remembered ([`Store`], one file per address).
//!
//! The store is laid out like the reference host-local plugin's, so it
//! survives restarts of the agent and of the plugin and needs no daemon:
//!
//! ```text
//! <dataDir>/<name>/<bridge>.lock    flock(2)ed around every read-modify-write
//! <dataDir>/<name>/<bridge>/<ip>    "<container id>\r\n<ifname>"
//! ```
//!
//! Concurrent ADDs (a runtime starting many containers at once runs many
//! plugin processes) are serialized by the lock; each one re-reads the
//! directory under it, so the decision is always taken on the current
//! state. The lowest free address wins, which keeps allocations compact and
//! the choice easy to predict in tests.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;

use crate::error::{code, CniError};

/// How long an ADD/DEL waits for another plugin process to finish with the
/// store before answering "try again later" (code 11).
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(30);

/// The container interface an address belongs to (the spec's unique key of
/// an attachment).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Owner {
    pub container_id: String,
    pub ifname: String,
}

impl Owner {
    pub fn new(container_id: impl Into<String>, ifname: impl Into<String>) -> Owner {
        Owner {
            container_id: container_id.into(),
            ifname: ifname.into(),
        }
    }

    fn to_file(&self) -> String {
        format!("{}\r\n{}", self.container_id, self.ifname)
    }

    /// `None` for a file we cannot read as an owner: its address still
    /// counts as taken (never hand out what might be in use).
    fn from_file(text: &str) -> Option<Owner> {
        let mut lines = text.lines().map(|l| l.trim());
        let id = lines.next().filter(|s| !s.is_empty())?;
        let ifname = lines.next().filter(|s| !s.is_empty())?;
        Some(Owner::new(id, ifname))
    }
}

/// Every address with an allocation file, and whose it is.
pub type Allocations = BTreeMap<Ipv4Addr, Option<Owner>>;

/// The addresses a bridge hands out: its subnet without the network
/// address, the broadcast address and the gateway (the bridge's own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool {
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
}

impl Pool {
    pub fn is_usable(&self, ip: Ipv4Addr) -> bool {
        self.subnet.contains(&ip)
            && ip != self.subnet.network()
            && ip != self.subnet.broadcast()
            && ip != self.gateway
    }

    /// Usable addresses, lowest first.
    pub fn usable(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        let first = u32::from(self.subnet.network());
        let last = u32::from(self.subnet.broadcast());
        (first..=last)
            .map(Ipv4Addr::from)
            .filter(|ip| self.is_usable(*ip))
    }

    /// How many addresses can be handed out (config validation keeps the
    /// prefix at /30 or shorter, so the gateway is always one of the hosts).
    pub fn capacity(&self) -> u64 {
        let all = 1u64 << (32 - u32::from(self.subnet.prefix_len()));
        let gateway_inside = self.subnet.contains(&self.gateway)
            && self.gateway != self.subnet.network()
            && self.gateway != self.subnet.broadcast();
        all.saturating_sub(2 + u64::from(gateway_inside))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// The owner already holds this address (a repeated ADD).
    Existing(Ipv4Addr),
    /// Newly taken: nobody holds it.
    Fresh(Ipv4Addr),
}

impl Choice {
    pub fn ip(self) -> Ipv4Addr {
        match self {
            Choice::Existing(ip) | Choice::Fresh(ip) => ip,
        }
    }
}

/// Which address `who` gets. Pure: the owner's own address if it has one in
/// the pool (so a repeated ADD is idempotent), else the lowest usable
/// address without an allocation.
pub fn choose(pool: &Pool, allocs: &Allocations, who: &Owner) -> Result<Choice, CniError> {
    if let Some(ip) = owned_by(allocs, who)
        .into_iter()
        .find(|ip| pool.is_usable(*ip))
    {
        return Ok(Choice::Existing(ip));
    }
    pool.usable()
        .find(|ip| !allocs.contains_key(ip))
        .map(Choice::Fresh)
        .ok_or_else(|| exhausted(pool))
}

pub fn exhausted(pool: &Pool) -> CniError {
    CniError::new(
        code::SUBNET_EXHAUSTED,
        format!(
            "subnet exhausted: all {} addresses of {} are allocated",
            pool.capacity(),
            pool.subnet
        ),
    )
}

/// The addresses held by `who`, lowest first. Normally none or one; more
/// only if the files were edited by hand, and DEL then frees them all.
pub fn owned_by(allocs: &Allocations, who: &Owner) -> Vec<Ipv4Addr> {
    allocs
        .iter()
        .filter(|(_, owner)| owner.as_ref() == Some(who))
        .map(|(ip, _)| *ip)
        .collect()
}

/// The allocation files of one bridge of one network.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
    lock: PathBuf,
    lock_timeout: Duration,
}

impl Store {
    pub fn new(data_dir: &Path, network: &str, bridge: &str) -> Store {
        let net_dir = data_dir.join(network);
        Store {
            dir: net_dir.join(bridge),
            lock: net_dir.join(format!("{bridge}.lock")),
            lock_timeout: LOCK_TIMEOUT,
        }
    }

    pub fn with_lock_timeout(mut self, timeout: Duration) -> Store {
        self.lock_timeout = timeout;
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn lock_path(&self) -> &Path {
        &self.lock
    }

    /// ADD's half: the owner's address, taken and persisted if it is new.
    pub fn allocate(&self, pool: &Pool, who: &Owner) -> Result<Choice, CniError> {
        let _lock = self.lock()?;
        let allocs = self.read()?;
        let choice = choose(pool, &allocs, who)?;
        if let Choice::Fresh(ip) = choice {
            self.write(ip, who)?;
        }
        Ok(choice)
    }

    /// DEL's half: frees every address `who` holds and returns them (empty
    /// when there was nothing, which is not an error). Files of other owners
    /// are never touched.
    pub fn release(&self, who: &Owner) -> Result<Vec<Ipv4Addr>, CniError> {
        let _lock = self.lock()?;
        let owned = owned_by(&self.read()?, who);
        for ip in &owned {
            let path = self.dir.join(ip.to_string());
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(CniError::io(format!("removing {}", path.display()), e)),
            }
        }
        if !owned.is_empty() {
            sync_dir(&self.dir)?;
        }
        Ok(owned)
    }

    /// CHECK's half: the owner's address, if any.
    pub fn lookup(&self, who: &Owner) -> Result<Option<Ipv4Addr>, CniError> {
        let _lock = self.lock()?;
        Ok(owned_by(&self.read()?, who).into_iter().next())
    }

    /// Everything allocated, read under the lock.
    pub fn snapshot(&self) -> Result<Allocations, CniError> {
        let _lock = self.lock()?;
        self.read()
    }

    fn lock(&self) -> Result<Lock, CniError> {
        fs::create_dir_all(&self.dir)
            .map_err(|e| CniError::io(format!("creating {}", self.dir.display()), e))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&self.lock)
            .map_err(|e| CniError::io(format!("opening lock {}", self.lock.display()), e))?;
        // Non-blocking attempts, so a wedged holder turns into code 11
        // instead of a runtime waiting forever on us.
        let deadline = Instant::now() + self.lock_timeout;
        loop {
            // SAFETY: flock on a descriptor we own; no memory is involved.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc == 0 {
                return Ok(Lock(file));
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EWOULDBLOCK) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Some(libc::EWOULDBLOCK) => {
                    return Err(CniError::new(
                        code::TRY_AGAIN_LATER,
                        format!(
                            "{} is still locked by another skein-cni after {:?}",
                            self.lock.display(),
                            self.lock_timeout
                        ),
                    ))
                }
                _ => {
                    return Err(CniError::io(
                        format!("locking {}", self.lock.display()),
                        err,
                    ))
                }
            }
        }
    }

    /// Only under the lock.
    fn read(&self) -> Result<Allocations, CniError> {
        let mut allocs = Allocations::new();
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(allocs),
            Err(e) => return Err(CniError::io(format!("reading {}", self.dir.display()), e)),
        };
        for entry in entries {
            let entry =
                entry.map_err(|e| CniError::io(format!("reading {}", self.dir.display()), e))?;
            // Anything not named like an address (our temp files) is not an
            // allocation.
            let Some(ip) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<Ipv4Addr>().ok())
            else {
                continue;
            };
            let text = match fs::read(entry.path()) {
                Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(CniError::io(
                        format!("reading {}", entry.path().display()),
                        e,
                    ))
                }
            };
            allocs.insert(ip, Owner::from_file(&text));
        }
        Ok(allocs)
    }

    /// Only under the lock. The file appears complete or not at all (written
    /// aside, fsynced, then linked into place), so a crash mid-ADD never
    /// leaves a half-written owner behind; linking rather than renaming
    /// refuses to overwrite an allocation we did not see.
    fn write(&self, ip: Ipv4Addr, who: &Owner) -> Result<(), CniError> {
        let path = self.dir.join(ip.to_string());
        let tmp = self.dir.join(format!(".{ip}.{}.tmp", std::process::id()));
        let result = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(who.to_file().as_bytes())?;
            f.sync_all()?;
            fs::hard_link(&tmp, &path)
        })();
        let _ = fs::remove_file(&tmp);
        result.map_err(|e| CniError::io(format!("writing allocation {}", path.display()), e))?;
        sync_dir(&self.dir)
    }
}

/// Held while the store is read and changed; closing the file unlocks.
struct Lock(#[allow(dead_code)] File);

fn sync_dir(dir: &Path) -> Result<(), CniError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| CniError::io(format!("syncing {}", dir.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn pool(subnet: &str, gateway: &str) -> Pool {
        Pool {
            subnet: subnet.parse().unwrap(),
            gateway: gateway.parse().unwrap(),
        }
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    /// Applies one ADD to the model the way [`Store::allocate`] does.
    fn add(pool: &Pool, allocs: &mut Allocations, who: &Owner) -> Result<Choice, CniError> {
        let choice = choose(pool, allocs, who)?;
        if let Choice::Fresh(ip) = choice {
            assert!(
                allocs.insert(ip, Some(who.clone())).is_none(),
                "{ip} handed out while allocated"
            );
        }
        Ok(choice)
    }

    fn del(allocs: &mut Allocations, who: &Owner) -> Vec<Ipv4Addr> {
        let owned = owned_by(allocs, who);
        for ip in &owned {
            allocs.remove(ip);
        }
        owned
    }

    #[test]
    fn lowest_free_skips_network_and_gateway() {
        let p = pool("9.0.1.0/25", "9.0.1.1");
        let mut a = Allocations::new();
        let c1 = Owner::new("c1", "eth0");
        let c2 = Owner::new("c2", "eth0");
        assert_eq!(add(&p, &mut a, &c1).unwrap(), Choice::Fresh(ip("9.0.1.2")));
        assert_eq!(add(&p, &mut a, &c2).unwrap(), Choice::Fresh(ip("9.0.1.3")));
        // Idempotent.
        assert_eq!(
            add(&p, &mut a, &c1).unwrap(),
            Choice::Existing(ip("9.0.1.2"))
        );
        // Freed addresses are reused, lowest first.
        assert_eq!(del(&mut a, &c1), vec![ip("9.0.1.2")]);
        let c3 = Owner::new("c3", "eth0");
        assert_eq!(add(&p, &mut a, &c3).unwrap(), Choice::Fresh(ip("9.0.1.2")));
    }

    #[test]
    fn gateway_in_the_middle_and_the_upper_half() {
        let p = pool("9.0.1.128/25", "9.0.1.129");
        assert_eq!(p.usable().next(), Some(ip("9.0.1.130")));
        assert_eq!(p.usable().last(), Some(ip("9.0.1.254")));
        assert_eq!(p.capacity(), 125);
        let p = pool("10.0.0.0/29", "10.0.0.3");
        let all: Vec<_> = p.usable().collect();
        assert_eq!(
            all,
            ["10.0.0.1", "10.0.0.2", "10.0.0.4", "10.0.0.5", "10.0.0.6"].map(ip)
        );
        assert_eq!(p.capacity(), 5);
    }

    #[test]
    fn same_container_other_ifname_is_another_owner() {
        let p = pool("10.0.0.0/29", "10.0.0.1");
        let mut a = Allocations::new();
        let e0 = Owner::new("c1", "eth0");
        let e1 = Owner::new("c1", "eth1");
        assert_ne!(
            add(&p, &mut a, &e0).unwrap().ip(),
            add(&p, &mut a, &e1).unwrap().ip()
        );
    }

    #[test]
    fn exhaustion_is_101_and_names_the_subnet() {
        let p = pool("10.0.0.0/30", "10.0.0.1");
        let mut a = Allocations::new();
        assert_eq!(
            add(&p, &mut a, &Owner::new("c1", "eth0")).unwrap(),
            Choice::Fresh(ip("10.0.0.2"))
        );
        let err = add(&p, &mut a, &Owner::new("c2", "eth0")).unwrap_err();
        assert_eq!(err.code, code::SUBNET_EXHAUSTED);
        assert_eq!(
            err.msg,
            "subnet exhausted: all 1 addresses of 10.0.0.0/30 are allocated"
        );
        // The owner of the only address still gets it back.
        assert!(add(&p, &mut a, &Owner::new("c1", "eth0")).is_ok());
    }

    #[test]
    fn unreadable_files_count_as_taken() {
        let p = pool("10.0.0.0/29", "10.0.0.1");
        let mut a = Allocations::new();
        a.insert(ip("10.0.0.2"), None);
        assert_eq!(
            choose(&p, &a, &Owner::new("c1", "eth0")).unwrap(),
            Choice::Fresh(ip("10.0.0.3"))
        );
    }

    #[test]
    fn an_owned_address_outside_the_pool_is_not_reused() {
        // The agent moved the bridge to another subnet: the stale file is
        // the container's, but not an address it can use here.
        let p = pool("10.0.0.0/29", "10.0.0.1");
        let who = Owner::new("c1", "eth0");
        let mut a = Allocations::new();
        a.insert(ip("10.9.9.9"), Some(who.clone()));
        assert_eq!(choose(&p, &a, &who).unwrap(), Choice::Fresh(ip("10.0.0.2")));
    }

    #[test]
    fn owner_file_round_trip() {
        let who = Owner::new("abc", "eth0");
        assert_eq!(Owner::from_file(&who.to_file()), Some(who.clone()));
        assert_eq!(Owner::from_file("abc\neth0\n"), Some(who));
        assert_eq!(Owner::from_file(""), None);
        assert_eq!(Owner::from_file("abc"), None);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Add(usize),
        Del(usize),
    }

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        // Containers 0..8 on a /29 with 5 usable addresses: exhaustion and
        // reuse both happen often. Container 7's ifname is eth1 of 6's id.
        prop::collection::vec(
            prop_oneof![(0usize..8).prop_map(Op::Add), (0usize..8).prop_map(Op::Del),],
            1..60,
        )
    }

    fn owner(i: usize) -> Owner {
        if i == 7 {
            Owner::new("c6", "eth1")
        } else {
            Owner::new(format!("c{i}"), "eth0")
        }
    }

    proptest! {
        #[test]
        fn any_sequence_keeps_addresses_unique(ops in ops(), gw in 1u32..7) {
            let p = Pool {
                subnet: "10.1.2.8/29".parse().unwrap(),
                gateway: Ipv4Addr::from(u32::from(ip("10.1.2.8")) + gw),
            };
            let mut allocs = Allocations::new();
            // What each live container was told, to check idempotence.
            let mut told: BTreeMap<Owner, Ipv4Addr> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Add(i) => {
                        let who = owner(i);
                        let live = told.len() as u64;
                        match add(&p, &mut allocs, &who) {
                            Ok(choice) => {
                                let got = choice.ip();
                                prop_assert!(p.is_usable(got), "{got} is network/broadcast/gateway");
                                prop_assert_ne!(got, p.gateway);
                                if let Some(before) = told.get(&who) {
                                    prop_assert_eq!(choice, Choice::Existing(*before));
                                } else {
                                    prop_assert!(matches!(choice, Choice::Fresh(_)));
                                    told.insert(who, got);
                                }
                            }
                            Err(e) => {
                                prop_assert_eq!(e.code, code::SUBNET_EXHAUSTED);
                                prop_assert!(!told.contains_key(&who));
                                prop_assert_eq!(live, p.capacity());
                            }
                        }
                    }
                    Op::Del(i) => {
                        let who = owner(i);
                        let before = allocs.clone();
                        let freed = del(&mut allocs, &who);
                        match told.remove(&who) {
                            Some(ip) => prop_assert_eq!(freed, vec![ip]),
                            None => {
                                prop_assert!(freed.is_empty());
                                prop_assert_eq!(&allocs, &before, "DEL of nothing changed the store");
                            }
                        }
                    }
                }
                // No two live containers share an address, and the store
                // holds exactly the live ones.
                let distinct: BTreeSet<_> = told.values().collect();
                prop_assert_eq!(distinct.len(), told.len());
                let model: Allocations = told.iter().map(|(o, ip)| (*ip, Some(o.clone()))).collect();
                prop_assert_eq!(&allocs, &model);
            }
        }
    }
}
