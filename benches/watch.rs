//! Watch fan-out benchmark: delivery latency (commit to watcher) and server
//! memory per idle watch stream, at 1 to 10,000 concurrent watchers.
//!
//! `cargo bench --bench watch [-- --watchers 1,100,1000,10000 --changes 50]`
//!
//! For each watcher count it starts a fresh `lightbox serve --target
//! contracts` (the release binary, SQLite in a temporary directory) as a
//! child process, so the server's memory is its own; opens the watch streams
//! over loopback (100 per HTTP/2 connection); reads the server's resident
//! memory once they are all idle; then updates one contract `--changes`
//! times, one after the other, and records for every watcher how long after
//! the commit each change arrived (the server stamps `update_time` in the
//! committing transaction; same machine, same clock). Client and server
//! share the machine's cores: the numbers include that contention, and the
//! table shows how the CPU time per delivery splits between the two.

#[path = "support/cpu.rs"]
mod cpu;
#[path = "support/rss.rs"]
mod rss;

use std::{
    net::SocketAddr,
    process::Stdio,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use cpu::cpu_seconds;
use lightbox_api::contracts::{
    Contract, ContractOption, CreateContractRequest, Plan, UpdateContractRequest, WatchContractsRequest,
    contracts_service_client::ContractsServiceClient, watch_contracts_response::Event,
};
use rss::rss_kib;
use tokio::{process::Command, sync::mpsc};
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint};

const BIN: &str = env!("CARGO_BIN_EXE_lightbox");
const PER_CONNECTION: usize = 100;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let counts: Vec<usize> = arg("--watchers")
        .unwrap_or_else(|| "1,100,1000,10000".into())
        .split(',')
        .map(|n| n.trim().parse())
        .collect::<Result<_, _>>()?;
    let changes: usize = arg("--changes").map(|n| n.parse()).transpose()?.unwrap_or(50);

    println!("\nWatch fan-out: lightbox serve --target contracts (SQLite), {changes} changes per row");
    println!(
        "| watchers | deliveries | p50 | p99 | max | server RSS, idle streams | per idle stream | server CPU per delivery | client CPU per delivery |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for watchers in counts {
        let row = run(watchers, changes).await?;
        println!(
            "| {watchers} | {} | {:.2} ms | {:.2} ms | {:.2} ms | {:.1} MiB | {:.1} KiB | {:.1} µs | {:.1} µs |",
            row.deliveries,
            row.p50_ms,
            row.p99_ms,
            row.max_ms,
            row.rss_idle_kib as f64 / 1024.0,
            row.per_stream_kib,
            row.server_cpu_us,
            row.client_cpu_us
        );
    }
    Ok(())
}

struct Row {
    deliveries: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    rss_idle_kib: u64,
    per_stream_kib: f64,
    server_cpu_us: f64,
    client_cpu_us: f64,
}

async fn run(watchers: usize, changes: usize) -> Result<Row, Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let addr = free_port()?;
    let mut server = Command::new(BIN)
        .args(["serve", "--target", "contracts", "--contracts-addr", &addr.to_string()])
        .args(["--admin-addr", "127.0.0.1:0"])
        .args(["--watcher-buffer", "4096", "--progress-interval", "1h", "--data-dir"])
        .arg(dir.path())
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let pid = server.id().ok_or("server exited")?;
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?;
    let mut client = loop {
        match endpoint.connect().await {
            Ok(channel) => break ContractsServiceClient::new(channel),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let mut contract = client
        .create_contract(CreateContractRequest {
            contract: Some(Contract {
                holder_user_id: "00000000-0000-7000-8000-000000000001".into(),
                plan: Plan::Standard as i32,
                options: vec![ContractOption {
                    code: "photo_quota".into(),
                    value: "0".into(),
                    enabled: true,
                }],
                ..Contract::default()
            }),
        })
        .await?
        .into_inner()
        .contract
        .ok_or("no contract")?;
    let rss_before = rss_kib(pid)?;

    // Open the watchers; each reports (revision, latency) per change.
    let (report, mut reports) = mpsc::unbounded_channel::<f64>();
    let (ready, mut readiness) = mpsc::unbounded_channel::<()>();
    let mut channels: Vec<Channel> = Vec::new();
    for i in 0..watchers {
        if i % PER_CONNECTION == 0 {
            channels.push(endpoint.connect().await?);
        }
        let channel = channels.last().cloned().ok_or("no channel")?;
        let (report, ready) = (report.clone(), ready.clone());
        let since = contract.revision;
        tokio::spawn(async move {
            let mut client = ContractsServiceClient::new(channel);
            let request = WatchContractsRequest {
                since_revision: since,
                ..WatchContractsRequest::default()
            };
            let Ok(response) = client.watch_contracts(request).await else {
                return;
            };
            let _ = ready.send(());
            let mut stream = response.into_inner();
            while let Some(Ok(frame)) = stream.next().await {
                if let Some(Event::Change(change)) = frame.event {
                    let stamped = change.contract.and_then(|c| c.update_time).unwrap_or_default();
                    let sent = Duration::new(stamped.seconds as u64, stamped.nanos as u32);
                    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
                    let _ = report.send(now.saturating_sub(sent).as_secs_f64() * 1000.0);
                }
            }
        });
    }
    drop(report);
    for _ in 0..watchers {
        readiness.recv().await.ok_or("a watcher failed to open")?;
    }
    // Let the server settle (every stream idle, allocator quiet) and read its memory.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_idle = rss_kib(pid)?;

    let mut latencies = Vec::with_capacity(watchers * changes);
    let (server_cpu, client_cpu) = (cpu_seconds(pid)?, cpu_seconds(std::process::id())?);
    for i in 0..changes {
        contract.options[0].value = i.to_string();
        contract = client
            .update_contract(UpdateContractRequest {
                contract: Some(contract.clone()),
                update_mask: None,
                expected_revision: 0,
            })
            .await?
            .into_inner()
            .contract
            .ok_or("no contract")?;
        // Wait for every watcher to get this change before the next one.
        for _ in 0..watchers {
            let latency = tokio::time::timeout(Duration::from_secs(60), reports.recv())
                .await?
                .ok_or("watchers ended")?;
            latencies.push(latency);
        }
    }
    let server_cpu = cpu_seconds(pid)? - server_cpu;
    let client_cpu = cpu_seconds(std::process::id())? - client_cpu;
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    let row = Row {
        deliveries: latencies.len(),
        p50_ms: at(0.50),
        p99_ms: at(0.99),
        max_ms: latencies.last().copied().unwrap_or_default(),
        rss_idle_kib: rss_idle,
        per_stream_kib: rss_idle.saturating_sub(rss_before) as f64 / watchers as f64,
        server_cpu_us: server_cpu * 1e6 / latencies.len() as f64,
        client_cpu_us: client_cpu * 1e6 / latencies.len() as f64,
    };
    server.kill().await?;
    Ok(row)
}

fn free_port() -> std::io::Result<SocketAddr> {
    std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()
}
