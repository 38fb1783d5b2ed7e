//! Pull vs push: how fast a change reaches the local copies, and what
//! following costs the upstream, for copies that watch (push) and copies
//! that poll `ListUserChanges` every 100 ms and every 1 s (pull), with 1
//! and 100 followers, side by side in one run.
//!
//! `cargo bench --bench pull_push [-- --rounds 2 --followers 1,100 --polls 100ms,1s --writes 100 --write-rate 20 --idle 10 --idle-wait 30 --postgres 127.0.0.1:5432 --sqlite]`
//! (`-- --quick`: one round, 20 writes, 2 s idle windows, 2 s of idle wait
//! at most; well under a minute once built, for CI)
//!
//! Cells, alternated A B C … A B C … over the rounds (`--rounds`, default
//! 2; the summary takes each figure's median over the rounds):
//!
//! 1. `none`, 0 followers: the upstream alone (its own tail, leases,
//!    progress), and the writer's own cost;
//! 2. for each follower count N of `--followers` (default 1 and 100):
//!    `watch` (each copy its own `WatchUsers` stream), then `poll 100 ms`
//!    and `poll 1 s` (each copy polls `ListUserChanges` itself; the
//!    intervals of `--polls`).
//!
//! A follower is a `lightbox_cache::Cache<User>` in this process, as a
//! service holds one: its own SQLite file in a temporary directory, its own
//! balanced, health-checked channel (`lightbox_cache::sources::channel`:
//! one HTTP/2 connection, plus the client's `grpc.health.v1.Health/Watch`
//! on it), following with `Cache::follow_upstream` and
//! `CacheOptions::follow` = `FollowMode::Watch` or `FollowMode::poll(I)`
//! (the defaults otherwise: page size 500, ±10 % jitter on the interval).
//! Each cell opens N fresh copies, waits until every one holds the
//! upstream's head (the initial snapshot or state listing), lets them
//! settle 1 s, then:
//!
//! - **idle** (`--idle` seconds, default 10): followers connected, no
//!   writes: where polling costs and watching does not;
//! - **writing**: `--writes` renames (default 100) at `--write-rate`
//!   writes/s (default 20) over gRPC (`UpdateUser`, the display name
//!   carrying the write's sequence number), from the first write until
//!   every copy holds the last one. For every write and every follower, the
//!   time from the write's acknowledgement until that copy holds the
//!   write's revision: a task per copy waits on the copy's own notification
//!   (`Cache::wait_for`, the `tokio::sync::watch` the copy sends its state
//!   on after it publishes a snapshot), so no polling of ours adds error.
//!   p50 and p99 are over all (write, copy) pairs; "last copy p99" is the
//!   p99 over writes of the slowest copy. The time includes each copy's
//!   own durable apply (an SQLite transaction per batch, before the copy
//!   shows it), and with 100 copies all of them share core 1.
//!
//! Everything is checked: every write must be acknowledged, every copy must
//! hold the last revision within 10 s plus two poll intervals, and hold
//! exactly the display names last written; otherwise the cell says FAILED
//! with counts. Copies that had to reconnect (a stream ended, a poll failed)
//! are counted in the status.
//!
//! Upstream cost, per window, divided by the window's length:
//!
//! - **database transactions and queries per second** (PostgreSQL only).
//!   The server talks to PostgreSQL through a counting proxy (this bench's
//!   own binary re-run with `PULL_PUSH_ROLE=proxy`, pinned with the server
//!   to core 0) that reads the server's side of the wire protocol: a
//!   *transaction* is a `ReadyForQuery` back to idle after any work (an
//!   autocommit statement, a `COMMIT`, a `ROLLBACK`, an error, or a
//!   statement prepared on its own, which PostgreSQL also runs in a
//!   transaction: what `pg_stat_database`'s `xact_commit + xact_rollback`
//!   count); a *query* is a `CommandComplete` other than
//!   `BEGIN`/`COMMIT`/`ROLLBACK`; the pool's pings (a bare `Sync`) count
//!   as neither. PostgreSQL counts more transactions than the server
//!   asks for, which the columns leave out: one as each connection starts,
//!   one each time a listening connection (the feeds' `LISTEN`) reads the
//!   notifications of a write (per write: the same in every mode), and its
//!   own autovacuum's. `pg_stat_database` itself is not sampled per
//!   window: a backend publishes its counts at most once a second and,
//!   once idle, up to 10 s late (PostgreSQL 15), which would move counts
//!   between windows. Instead, once the server has stopped (its backends
//!   publish as they exit), the proxy's total plus connections and
//!   notifications is compared with `pg_stat_database`'s
//!   `xact_commit + xact_rollback` for the whole run; a difference of more
//!   than 1 % is reported with the autovacuum and autoanalyze runs that
//!   may explain it (`pg_stat_all_tables`).
//!   Nothing is subtracted: the `none` cell is the upstream's own floor.
//!   The database is `lightbox_bench_<pid>`, created on 127.0.0.1:5432
//!   (`--postgres`; user postgres, trust) and dropped at the end. Without
//!   PostgreSQL (or with `--sqlite`) the server runs on SQLite files and
//!   the database columns say "not measured".
//! - **server CPU**: utime + stime of `lightbox dev` from `/proc/PID/stat`,
//!   in % of one core (the proxy's, on the same core, in parentheses).
//! - **gRPC calls/s** and **messages sent/s** (`msgs/s`: a unary answer is
//!   one, a watch's frames one each) of the Users service, from the
//!   server's `grpc_server_started_total` and `grpc_server_msg_sent_total`
//!   at `http://ADMIN/metrics` (its admin listener, read from the banner).
//!   The followers' health watches (`grpc.health.v1.Health`) are not
//!   counted.
//! - **polls/s** the copies made (their `CacheState::polls`), and the share
//!   of them that found nothing (`empty_polls`).
//! - **follower-side CPU**: this process (the copies, their SQLite threads,
//!   the writer), in % of one core: near 100 % means the followers' core,
//!   not the upstream, was the limit.
//!
//! The server under test is `lightbox dev --target users,contracts
//! --no-demo` (the release binary, every port 127.0.0.1:0, addresses read
//! from its banner) with `TOKIO_WORKER_THREADS=1` (the binary has no flag
//! of its own; `#[tokio::main]` honours the variable), its copies watching
//! (`--follow` is left at its default: the copies under test are this
//! bench's), pinned to core 0 with `taskset -c 0`; this process re-runs
//! itself under `taskset -c 1` (`PULL_PUSH_PINNED=1`) and runs the writer
//! and every follower on one thread on core 1. PostgreSQL is not pinned.
//! On a machine with one core, or without `taskset`, nothing is pinned and
//! the header says so. Before each cell the bench waits (up to
//! `--idle-wait` seconds) for the machine to go idle, and warns of the
//! cells that started on a busy one.

#[path = "support/cpu.rs"]
mod cpu;
#[path = "support/duration.rs"]
mod duration;
#[path = "support/harness.rs"]
mod harness;
#[path = "support/role.rs"]
mod role;

use std::{
    error::Error,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use cpu::cpu_seconds;
use duration::parse_duration;
use harness::{
    Args, Dev, IDLE, NOT_PINNED, Res, connect, cpus_allowed, create_user, machine_cores, machine_line, median,
    pin_self, quantile, rename, status_text, tokio_workers, wait_for_idle,
};
use lightbox_api::users::{User, users_service_client::UsersServiceClient};
use lightbox_cache::{Cache, CacheOptions, FollowMode, sources};
use lightbox_changefeed::Db;
use role::start_role;
use sqlx::Connection;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    process::Child,
    task::JoinSet,
};
use tonic::transport::Channel;

/// Set to `proxy` in the counting proxy's environment.
const ROLE: &str = "PULL_PUSH_ROLE";
/// Where the proxy forwards to (`host:port`).
const UPSTREAM: &str = "PULL_PUSH_UPSTREAM";
/// Set once this process runs under `taskset -c 1`.
const PINNED: &str = "PULL_PUSH_PINNED";
/// Users the writer renames in turn.
const PEOPLE: usize = 10;
/// The display name of write `n` is this followed by `n`.
const WRITE_PREFIX: &str = "write ";
const USERS_SERVICE: &str = "lightbox.users.v1.UsersService";

fn main() -> Res<()> {
    if std::env::var(ROLE).is_ok_and(|role| role == "proxy") {
        return serve_proxy();
    }
    let args: Vec<String> = std::env::args().collect();
    let settings = Settings::parse(&args)?;
    let cores = machine_cores();
    let pinned = pin_self("pull_push", PINNED, cores, &args);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(run(settings, cores, pinned))
}

/// The command line.
struct Settings {
    quick: bool,
    rounds: usize,
    followers: Vec<usize>,
    polls: Vec<Duration>,
    writes: usize,
    write_rate: f64,
    /// The idle window of each cell.
    idle: Duration,
    /// How long to wait, before each cell, for the machine to go idle.
    idle_wait: Duration,
    /// PostgreSQL's `host:port`, unless `--sqlite`.
    postgres: Option<String>,
}

impl Settings {
    fn parse(args: &[String]) -> Res<Settings> {
        let args = Args(args);
        let quick = args.flag("--quick");
        let followers = args.counts("--followers", vec![1, 100])?;
        if followers.contains(&0) {
            return Err("--followers: every count must be at least 1 (the `none` cell is always run)".into());
        }
        let polls = match args.value("--polls") {
            Some(list) => list.split(',').map(parse_duration).collect::<Result<Vec<_>, _>>()?,
            None => vec![Duration::from_millis(100), Duration::from_secs(1)],
        };
        if polls.iter().any(Duration::is_zero) {
            return Err("--polls: every interval must be positive".into());
        }
        let settings = Settings {
            quick,
            rounds: args.number("--rounds", if quick { 1.0 } else { 2.0 })? as usize,
            followers,
            polls,
            writes: args.number("--writes", if quick { 20.0 } else { 100.0 })? as usize,
            write_rate: args.number("--write-rate", 20.0)?,
            idle: args.seconds("--idle", if quick { 2.0 } else { 10.0 })?,
            idle_wait: args.seconds("--idle-wait", if quick { 2.0 } else { 30.0 })?,
            postgres: match args.flag("--sqlite") {
                true => None,
                false => Some(args.value("--postgres").unwrap_or_else(|| "127.0.0.1:5432".to_owned())),
            },
        };
        if settings.rounds == 0 || settings.writes == 0 || settings.write_rate <= 0.0 || settings.idle.is_zero() {
            return Err("--rounds, --writes, --write-rate and --idle must be positive".into());
        }
        Ok(settings)
    }
}

/// How the copies of a cell follow.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// No copies: the upstream alone.
    None,
    Watch,
    Poll(Duration),
}

impl Mode {
    fn name(self) -> String {
        match self {
            Mode::None => "none".into(),
            Mode::Watch => "watch".into(),
            Mode::Poll(interval) if interval.subsec_millis() == 0 || interval >= Duration::from_secs(10) => {
                format!("poll {} s", interval.as_secs_f64())
            }
            Mode::Poll(interval) => format!("poll {} ms", interval.as_millis()),
        }
    }

    fn follow(self) -> FollowMode {
        match self {
            Mode::Poll(interval) => FollowMode::poll(interval),
            Mode::None | Mode::Watch => FollowMode::Watch,
        }
    }

    /// The longest a copy may take to see a write, beyond the machine's own
    /// delays.
    fn grace(self) -> Duration {
        match self {
            Mode::Poll(interval) => Duration::from_secs(10) + interval * 2,
            Mode::None | Mode::Watch => Duration::from_secs(10),
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
struct Cell {
    mode: Mode,
    followers: usize,
}

impl Cell {
    fn all(settings: &Settings) -> Vec<Cell> {
        let mut cells = vec![Cell {
            mode: Mode::None,
            followers: 0,
        }];
        for &followers in &settings.followers {
            cells.push(Cell {
                mode: Mode::Watch,
                followers,
            });
            for &interval in &settings.polls {
                cells.push(Cell {
                    mode: Mode::Poll(interval),
                    followers,
                });
            }
        }
        cells
    }
}

async fn run(settings: Settings, cores: usize, pinned: bool) -> Res<()> {
    println!("\n## Pull vs push: copies of users that watch or poll, 1 to 100 followers\n");
    println!("{}", machine_line(cores));
    // PostgreSQL if reachable: a fresh database, reached through the counting proxy.
    let mut postgres = None;
    if let Some(addr) = &settings.postgres {
        match Postgres::create(addr, pinned).await {
            Ok(pg) => postgres = Some(pg),
            Err(err) => println!(
                "- database: PostgreSQL at {addr} is not usable ({err}): SQLite files instead; DB queries are NOT measured"
            ),
        }
    } else {
        println!("- database: SQLite files (--sqlite); DB queries are NOT measured");
    }
    let outcome = run_with(&settings, pinned, postgres.as_mut()).await;
    if let Some(pg) = postgres {
        pg.drop_database().await;
    }
    outcome
}

async fn run_with(settings: &Settings, pinned: bool, mut postgres: Option<&mut Postgres>) -> Res<()> {
    let database_url = postgres.as_ref().map(|pg| pg.server_url());
    let mut extra: Vec<String> = ["--target", "users,contracts", "--no-demo"].map(String::from).into();
    if let Some(url) = database_url {
        extra.extend(["--database-url".to_owned(), url]);
    }
    let server = Dev::start_fresh(pinned, &["users", "contracts", "admin"], &extra).await?;
    if let Some(pg) = &postgres {
        println!(
            "- database: PostgreSQL {} at {}, database {}, through the counting proxy at {} (pid {}, CPUs {})",
            pg.version,
            pg.addr,
            pg.name,
            pg.proxy.pg_addr,
            pg.proxy.pid,
            cpus_allowed(pg.proxy.pid)
        );
    }
    println!(
        "- pinning: {}; lightbox dev CPUs {} ({} tokio worker(s)); followers and writer CPUs {} (one thread)",
        if pinned {
            "server (and proxy) on core 0, followers and writer on core 1, PostgreSQL unpinned"
        } else {
            NOT_PINNED
        },
        cpus_allowed(server.pid),
        tokio_workers(server.pid),
        cpus_allowed(std::process::id()),
    );
    println!(
        "- per cell: copies opened and synced, 1 s settle, {:?} idle, then {} writes at {}/s; {} round(s), cells alternated{}",
        settings.idle,
        settings.writes,
        settings.write_rate,
        settings.rounds,
        if settings.quick { " (--quick)" } else { "" }
    );
    println!(
        "- before each cell, up to {:?} waiting for the machine to use < {:.0} % of a core",
        settings.idle_wait,
        IDLE * 100.0
    );

    let writer = connect(&server.url("users")).await?;
    let mut people = create_people(&writer).await?;
    let mut head = people.iter().map(|p| p.revision).max().unwrap_or(0);
    let http = reqwest::Client::new();
    let probe = Probe {
        server: server.pid,
        proxy: postgres.as_ref().map(|pg| (pg.proxy.pid, pg.proxy.stats_addr.clone())),
        metrics: format!("{}/metrics", server.url("admin")),
        http,
    };
    // Check before timing: the metrics answer, the proxy counts.
    let first = probe.sample(&[]).await?;
    if first.calls.is_none() {
        println!(
            "- WARNING: {} did not answer metrics: gRPC calls not measured",
            probe.metrics
        );
    }
    if let Some(db) = first.db {
        if db.transactions == 0 {
            return Err("the proxy counted no database transaction during set-up: its counts are wrong".into());
        }
        if db.unparsed > 0 {
            return Err(format!("the proxy could not read {} connection(s) (TLS?)", db.unparsed).into());
        }
    }

    let cells = Cell::all(settings);
    let mut results: Vec<Vec<Outcome>> = vec![Vec::new(); cells.len()];
    println!("\n### Each round\n");
    println!(
        "| round | mode | followers | ack → copy p50 | p99 | last copy p99 | max | writing: DB tx/s | queries/s | server CPU | gRPC calls/s | msgs/s | idle: DB tx/s | queries/s | server CPU | gRPC calls/s | msgs/s | polls/s (empty) | follower-side CPU | status |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    let mut busy_starts = Vec::new();
    for round in 1..=settings.rounds {
        for (index, cell) in cells.iter().enumerate() {
            let busy = wait_for_idle(settings.idle_wait).await?;
            if busy >= IDLE {
                busy_starts.push(format!(
                    "round {round}, {} × {}: {:.0} %",
                    cell.mode.name(),
                    cell.followers,
                    busy * 100.0
                ));
            }
            let outcome = match run_cell(*cell, settings, &probe, &server, &writer, &mut people, head).await {
                Ok(outcome) => outcome,
                Err(err) => Outcome::failed(format!("{err}")),
            };
            head = head.max(outcome.head);
            print_round_row(round, *cell, &outcome);
            results[index].push(outcome);
        }
    }

    if !busy_starts.is_empty() {
        println!(
            "\nWARNING: {} cell(s) started on a busy machine (after {:?} of waiting, the machine used this much of a core: {}): \
             numbers are contended",
            busy_starts.len(),
            settings.idle_wait,
            busy_starts.join("; ")
        );
    }

    println!("\n### Median of {} round(s)\n", settings.rounds);
    println!(
        "| mode | followers | ack → copy p50 | p99 | last copy p99 | DB tx/s writing | idle | DB queries/s writing | idle | server CPU writing | idle | gRPC calls/s writing | idle | status |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for (cell, outcomes) in cells.iter().zip(&results) {
        let ok: Vec<&Outcome> = outcomes.iter().filter(|o| o.failure.is_none()).collect();
        let pick = |f: &dyn Fn(&Outcome) -> f64| median(ok.iter().map(|o| f(o)).collect());
        let failed = outcomes.len() - ok.len();
        let status = match failed {
            0 => "ok".to_owned(),
            n => format!("FAILED in {n} of {} round(s)", outcomes.len()),
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {status} |",
            cell.mode.name(),
            cell.followers,
            ms(pick(&|o| o.p50)),
            ms(pick(&|o| o.p99)),
            ms(pick(&|o| o.last_p99)),
            rate(pick(&|o| o.writing.tx.unwrap_or(f64::NAN))),
            rate(pick(&|o| o.idle.tx.unwrap_or(f64::NAN))),
            rate(pick(&|o| o.writing.queries.unwrap_or(f64::NAN))),
            rate(pick(&|o| o.idle.queries.unwrap_or(f64::NAN))),
            percent(pick(&|o| o.writing.server_cpu)),
            percent(pick(&|o| o.idle.server_cpu)),
            rate(pick(&|o| o.writing.calls.unwrap_or(f64::NAN))),
            rate(pick(&|o| o.idle.calls.unwrap_or(f64::NAN))),
        );
    }
    if postgres.is_none() {
        println!("\n(DB columns: not measured, the server ran on SQLite)");
    }
    println!(
        "\n(ack → copy: from the write's acknowledgement until the copy holds its revision, over every write and copy; \
         last copy: per write, the slowest copy. Writing windows run from the first write until every copy holds the last; \
         DB and gRPC figures are the upstream's totals, nothing subtracted: the `none` row is its floor \
         (its own tail, leases, progress frames, and the writer's {}/s renames while writing).)",
        settings.write_rate
    );

    // Ratios, side by side: the upstream's idle cost per follower.
    let find = |mode: Mode, followers: usize| {
        cells
            .iter()
            .position(|c| c.mode == mode && c.followers == followers)
            .map(|i| &results[i])
    };
    if let (Some(most), Some(floor)) = (settings.followers.iter().max(), find(Mode::None, 0)) {
        let floor_tx = median(
            floor
                .iter()
                .filter(|o| o.failure.is_none())
                .filter_map(|o| o.idle.tx)
                .collect(),
        );
        println!(
            "\n### Idle database cost per follower, at {most} followers (above the `none` floor of {} tx/s)\n",
            rate(floor_tx)
        );
        let mut modes = vec![Mode::Watch];
        modes.extend(settings.polls.iter().map(|i| Mode::Poll(*i)));
        for mode in modes {
            if let Some(outcomes) = find(mode, *most) {
                let tx = median(
                    outcomes
                        .iter()
                        .filter(|o| o.failure.is_none())
                        .filter_map(|o| o.idle.tx)
                        .collect(),
                );
                let p99 = median(outcomes.iter().filter(|o| o.failure.is_none()).map(|o| o.p99).collect());
                println!(
                    "- {}: {} tx/s idle = {} tx/s per follower; ack → copy p99 {}",
                    mode.name(),
                    rate(tx),
                    rate2((tx - floor_tx) / *most as f64),
                    ms(p99)
                );
            }
        }
    }

    let proxy_pid = postgres.as_ref().map(|pg| pg.proxy.pid);
    let last = probe.sample(&[]).await?;
    let proxy_cpu = match proxy_pid {
        Some(pid) => cpu_seconds(pid).ok(),
        None => None,
    };
    server.stop().await;
    if let Some(pg) = postgres.as_mut() {
        // The server's backends publish their counts as they exit.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let proxied = pg.proxy.counts().await.unwrap_or(last.db.unwrap_or_default());
        match pg.stats().await {
            Ok((xacts, returned, fetched)) => {
                let (x0, r0, f0) = pg.stats_at_start;
                // PostgreSQL also counts a transaction per connection's start, and
                // one per notification a listening connection reads.
                let expected = proxied.transactions + proxied.notifications + proxied.connections;
                println!(
                    "\n- check: over the whole run (set-up included) the proxy counted {} transactions, {} queries, {} statements, {} round trips, \
                     {} notifications read by listeners and {} connections: {expected} transactions as PostgreSQL counts them; \
                     pg_stat_database counted {} (xact_commit + xact_rollback), {} rows returned, {} fetched; the proxy used {:.1} s of CPU",
                    proxied.transactions,
                    proxied.queries,
                    proxied.statements,
                    proxied.round_trips,
                    proxied.notifications,
                    proxied.connections,
                    xacts - x0,
                    returned - r0,
                    fetched - f0,
                    proxy_cpu.unwrap_or(f64::NAN),
                );
                let (a, b) = (expected as f64, (xacts - x0) as f64);
                if (a - b).abs() > 0.01 * b.max(1.0) + 5.0 {
                    // PostgreSQL's own maintenance runs transactions the wire never shows.
                    let maintenance = match pg.maintenance().await {
                        Ok((vacuums, analyzes)) => format!(
                            "autovacuum ran {vacuums} and autoanalyze {analyzes} time(s) in the database meanwhile, \
                             in transactions of PostgreSQL's own that pg_stat_database counts and the server never asked for"
                        ),
                        Err(err) => format!("cannot read pg_stat_user_tables ({err})"),
                    };
                    println!(
                        "\nWARNING: the proxy's count and pg_stat_database's differ by {:.0} ({:.1} %); {maintenance}",
                        b - a,
                        (b - a) / b.max(1.0) * 100.0
                    );
                }
            }
            Err(err) => println!("\n- check: cannot read pg_stat_database ({err})"),
        }
    }
    let failures = results.iter().flatten().filter(|o| o.failure.is_some()).count();
    if failures > 0 {
        println!("\nFAILED: {failures} cell(s) failed (see the status column)");
    }
    Ok(())
}

fn print_round_row(round: usize, cell: Cell, o: &Outcome) {
    let status = match &o.failure {
        Some(failure) => format!("FAILED: {failure}"),
        None if o.reconnects > 0 => format!("ok ({} reconnects)", o.reconnects),
        None => "ok".to_owned(),
    };
    let cpu = |r: &Rates| match r.proxy_cpu {
        Some(proxy) => format!("{} (+{})", percent(r.server_cpu), percent(proxy)),
        None => percent(r.server_cpu),
    };
    let opt = |v: Option<f64>| v.map_or("-".to_owned(), rate);
    let polls = match cell.mode {
        Mode::Poll(_) => format!("{} ({:.0} %)", rate(o.idle.polls), o.idle.empty_share * 100.0),
        _ => "-".to_owned(),
    };
    println!(
        "| {round} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {polls} | {} | {status} |",
        cell.mode.name(),
        cell.followers,
        ms(o.p50),
        ms(o.p99),
        ms(o.last_p99),
        ms(o.max),
        opt(o.writing.tx),
        opt(o.writing.queries),
        cpu(&o.writing),
        opt(o.writing.calls),
        opt(o.writing.msgs),
        opt(o.idle.tx),
        opt(o.idle.queries),
        cpu(&o.idle),
        opt(o.idle.calls),
        opt(o.idle.msgs),
        percent(o.idle.bench_cpu.max(o.writing.bench_cpu)),
    );
}

fn ms(v: f64) -> String {
    if v.is_nan() { "-".into() } else { format!("{v:.2} ms") }
}

fn rate(v: f64) -> String {
    if v.is_nan() { "-".into() } else { format!("{v:.1}") }
}

fn rate2(v: f64) -> String {
    if v.is_nan() { "-".into() } else { format!("{v:.2}") }
}

fn percent(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else {
        format!("{:.0} %", v * 100.0)
    }
}

// ---------------------------------------------------------------------------
// A cell

/// What one cell measured.
#[derive(Clone, Default)]
struct Outcome {
    idle: Rates,
    writing: Rates,
    p50: f64,
    p99: f64,
    last_p99: f64,
    max: f64,
    reconnects: u64,
    /// The users feed's revision after the cell's writes.
    head: i64,
    failure: Option<String>,
}

impl Outcome {
    fn failed(failure: String) -> Outcome {
        Outcome {
            idle: Rates::unknown(),
            writing: Rates::unknown(),
            p50: f64::NAN,
            p99: f64::NAN,
            last_p99: f64::NAN,
            max: f64::NAN,
            failure: Some(failure),
            ..Outcome::default()
        }
    }
}

/// A copy under test, and when it reached each revision.
struct Follower {
    cache: Cache<User>,
    db: Db,
    /// (applied revision, when the copy published it), in order.
    log: Arc<Mutex<Vec<(i64, Instant)>>>,
}

/// One acknowledged write.
struct Write {
    revision: i64,
    acked: Instant,
}

async fn run_cell(
    cell: Cell,
    settings: &Settings,
    probe: &Probe,
    server: &Dev,
    writer: &Channel,
    people: &mut [User],
    head: i64,
) -> Res<Outcome> {
    let dir = tempfile::tempdir()?;
    let mut tasks = JoinSet::new();
    let mut followers = Vec::with_capacity(cell.followers);
    let result = async {
        for i in 0..cell.followers {
            let db = Db::sqlite_file(&dir.path().join(format!("copy{i}.db"))).await?;
            db.migrate(&[&lightbox_cache::MIGRATIONS]).await?;
            let options = CacheOptions {
                follow: cell.mode.follow(),
                ..CacheOptions::default()
            };
            let cache: Cache<User> = Cache::open(db.clone(), "users", options).await?;
            let source = sources::UsersSource::new(sources::channel(&server.url("users"), Duration::from_secs(10))?);
            let log = Arc::new(Mutex::new(Vec::new()));
            {
                let cache = cache.clone();
                tasks.spawn(async move { cache.follow_upstream(source).await });
            }
            tasks.spawn(observe(cache.clone(), Arc::clone(&log)));
            followers.push(Follower { cache, db, log });
        }
        // Every copy holds the upstream's head (its snapshot, or its state listing).
        let deadline = Instant::now() + Duration::from_secs(60);
        for (i, follower) in followers.iter().enumerate() {
            let left = deadline.saturating_duration_since(Instant::now());
            if !follower.cache.wait_for(head, left).await {
                let synced = followers
                    .iter()
                    .filter(|f| f.cache.state().applied_revision >= head)
                    .count();
                return Err(format!(
                    "{synced} of {} copies reached revision {head} within 60 s (copy {i} is at {})",
                    followers.len(),
                    follower.cache.state().applied_revision
                )
                .into());
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let caches: Vec<Cache<User>> = followers.iter().map(|f| f.cache.clone()).collect();

        // Idle: connected, no writes.
        let before = probe.sample(&caches).await?;
        tokio::time::sleep(settings.idle).await;
        let after = probe.sample(&caches).await?;
        let idle = after.since(&before);

        // Writing.
        let mut users = UsersServiceClient::new(writer.clone());
        let mut writes = Vec::with_capacity(settings.writes);
        let (mut write_errors, mut first_error) = (0, None);
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / settings.write_rate));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let before = probe.sample(&caches).await?;
        for seq in 0..settings.writes {
            tick.tick().await;
            let index = seq % people.len();
            match rename(&mut users, &people[index], format!("{WRITE_PREFIX}{seq}")).await {
                Ok((_, acked, Some(user))) => {
                    writes.push(Write {
                        revision: user.revision,
                        acked,
                    });
                    people[index] = user;
                }
                Ok((_, _, None)) => {
                    write_errors += 1;
                    first_error.get_or_insert_with(|| "UpdateUser answered no user".to_owned());
                }
                Err(status) => {
                    write_errors += 1;
                    first_error.get_or_insert(status_text(&status));
                }
            }
        }
        let last = writes.iter().map(|w| w.revision).max().unwrap_or(head);
        let deadline = Instant::now() + cell.mode.grace();
        let mut behind = 0;
        for follower in &followers {
            let left = deadline.saturating_duration_since(Instant::now());
            if !follower.cache.wait_for(last, left).await {
                behind += 1;
            }
        }
        let after = probe.sample(&caches).await?;
        let writing = after.since(&before);

        // Propagation: for each write and copy, the first revision at or past the write's.
        let (mut all, mut slowest, mut missing) = (Vec::new(), Vec::new(), 0);
        let logs: Vec<Vec<(i64, Instant)>> = followers
            .iter()
            .map(|f| f.log.lock().map(|log| log.clone()).unwrap_or_default())
            .collect();
        for write in &writes {
            let mut worst: Option<f64> = None;
            for log in &logs {
                let at = log.partition_point(|(revision, _)| *revision < write.revision);
                match log.get(at) {
                    Some((_, reached)) => {
                        let delay = reached.saturating_duration_since(write.acked).as_secs_f64() * 1e3;
                        all.push(delay);
                        worst = Some(worst.map_or(delay, |w| w.max(delay)));
                    }
                    None => missing += 1,
                }
            }
            slowest.extend(worst);
        }
        all.sort_by(f64::total_cmp);
        slowest.sort_by(f64::total_cmp);

        // Every copy holds exactly the names last written.
        let mut wrong = 0;
        for follower in &followers {
            for person in people.iter() {
                let held = follower.cache.get(&person.id).map(|(user, _)| user.display_name);
                if held.as_deref() != Some(person.display_name.as_str()) {
                    wrong += 1;
                }
            }
        }
        let reconnects = followers.iter().map(|f| f.cache.state().reconnects).sum();
        let mut problems = Vec::new();
        if write_errors > 0 {
            problems.push(format!(
                "{write_errors} of {} writes failed (first: {})",
                settings.writes,
                first_error.as_deref().unwrap_or("?")
            ));
        }
        if behind > 0 {
            problems.push(format!(
                "{behind} of {} copies did not reach revision {last} within {:?}",
                followers.len(),
                cell.mode.grace()
            ));
        }
        if missing > 0 {
            problems.push(format!("{missing} (write, copy) pairs never seen"));
        }
        if wrong > 0 {
            problems.push(format!(
                "{wrong} (user, copy) pairs hold another name than the last written"
            ));
        }
        Ok::<Outcome, Box<dyn Error + Send + Sync>>(Outcome {
            idle,
            writing,
            p50: quantile(&all, 0.5),
            p99: quantile(&all, 0.99),
            last_p99: quantile(&slowest, 0.99),
            max: all.last().copied().unwrap_or(f64::NAN),
            reconnects,
            head: last,
            failure: (!problems.is_empty()).then(|| problems.join("; ")),
        })
    }
    .await;
    tasks.shutdown().await;
    for follower in followers {
        follower.db.close().await;
    }
    result
}

/// Records each revision `cache` publishes, as it is published: woken by
/// the copy's own state channel, not by polling.
async fn observe(cache: Cache<User>, log: Arc<Mutex<Vec<(i64, Instant)>>>) {
    let mut seen = cache.state().applied_revision;
    loop {
        if cache.wait_for(seen + 1, Duration::from_secs(3600)).await {
            let at = Instant::now();
            seen = cache.state().applied_revision;
            if let Ok(mut log) = log.lock() {
                log.push((seen, at));
            }
        }
    }
}

/// [`PEOPLE`] users to rename, created over gRPC.
async fn create_people(channel: &Channel) -> Res<Vec<User>> {
    let mut client = UsersServiceClient::new(channel.clone());
    let mut people = Vec::with_capacity(PEOPLE);
    for i in 0..PEOPLE {
        let display_name = format!("Person {i}");
        let user = create_user(&mut client, i, display_name, format!("person{i}@pull-push.example.com")).await?;
        people.push(user);
    }
    Ok(people)
}

// ---------------------------------------------------------------------------
// Sampling

/// Where the figures of a window come from.
struct Probe {
    server: u32,
    /// The proxy's pid and stats address, on PostgreSQL.
    proxy: Option<(u32, String)>,
    metrics: String,
    http: reqwest::Client,
}

#[derive(Clone, Copy, Default, Debug)]
struct DbCounts {
    transactions: u64,
    queries: u64,
    statements: u64,
    round_trips: u64,
    /// Notifications (`LISTEN`) the server received.
    notifications: u64,
    /// Connections the server opened.
    connections: u64,
    unparsed: u64,
}

struct Sample {
    at: Instant,
    server_cpu: f64,
    proxy_cpu: Option<f64>,
    bench_cpu: f64,
    db: Option<DbCounts>,
    calls: Option<f64>,
    msgs: Option<f64>,
    polls: u64,
    empty: u64,
}

/// A window's figures, per second (CPU: share of one core).
#[derive(Clone, Default)]
struct Rates {
    server_cpu: f64,
    proxy_cpu: Option<f64>,
    bench_cpu: f64,
    tx: Option<f64>,
    queries: Option<f64>,
    calls: Option<f64>,
    msgs: Option<f64>,
    polls: f64,
    empty_share: f64,
}

impl Rates {
    fn unknown() -> Rates {
        Rates {
            server_cpu: f64::NAN,
            bench_cpu: f64::NAN,
            polls: f64::NAN,
            empty_share: f64::NAN,
            ..Rates::default()
        }
    }
}

impl Probe {
    async fn sample(&self, caches: &[Cache<User>]) -> Res<Sample> {
        let db = match &self.proxy {
            Some((_, stats)) => Some(proxy_counts(stats).await?),
            None => None,
        };
        let (calls, msgs) = match self.scrape().await {
            Some(text) => (
                Some(metric_sum(&text, "grpc_server_started_total")),
                Some(metric_sum(&text, "grpc_server_msg_sent_total")),
            ),
            None => (None, None),
        };
        let (mut polls, mut empty) = (0, 0);
        for cache in caches {
            let state = cache.state();
            polls += state.polls;
            empty += state.empty_polls;
        }
        Ok(Sample {
            at: Instant::now(),
            server_cpu: cpu_seconds(self.server)?,
            proxy_cpu: match &self.proxy {
                Some((pid, _)) => Some(cpu_seconds(*pid)?),
                None => None,
            },
            bench_cpu: cpu_seconds(std::process::id())?,
            db,
            calls,
            msgs,
            polls,
            empty,
        })
    }

    async fn scrape(&self) -> Option<String> {
        let response = self
            .http
            .get(&self.metrics)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?;
        if !response.status().is_success() {
            return None;
        }
        response.text().await.ok()
    }
}

impl Sample {
    fn since(&self, before: &Sample) -> Rates {
        let seconds = self.at.duration_since(before.at).as_secs_f64().max(1e-9);
        let per = |a: f64, b: f64| (a - b) / seconds;
        let polls = self.polls.saturating_sub(before.polls);
        Rates {
            server_cpu: per(self.server_cpu, before.server_cpu),
            proxy_cpu: self.proxy_cpu.zip(before.proxy_cpu).map(|(a, b)| per(a, b)),
            bench_cpu: per(self.bench_cpu, before.bench_cpu),
            tx: self
                .db
                .zip(before.db)
                .map(|(a, b)| per(a.transactions as f64, b.transactions as f64)),
            queries: self
                .db
                .zip(before.db)
                .map(|(a, b)| per(a.queries as f64, b.queries as f64)),
            calls: self.calls.zip(before.calls).map(|(a, b)| per(a, b)),
            msgs: self.msgs.zip(before.msgs).map(|(a, b)| per(a, b)),
            polls: polls as f64 / seconds,
            empty_share: match polls {
                0 => f64::NAN,
                n => self.empty.saturating_sub(before.empty) as f64 / n as f64,
            },
        }
    }
}

/// The sum of `name`'s samples for the Users service, in Prometheus text.
fn metric_sum(text: &str, name: &str) -> f64 {
    let service = format!("grpc_service=\"{USERS_SERVICE}\"");
    text.lines()
        .filter(|line| line.strip_prefix(name).is_some_and(|rest| rest.starts_with('{')))
        .filter(|line| line.contains(&service))
        .filter_map(|line| line.rsplit_once(' ').and_then(|(_, value)| value.parse::<f64>().ok()))
        .sum()
}

// ---------------------------------------------------------------------------
// PostgreSQL and the counting proxy

struct Postgres {
    addr: String,
    version: String,
    name: String,
    /// A connection to the maintenance database (not through the proxy).
    admin: sqlx::PgConnection,
    proxy: Proxy,
    /// `pg_stat_database` (transactions, rows returned, rows fetched) once
    /// the database was made.
    stats_at_start: (i64, i64, i64),
}

impl Postgres {
    async fn create(addr: &str, pinned: bool) -> Res<Postgres> {
        let url = format!("postgres://postgres@{addr}/postgres?sslmode=disable");
        let mut admin = tokio::time::timeout(Duration::from_secs(5), sqlx::PgConnection::connect(&url))
            .await
            .map_err(|_| "no answer within 5 s")??;
        let version: String = sqlx::query_scalar("SHOW server_version").fetch_one(&mut admin).await?;
        let name = format!("lightbox_bench_{}", std::process::id());
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&mut admin)
        .await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await?;
        let proxy = match Proxy::start(pinned, addr).await {
            Ok(proxy) => proxy,
            Err(err) => {
                let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name}")))
                    .execute(&mut admin)
                    .await;
                return Err(err);
            }
        };
        let mut pg = Postgres {
            addr: addr.to_owned(),
            version,
            name,
            admin,
            proxy,
            stats_at_start: (0, 0, 0),
        };
        pg.stats_at_start = pg.stats().await?;
        Ok(pg)
    }

    /// The server's database URL: through the proxy, without TLS (the proxy
    /// reads the protocol).
    fn server_url(&self) -> String {
        format!(
            "postgres://postgres@{}/{}?sslmode=disable",
            self.proxy.pg_addr, self.name
        )
    }

    /// (transactions, rows returned, rows fetched) of the database so far.
    async fn stats(&mut self) -> Res<(i64, i64, i64)> {
        let row: (i64, i64, i64) = sqlx::query_as(
            "SELECT xact_commit + xact_rollback, tup_returned, tup_fetched FROM pg_stat_database WHERE datname = $1",
        )
        .bind(&self.name)
        .fetch_one(&mut self.admin)
        .await?;
        Ok(row)
    }

    /// (autovacuum runs, autoanalyze runs) in the database so far, read in
    /// the database itself (after everything else: this adds transactions).
    async fn maintenance(&self) -> Res<(i64, i64)> {
        let url = format!("postgres://postgres@{}/{}?sslmode=disable", self.addr, self.name);
        let mut conn = sqlx::PgConnection::connect(&url).await?;
        let row: (i64, i64) = sqlx::query_as(
            "SELECT COALESCE(SUM(autovacuum_count), 0)::bigint, COALESCE(SUM(autoanalyze_count), 0)::bigint \
             FROM pg_stat_all_tables",
        )
        .fetch_one(&mut conn)
        .await?;
        let _ = conn.close().await;
        Ok(row)
    }

    async fn drop_database(mut self) {
        let _ = self.proxy.child.kill().await;
        let dropped = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )))
        .execute(&mut self.admin)
        .await;
        if let Err(err) = dropped {
            eprintln!("pull_push: cannot drop database {}: {err}", self.name);
        }
        let _ = self.admin.close().await;
    }
}

/// The counting proxy, a child process.
struct Proxy {
    child: Child,
    pid: u32,
    pg_addr: String,
    stats_addr: String,
}

impl Proxy {
    async fn start(pinned: bool, upstream: &str) -> Res<Proxy> {
        let (child, pid, line) = start_role(pinned, &[(ROLE, "proxy"), (UPSTREAM, upstream)], "the proxy").await?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let ["proxy", pg_addr, "stats", stats_addr] = words.as_slice() else {
            return Err(format!("the proxy said {line:?}").into());
        };
        let (pg_addr, stats_addr) = ((*pg_addr).to_owned(), (*stats_addr).to_owned());
        Ok(Proxy {
            child,
            pid,
            pg_addr,
            stats_addr,
        })
    }

    async fn counts(&self) -> Res<DbCounts> {
        proxy_counts(&self.stats_addr).await
    }
}

async fn proxy_counts(stats: &str) -> Res<DbCounts> {
    let mut stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(stats))
        .await
        .map_err(|_| "the proxy's stats did not answer within 5 s")??;
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut text))
        .await
        .map_err(|_| "the proxy's stats did not answer within 5 s")??;
    let numbers: Vec<u64> = text
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("the proxy's stats {text:?}: {e}"))?;
    let [
        transactions,
        queries,
        statements,
        round_trips,
        notifications,
        connections,
        unparsed,
    ] = numbers.as_slice()
    else {
        return Err(format!("the proxy's stats {text:?}").into());
    };
    Ok(DbCounts {
        transactions: *transactions,
        queries: *queries,
        statements: *statements,
        round_trips: *round_trips,
        notifications: *notifications,
        connections: *connections,
        unparsed: *unparsed,
    })
}

static TRANSACTIONS: AtomicU64 = AtomicU64::new(0);
static QUERIES: AtomicU64 = AtomicU64::new(0);
static STATEMENTS: AtomicU64 = AtomicU64::new(0);
static ROUND_TRIPS: AtomicU64 = AtomicU64::new(0);
static NOTIFICATIONS: AtomicU64 = AtomicU64::new(0);
static CONNECTIONS: AtomicU64 = AtomicU64::new(0);
static UNPARSED: AtomicU64 = AtomicU64::new(0);

/// `PULL_PUSH_ROLE=proxy`: forwards 127.0.0.1:0 to `PULL_PUSH_UPSTREAM`,
/// counting what the server answers; serves the counts (one line) to
/// whoever connects to its stats listener. Prints `proxy ADDR stats ADDR`.
fn serve_proxy() -> Res<()> {
    let upstream = std::env::var(UPSTREAM)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        let pg = TcpListener::bind("127.0.0.1:0").await?;
        let stats = TcpListener::bind("127.0.0.1:0").await?;
        println!("proxy {} stats {}", pg.local_addr()?, stats.local_addr()?);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = stats.accept().await {
                let line = format!(
                    "{} {} {} {} {} {} {}\n",
                    TRANSACTIONS.load(Ordering::Relaxed),
                    QUERIES.load(Ordering::Relaxed),
                    STATEMENTS.load(Ordering::Relaxed),
                    ROUND_TRIPS.load(Ordering::Relaxed),
                    NOTIFICATIONS.load(Ordering::Relaxed),
                    CONNECTIONS.load(Ordering::Relaxed),
                    UNPARSED.load(Ordering::Relaxed),
                );
                let _ = stream.write_all(line.as_bytes()).await;
            }
        });
        loop {
            let (client, _) = pg.accept().await?;
            CONNECTIONS.fetch_add(1, Ordering::Relaxed);
            let upstream = upstream.clone();
            tokio::spawn(async move {
                if let Err(err) = relay(client, &upstream).await {
                    eprintln!("pull_push proxy: {err}");
                }
            });
        }
    })
}

async fn relay(client: TcpStream, upstream: &str) -> Res<()> {
    let server = TcpStream::connect(upstream).await?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let up = async move {
        let copied = tokio::io::copy(&mut client_read, &mut server_write).await;
        let _ = server_write.shutdown().await;
        copied.map(|_| ())
    };
    let down = async move {
        let mut parser = PgParser::default();
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let n = server_read.read(&mut buffer).await?;
            if n == 0 {
                let _ = client_write.shutdown().await;
                return Ok::<_, std::io::Error>(());
            }
            parser.feed(&buffer[..n]);
            client_write.write_all(&buffer[..n]).await?;
        }
    };
    let (up, down) = tokio::join!(up, down);
    up?;
    down?;
    Ok(())
}

/// Reads the backend's messages (type byte, big-endian length including
/// itself, body) and counts: `CommandComplete` (`C`) as a statement, a
/// query unless its tag is transaction control; `ReadyForQuery` (`Z`) as a
/// round trip, and as a finished transaction when it says idle (`I`) after
/// any work since the last one: a statement, an error, or the answer to a
/// Parse, Bind or Describe (a statement prepared alone is a transaction to
/// PostgreSQL too). A bare `Sync` (the pool's ping) and the start-up's
/// first `ReadyForQuery` are round trips only.
#[derive(Default)]
struct PgParser {
    started: bool,
    broken: bool,
    header: [u8; 5],
    have: usize,
    left: usize,
    /// The body's first bytes (enough for a command tag or a status).
    body: Vec<u8>,
    statement: bool,
}

impl PgParser {
    fn feed(&mut self, mut data: &[u8]) {
        if self.broken {
            return;
        }
        if !self.started && !data.is_empty() {
            self.started = true;
            match data[0] {
                // The answer to an SSL or GSS request: refused, plaintext follows.
                b'N' => data = &data[1..],
                // Accepted: encrypted from here on.
                b'S' | b'G' => {
                    self.broken = true;
                    UNPARSED.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                _ => {}
            }
        }
        while !data.is_empty() {
            if self.have < 5 {
                let take = (5 - self.have).min(data.len());
                self.header[self.have..self.have + take].copy_from_slice(&data[..take]);
                self.have += take;
                data = &data[take..];
                if self.have < 5 {
                    return;
                }
                let [_, a, b, c, d] = self.header;
                self.left = (u32::from_be_bytes([a, b, c, d]) as usize).saturating_sub(4);
                self.body.clear();
                if self.left == 0 {
                    self.finish();
                }
                continue;
            }
            let take = self.left.min(data.len());
            let keep = take.min(16usize.saturating_sub(self.body.len()));
            self.body.extend_from_slice(&data[..keep]);
            self.left -= take;
            data = &data[take..];
            if self.left == 0 {
                self.finish();
            }
        }
    }

    fn finish(&mut self) {
        self.have = 0;
        match self.header[0] {
            b'C' => {
                STATEMENTS.fetch_add(1, Ordering::Relaxed);
                let control = ["BEGIN", "COMMIT", "ROLLBACK", "START", "SAVEPOINT", "RELEASE"]
                    .iter()
                    .any(|tag| self.body.starts_with(tag.as_bytes()));
                if !control {
                    QUERIES.fetch_add(1, Ordering::Relaxed);
                }
                self.statement = true;
            }
            // An error, or the answers to a Parse, Bind or Describe: work in
            // a transaction (PostgreSQL starts one for a Parse even alone).
            b'E' | b'1' | b'2' | b't' | b'T' | b'n' | b'D' | b'I' => self.statement = true,
            b'A' => {
                NOTIFICATIONS.fetch_add(1, Ordering::Relaxed);
            }
            b'Z' => {
                ROUND_TRIPS.fetch_add(1, Ordering::Relaxed);
                if self.body.first() == Some(&b'I') && self.statement {
                    TRANSACTIONS.fetch_add(1, Ordering::Relaxed);
                }
                self.statement = false;
            }
            _ => {}
        }
    }
}
