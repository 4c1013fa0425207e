//! The server's CPU time and resident memory, read from `/proc`.

/// Clock ticks per second of `/proc/PID/stat` (USER_HZ; 100 on Linux for decades).
const TICKS_PER_SECOND: f64 = 100.0;

/// CPU seconds of process `pid`: the sum of its threads' run time from
/// `/proc/PID/task/*/schedstat` (nanoseconds), or, where that is missing, user + system time
/// from `/proc/PID/stat`. The latter counts in 10 ms ticks: over an 8 s window at ~5,000
/// deliveries/s, one tick is ~7 % of a 4 µs-per-delivery figure.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    schedstat_seconds(pid).or_else(|| stat_seconds(pid))
}

fn schedstat_seconds(pid: u32) -> Option<f64> {
    let mut nanos = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let path = task.ok()?.path().join("schedstat");
        // A thread that ended since the listing has nothing more to count.
        let Ok(line) = std::fs::read_to_string(path) else {
            continue;
        };
        nanos += line.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    (nanos > 0).then_some(nanos as f64 / 1e9)
}

fn stat_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / TICKS_PER_SECOND)
}

/// Resident set size of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}
