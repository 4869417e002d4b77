//! Process resource readings from /proc (Linux only; elsewhere they read 0).

use std::time::Instant;

/// Resident set size of this process, in bytes (VmRSS of /proc/self/status,
/// which is /proc/self/statm's second field already converted from pages).
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
        })
        .map_or(0, |kib| kib * 1024)
}

/// CPU time (user + system, all threads) this process has used, in seconds.
pub fn cpu_seconds() -> f64 {
    // Fields 14 and 15 of /proc/self/stat, counted after the parenthesised
    // command name (which may itself contain spaces).
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // rest starts at field 3 (state): utime is field 14 → index 11.
    // USER_HZ is 100 on every Linux architecture /proc exposes it for.
    (ticks(11) + ticks(12)) as f64 / 100.0
}

pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// CPU utilisation of a span of the run, as a fraction of all cores.
pub struct CpuMeter {
    wall: Instant,
    cpu: f64,
}

impl CpuMeter {
    pub fn start() -> Self {
        CpuMeter {
            wall: Instant::now(),
            cpu: cpu_seconds(),
        }
    }

    /// Fraction of the machine's cores busy since `start` (1.0 = all of them).
    pub fn utilisation(&self) -> f64 {
        let wall = self.wall.elapsed().as_secs_f64();
        if wall <= 0.0 {
            return 0.0;
        }
        (cpu_seconds() - self.cpu) / wall / cores() as f64
    }
}
