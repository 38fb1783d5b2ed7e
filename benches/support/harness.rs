//! What the one-core benches (`many_users`, `asynchronous`, `pull_push`)
//! share: pinning with `taskset` and re-running the bench pinned, `lightbox
//! dev` as a child process with its addresses read from its banner, the
//! machine's cores and how busy it is, percentiles and medians, and the
//! command line's flags. Included by each of them
//! (`#[path = "support/harness.rs"] mod harness;`); what only some of them
//! need is in the other files of `benches/support/`.

use std::{
    os::unix::process::CommandExt,
    path::Path,
    time::{Duration, Instant},
};

use lightbox_api::users::{CreateUserRequest, UpdateUserRequest, User, users_service_client::UsersServiceClient};
use tonic::{
    Status,
    transport::{Channel, Endpoint},
};

pub use lightbox_bench::harness::{Res, Server};

pub const BIN: &str = env!("CARGO_BIN_EXE_lightbox");
/// The most of a core the rest of the machine may use for it to count as
/// idle.
pub const IDLE: f64 = 0.3;
/// What the header says of the pinning when nothing is pinned.
pub const NOT_PINNED: &str = "NONE (one core, or no taskset): numbers share cores";

// ---------------------------------------------------------------------------
// Pinning

/// Re-runs this bench under `taskset -c 1` (replacing this process, with
/// `pinned_var=1` set) unless it already is, or cannot be; answers whether
/// the processes are pinned. `bench` names the bench in its messages.
pub fn pin_self(bench: &str, pinned_var: &str, cores: usize, args: &[String]) -> bool {
    if std::env::var(pinned_var).is_ok_and(|p| p == "1") {
        return true;
    }
    if cores < 2 {
        eprintln!("{bench}: {cores} core(s): nothing is pinned");
        return false;
    }
    let works = std::process::Command::new("taskset")
        .args(["-c", "1", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !works {
        eprintln!("{bench}: `taskset -c 1` does not work here: nothing is pinned");
        return false;
    }
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(err) => {
            eprintln!("{bench}: cannot find this bench's binary ({err}): nothing is pinned");
            return false;
        }
    };
    // Only returns if the exec failed.
    let err = std::process::Command::new("taskset")
        .args(["-c", "1"])
        .arg(exe)
        .args(args.iter().skip(1))
        .env(pinned_var, "1")
        .exec();
    eprintln!("{bench}: cannot re-run under taskset ({err}): nothing is pinned");
    false
}

// ---------------------------------------------------------------------------
// The machine

/// The machine's cores (all of them, not this process's affinity).
pub use lightbox_bench::harness::machine_cores;

pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// The header's first line: the machine's cores, CPU and load average.
pub fn machine_line(cores: usize) -> String {
    format!(
        "- machine: {cores} cores ({}), load average {}",
        cpu_model(),
        std::fs::read_to_string("/proc/loadavg")
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|_| "unknown".into())
    )
}

/// The CPUs process `pid` may run on (Linux), as `taskset` left them.
pub fn cpus_allowed(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("Cpus_allowed_list:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "?".into())
}

/// Threads of process `pid` named as tokio names its workers.
pub fn tokio_workers(pid: u32) -> usize {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter(|task| {
            // "tokio-rt-worker" (tokio 1.4x and later) or "tokio-runtime-worker", cut to 15 bytes.
            std::fs::read_to_string(task.path().join("comm"))
                .is_ok_and(|name| name.starts_with("tokio-rt-worker") || name.starts_with("tokio-runtime-w"))
        })
        .count()
}

/// Waits up to `max` until the machine is idle: busy less than [`IDLE`] of
/// a core over half a second (the benches' servers are idle between
/// cells). Answers how busy it was last (share of one core).
pub async fn wait_for_idle(max: Duration) -> Res<f64> {
    let start = Instant::now();
    loop {
        let before = machine_busy_seconds()?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let busy = (machine_busy_seconds()? - before) / 0.5;
        if busy < IDLE || start.elapsed() >= max {
            return Ok(busy);
        }
    }
}

/// CPU time the whole machine spent busy so far, in seconds summed over
/// its cores (Linux `/proc/stat`, ticks of 10 ms).
pub fn machine_busy_seconds() -> Res<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or("no cpu line in /proc/stat")?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    // user nice system idle iowait irq softirq steal (guest time is in user).
    let busy: u64 = ticks
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, t)| t)
        .sum();
    Ok(busy as f64 / 100.0)
}

// ---------------------------------------------------------------------------
// Figures

/// The value at quantile `q` of sorted `samples` (NaN when empty).
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

/// The median of `values`, leaving out NaNs (a figure a round could not
/// measure); NaN when none is left.
pub fn median(mut values: Vec<f64>) -> f64 {
    values.retain(|v| !v.is_nan());
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

// ---------------------------------------------------------------------------
// The command line

/// The bench's arguments, `--name value` and `--flag`.
pub struct Args<'a>(pub &'a [String]);

impl Args<'_> {
    pub fn flag(&self, name: &str) -> bool {
        self.0.iter().any(|a| a == name)
    }

    pub fn value(&self, name: &str) -> Option<String> {
        self.0
            .iter()
            .position(|a| a == name)
            .and_then(|i| self.0.get(i + 1))
            .cloned()
    }

    pub fn number(&self, name: &str, default: f64) -> Res<f64> {
        match self.value(name) {
            Some(text) => Ok(text.parse().map_err(|e| format!("{name} {text:?}: {e}"))?),
            None => Ok(default),
        }
    }

    /// A number of seconds.
    pub fn seconds(&self, name: &str, default: f64) -> Res<Duration> {
        let seconds = self.number(name, default)?;
        Ok(Duration::try_from_secs_f64(seconds).map_err(|e| format!("{name} {seconds}: {e}"))?)
    }

    /// A comma-separated list of counts.
    pub fn counts(&self, name: &str, default: Vec<usize>) -> Res<Vec<usize>> {
        match self.value(name) {
            Some(list) => Ok(list
                .split(',')
                .map(|n| n.trim().parse::<usize>().map_err(|e| format!("{name} {list:?}: {e}")))
                .collect::<Result<Vec<_>, _>>()?),
            None => Ok(default),
        }
    }
}

// ---------------------------------------------------------------------------
// `lightbox dev`

/// The address every listener of a fresh `lightbox dev` takes.
pub const ANY_PORT: &str = "127.0.0.1:0";

/// A `lightbox dev` child process and where it listens: `lightbox bench`'s
/// [`Server`], started with the `lightbox` this bench was built with.
pub struct Dev {
    server: Server,
    pub pid: u32,
    _dir: Option<tempfile::TempDir>,
}

impl Dev {
    /// [`Dev::start`] on a temporary directory of its own, every listener
    /// on 127.0.0.1:0.
    pub async fn start_fresh(pinned: bool, listeners: &[&str], extra: &[String]) -> Res<Dev> {
        let dir = tempfile::tempdir()?;
        let mut dev = Dev::start(pinned, dir.path(), listeners, None, extra).await?;
        dev._dir = Some(dir);
        Ok(dev)
    }

    /// Starts `lightbox dev` on `dir` (the release binary, `RUST_LOG=error`,
    /// `TOKIO_WORKER_THREADS=1`, on core 0 when pinning; the environment's
    /// `DATABASE_URL`, `LIGHTBOX_FOLLOW` and `LIGHTBOX_TARGET` left out),
    /// with `--NAME-addr` for each of `listeners`: where `again` listened
    /// (the same ports after a restart), or 127.0.0.1:0; `extra` after
    /// that. Answers once the banner said where each of them listens.
    pub async fn start(
        pinned: bool,
        dir: &Path,
        listeners: &[&str],
        again: Option<&Dev>,
        extra: &[String],
    ) -> Res<Dev> {
        let data = dir.to_string_lossy().into_owned();
        let flags: Vec<(String, String)> = listeners
            .iter()
            .map(|name| {
                let addr = again.map_or(ANY_PORT, |dev| dev.addr(name));
                (format!("--{name}-addr"), addr.to_owned())
            })
            .collect();
        let mut args = vec!["dev"];
        for (flag, addr) in &flags {
            args.extend([flag.as_str(), addr.as_str()]);
        }
        args.extend(["--data-dir", data.as_str()]);
        args.extend(extra.iter().map(String::as_str));
        let server = Server::start_program(pinned, BIN, &args, None, listeners).await?;
        let pid = server.pid;
        Ok(Dev {
            server,
            pid,
            _dir: None,
        })
    }

    /// Where component `name` listens, `host:port` (empty if it was not
    /// asked for).
    pub fn addr(&self, name: &str) -> &str {
        self.server().addr(name)
    }

    /// `http://host:port` of component `name`.
    pub fn url(&self, name: &str) -> String {
        self.server.url(name)
    }

    /// The child process, as `lightbox bench` knows it.
    pub fn server(&self) -> &Server {
        &self.server
    }

    /// SIGKILL, and waits for the process to be gone.
    pub async fn kill(&mut self) -> Res<()> {
        self.server.kill().await
    }

    pub async fn stop(mut self) {
        let _ = self.kill().await;
    }
}

// ---------------------------------------------------------------------------
// gRPC

pub async fn connect(url: &str) -> Res<Channel> {
    Ok(Endpoint::from_shared(url.to_owned())?
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {url}: {e}"))?)
}

pub fn status_text(status: &Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

/// User `i`, created over gRPC.
pub async fn create_user(
    client: &mut UsersServiceClient<Channel>,
    i: usize,
    display_name: String,
    email: String,
) -> Result<User, String> {
    let request = CreateUserRequest {
        user: Some(User {
            display_name,
            email,
            ..User::default()
        }),
    };
    client
        .create_user(request)
        .await
        .map_err(|s| format!("CreateUser {i}: {}", status_text(&s)))?
        .into_inner()
        .user
        .ok_or_else(|| format!("CreateUser {i} answered no user"))
}

/// Renames `user` over gRPC (`UpdateUser`, the rest of it as it is): when
/// the request was sent, when the answer came, and the user it answered.
pub async fn rename(
    client: &mut UsersServiceClient<Channel>,
    user: &User,
    display_name: String,
) -> Result<(Instant, Instant, Option<User>), Status> {
    let request = UpdateUserRequest {
        user: Some(User {
            display_name,
            ..user.clone()
        }),
        update_mask: None,
        expected_revision: 0,
    };
    let sent = Instant::now();
    let answer = client.update_user(request).await?;
    Ok((sent, Instant::now(), answer.into_inner().user))
}
