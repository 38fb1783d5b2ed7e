//! The gateway's overhead: the same photo list through the gateway
//! (HTTP/1.1 + JSON + JWT check + transcoding) and straight to Photos over
//! gRPC, at the same concurrency, side by side in one run.
//!
//! `cargo bench --bench gateway [-- --connections 64 --seconds 5]`
//!
//! The server is a `lightbox dev` child process (release build, SQLite,
//! demo data); the load comes from this process over N connections, in two
//! shapes: closed loop (each connection sends its next request as soon as
//! the last answers: the most either path can do, where the two cores are
//! saturated and latency is queueing), then paced at `--rate` requests/s in
//! all (below saturation: latency is the cost of one request, measured from
//! when each request was due, so a stall is not hidden). The two paths
//! alternate, twice each, so drift on a shared machine hits both alike.

use std::{
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use lightbox_api::photos::{ListPhotosRequest, photos_service_client::PhotosServiceClient};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::Command,
};

const BIN: &str = env!("CARGO_BIN_EXE_lightbox");
const ADA: &str = "00000000-0000-7000-8000-000000000001";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str, default: u64| -> Result<u64, Box<dyn std::error::Error>> {
        Ok(args
            .iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map(|n| n.parse())
            .transpose()?
            .unwrap_or(default))
    };
    let connections = flag("--connections", 64)? as usize;
    let seconds = Duration::from_secs(flag("--seconds", 5)?);
    let rate = flag("--rate", 1000)? as f64;

    let dir = tempfile::tempdir()?;
    let mut server = Command::new(BIN)
        .args(["dev", "--users-addr", "127.0.0.1:0", "--contracts-addr", "127.0.0.1:0"])
        .args([
            "--photos-addr",
            "127.0.0.1:0",
            "--gateway-addr",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir.path())
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = server.stdout.take().ok_or("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let (mut photos, mut gateway, mut token) = (None, None, None);
    while photos.is_none() || gateway.is_none() || token.is_none() {
        let line = lines.next_line().await?.ok_or("lightbox dev ended before its banner")?;
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["photos", url] => photos = Some(url.replace("grpc://", "http://")),
            ["gateway", url] => gateway = Some(url.to_string()),
            ["export", assignment] => token = assignment.strip_prefix("TOKEN=").map(str::to_owned),
            _ => {}
        }
    }
    let (photos, gateway, token) = (
        photos.ok_or("no photos address")?,
        gateway.ok_or("no gateway address")?,
        token.ok_or("no token")?,
    );
    // Drain the rest of the banner so the child never blocks on its pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    let url = Arc::new(format!("{gateway}/v1/users/me/photos"));
    let token = Arc::new(token);
    let http = reqwest::Client::builder().pool_max_idle_per_host(connections).build()?;
    let mut channels = Vec::new();
    for _ in 0..connections {
        channels.push(
            tonic::transport::Endpoint::from_shared(photos.clone())?
                .connect()
                .await?,
        );
    }
    // Warm up both paths (the copies hold Ada from the demo data).
    let warm = Load {
        length: Duration::from_secs(1),
        pace: None,
    };
    run_http(&http, &url, &token, connections, warm).await?;
    run_grpc(&channels, warm).await?;

    println!(
        "\nListPhotos for one user (2 photos, with user and contract), {connections} connections, {seconds:?} per run"
    );
    println!("| load | path | run | requests/s | p50 | p99 |");
    println!("|---|---|---:|---:|---:|---:|");
    let pace = Duration::from_secs_f64(connections as f64 / rate);
    for pace in [None, Some(pace)] {
        let load = Load { length: seconds, pace };
        let shape = match pace {
            None => "closed loop".to_owned(),
            Some(_) => format!("paced at {rate:.0}/s"),
        };
        let mut p99 = ([0.0; 2], [0.0; 2]);
        for run in 0..2 {
            let grpc = run_grpc(&channels, load).await?;
            let gateway = run_http(&http, &url, &token, connections, load).await?;
            for (path, s) in [("gRPC straight to Photos", &grpc), ("gateway (HTTP/JSON)", &gateway)] {
                println!(
                    "| {shape} | {path} | {} | {:.0} | {:.2} ms | {:.2} ms |",
                    run + 1,
                    s.rate,
                    s.p50,
                    s.p99
                );
            }
            p99.0[run] = grpc.p99;
            p99.1[run] = gateway.p99;
        }
        let added = (p99.1[0] - p99.0[0]).min(p99.1[1] - p99.0[1]);
        println!("| {shape} | p99 added by the gateway (the smaller of the two rounds) | | | | {added:.2} ms |");
    }
    println!("\n(aim: the gateway adds < 1 ms at p99 at {connections} connections)");
    server.kill().await?;
    Ok(())
}

/// How long to load, and how: `pace` is each connection's interval between
/// requests (none: back to back).
#[derive(Clone, Copy)]
struct Load {
    length: Duration,
    pace: Option<Duration>,
}

/// One connection's schedule under a [`Load`].
struct Schedule {
    pace: Option<Duration>,
    due: Instant,
}

impl Schedule {
    /// Connection `index` of `connections`: paced connections start spread
    /// over one interval.
    fn new(load: Load, start: Instant, index: usize, connections: usize) -> Schedule {
        let offset = load
            .pace
            .map_or(Duration::ZERO, |p| p.mul_f64(index as f64 / connections as f64));
        Schedule {
            pace: load.pace,
            due: start + offset,
        }
    }

    /// Waits until the next request is due; answers when it was due, which
    /// latency is measured from.
    async fn next(&mut self) -> Instant {
        match self.pace {
            None => Instant::now(),
            Some(pace) => {
                let at = self.due;
                tokio::time::sleep_until(at.into()).await;
                self.due += pace;
                at
            }
        }
    }
}

struct Stats {
    rate: f64,
    p50: f64,
    p99: f64,
}

fn stats(mut samples: Vec<f64>, elapsed: Duration) -> Stats {
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| {
        samples
            .get(((samples.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    Stats {
        rate: samples.len() as f64 / elapsed.as_secs_f64(),
        p50: at(0.5),
        p99: at(0.99),
    }
}

/// Waits for every connection's samples; the stats of all of them.
async fn gather(
    mut tasks: tokio::task::JoinSet<Result<Vec<f64>, String>>,
    start: Instant,
) -> Result<Stats, Box<dyn std::error::Error>> {
    let mut all = Vec::new();
    while let Some(done) = tasks.join_next().await {
        all.extend(done??);
    }
    Ok(stats(all, start.elapsed()))
}

async fn run_grpc(channels: &[tonic::transport::Channel], load: Load) -> Result<Stats, Box<dyn std::error::Error>> {
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (index, channel) in channels.iter().enumerate() {
        let mut client = PhotosServiceClient::new(channel.clone());
        let mut schedule = Schedule::new(load, start, index, channels.len());
        tasks.spawn(async move {
            let mut samples = Vec::new();
            while start.elapsed() < load.length {
                let sent = schedule.next().await;
                let request = ListPhotosRequest {
                    user_id: ADA.into(),
                    ..ListPhotosRequest::default()
                };
                client.list_photos(request).await.map_err(|s| s.to_string())?;
                samples.push(sent.elapsed().as_secs_f64() * 1e3);
            }
            Ok::<_, String>(samples)
        });
    }
    gather(tasks, start).await
}

async fn run_http(
    http: &reqwest::Client,
    url: &Arc<String>,
    token: &Arc<String>,
    connections: usize,
    load: Load,
) -> Result<Stats, Box<dyn std::error::Error>> {
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..connections {
        let (http, url, token) = (http.clone(), Arc::clone(url), Arc::clone(token));
        let mut schedule = Schedule::new(load, start, index, connections);
        tasks.spawn(async move {
            let mut samples = Vec::new();
            while start.elapsed() < load.length {
                let sent = schedule.next().await;
                let response = http
                    .get(url.as_str())
                    .bearer_auth(token.as_str())
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                if !response.status().is_success() {
                    return Err(format!("the gateway answered {}", response.status()));
                }
                response.bytes().await.map_err(|e| e.to_string())?;
                samples.push(sent.elapsed().as_secs_f64() * 1e3);
            }
            Ok::<_, String>(samples)
        });
    }
    gather(tasks, start).await
}
