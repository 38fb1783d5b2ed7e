//! The gateway's overhead: the same photo list through the gateway
//! (HTTP/1.1 + JSON + JWT check + transcoding) and straight to Photos over
//! gRPC, at the same concurrency, side by side in one run.
//!
//! `cargo bench --bench gateway [-- --connections 64 --seconds 5]`
//!
//! The server is a `lightbox dev` child process (release build, SQLite,
//! demo data); the load comes from this process: N connections, each
//! sending its next request as soon as the last answers. The two paths
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
    run_http(&http, &url, &token, connections, Duration::from_secs(1)).await?;
    run_grpc(&channels, Duration::from_secs(1)).await?;

    println!(
        "\nListPhotos for one user (2 photos, with user and contract), {connections} connections, {seconds:?} per run"
    );
    println!("| path | run | requests/s | p50 | p99 |");
    println!("|---|---:|---:|---:|---:|");
    let mut p99 = ([0.0; 2], [0.0; 2]);
    for run in 0..2 {
        let grpc = run_grpc(&channels, seconds).await?;
        println!(
            "| gRPC straight to Photos | {} | {:.0} | {:.2} ms | {:.2} ms |",
            run + 1,
            grpc.rate,
            grpc.p50,
            grpc.p99
        );
        let http_stats = run_http(&http, &url, &token, connections, seconds).await?;
        println!(
            "| gateway (HTTP/JSON) | {} | {:.0} | {:.2} ms | {:.2} ms |",
            run + 1,
            http_stats.rate,
            http_stats.p50,
            http_stats.p99
        );
        p99.0[run] = grpc.p99;
        p99.1[run] = http_stats.p99;
    }
    let added = (p99.1[0] - p99.0[0]).min(p99.1[1] - p99.0[1]);
    println!(
        "\np99 added by the gateway (the smaller of the two rounds): {added:.2} ms (aim: < 1 ms at 64 connections)"
    );
    server.kill().await?;
    Ok(())
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

async fn run_grpc(
    channels: &[tonic::transport::Channel],
    length: Duration,
) -> Result<Stats, Box<dyn std::error::Error>> {
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for channel in channels {
        let mut client = PhotosServiceClient::new(channel.clone());
        tasks.spawn(async move {
            let mut samples = Vec::new();
            while start.elapsed() < length {
                let sent = Instant::now();
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
    length: Duration,
) -> Result<Stats, Box<dyn std::error::Error>> {
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let (http, url, token) = (http.clone(), Arc::clone(url), Arc::clone(token));
        tasks.spawn(async move {
            let mut samples = Vec::new();
            while start.elapsed() < length {
                let sent = Instant::now();
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
