//! CPU time from `/proc`, for the benchmarks that record how busy the daemon, the kernel's
//! threads and the rest of this (shared) machine were while they measured.

/// Clock ticks per second (`/proc` times are in ticks).
pub fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64).max(1.0)
}

/// CPU seconds (user + system) process `pid` has used, or `None` if its stat cannot be read.
pub fn process_cpu_checked(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks())
}

/// [`process_cpu_checked`], 0 if the stat cannot be read.
pub fn process_cpu(pid: u32) -> f64 {
    process_cpu_checked(pid).unwrap_or(0.0)
}

/// CPU seconds the kernel's threads (kthreadd and its children: writeback among them) have
/// used.
pub fn kernel_threads_cpu() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    let mut ticks = 0.0;
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let Some(rest) = stat.rfind(')').and_then(|i| stat.get(i + 2..)) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ppid: u32 = f.get(1).and_then(|v| v.parse().ok()).unwrap_or(0);
        if pid == 2 || ppid == 2 {
            let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            ticks += t(11) + t(12);
        }
    }
    ticks / clock_ticks()
}

/// CPU seconds the whole machine has been busy (all CPUs; idle and iowait excluded).
pub fn system_busy() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0.0;
    };
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let busy: f64 = cpu
        .split_whitespace()
        .skip(1)
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .filter_map(|(_, v)| v.parse::<f64>().ok())
        .sum();
    busy / clock_ticks()
}
