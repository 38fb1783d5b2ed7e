//! The CPU time of a process, from `/proc/PID/stat` (Linux). Included by
//! the benches that time a server's CPU (`#[path = "support/cpu.rs"]`).

/// User plus system CPU time of process `pid`, in seconds (Linux; clock
/// ticks of 10 ms, so meaningful over many ticks only).
pub fn cpu_seconds(pid: u32) -> Result<f64, Box<dyn std::error::Error>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces), from field 3.
    let rest = stat.rsplit_once(')').ok_or("bad stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 =
        fields.get(11).ok_or("no utime")?.parse::<u64>()? + fields.get(12).ok_or("no stime")?.parse::<u64>()?;
    Ok(ticks as f64 / 100.0)
}
