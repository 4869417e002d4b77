//! One shape for every kernel realizer (nftables, IPVS, VXLAN), and one
//! driver that runs any of them.
//!
//! A [`Dataplane`] says four things: what the kernel should hold for a
//! [`View`] (pure), what it holds now (reads the kernel), the changes from
//! one to the other (pure), and how to make them (writes the kernel). The
//! [`Driver`] owns everything else, identically for all of them: the
//! warm-up after a restart, wake-ups (a new view, the resync period, a
//! retry after a failure), the cache of what was last programmed, drift
//! detection and repair, counters and timings under the same metric names.
//! kube-proxy's single `syncProxyRules` against a fake `knftables` is the
//! model: each dataplane has an in-memory fake kernel, so the driver and the
//! planners are tested without root.

use std::fmt::Debug;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::view::View;

/// A kernel dataplane as the driver sees it.
pub(crate) trait Dataplane: Send + 'static {
    /// What the kernel holds of ours, in the dataplane's own model.
    type State: PartialEq + Debug + Send + Sync + 'static;
    /// The changes between two states.
    type Plan: Debug + Send;

    /// The name in logs and in the `realizer` label of metrics.
    fn name(&self) -> &'static str;
    /// What the kernel should hold for `view`. Pure.
    fn desired(&mut self, view: &View) -> Self::State;
    /// What the kernel holds now; `None` when it holds nothing of ours or
    /// nothing in a shape we can read (the plan then writes everything).
    fn observe(&mut self) -> anyhow::Result<Option<Self::State>>;
    /// The changes from `from` (`None`: nothing) to `to`, or `None` when
    /// there is nothing to do. Pure.
    fn plan(&self, from: Option<&Self::State>, to: &Self::State) -> Option<Self::Plan>;
    /// Makes the changes; returns how many there were. Atomic where the
    /// kernel allows it; on error the driver re-reads the kernel before
    /// trying again, so a partial apply is repaired.
    fn apply(&mut self, plan: &Self::Plan) -> anyhow::Result<usize>;
    /// How a step ended: `Ok` once the kernel holds what `desired` said
    /// (changed or already so), or the error. For dataplanes that report
    /// a status; nothing by default.
    fn stepped(&mut self, _result: Result<usize, &anyhow::Error>) {}
    /// Whether `desired` would change with time alone for the same view
    /// (something settling): the driver then steps again every
    /// [`TIME_STEP`] until it no longer does. Views are not rebuilt while
    /// nothing changes, so time must wake the realizer itself.
    fn waits_on_time(&self) -> bool {
        false
    }
}

/// How often a realizer that waits on time is stepped with the same view.
pub(crate) const TIME_STEP: Duration = Duration::from_millis(250);

/// The same counters for every realizer (`/metrics`: `skein_realizer_*`).
#[derive(Debug, Default)]
pub struct RealizerCounters {
    /// Plans applied successfully.
    pub applies: AtomicU64,
    /// Plans or kernel reads that failed.
    pub errors: AtomicU64,
    /// Changes made (rules, elements, addresses, entries).
    pub changes: AtomicU64,
    /// Times the kernel was found to differ from what we programmed.
    pub drift_repaired: AtomicU64,
    /// Kernel reads (at start, per resync, after a failure).
    pub observes: AtomicU64,
    /// Duration of the last apply, planning included.
    pub last_apply_us: AtomicU64,
    /// 1 once the first plan was applied (or found unnecessary).
    pub ready: AtomicU64,
}

/// How the driver is paced.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pacing {
    /// After a restart the kernel still holds the previous agent's rules,
    /// which keep serving: nothing is touched before this much uptime.
    pub warm_up: Duration,
    /// How often the kernel is read back and compared (drift repair).
    pub resync: Duration,
    /// First retry after a failure; doubles up to `resync`.
    pub retry: Duration,
}

/// Runs a [`Dataplane`] against the views it is given.
pub(crate) struct Driver<D: Dataplane> {
    dataplane: D,
    counters: Arc<RealizerCounters>,
    /// What we believe the kernel holds: `Some(state)` after a read or a
    /// successful apply; `None` when unknown (start, after a failure).
    programmed: Option<Option<D::State>>,
    failures: u32,
}

/// Why the driver woke up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wake {
    /// A new view.
    View,
    /// The resync period: read the kernel back.
    Resync,
    /// A retry after a failure.
    Retry,
    /// Time passed while the dataplane waited on it (same view).
    Time,
}

impl<D: Dataplane> Driver<D> {
    pub(crate) fn new(dataplane: D, counters: Arc<RealizerCounters>) -> Driver<D> {
        Driver {
            dataplane,
            counters,
            programmed: None,
            failures: 0,
        }
    }

    #[cfg(test)]
    pub(crate) fn counters(&self) -> &Arc<RealizerCounters> {
        &self.counters
    }

    #[cfg(test)]
    pub(crate) fn dataplane(&self) -> &D {
        &self.dataplane
    }

    #[cfg(test)]
    pub(crate) fn dataplane_mut(&mut self) -> &mut D {
        &mut self.dataplane
    }

    /// Whether the last step failed (the caller schedules a retry).
    pub(crate) fn failing(&self) -> bool {
        self.failures > 0
    }

    /// One step: brings the kernel to what `view` wants. Blocking (kernel
    /// calls); returns the number of changes made.
    pub(crate) fn step(&mut self, view: &View, wake: Wake) -> anyhow::Result<usize> {
        let started = Instant::now();
        let result = self.step_inner(view, wake, started);
        self.dataplane.stepped(result.as_ref().copied());
        match &result {
            Ok(_) => self.failures = 0,
            Err(e) => {
                self.failures = self.failures.saturating_add(1);
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                // Unknown until read again: the next step starts from the
                // kernel, whatever part of the plan made it there.
                self.programmed = None;
                tracing::warn!(
                    realizer = self.dataplane.name(),
                    error = %format!("{e:#}"),
                    failures = self.failures,
                    "cannot realize; retrying"
                );
            }
        }
        result
    }

    fn step_inner(&mut self, view: &View, wake: Wake, started: Instant) -> anyhow::Result<usize> {
        let name = self.dataplane.name();
        let desired = self.dataplane.desired(view);
        if self.programmed.is_none() || wake == Wake::Resync {
            self.counters.observes.fetch_add(1, Ordering::Relaxed);
            let observed = self.dataplane.observe()?;
            if let Some(believed) = &self.programmed {
                if *believed != observed {
                    self.counters.drift_repaired.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        realizer = name,
                        "the kernel changed behind our back; repairing"
                    );
                }
            }
            self.programmed = Some(observed);
        }
        let from = self.programmed.as_ref().and_then(Option::as_ref);
        let Some(plan) = self.dataplane.plan(from, &desired) else {
            self.counters.ready.store(1, Ordering::Relaxed);
            return Ok(0);
        };
        let changes = self.dataplane.apply(&plan)?;
        self.programmed = Some(Some(desired));
        let took = started.elapsed();
        self.counters.applies.fetch_add(1, Ordering::Relaxed);
        self.counters
            .changes
            .fetch_add(changes as u64, Ordering::Relaxed);
        self.counters
            .last_apply_us
            .store(took.as_micros() as u64, Ordering::Relaxed);
        self.counters.ready.store(1, Ordering::Relaxed);
        tracing::info!(
            realizer = name,
            changes,
            took_us = took.as_micros() as u64,
            "kernel updated"
        );
        Ok(changes)
    }
}

/// Runs `driver` until `views` closes: a step on every new view, a read-back
/// every `pacing.resync`, retries with backoff after failures. Kernel calls
/// run on the blocking pool; `started` is when the agent started (warm-up).
pub(crate) async fn run<D: Dataplane>(
    mut driver: Driver<D>,
    mut views: watch::Receiver<Arc<View>>,
    pacing: Pacing,
    started: Instant,
) {
    tokio::time::sleep(pacing.warm_up.saturating_sub(started.elapsed())).await;
    let mut resync = tokio::time::interval(pacing.resync);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    resync.reset(); // the first step below is the start-up read
    let mut wake = Wake::View;
    loop {
        let view = views.borrow_and_update().clone();
        let step = tokio::task::spawn_blocking(move || {
            let result = driver.step(&view, wake);
            (driver, result)
        })
        .await;
        driver = match step {
            Ok((driver, _)) => driver,
            Err(e) => {
                tracing::error!(error = %e, "realizer panicked; stopping it");
                return;
            }
        };
        let waits_on_time = driver.dataplane.waits_on_time();
        let retry = driver.failing().then(|| {
            let backoff = pacing
                .retry
                .saturating_mul(1 << driver.failures.min(8).saturating_sub(1));
            backoff.min(pacing.resync)
        });
        wake = tokio::select! {
            changed = views.changed() => match changed {
                Ok(()) => Wake::View,
                Err(_) => return,
            },
            _ = resync.tick() => Wake::Resync,
            _ = async {
                match retry {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            } => Wake::Retry,
            _ = async {
                if waits_on_time {
                    tokio::time::sleep(TIME_STEP).await
                } else {
                    std::future::pending().await
                }
            } => Wake::Time,
        };
    }
}

#[cfg(test)]
pub(crate) mod fake {
    //! An in-memory kernel for the driver's tests: a map of entries, with
    //! failures and tampering on demand.

    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    use super::Dataplane;
    use crate::view::View;

    #[derive(Debug, Default)]
    pub(crate) struct Kernel {
        pub entries: Option<BTreeMap<String, String>>,
        pub fail_next_apply: bool,
        pub writes: usize,
    }

    pub(crate) struct Fake {
        pub kernel: Arc<Mutex<Kernel>>,
        pub desired: Arc<Mutex<BTreeMap<String, String>>>,
    }

    #[derive(Debug)]
    pub(crate) struct Plan {
        pub set: Vec<(String, String)>,
        pub remove: Vec<String>,
    }

    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    impl Dataplane for Fake {
        type State = BTreeMap<String, String>;
        type Plan = Plan;

        fn name(&self) -> &'static str {
            "fake"
        }

        fn desired(&mut self, _view: &View) -> Self::State {
            lock(&self.desired).clone()
        }

        fn observe(&mut self) -> anyhow::Result<Option<Self::State>> {
            Ok(lock(&self.kernel).entries.clone())
        }

        fn plan(&self, from: Option<&Self::State>, to: &Self::State) -> Option<Plan> {
            let empty = BTreeMap::new();
            let from = from.unwrap_or(&empty);
            let set: Vec<_> = to
                .iter()
                .filter(|(k, v)| from.get(*k) != Some(*v))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let remove: Vec<_> = from
                .keys()
                .filter(|k| !to.contains_key(*k))
                .cloned()
                .collect();
            (!set.is_empty() || !remove.is_empty()).then_some(Plan { set, remove })
        }

        fn apply(&mut self, plan: &Plan) -> anyhow::Result<usize> {
            let mut k = lock(&self.kernel);
            if std::mem::take(&mut k.fail_next_apply) {
                anyhow::bail!("injected failure");
            }
            k.writes += 1;
            let entries = k.entries.get_or_insert_with(BTreeMap::new);
            for (key, value) in &plan.set {
                entries.insert(key.clone(), value.clone());
            }
            for key in &plan.remove {
                entries.remove(key);
            }
            Ok(plan.set.len() + plan.remove.len())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    use super::fake::{Fake, Kernel};
    use super::*;

    fn view() -> View {
        View::empty("n1", &Default::default())
    }

    fn entries(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    type Shared<T> = Arc<Mutex<T>>;

    fn setup(
        kernel: Option<BTreeMap<String, String>>,
        desired: BTreeMap<String, String>,
    ) -> (
        Driver<Fake>,
        Shared<Kernel>,
        Shared<BTreeMap<String, String>>,
    ) {
        let kernel = Arc::new(Mutex::new(Kernel {
            entries: kernel,
            ..Default::default()
        }));
        let desired = Arc::new(Mutex::new(desired));
        let driver = Driver::new(
            Fake {
                kernel: kernel.clone(),
                desired: desired.clone(),
            },
            Arc::default(),
        );
        (driver, kernel, desired)
    }

    #[test]
    fn warm_start_changes_nothing() {
        let want = entries(&[("a", "1"), ("b", "2")]);
        let (mut d, kernel, _) = setup(Some(want.clone()), want);
        assert_eq!(d.step(&view(), Wake::View).unwrap(), 0);
        assert_eq!(kernel.lock().unwrap().writes, 0, "nothing written");
        assert_eq!(d.counters.observes.load(Ordering::Relaxed), 1);
        assert_eq!(d.counters.ready.load(Ordering::Relaxed), 1);
        // Later views with the same desire read nothing and write nothing.
        assert_eq!(d.step(&view(), Wake::View).unwrap(), 0);
        assert_eq!(d.counters.observes.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn cold_start_writes_everything_then_only_changes() {
        let (mut d, kernel, desired) = setup(None, entries(&[("a", "1"), ("b", "2")]));
        assert_eq!(d.step(&view(), Wake::View).unwrap(), 2);
        *desired.lock().unwrap() = entries(&[("a", "1"), ("b", "3"), ("c", "4")]);
        assert_eq!(
            d.step(&view(), Wake::View).unwrap(),
            2,
            "b changed, c added"
        );
        assert_eq!(
            kernel.lock().unwrap().entries,
            Some(entries(&[("a", "1"), ("b", "3"), ("c", "4")]))
        );
        assert_eq!(
            d.counters.observes.load(Ordering::Relaxed),
            1,
            "a change does not read the kernel"
        );
        assert_eq!(d.counters.changes.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn drift_is_found_on_resync_and_repaired() {
        let want = entries(&[("a", "1"), ("b", "2")]);
        let (mut d, kernel, _) = setup(None, want.clone());
        d.step(&view(), Wake::View).unwrap();
        // Someone deletes an entry and adds one of their own.
        {
            let mut k = kernel.lock().unwrap();
            let e = k.entries.as_mut().unwrap();
            e.remove("a");
            e.insert("z".into(), "9".into());
        }
        assert_eq!(
            d.step(&view(), Wake::View).unwrap(),
            0,
            "not seen before a resync"
        );
        assert_eq!(d.step(&view(), Wake::Resync).unwrap(), 2);
        assert_eq!(d.counters.drift_repaired.load(Ordering::Relaxed), 1);
        assert_eq!(kernel.lock().unwrap().entries, Some(want));
        // A resync that finds what we left counts nothing.
        assert_eq!(d.step(&view(), Wake::Resync).unwrap(), 0);
        assert_eq!(d.counters.drift_repaired.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_failed_apply_is_counted_and_retried_from_the_kernel() {
        let (mut d, kernel, desired) = setup(None, entries(&[("a", "1")]));
        d.step(&view(), Wake::View).unwrap();
        *desired.lock().unwrap() = entries(&[("a", "1"), ("b", "2")]);
        kernel.lock().unwrap().fail_next_apply = true;
        assert!(d.step(&view(), Wake::View).is_err());
        assert!(d.failing());
        assert_eq!(d.counters.errors.load(Ordering::Relaxed), 1);
        assert_eq!(d.step(&view(), Wake::Retry).unwrap(), 1);
        assert!(!d.failing());
        assert_eq!(
            d.counters.observes.load(Ordering::Relaxed),
            2,
            "the retry read the kernel first"
        );
        assert_eq!(
            kernel.lock().unwrap().entries,
            Some(entries(&[("a", "1"), ("b", "2")]))
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_loop_follows_views_and_retries_after_a_failure() {
        let (d, kernel, desired) = setup(None, entries(&[("a", "1")]));
        let counters = d.counters.clone();
        let (tx, rx) = watch::channel(Arc::new(view()));
        kernel.lock().unwrap().fail_next_apply = true;
        let task = tokio::spawn(run(
            d,
            rx,
            Pacing {
                warm_up: Duration::ZERO,
                resync: Duration::from_secs(3600),
                retry: Duration::from_millis(10),
            },
            Instant::now(),
        ));
        let wait = |want: BTreeMap<String, String>| {
            let kernel = kernel.clone();
            async move {
                let deadline = Instant::now() + Duration::from_secs(10);
                while kernel.lock().unwrap().entries.as_ref() != Some(&want) {
                    assert!(Instant::now() < deadline, "kernel never reached {want:?}");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        };
        wait(entries(&[("a", "1")])).await;
        assert_eq!(counters.errors.load(Ordering::Relaxed), 1);
        *desired.lock().unwrap() = entries(&[("b", "2")]);
        tx.send_replace(Arc::new(view()));
        wait(entries(&[("b", "2")])).await;
        drop(tx);
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the loop ends when views close")
            .unwrap();
    }
}
