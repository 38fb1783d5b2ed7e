//! The resident memory of a process, from `/proc/PID/status` (Linux):
//! `lightbox bench`'s. Included by the benches that weigh a server
//! (`#[path = "support/rss.rs"]`).

pub use lightbox_bench::harness::rss_kib;
