//! The process figures Prometheus users expect (`process_*`), read from `/proc/self` when
//! scraped: nothing is kept or sampled in between.

use std::fmt::Write as _;

/// What `/proc/self` says now; zeros where it cannot be read (not Linux).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Process {
    /// Resident set size.
    pub resident_bytes: u64,
    /// User and system CPU time.
    pub cpu_seconds: f64,
    /// Open file descriptors.
    pub open_fds: u64,
    /// The soft limit on them.
    pub max_fds: u64,
    /// When the process started, in Unix seconds.
    pub start_time_seconds: f64,
}

/// Clock ticks per second for `/proc/self/stat`: 100 on every Linux target roomcast builds
/// for (`sysconf(_SC_CLK_TCK)`; reading it would need libc for one constant).
const TICKS_PER_SECOND: f64 = 100.0;
const PAGE_BYTES: u64 = 4096;

impl Process {
    /// Reads `/proc/self` now. Counting open descriptors lists `/proc/self/fd`, one entry per
    /// connection: fine for a scrape every few seconds; the dashboard's once-a-second figures
    /// use [`read_usage`](Self::read_usage).
    pub fn read() -> Self {
        let mut p = Self::read_usage();
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            p.open_fds = dir.count() as u64;
        }
        if let Ok(limits) = std::fs::read_to_string("/proc/self/limits") {
            p.max_fds = limits
                .lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
        }
        p
    }

    /// Memory, CPU time and start time only (two small files), without the descriptors.
    pub fn read_usage() -> Self {
        let mut p = Self::default();
        if let Ok(statm) = std::fs::read_to_string("/proc/self/statm") {
            let resident = statm.split_whitespace().nth(1).and_then(|s| s.parse().ok());
            p.resident_bytes = resident.unwrap_or(0) * PAGE_BYTES;
        }
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            // Fields after the command name, which may hold spaces: from the last ')'.
            let fields: Vec<&str> = stat
                .rsplit_once(')')
                .map(|(_, rest)| rest.split_whitespace().collect())
                .unwrap_or_default();
            let field = |n: usize| fields.get(n - 3).and_then(|s| s.parse::<u64>().ok());
            let (utime, stime) = (field(14).unwrap_or(0), field(15).unwrap_or(0));
            p.cpu_seconds = (utime + stime) as f64 / TICKS_PER_SECOND;
            p.start_time_seconds = start_time(field(22).unwrap_or(0));
        }
        p
    }

    /// The `process_*` series, with HELP and TYPE.
    pub fn prometheus(&self, out: &mut String) {
        let rows: [(&str, &str, &str, f64); 5] = [
            (
                "process_resident_memory_bytes",
                "gauge",
                "resident memory size in bytes",
                self.resident_bytes as f64,
            ),
            (
                "process_cpu_seconds_total",
                "counter",
                "user and system CPU time spent in seconds",
                self.cpu_seconds,
            ),
            (
                "process_open_fds",
                "gauge",
                "open file descriptors",
                self.open_fds as f64,
            ),
            (
                "process_max_fds",
                "gauge",
                "the limit on open file descriptors",
                self.max_fds as f64,
            ),
            (
                "process_start_time_seconds",
                "gauge",
                "start time of the process since the Unix epoch in seconds",
                self.start_time_seconds,
            ),
        ];
        for (name, kind, help, value) in rows {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
    }
}

/// The process's start in Unix seconds, from its start in ticks after boot (`/proc/stat`'s
/// `btime` is the boot time).
fn start_time(ticks_after_boot: u64) -> f64 {
    let boot = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|b| b.trim().parse::<u64>().ok())
        })
        .unwrap_or(0);
    boot as f64 + ticks_after_boot as f64 / TICKS_PER_SECOND
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let p = Process::read();
        assert!(p.resident_bytes > 1 << 20, "{p:?}");
        assert!(p.open_fds >= 3 && p.max_fds >= p.open_fds, "{p:?}");
        assert!(p.start_time_seconds > 1.5e9, "{p:?}");
        let mut out = String::new();
        p.prometheus(&mut out);
        assert!(
            out.contains("# TYPE process_cpu_seconds_total counter\n"),
            "{out}"
        );
    }
}
