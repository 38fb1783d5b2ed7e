//! The resident memory of a process, from `/proc/PID/status` (Linux).
//! Included by the benches that weigh a server (`#[path = "support/rss.rs"]`).

/// The resident memory of process `pid`, in KiB (Linux).
pub fn rss_kib(pid: u32) -> Result<u64, Box<dyn std::error::Error>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).ok_or("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).ok_or("bad VmRSS")?.parse()?)
}
