//! The CPU time of a process, from `/proc/PID/stat` (Linux): `lightbox
//! bench`'s. Included by the benches that time a server's CPU
//! (`#[path = "support/cpu.rs"]`).

pub use lightbox_bench::harness::cpu_seconds;
