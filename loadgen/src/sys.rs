//! OS plumbing: file-descriptor limits, CPU accounting and /proc readings of the server.

/// The OS cannot hold the run as configured; each says what to change.
#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    #[error("getrlimit(RLIMIT_NOFILE): {0}")]
    Getrlimit(std::io::Error),
    #[error(
        "the OS will not allow {clients} clients: they need about {needed} open files, but \
         this process may open only {soft} (RLIMIT_NOFILE soft {soft}, hard {hard}). \
         Raise the hard limit (as root: `ulimit -Hn {needed}`, or `nofile` in \
         /etc/security/limits.conf / LimitNOFILE= for a service) or ask for fewer clients."
    )]
    OpenFiles {
        clients: usize,
        needed: u64,
        soft: u64,
        /// The hard limit as a number or `unlimited`.
        hard: String,
    },
    #[error(
        "the OS will not allow {per_destination} connections to one address: \
         net.ipv4.ip_local_port_range ({lo}-{hi}) has only {ports} local ports. Widen it \
         (sysctl -w net.ipv4.ip_local_port_range=\"1024 65535\"), add more --url \
         targets (e.g. 127.0.0.2, 127.0.0.3 for a server on 0.0.0.0) or use fewer clients."
    )]
    LocalPorts {
        per_destination: usize,
        lo: u64,
        hi: u64,
        ports: u64,
    },
}

/// File descriptors loadgen needs besides one per client (stdio, epoll, the runtime's own,
/// files written at the end).
pub const FD_MARGIN: u64 = 64;

/// Raises the soft RLIMIT_NOFILE to the hard limit and fails with an explanation when even
/// that cannot hold `clients` connections. Returns the soft limit now in force.
pub fn raise_nofile(clients: usize) -> Result<u64, LimitError> {
    let needed = clients as u64 + FD_MARGIN;
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
        return Err(LimitError::Getrlimit(std::io::Error::last_os_error()));
    }
    let hard = rl.rlim_max;
    // Linux refuses RLIM_INFINITY for NOFILE; nr_open is the real ceiling.
    let target = if hard == libc::RLIM_INFINITY {
        read_u64("/proc/sys/fs/nr_open").unwrap_or(1 << 20) as libc::rlim_t
    } else {
        hard
    };
    if rl.rlim_cur < target {
        let want = libc::rlimit {
            rlim_cur: target,
            rlim_max: hard,
        };
        // SAFETY: setrlimit only reads the struct. Failure leaves the old limit, checked below.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) };
        // SAFETY: as above.
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) };
    }
    // rlim_t is u64 here but narrower on some targets.
    #[allow(clippy::unnecessary_cast)]
    let soft = rl.rlim_cur as u64;
    if soft < needed {
        let hard = if hard == libc::RLIM_INFINITY {
            "unlimited".to_string()
        } else {
            hard.to_string()
        };
        return Err(LimitError::OpenFiles {
            clients,
            needed,
            soft,
            hard,
        });
    }
    Ok(soft)
}

/// Fails when more clients would go to one destination than there are local ports to use.
pub fn check_port_range(per_destination: usize) -> Result<(), LimitError> {
    let Ok(s) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range") else {
        return Ok(());
    };
    let mut it = s.split_whitespace().filter_map(|v| v.parse::<u64>().ok());
    let (Some(lo), Some(hi)) = (it.next(), it.next()) else {
        return Ok(());
    };
    let ports = hi.saturating_sub(lo) + 1;
    if per_destination as u64 > ports {
        return Err(LimitError::LocalPorts {
            per_destination,
            lo,
            hi,
            ports,
        });
    }
    Ok(())
}

fn read_u64(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// User plus system CPU seconds consumed by this process so far.
pub fn self_cpu_seconds() -> f64 {
    // SAFETY: an all-zero rusage is a valid value for getrusage to overwrite.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage only writes into the struct we pass.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// User plus system CPU seconds of another process, from /proc/PID/stat.
pub fn proc_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses; fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // rest starts at field 3 (state); utime and stime are fields 14 and 15.
    let utime: f64 = fields.nth(11)?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some((utime + stime) / clock_ticks())
}

/// (VmRSS, VmHWM) in KiB from /proc/PID/status.
pub fn proc_rss_kb(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        line[name.len()..].split_whitespace().next()?.parse().ok()
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

pub fn process_exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}/stat")).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_proc_entries() {
        let me = std::process::id();
        assert!(process_exists(me));
        assert!(proc_cpu_seconds(me).is_some());
        let (rss, hwm) = proc_rss_kb(me).unwrap();
        assert!(rss > 0 && hwm >= rss);
        assert!(self_cpu_seconds() >= 0.0);
    }
}
