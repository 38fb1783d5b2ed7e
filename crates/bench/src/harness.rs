//! What every part of `lightbox bench` shares: the machine (cores, CPU,
//! how busy), pinning (servers on core 0, the load generator on core 1),
//! child processes of this binary (`lightbox dev`, `lightbox serve`, the
//! minimal server) with their addresses read from what they print, a
//! process's memory and CPU time, gRPC channels, and a `/metrics` scrape.

use std::{
    error::Error,
    ffi::OsStr,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    process::{Child, Command},
};
use tonic::transport::{Channel, Endpoint};

/// Every fallible step of a bench.
pub type Res<T> = Result<T, Box<dyn Error + Send + Sync>>;

/// Set in the environment of a `lightbox bench` re-run under `taskset`.
const PINNED: &str = "LIGHTBOX_BENCH_PINNED";

/// This binary: what the children run.
pub fn binary() -> Res<PathBuf> {
    Ok(std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?)
}

/// The machine's cores (all of them, not this process's affinity).
pub fn machine_cores() -> usize {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|info| info.lines().filter(|l| l.starts_with("processor")).count())
        .ok()
        .filter(|n| *n > 0)
        .or_else(|| std::thread::available_parallelism().ok().map(usize::from))
        .unwrap_or(1)
}

/// The machine in one line: cores, CPU model, load average.
pub fn machine_line(cores: usize) -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into());
    format!("{cores} cores ({model}), load average {load}")
}

/// Re-runs this command under `taskset -c 1` (replacing this process)
/// unless it already runs so, or cannot; answers whether the servers and
/// the load generator are pinned apart.
pub fn pin_self(cores: usize) -> bool {
    if std::env::var(PINNED).is_ok_and(|p| p == "1") {
        return true;
    }
    if cores < 2 {
        eprintln!("lightbox bench: {cores} core(s): nothing is pinned");
        return false;
    }
    let works = std::process::Command::new("taskset")
        .args(["-c", "1", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let exe = binary();
    let (true, Ok(exe)) = (works, exe) else {
        eprintln!("lightbox bench: `taskset -c 1` does not work here: nothing is pinned");
        return false;
    };
    // Only returns if the exec failed.
    let err = std::process::Command::new("taskset")
        .args(["-c", "1"])
        .arg(exe)
        .args(std::env::args_os().skip(1))
        .env(PINNED, "1")
        .exec();
    eprintln!("lightbox bench: cannot re-run under taskset ({err}): nothing is pinned");
    false
}

/// A command for a server: under `taskset -c 0` when pinning.
pub fn server_command(pinned: bool, program: impl AsRef<OsStr>) -> Command {
    if pinned {
        let mut command = Command::new("taskset");
        command.args(["-c", "0"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

/// The resident memory of process `pid`, in KiB (Linux).
pub fn rss_kib(pid: u32) -> Res<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).ok_or("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).ok_or("bad VmRSS")?.parse()?)
}

/// User plus system CPU time of process `pid`, in seconds (Linux; ticks
/// of 10 ms, so meaningful over many ticks only).
pub fn cpu_seconds(pid: u32) -> Res<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces), from field 3.
    let rest = stat.rsplit_once(')').ok_or("bad stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 =
        fields.get(11).ok_or("no utime")?.parse::<u64>()? + fields.get(12).ok_or("no stime")?.parse::<u64>()?;
    Ok(ticks as f64 / 100.0)
}

/// A child process of this binary and what it printed of where it listens.
pub struct Server {
    child: Child,
    /// Its process id.
    pub pid: u32,
    /// (name, `host:port`) of each listener it announced.
    addrs: Vec<(String, String)>,
    /// Its data directory, removed with it.
    _dir: Option<tempfile::TempDir>,
}

impl Server {
    /// Starts this binary with `args` (on core 0 when pinning, `RUST_LOG=error`,
    /// one tokio worker, the environment's database and targets left out),
    /// and reads its standard output until it has announced each of
    /// `listeners`: a line `  NAME  grpc://HOST:PORT…` or `http://…`.
    pub async fn start(pinned: bool, args: &[&str], dir: Option<tempfile::TempDir>, listeners: &[&str]) -> Res<Server> {
        Server::start_program(pinned, binary()?, args, dir, listeners).await
    }

    /// [`Server::start`] with another program than this binary (the
    /// `cargo bench` targets start the `lightbox` they were built with).
    pub async fn start_program(
        pinned: bool,
        program: impl AsRef<OsStr>,
        args: &[&str],
        dir: Option<tempfile::TempDir>,
        listeners: &[&str],
    ) -> Res<Server> {
        let mut command = server_command(pinned, program);
        let mut child = command
            .args(args)
            .env("RUST_LOG", "error")
            .env("TOKIO_WORKER_THREADS", "1")
            .env_remove("DATABASE_URL")
            .env_remove("LIGHTBOX_FOLLOW")
            .env_remove("LIGHTBOX_TARGET")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let pid = child.id().ok_or("the server exited at once")?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let mut addrs: Vec<(String, String)> = Vec::new();
        let banner = async {
            while addrs.len() < listeners.len() {
                let line = lines
                    .next_line()
                    .await?
                    .ok_or("the server ended before saying where it listens")?;
                let words: Vec<&str> = line.split_whitespace().collect();
                let Some((name, url)) = words.first().zip(words.get(1)) else {
                    continue;
                };
                let Some(addr) = ["grpc://", "http://"].iter().find_map(|s| url.strip_prefix(s)) else {
                    continue;
                };
                if listeners.contains(name) && !addrs.iter().any(|(n, _)| n == name) {
                    addrs.push(((*name).to_owned(), addr.to_owned()));
                }
            }
            Ok::<_, Box<dyn Error + Send + Sync>>(())
        };
        tokio::time::timeout(Duration::from_secs(120), banner)
            .await
            .map_err(|_| format!("{args:?} said nothing of its listeners within 120 s"))??;
        // Drain the rest so the child never blocks on its pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Server {
            child,
            pid,
            addrs,
            _dir: dir,
        })
    }

    /// `lightbox dev` on a fresh directory, every listener of `listeners` on
    /// a free port, `extra` arguments after.
    pub async fn dev(pinned: bool, listeners: &[&str], extra: &[&str]) -> Res<Server> {
        let dir = tempfile::tempdir()?;
        let data = dir.path().to_string_lossy().into_owned();
        let flags: Vec<String> = listeners.iter().map(|name| format!("--{name}-addr")).collect();
        let mut args = vec!["dev", "--data-dir", data.as_str()];
        for flag in &flags {
            args.extend([flag.as_str(), "127.0.0.1:0"]);
        }
        args.extend(extra);
        Server::start(pinned, &args, Some(dir), listeners).await
    }

    /// Where `name` listens, `host:port` (empty if not announced).
    pub fn addr(&self, name: &str) -> &str {
        self.addrs
            .iter()
            .find(|(n, _)| n == name)
            .map_or("", |(_, addr)| addr.as_str())
    }

    /// `http://host:port` of `name`.
    pub fn url(&self, name: &str) -> String {
        format!("http://{}", self.addr(name))
    }

    /// SIGKILL, and waits for the process to be gone.
    pub async fn kill(&mut self) -> Res<()> {
        self.child
            .kill()
            .await
            .map_err(|e| format!("cannot kill the server: {e}"))?;
        Ok(())
    }

    /// Kills it.
    pub async fn stop(mut self) {
        let _ = self.kill().await;
    }
}

/// A channel to `url`, connected: its own HTTP/2 connection.
pub async fn connect(url: &str) -> Res<Channel> {
    Ok(Endpoint::from_shared(url.to_owned())?
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {url}: {e}"))?)
}

/// The sum of the values of the samples of metric `name` whose labels
/// hold every one of `labels` (`key="value"`), in `text` (OpenMetrics).
pub fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let rest = series.strip_prefix(name)?;
            let matches = (rest.is_empty() || rest.starts_with('{')) && labels.iter().all(|label| rest.contains(label));
            matches.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// `GET /metrics` on the admin listener at `addr` (`host:port`).
pub async fn scrape(addr: &str) -> Res<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut answer))
        .await
        .map_err(|_| "the metrics took over 10 s")??;
    let (head, body) = answer.split_once("\r\n\r\n").ok_or("a metrics answer without a body")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(format!("GET /metrics answered {}", head.lines().next().unwrap_or_default()).into());
    }
    Ok(body.to_owned())
}

/// A temporary directory's path as text.
pub fn path_text(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_sums_match_name_and_labels() {
        let text = "# TYPE grpc_server_started_total counter\n\
            grpc_server_started_total{grpc_service=\"a.Users\",grpc_method=\"GetUser\"} 3\n\
            grpc_server_started_total{grpc_service=\"a.Contracts\",grpc_method=\"GetContract\"} 4\n\
            grpc_server_started_total_other{grpc_service=\"a.Users\"} 100\n";
        assert_eq!(metric_sum(text, "grpc_server_started_total", &[]), 7.0);
        assert_eq!(
            metric_sum(text, "grpc_server_started_total", &["grpc_service=\"a.Users\""]),
            3.0
        );
    }
}
