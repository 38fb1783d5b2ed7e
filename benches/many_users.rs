//! Many users: how close Photos' reads come to a bare tonic server, and
//! what an open phone costs, side by side in one run.
//!
//! `cargo bench --bench many_users [-- --seconds 5 --rounds 2 --phones 100,1000,10000 --writes 200 --write-rate 20 --idle-wait 30]`
//! (`-- --quick`: 1 s cells, one round, 100 phones, 20 writes, 2 s of idle
//! wait at most; well under a minute once built, for CI)
//!
//! Unary cells, all under the same load generator (this process, closed
//! loop: 128 calls in flight over 4 HTTP/2 connections, 4 tonic channels ×
//! 32 tasks), a warm-up of each cell, then a fixed window per cell, the
//! cells alternated A B C D A B C D over the rounds:
//!
//! 1. the ceiling: a minimal tonic unary server (this bench's own binary,
//!    re-run with `MANY_USERS_ROLE=minimal`: one tokio worker, serving only
//!    `lightbox.admin.v1.FaultService/GetFault`, an empty request answered
//!    with a constant two-byte message, prost-generated);
//! 2. Photos `GetProfile`, `CACHED` (user and contract from the copies);
//! 3. Photos `ListPhotos`, `CACHED`, a page of 10 photos with user and
//!    contract;
//! 4. Photos `ListPhotos`, `FRESH` (the synchronous chain Photos → Users →
//!    Contracts), the same user.
//!
//! The customer of 2–4 (a user, a contract with a photo quota of 100, the
//! link, 10 photos) is created over gRPC first. Every answer's gRPC status
//! and shape is checked (10 photos, user and contract present, served from
//! the copies or the chain as asked); a call that fails counts as an error,
//! not a sample, and a cell with errors says FAILED. Each cell reports
//! requests/s, p50 and p99, the CPU used by the server and by the load
//! generator (share of one core: a server well below 100 % means the
//! generator, not the server, was the limit), and requests/s as a share of
//! the minimal server's in the same round; then the median over the rounds.
//!
//! Phones (`--phones`), each cell on a fresh server (its limit of event
//! streams raised above N, the rest as `lightbox dev` has it): N users,
//! each its own phone holding `GET /v1/users/me/events` (SSE over HTTP/1.1,
//! a JWT for its user signed with the development key), all open until
//! each has had its three `synced` events; the server's resident memory before opening and
//! once all are idle gives KiB per phone (gateway stream plus its three
//! upstream watches: everything runs in the one `lightbox dev` process).
//! Then a writer renames random users over gRPC (`UpdateUser`, the display
//! name carrying the write's sequence number) at `--write-rate` writes/s,
//! `--writes` times, and every delivery of the `user` event to its phone is
//! timed from the write's acknowledgement (and from its send).
//!
//! The server under test is `lightbox dev` (the release binary, SQLite in a
//! temporary directory, every port 127.0.0.1:0, addresses read from its
//! banner) with `TOKIO_WORKER_THREADS=1` (the binary has no flag of its own;
//! `#[tokio::main]` honours the variable), pinned to core 0 with `taskset
//! -c 0` like the minimal server; this process re-runs itself under `taskset
//! -c 1` (`MANY_USERS_PINNED=1`) and generates the load from one thread on
//! core 1. On a machine with one core, or without `taskset`, nothing is
//! pinned, and the header says so. The targets of the issue are printed
//! next to the results, MET or MISSED; a missed target does not fail the
//! bench. Before each cell the bench waits (up to `--idle-wait` seconds)
//! for the rest of the machine to go idle, and every unary cell reports
//! what the rest of the machine used meanwhile (a warning says when that
//! was much: the numbers were contended).

#[path = "support/cpu.rs"]
mod cpu;
#[path = "support/customer.rs"]
mod customer;
#[path = "support/harness.rs"]
mod harness;
#[path = "support/role.rs"]
mod role;
#[path = "support/rss.rs"]
mod rss;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use cpu::cpu_seconds;
use customer::create_customer;
use harness::{
    Args, Dev, IDLE, NOT_PINNED, Res, connect, cpus_allowed, create_user, machine_busy_seconds, machine_cores,
    machine_line, median, pin_self, quantile, rename, status_text, tokio_workers, wait_for_idle,
};
use lightbox_api::{
    admin::{
        ClearFaultRequest, ClearFaultResponse, Fault, GetFaultRequest, GetFaultResponse, SetFaultRequest,
        SetFaultResponse,
        fault_service_client::FaultServiceClient,
        fault_service_server::{FaultService, FaultServiceServer},
    },
    feed::{Freshness, Source},
    photos::{
        Consistency, CreatePhotoRequest, GetProfileRequest, ListPhotosRequest, ListPhotosResponse, Photo,
        photos_service_client::PhotosServiceClient,
    },
    users::{User, users_service_client::UsersServiceClient},
};
use lightbox_gateway::auth::{DEFAULT_AUDIENCE, DEFAULT_ISSUER, DEVELOPMENT_SECRET, hs256_token};
use role::start_role;
use rss::rss_kib;
use tokio::{
    process::Child,
    sync::{Semaphore, mpsc},
    task::JoinSet,
};
use tonic::{
    Request, Response, Status,
    transport::{Channel, Server, server::TcpIncoming},
};

/// Set to `minimal` in the minimal server's environment.
const ROLE: &str = "MANY_USERS_ROLE";
/// Set once this process runs under `taskset -c 1`.
const PINNED: &str = "MANY_USERS_PINNED";
/// The listeners of the `lightbox dev` under test.
const LISTENERS: [&str; 4] = ["users", "contracts", "photos", "gateway"];
const CONNECTIONS: usize = 4;
const PER_CONNECTION: usize = 32;
const PAGE: usize = 10;
/// The sources of an events stream, each of which sends `synced` once.
const SOURCES: usize = 3;
/// Phones connecting at once (the rest wait), so the gateway's accept
/// backlog never overflows into SYN retries.
const OPENING: usize = 256;
/// The display name of write `n` is this followed by `n`.
const WRITE_PREFIX: &str = "write ";

fn main() -> Res<()> {
    if std::env::var(ROLE).is_ok_and(|role| role == "minimal") {
        return serve_minimal();
    }
    let args: Vec<String> = std::env::args().collect();
    let settings = Settings::parse(&args)?;
    let cores = machine_cores();
    let pinned = pin_self("many_users", PINNED, cores, &args);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(run(settings, cores, pinned))
}

/// The command line.
struct Settings {
    quick: bool,
    seconds: Duration,
    warmup: Duration,
    rounds: usize,
    phones: Vec<usize>,
    writes: usize,
    write_rate: f64,
    /// How long to wait, before each cell, for the rest of the machine to
    /// go idle.
    idle_wait: Duration,
}

impl Settings {
    fn parse(args: &[String]) -> Res<Settings> {
        let args = Args(args);
        let quick = args.flag("--quick");
        let phones = args.counts("--phones", if quick { vec![100] } else { vec![100, 1000, 10_000] })?;
        if phones.contains(&0) {
            return Err("--phones: every count must be at least 1".into());
        }
        let settings = Settings {
            quick,
            seconds: args.seconds("--seconds", if quick { 1.0 } else { 5.0 })?,
            warmup: args.seconds("--warmup", if quick { 0.5 } else { 1.0 })?,
            rounds: args.number("--rounds", if quick { 1.0 } else { 2.0 })? as usize,
            phones,
            writes: args.number("--writes", if quick { 20.0 } else { 200.0 })? as usize,
            write_rate: args.number("--write-rate", 20.0)?,
            idle_wait: args.seconds("--idle-wait", if quick { 2.0 } else { 30.0 })?,
        };
        if settings.rounds == 0 || settings.writes == 0 || settings.write_rate <= 0.0 {
            return Err("--rounds, --writes and --write-rate must be positive".into());
        }
        Ok(settings)
    }
}

async fn run(settings: Settings, cores: usize, pinned: bool) -> Res<()> {
    let minimal = MinimalServer::start(pinned).await?;
    let server = Dev::start_fresh(pinned, &LISTENERS, &[]).await?;

    println!("\n## Many users: Photos reads against a minimal tonic server, and phones on SSE\n");
    println!("{}", machine_line(cores));
    println!(
        "- pinning: {}; minimal server CPUs {} ({} tokio worker(s)); lightbox dev CPUs {} ({} tokio worker(s)); load generator CPUs {} (one thread)",
        if pinned {
            "servers on core 0, load generator on core 1"
        } else {
            NOT_PINNED
        },
        cpus_allowed(minimal.pid),
        tokio_workers(minimal.pid),
        cpus_allowed(server.pid),
        tokio_workers(server.pid),
        cpus_allowed(std::process::id()),
    );
    println!(
        "- unary load: closed loop, {} in flight = {CONNECTIONS} HTTP/2 connections × {PER_CONNECTION} tasks; warm-up {:?} per cell, then {:?} per cell; {} round(s), cells alternated{}",
        CONNECTIONS * PER_CONNECTION,
        settings.warmup,
        settings.seconds,
        settings.rounds,
        if settings.quick { " (--quick)" } else { "" }
    );
    println!(
        "- before each cell, up to {:?} waiting for the rest of the machine to use < {:.0} % of a core",
        settings.idle_wait,
        IDLE * 100.0
    );
    println!(
        "- phones: {:?}, each cell on a fresh lightbox dev; {} writes at {}/s per cell",
        settings.phones, settings.writes, settings.write_rate
    );

    let customer = Arc::new(setup_customer(&server).await?);
    let minimal_channels = connect_many(&minimal.url).await?;
    let photos_channels = connect_many(&server.url("photos")).await?;
    let channels = |cell: Cell| match cell {
        Cell::Minimal => &minimal_channels,
        _ => &photos_channels,
    };
    let pid = |cell: Cell| match cell {
        Cell::Minimal => minimal.pid,
        _ => server.pid,
    };

    for cell in Cell::ALL {
        let warm = run_cell(cell, channels(cell), &customer, settings.warmup, pid(cell)).await?;
        if warm.errors > 0 {
            eprintln!(
                "warning: the warm-up of {} had {} errors; first: {}",
                cell.name(),
                warm.errors,
                warm.first_error.as_deref().unwrap_or("?")
            );
        }
    }

    println!("\n### Unary calls, each round\n");
    println!("| round | cell | requests/s | p50 | p99 | errors | server CPU | load-gen CPU | other CPU | × minimal |");
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut results: Vec<Vec<Outcome>> = vec![Vec::new(); Cell::ALL.len()];
    let mut notes = Vec::new();
    let mut busiest: f64 = 0.0;
    for round in 1..=settings.rounds {
        let mut ceiling = f64::NAN;
        for (index, cell) in Cell::ALL.into_iter().enumerate() {
            wait_for_idle(settings.idle_wait).await?;
            let mut outcome = run_cell(cell, channels(cell), &customer, settings.seconds, pid(cell)).await?;
            if cell == Cell::Minimal {
                ceiling = outcome.rate;
            }
            outcome.share = outcome.rate / ceiling;
            println!(
                "| {round} | {} | {:.0} | {:.2} ms | {:.2} ms | {} | {:.0} % | {:.0} % | {:.0} % | {:.2} |",
                cell.name(),
                outcome.rate,
                outcome.p50,
                outcome.p99,
                outcome.errors,
                outcome.server_cpu * 100.0,
                outcome.client_cpu * 100.0,
                outcome.other_cpu * 100.0,
                outcome.share
            );
            busiest = busiest.max(outcome.other_cpu);
            if let Some(first) = &outcome.first_error {
                notes.push(format!(
                    "round {round}, {}: {} errors, first: {first}",
                    cell.name(),
                    outcome.errors
                ));
            }
            results[index].push(outcome);
        }
    }
    for note in &notes {
        println!("\nFAILED {note}");
    }
    println!(
        "\n(server CPU well below 100 % with no errors: the load generator or the machine was the limit, not the server; \
         other CPU is what the rest of the machine used meanwhile, in % of one core)"
    );
    if busiest > 0.25 {
        println!(
            "\nWARNING: other processes used up to {:.0} % of a core during a cell: the machine was not idle, numbers are contended",
            busiest * 100.0
        );
    }

    println!("\n### Unary calls, median of {} round(s)\n", settings.rounds);
    println!("| cell | requests/s | p50 | p99 | × minimal | target | verdict |");
    println!("|---|---:|---:|---:|---:|---|---|");
    let mut verdicts = Vec::new();
    for (cell, outcomes) in Cell::ALL.into_iter().zip(&results) {
        let pick = |f: fn(&Outcome) -> f64| median(outcomes.iter().map(f).collect());
        let share = pick(|o| o.share);
        let errors: usize = outcomes.iter().map(|o| o.errors).sum();
        let verdict = match cell.target() {
            _ if errors > 0 => format!("FAILED ({errors} errors)"),
            Some(target) => met(share >= target).to_owned(),
            None => "-".to_owned(),
        };
        let target = cell.target().map_or("-".to_owned(), |t| format!("≥ {t} × minimal"));
        println!(
            "| {} | {:.0} | {:.2} ms | {:.2} ms | {share:.3} | {target} | {verdict} |",
            cell.name(),
            pick(|o| o.rate),
            pick(|o| o.p50),
            pick(|o| o.p99),
        );
        if let Some(t) = cell.target() {
            verdicts.push(format!("{} ≥ {t} × minimal: {share:.3} ×: {verdict}", cell.name()));
        }
    }
    drop(photos_channels);
    drop(minimal_channels);
    minimal.stop().await;
    server.stop().await;

    println!(
        "\n### Phones: SSE `GET /v1/users/me/events`, one user each; {} renames at {}/s\n",
        settings.writes, settings.write_rate
    );
    println!(
        "| phones | opened in | RSS before | RSS idle | per phone | ack → phone p50 | p99 | max | send → phone p99 | delivered | server CPU while writing | status |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    let mut rows = Vec::new();
    for &phones in &settings.phones {
        wait_for_idle(settings.idle_wait).await?;
        match phone_cell(phones, &settings, pinned).await {
            Ok(row) => {
                let status = row
                    .failure
                    .as_deref()
                    .map_or("ok".to_owned(), |f| format!("FAILED: {f}"));
                println!(
                    "| {phones} | {:.2} s | {:.1} MiB | {:.1} MiB | {:.1} KiB | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {} / {} ({} before the ack) | {:.0} % | {status} |",
                    row.open_time.as_secs_f64(),
                    row.rss_before_kib as f64 / 1024.0,
                    row.rss_idle_kib as f64 / 1024.0,
                    row.per_phone_kib,
                    row.p50,
                    row.p99,
                    row.max,
                    row.send_p99,
                    row.delivered,
                    row.writes,
                    row.before_ack,
                    row.server_cpu * 100.0,
                );
                rows.push((phones, row));
            }
            Err(err) => println!("| {phones} | | | | | | | | | | | FAILED: {err} |"),
        }
    }

    println!("\n### Targets (issue \"Many users\")\n");
    for verdict in verdicts {
        println!("- {verdict}");
    }
    match rows.iter().max_by_key(|(n, _)| *n) {
        Some((n, row)) => {
            let verdict = if row.failure.is_some() {
                "FAILED"
            } else {
                met(row.per_phone_kib <= 16.0)
            };
            println!(
                "- memory ≤ 16 KiB per phone (at {n} phones, the most measured): {:.1} KiB: {verdict}",
                row.per_phone_kib
            );
        }
        None => println!("- memory ≤ 16 KiB per phone: no phone cell succeeded: FAILED"),
    }
    let p99_at = |n: usize| rows.iter().find(|(m, _)| *m == n).map(|(_, r)| r);
    match (p99_at(100), p99_at(10_000)) {
        (Some(small), Some(large)) => {
            let verdict = if small.failure.is_some() || large.failure.is_some() {
                "FAILED"
            } else {
                met(large.p99 <= 2.0 * small.p99)
            };
            println!(
                "- p99 at 10,000 phones ≤ 2 × p99 at 100: {:.2} ms vs {:.2} ms ({:.1} ×): {verdict}",
                large.p99,
                small.p99,
                large.p99 / small.p99
            );
        }
        _ => {
            let (smallest, largest) = (rows.first(), rows.iter().max_by_key(|(n, _)| *n));
            let extra = match (smallest, largest) {
                (Some((a, small)), Some((b, large))) if a != b => format!(
                    "; for information, p99 at {b} / p99 at {a} = {:.1} ×",
                    large.p99 / small.p99
                ),
                _ => String::new(),
            };
            println!("- p99 at 10,000 phones ≤ 2 × p99 at 100: not measured (needs 100 and 10000 in --phones){extra}");
        }
    }
    Ok(())
}

fn met(ok: bool) -> &'static str {
    if ok { "MET" } else { "MISSED" }
}

// ---------------------------------------------------------------------------
// The servers

/// The minimal server's one RPC: an empty request, a constant answer.
struct Minimal;

#[tonic::async_trait]
impl FaultService for Minimal {
    async fn get_fault(&self, _: Request<GetFaultRequest>) -> Result<Response<GetFaultResponse>, Status> {
        Ok(Response::new(GetFaultResponse {
            fault: Some(Fault::default()),
            component: String::new(),
        }))
    }

    async fn set_fault(&self, _: Request<SetFaultRequest>) -> Result<Response<SetFaultResponse>, Status> {
        Err(Status::unimplemented("the minimal server only answers GetFault"))
    }

    async fn clear_fault(&self, _: Request<ClearFaultRequest>) -> Result<Response<ClearFaultResponse>, Status> {
        Err(Status::unimplemented("the minimal server only answers GetFault"))
    }
}

/// `MANY_USERS_ROLE=minimal`: serves [`Minimal`] on 127.0.0.1:0 with one
/// tokio worker, printing `minimal ADDR` once listening.
fn serve_minimal() -> Res<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        println!("minimal {}", listener.local_addr()?);
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        Server::builder()
            .add_service(FaultServiceServer::new(Minimal))
            .serve_with_incoming(incoming)
            .await?;
        Ok(())
    })
}

struct MinimalServer {
    child: Child,
    pid: u32,
    url: String,
}

impl MinimalServer {
    async fn start(pinned: bool) -> Res<MinimalServer> {
        let (child, pid, line) = start_role(pinned, &[(ROLE, "minimal")], "the minimal server").await?;
        let addr = line
            .strip_prefix("minimal ")
            .ok_or_else(|| format!("the minimal server said {line:?}"))?;
        let url = format!("http://{addr}");
        Ok(MinimalServer { child, pid, url })
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// [`CONNECTIONS`] channels, each its own HTTP/2 connection.
async fn connect_many(url: &str) -> Res<Vec<Channel>> {
    let mut channels = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        channels.push(connect(url).await?);
    }
    Ok(channels)
}

// ---------------------------------------------------------------------------
// Unary cells

/// The customer the Photos cells read.
struct Customer {
    user_id: String,
}

/// A user, a contract (photo quota 100), the link, and [`PAGE`] photos,
/// created over gRPC; answers once Photos' copies hold them.
async fn setup_customer(server: &Dev) -> Res<Customer> {
    let (user, contract) = create_customer(server, "Many Photos", "many-photos@example.com", 100).await?;
    let mut photos = PhotosServiceClient::new(connect(&server.url("photos")).await?);
    for i in 0..PAGE {
        let request = CreatePhotoRequest {
            photo: Some(Photo {
                user_id: user.id.clone(),
                title: format!("Photo {i}"),
                content_type: "image/jpeg".into(),
                size_bytes: 1_000_000 + i as i64,
                ..Photo::default()
            }),
        };
        // The owner may not have reached Photos yet: a few tries.
        let mut tries = 1;
        while let Err(status) = photos.create_photo(request.clone()).await {
            if tries == 50 {
                return Err(format!("CreatePhoto, {tries} tries: {}", status_text(&status)).into());
            }
            tries += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Wait until the copies answer with it all.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = photos
            .list_photos(ListPhotosRequest {
                user_id: user.id.clone(),
                page_size: PAGE as i32,
                consistency: Consistency::Cached as i32,
                min_users_revision: user.revision,
                min_contracts_revision: contract.revision,
                ..ListPhotosRequest::default()
            })
            .await;
        let check = match answer {
            Ok(answer) => check_list(&answer.into_inner(), Source::Cache),
            Err(status) => Err(status_text(&status)),
        };
        match check {
            Ok(()) => break,
            Err(why) if Instant::now() > deadline => {
                return Err(format!("Photos' copies do not hold the customer after 30 s: {why}").into());
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    Ok(Customer { user_id: user.id })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Cell {
    Minimal,
    GetProfile,
    ListCached,
    ListFresh,
}

impl Cell {
    const ALL: [Cell; 4] = [Cell::Minimal, Cell::GetProfile, Cell::ListCached, Cell::ListFresh];

    fn name(self) -> &'static str {
        match self {
            Cell::Minimal => "minimal tonic server (GetFault)",
            Cell::GetProfile => "GetProfile CACHED",
            Cell::ListCached => "ListPhotos CACHED (10 photos)",
            Cell::ListFresh => "ListPhotos FRESH (10 photos)",
        }
    }

    /// The issue's target, as a share of the minimal server's requests/s.
    fn target(self) -> Option<f64> {
        match self {
            Cell::GetProfile => Some(0.7),
            Cell::ListCached => Some(0.5),
            Cell::Minimal | Cell::ListFresh => None,
        }
    }
}

/// One load task's client.
enum Caller {
    Minimal(FaultServiceClient<Channel>),
    Photos {
        client: PhotosServiceClient<Channel>,
        cell: Cell,
        customer: Arc<Customer>,
    },
}

impl Caller {
    fn new(cell: Cell, channel: Channel, customer: &Arc<Customer>) -> Caller {
        match cell {
            Cell::Minimal => Caller::Minimal(FaultServiceClient::new(channel)),
            _ => Caller::Photos {
                client: PhotosServiceClient::new(channel),
                cell,
                customer: Arc::clone(customer),
            },
        }
    }

    /// One call, its status and answer checked.
    async fn call(&mut self) -> Result<(), String> {
        match self {
            Caller::Minimal(client) => {
                let answer = client
                    .get_fault(GetFaultRequest::default())
                    .await
                    .map_err(|s| status_text(&s))?;
                answer
                    .into_inner()
                    .fault
                    .map(drop)
                    .ok_or_else(|| "no fault in the answer".to_owned())
            }
            Caller::Photos {
                client,
                cell: Cell::GetProfile,
                customer,
            } => {
                let request = GetProfileRequest {
                    user_id: customer.user_id.clone(),
                    consistency: Consistency::Cached as i32,
                    ..GetProfileRequest::default()
                };
                let answer = client
                    .get_profile(request)
                    .await
                    .map_err(|s| status_text(&s))?
                    .into_inner();
                check_owner(
                    answer.user.as_ref(),
                    answer.contract.is_some(),
                    answer.user_freshness.as_ref(),
                    answer.contract_freshness.as_ref(),
                    Source::Cache,
                )
            }
            Caller::Photos { client, cell, customer } => {
                let (consistency, source) = match cell {
                    Cell::ListFresh => (Consistency::Fresh, Source::Upstream),
                    _ => (Consistency::Cached, Source::Cache),
                };
                let request = ListPhotosRequest {
                    user_id: customer.user_id.clone(),
                    page_size: PAGE as i32,
                    consistency: consistency as i32,
                    ..ListPhotosRequest::default()
                };
                let answer = client
                    .list_photos(request)
                    .await
                    .map_err(|s| status_text(&s))?
                    .into_inner();
                check_list(&answer, source)
            }
        }
    }
}

fn check_list(answer: &ListPhotosResponse, source: Source) -> Result<(), String> {
    if answer.photos.len() != PAGE {
        return Err(format!("{} photos instead of {PAGE}", answer.photos.len()));
    }
    let contract_freshness = match source {
        // The chain's contract freshness is the Users service's business.
        Source::Upstream => None,
        _ => answer.contract_freshness.as_ref(),
    };
    check_owner(
        answer.user.as_ref(),
        answer.contract.is_some(),
        answer.user_freshness.as_ref(),
        contract_freshness,
        source,
    )
}

/// The owner is there with a contract, read from where it was asked for.
fn check_owner(
    user: Option<&User>,
    has_contract: bool,
    user_freshness: Option<&Freshness>,
    contract_freshness: Option<&Freshness>,
    source: Source,
) -> Result<(), String> {
    if user.is_none() || !has_contract {
        return Err("the answer lacks the user or their contract".into());
    }
    let from = |f: Option<&Freshness>| f.map_or(Source::Unspecified as i32, |f| f.source);
    if from(user_freshness) != source as i32 {
        return Err(format!(
            "the user came from source {} instead of {source:?}",
            from(user_freshness)
        ));
    }
    if contract_freshness.is_some() && from(contract_freshness) != source as i32 {
        return Err(format!(
            "the contract came from source {} instead of {source:?}",
            from(contract_freshness)
        ));
    }
    Ok(())
}

#[derive(Clone, Default)]
struct Outcome {
    rate: f64,
    p50: f64,
    p99: f64,
    errors: usize,
    first_error: Option<String>,
    /// Shares of one core over the window: the server's, the load
    /// generator's, and everything else on the machine (cores' worth).
    server_cpu: f64,
    client_cpu: f64,
    other_cpu: f64,
    /// `rate` over the minimal server's in the same round.
    share: f64,
}

#[derive(Default)]
struct Tally {
    samples: Vec<f64>,
    errors: usize,
    first_error: Option<String>,
}

/// Closed loop for `length`: every task sends its next call as soon as the
/// last answers. `pid` is the server's, for its CPU time.
async fn run_cell(
    cell: Cell,
    channels: &[Channel],
    customer: &Arc<Customer>,
    length: Duration,
    pid: u32,
) -> Res<Outcome> {
    let (server_before, client_before) = (cpu_seconds(pid)?, cpu_seconds(std::process::id())?);
    let machine_before = machine_busy_seconds()?;
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for channel in channels {
        for _ in 0..PER_CONNECTION {
            let mut caller = Caller::new(cell, channel.clone(), customer);
            tasks.spawn(async move {
                let mut tally = Tally::default();
                while start.elapsed() < length {
                    let sent = Instant::now();
                    match caller.call().await {
                        Ok(()) => tally.samples.push(sent.elapsed().as_secs_f64() * 1e3),
                        Err(err) => {
                            tally.errors += 1;
                            tally.first_error.get_or_insert(err);
                        }
                    }
                }
                tally
            });
        }
    }
    let mut all = Tally::default();
    while let Some(done) = tasks.join_next().await {
        let tally = done?;
        all.samples.extend(tally.samples);
        all.errors += tally.errors;
        if all.first_error.is_none() {
            all.first_error = tally.first_error;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let server_cpu = (cpu_seconds(pid)? - server_before) / elapsed;
    let client_cpu = (cpu_seconds(std::process::id())? - client_before) / elapsed;
    let machine = (machine_busy_seconds()? - machine_before) / elapsed;
    let other_cpu = (machine - server_cpu - client_cpu).max(0.0);
    let rate = all.samples.len() as f64 / elapsed;
    all.samples.sort_by(f64::total_cmp);
    Ok(Outcome {
        rate,
        p50: quantile(&all.samples, 0.5),
        p99: quantile(&all.samples, 0.99),
        errors: all.errors,
        first_error: all.first_error,
        server_cpu,
        client_cpu,
        other_cpu,
        share: f64::NAN,
    })
}

// ---------------------------------------------------------------------------
// Phones

struct PhoneRow {
    open_time: Duration,
    rss_before_kib: u64,
    rss_idle_kib: u64,
    per_phone_kib: f64,
    p50: f64,
    p99: f64,
    max: f64,
    send_p99: f64,
    writes: usize,
    delivered: usize,
    before_ack: usize,
    server_cpu: f64,
    /// What went wrong, if anything did (the numbers are then partial).
    failure: Option<String>,
}

/// A phone's receipt of write `seq`.
struct Delivery {
    seq: usize,
    phone: usize,
    at: Instant,
}

/// A write, acknowledged.
struct Write {
    phone: usize,
    sent: Instant,
    acked: Instant,
}

async fn phone_cell(phones: usize, settings: &Settings, pinned: bool) -> Res<PhoneRow> {
    let max_streams = (phones + 1000).max(10_000);
    let extra = ["--gateway-max-event-streams".into(), max_streams.to_string()];
    let server = Dev::start_fresh(pinned, &LISTENERS, &extra).await?;
    let users_channel = connect(&server.url("users")).await?;
    let people = create_phone_users(&users_channel, phones).await?;
    let tokens = people
        .iter()
        .map(|user| {
            hs256_token(
                DEVELOPMENT_SECRET.as_bytes(),
                DEFAULT_ISSUER,
                DEFAULT_AUDIENCE,
                &user.id,
                Duration::from_secs(3600),
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let settle = Duration::from_secs(1);
    tokio::time::sleep(settle).await;
    let rss_before = rss_kib(server.pid)?;

    // Open every phone; each says when it has its three `synced` events.
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(0)
        .build()?;
    let url = Arc::new(format!("{}/v1/users/me/events", server.url("gateway")));
    let (ready_tx, mut ready) = mpsc::unbounded_channel::<Result<(), String>>();
    let (delivery_tx, mut deliveries) = mpsc::unbounded_channel::<Delivery>();
    let lost = Arc::new(AtomicUsize::new(0));
    let opening = Arc::new(Semaphore::new(OPENING));
    let mut readers = JoinSet::new();
    let opened = Instant::now();
    for (index, token) in tokens.into_iter().enumerate() {
        let phone = Phone {
            index,
            http: http.clone(),
            url: Arc::clone(&url),
            token,
            opening: Arc::clone(&opening),
            ready: ready_tx.clone(),
            deliveries: delivery_tx.clone(),
            lost: Arc::clone(&lost),
        };
        readers.spawn(phone.run());
    }
    drop((ready_tx, delivery_tx));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60) + Duration::from_millis(10 * phones as u64);
    let (mut synced, mut failed, mut first_failure) = (0, 0, None);
    while synced + failed < phones {
        match tokio::time::timeout_at(deadline, ready.recv()).await {
            Ok(Some(Ok(()))) => synced += 1,
            Ok(Some(Err(err))) => {
                failed += 1;
                first_failure.get_or_insert(err);
            }
            Ok(None) => break,
            Err(_) => {
                return Err(format!(
                    "{synced} of {phones} phones synced after {:.0} s",
                    opened.elapsed().as_secs_f64()
                )
                .into());
            }
        }
    }
    if failed > 0 || synced < phones {
        return Err(format!(
            "{} of {phones} phones could not open their stream; first: {}",
            phones - synced,
            first_failure.as_deref().unwrap_or("?")
        )
        .into());
    }
    let open_time = opened.elapsed();
    tokio::time::sleep(settle).await;
    let rss_idle = rss_kib(server.pid)?;

    // Rename random users at the write rate; each rename reaches one phone.
    let mut users = UsersServiceClient::new(users_channel.clone());
    let mut writes: Vec<Option<Write>> = Vec::with_capacity(settings.writes);
    let (mut write_errors, mut first_write_error) = (0, None);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / settings.write_rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let cpu_before = cpu_seconds(server.pid)?;
    let writing = Instant::now();
    for seq in 0..settings.writes {
        tick.tick().await;
        let phone = fastrand::usize(..phones);
        match rename(&mut users, &people[phone], format!("{WRITE_PREFIX}{seq}")).await {
            Ok((sent, acked, _)) => writes.push(Some(Write { phone, sent, acked })),
            Err(status) => {
                write_errors += 1;
                first_write_error.get_or_insert(status_text(&status));
                writes.push(None);
            }
        }
    }
    let expected = writes.iter().flatten().count();
    let mut received: Vec<Option<Instant>> = vec![None; writes.len()];
    let (mut delivered, mut misdelivered) = (0, 0);
    let grace = tokio::time::Instant::now() + Duration::from_secs(5);
    while delivered < expected {
        let Ok(Some(delivery)) = tokio::time::timeout_at(grace, deliveries.recv()).await else {
            break;
        };
        match writes.get(delivery.seq).and_then(Option::as_ref) {
            Some(write) if write.phone == delivery.phone && received[delivery.seq].is_none() => {
                received[delivery.seq] = Some(delivery.at);
                delivered += 1;
            }
            _ => misdelivered += 1,
        }
    }
    let window = writing.elapsed().as_secs_f64();
    let server_cpu = (cpu_seconds(server.pid)? - cpu_before) / window;
    let lost = lost.load(Ordering::Relaxed);
    readers.abort_all();
    server.stop().await;

    let (mut from_ack, mut from_send, mut before_ack) = (Vec::new(), Vec::new(), 0);
    for (write, at) in writes.iter().zip(&received) {
        if let (Some(write), Some(at)) = (write, at) {
            if *at < write.acked {
                before_ack += 1;
            }
            from_ack.push(at.saturating_duration_since(write.acked).as_secs_f64() * 1e3);
            from_send.push(at.saturating_duration_since(write.sent).as_secs_f64() * 1e3);
        }
    }
    from_ack.sort_by(f64::total_cmp);
    from_send.sort_by(f64::total_cmp);
    let mut problems = Vec::new();
    if write_errors > 0 {
        problems.push(format!(
            "{write_errors} writes failed (first: {})",
            first_write_error.as_deref().unwrap_or("?")
        ));
    }
    if delivered < expected {
        problems.push(format!("{} deliveries missing after 5 s", expected - delivered));
    }
    if misdelivered > 0 {
        problems.push(format!("{misdelivered} deliveries to the wrong phone or twice"));
    }
    if lost > 0 {
        problems.push(format!("{lost} streams ended while open"));
    }
    Ok(PhoneRow {
        open_time,
        rss_before_kib: rss_before,
        rss_idle_kib: rss_idle,
        per_phone_kib: rss_idle.saturating_sub(rss_before) as f64 / phones as f64,
        p50: quantile(&from_ack, 0.5),
        p99: quantile(&from_ack, 0.99),
        max: from_ack.last().copied().unwrap_or(f64::NAN),
        send_p99: quantile(&from_send, 0.99),
        writes: writes.len(),
        delivered,
        before_ack,
        server_cpu,
        failure: (!problems.is_empty()).then(|| problems.join("; ")),
    })
}

/// `count` users, created over gRPC 16 at a time.
async fn create_phone_users(channel: &Channel, count: usize) -> Res<Vec<User>> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..16 {
        let mut client = UsersServiceClient::new(channel.clone());
        let next = Arc::clone(&next);
        tasks.spawn(async move {
            let mut made = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return Ok::<_, String>(made);
                }
                let display_name = format!("Phone {i}");
                let user =
                    create_user(&mut client, i, display_name, format!("phone{i}@many-users.example.com")).await?;
                made.push((i, user));
            }
        });
    }
    let mut made = Vec::with_capacity(count);
    while let Some(done) = tasks.join_next().await {
        made.extend(done??);
    }
    made.sort_by_key(|(i, _)| *i);
    Ok(made.into_iter().map(|(_, user)| user).collect())
}

/// One phone: its events stream, read until the bench ends.
struct Phone {
    index: usize,
    http: reqwest::Client,
    url: Arc<String>,
    token: String,
    opening: Arc<Semaphore>,
    ready: mpsc::UnboundedSender<Result<(), String>>,
    deliveries: mpsc::UnboundedSender<Delivery>,
    lost: Arc<AtomicUsize>,
}

impl Phone {
    async fn run(self) {
        let mut permit = self.opening.acquire().await.ok();
        let response = self.http.get(self.url.as_str()).bearer_auth(&self.token).send().await;
        let mut response = match response {
            Ok(response) if response.status().is_success() => response,
            Ok(response) => {
                let status = response.status();
                let body = response.text().await.unwrap_or_default();
                let _ = self.ready.send(Err(format!("the gateway answered {status}: {body}")));
                return;
            }
            Err(err) => {
                let _ = self.ready.send(Err(format!("cannot open the stream: {err}")));
                return;
            }
        };
        let mut reader = SseReader::default();
        let mut synced = 0;
        let ended = loop {
            let chunk = match response.chunk().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break "the stream ended".to_owned(),
                Err(err) => break format!("the stream broke: {err}"),
            };
            let at = Instant::now();
            reader.feed(&chunk, |kind, data| match kind {
                Kind::Synced => {
                    synced += 1;
                    if synced == SOURCES {
                        permit = None;
                        let _ = self.ready.send(Ok(()));
                    }
                }
                Kind::User => {
                    if let Some(seq) = write_seq(data) {
                        let _ = self.deliveries.send(Delivery {
                            seq,
                            phone: self.index,
                            at,
                        });
                    }
                }
                Kind::Other => {}
            });
        };
        drop(permit);
        if synced < SOURCES {
            let _ = self.ready.send(Err(format!("{ended} after {synced} synced events")));
        } else {
            self.lost.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The events a phone looks at.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
enum Kind {
    #[default]
    Other,
    Synced,
    User,
}

/// Splits an SSE byte stream into events: `event:` and `data:` lines up to
/// a blank line (comments and ids are skipped).
#[derive(Default)]
struct SseReader {
    buffer: Vec<u8>,
    kind: Kind,
    data: Vec<u8>,
}

impl SseReader {
    fn feed(&mut self, chunk: &[u8], mut on_event: impl FnMut(Kind, &[u8])) {
        self.buffer.extend_from_slice(chunk);
        let mut start = 0;
        while let Some(length) = self.buffer[start..].iter().position(|b| *b == b'\n') {
            let line = &self.buffer[start..start + length];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.is_empty() {
                on_event(self.kind, &self.data);
                self.kind = Kind::Other;
                self.data.clear();
            } else if let Some(name) = line.strip_prefix(b"event:") {
                self.kind = match name.trim_ascii() {
                    b"synced" => Kind::Synced,
                    b"user" => Kind::User,
                    _ => Kind::Other,
                };
            } else if let Some(value) = line.strip_prefix(b"data:") {
                self.data.extend_from_slice(value.strip_prefix(b" ").unwrap_or(value));
            }
            start += length + 1;
        }
        self.buffer.drain(..start);
    }
}

/// The sequence number of the write a `user` event carries, if it is one.
fn write_seq(data: &[u8]) -> Option<usize> {
    let change: serde_json::Value = serde_json::from_slice(data).ok()?;
    change
        .get("user")?
        .get("displayName")?
        .as_str()?
        .strip_prefix(WRITE_PREFIX)?
        .parse()
        .ok()
}
