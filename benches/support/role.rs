//! This bench's own binary re-run in another role (a minimal server, a
//! proxy), on core 0 with the server under test when pinning. Included by
//! the benches that have such a role (`#[path = "support/role.rs"]`), next
//! to `harness.rs`.

use std::{process::Stdio, time::Duration};

use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::Child,
};

use lightbox_bench::harness::server_command;

use crate::harness::Res;

/// Starts this bench's binary again with `env` set; answers the child, its
/// pid and the first line it printed (where it listens). `what` names it
/// in the errors.
pub async fn start_role(pinned: bool, env: &[(&str, &str)], what: &str) -> Res<(Child, u32, String)> {
    let mut command = server_command(pinned, std::env::current_exe()?);
    for (name, value) in env {
        command.env(name, value);
    }
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().ok_or_else(|| format!("{what} exited at once"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .map_err(|_| format!("{what} did not say where it listens within 30 s"))??
        .ok_or_else(|| format!("{what} ended before saying where it listens"))?;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, pid, line))
}
