//! CPU time used by this process (user + system), to report how many cores a phase kept busy.

use std::time::Duration;

/// Process CPU time from `/proc/self/stat` (Linux); `None` elsewhere.
pub fn process_cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // Linux reports these in USER_HZ ticks, 100 per second on every mainstream configuration.
    Some(Duration::from_millis((utime + stime) * 10))
}
