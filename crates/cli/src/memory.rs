//! This process's memory as the kernel counts it: resident set now and at its peak
//! (`/proc/self/status`), for the memory figures `rrt eval` and the benchmarks print.

/// `(VmRSS, VmHWM)` in bytes; `None` where `/proc` is missing.
pub fn rss() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Bytes as MiB with one decimal.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_touched_shows_in_the_resident_set() {
        let Some((before, _)) = rss() else {
            panic!("/proc/self/status has no VmRSS on this Linux machine");
        };
        // Every page written, and the buffer kept alive past the reading.
        let mut buf = vec![0u8; 64 << 20];
        for i in (0..buf.len()).step_by(4096) {
            buf[i] = 1;
        }
        let buf = std::hint::black_box(buf);
        let (after, peak) = rss().unwrap();
        assert!(after >= before + (48 << 20), "{before} -> {after}");
        assert!(peak >= after);
        drop(buf);
        assert_eq!(mib(3 << 20), "3.0 MiB");
    }
}
