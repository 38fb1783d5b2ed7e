//! `lightbox dev` as the end-to-end tests start it: on free ports, its
//! addresses read from the banner it prints, its log read when asked; and
//! the `lightbox` binary run as a tool, with its exit code and output.
//! Included by the test files that need it (`#[path = "support/dev.rs"]`).

#![allow(dead_code)]

use std::{
    net::SocketAddr,
    path::Path,
    process::{Output, Stdio},
    sync::{Arc, Mutex},
};

use lightbox_testkit::DEADLINE;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_lightbox");

/// `lightbox dev` on free ports, with its addresses read from the banner.
pub struct Dev {
    pub child: Child,
    pub users: SocketAddr,
    pub contracts: SocketAddr,
    pub photos: SocketAddr,
    pub gateway: SocketAddr,
    /// The process's admin listener (health, metrics, faults).
    pub admin: SocketAddr,
    /// The demo token the banner prints.
    pub token: String,
    /// The `lightbox fault …` command the banner prints.
    pub fault_command: String,
    /// Its log lines so far (at `info`), when started by [`start_dev_logged`].
    pub log: Option<Arc<Mutex<Vec<String>>>>,
}

pub async fn start_dev(data_dir: &Path) -> Dev {
    start_dev_with(data_dir, &[]).await
}

pub async fn start_dev_with(data_dir: &Path, extra: &[&str]) -> Dev {
    spawn_dev(data_dir, extra, false).await
}

/// `lightbox dev` whose log (stderr, at `info`) the test reads.
pub async fn start_dev_logged(data_dir: &Path) -> Dev {
    spawn_dev(data_dir, &[], true).await
}

pub async fn spawn_dev(data_dir: &Path, extra: &[&str], logged: bool) -> Dev {
    let mut child = Command::new(BIN)
        .args([
            "dev",
            "--users-addr",
            "127.0.0.1:0",
            "--contracts-addr",
            "127.0.0.1:0",
            "--photos-addr",
            "127.0.0.1:0",
            "--gateway-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(data_dir)
        .args(extra)
        .env("RUST_LOG", if logged { "info" } else { "warn" })
        .stdout(Stdio::piped())
        .stderr(if logged { Stdio::piped() } else { Stdio::inherit() })
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|err| panic!("cannot run {BIN}: {err}"));
    let log = child.stderr.take().map(|stderr| {
        let log = Arc::new(Mutex::new(Vec::new()));
        let lines = Arc::clone(&log);
        tokio::spawn(async move {
            let mut stderr = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = stderr.next_line().await {
                lines.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        log
    });
    let stdout = child.stdout.take().unwrap_or_else(|| panic!("no stdout"));
    let mut lines = BufReader::new(stdout).lines();
    let (mut users, mut contracts, mut photos, mut gateway, mut admin, mut token) =
        (None, None, None, None, None, None);
    let mut fault_command = String::new();
    let banner = async {
        while users.is_none()
            || contracts.is_none()
            || photos.is_none()
            || gateway.is_none()
            || admin.is_none()
            || token.is_none()
        {
            let line = match lines.next_line().await {
                Ok(Some(line)) => line,
                other => panic!("lightbox dev ended before printing its addresses: {other:?}"),
            };
            let mut words = line.split_whitespace();
            let (Some(name), Some(url)) = (words.next(), words.next()) else {
                continue;
            };
            let addr = url.strip_prefix("grpc://").and_then(|a| a.parse::<SocketAddr>().ok());
            match name {
                "users" => users = addr,
                "contracts" => contracts = addr,
                "photos" => photos = addr,
                "admin" => admin = addr,
                "gateway" => gateway = url.strip_prefix("http://").and_then(|a| a.parse().ok()),
                "export" => token = url.strip_prefix("TOKEN=").map(str::to_owned),
                "lightbox" if url == "fault" => {
                    fault_command = line.split('#').next().unwrap_or_default().trim().to_owned();
                }
                _ => {}
            }
        }
    };
    tokio::time::timeout(DEADLINE, banner)
        .await
        .unwrap_or_else(|_| panic!("no banner within {DEADLINE:?}"));
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    match (users, contracts, photos, gateway, admin, token) {
        (Some(users), Some(contracts), Some(photos), Some(gateway), Some(admin), Some(token)) => Dev {
            child,
            users,
            contracts,
            photos,
            gateway,
            admin,
            token,
            fault_command,
            log,
        },
        _ => panic!("banner without addresses"),
    }
}

impl Dev {
    /// The log lines so far.
    pub fn log(&self) -> Vec<String> {
        let log = self
            .log
            .as_ref()
            .unwrap_or_else(|| panic!("not started by start_dev_logged"));
        log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits (within the deadline) for a log line containing `needle`, and
    /// answers every line so far.
    pub async fn log_until(&self, needle: &str) -> Vec<String> {
        let waited = tokio::time::timeout(DEADLINE, async {
            loop {
                let log = self.log();
                if log.iter().any(|line| line.contains(needle)) {
                    return log;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        });
        match waited.await {
            Ok(log) => log,
            Err(_) => panic!("no log line with {needle:?} within {DEADLINE:?}: {:#?}", self.log()),
        }
    }

    /// SIGTERM, then the exit status within the deadline.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().unwrap_or_else(|| panic!("already exited"));
        let killed = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        assert!(killed.is_ok_and(|s| s.success()), "kill -TERM failed");
        match tokio::time::timeout(DEADLINE, self.child.wait()).await {
            Ok(Ok(status)) => status,
            other => panic!("lightbox did not exit after SIGTERM: {other:?}"),
        }
    }
}

pub async fn lightbox(args: &[&str]) -> Output {
    let run = Command::new(BIN).args(args).output();
    match tokio::time::timeout(DEADLINE, run).await {
        Ok(Ok(output)) => output,
        other => panic!("lightbox {args:?} failed: {other:?}"),
    }
}

pub async fn tool(args: &[&str]) -> (Option<i32>, String, String) {
    let out = lightbox(args).await;
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A port nothing listens on (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap_or_else(|err| panic!("{err}"))
        .port()
}
