//! The wiring of Lightbox: configuration, the components and how they start,
//! the monolithic dev stack with its demo data, and the command-line tools.
//!
//! # Layout
//!
//! - [`target`]: [`Target`], the components by name (what `--target` and
//!   the startup code share).
//! - [`config`]: the command line ([`Cli`]), flags and environment; the
//!   servers' settings ([`ServeArgs`]).
//! - [`settings`]: [`Settings`], what the components start with, resolved
//!   from the command line (or built by tests).
//! - [`targets`]: [`start`](targets::start), which brings one component up
//!   on a bound listener and returns a [`Component`] handle to stop it.
//! - [`demo`]: the demo users, contracts and photos `lightbox dev` loads.
//! - [`metrics`]: [`ProcessMetrics`], Lightbox's own metrics, one set per
//!   process, which each component reports into as it starts.
//! - [`tools`]: the command-line tools (`users`, `contracts`, `photos`,
//!   `watch`, `fault`, `token`), one module each: tables or JSON, one-line
//!   errors, exit codes by failure kind.
//! - `telemetry` (private): logs.
//!
//! Dependencies inside flow one way: `target` ← `config` ← `settings` ←
//! `targets`;
//! `tools` needs none of them.
//!
//! [`run`] is what the `lightbox` binary calls; [`error_line`] and
//! [`exit_code`] say how it failed.

pub mod config;
pub mod demo;
pub mod metrics;
pub mod settings;
pub mod target;
pub mod targets;
mod telemetry;
pub mod tools;

use std::net::SocketAddr;

use anyhow::Context;
use lightbox_server::{AdminCredential, AdminOptions, ProcessHealth, Shutdown};

pub use config::{Cli, Command, ServeArgs};
pub use lightbox_server::ServerOptions;
pub use metrics::ProcessMetrics;
pub use settings::Settings;
pub use target::Target;
pub use targets::Component;
pub use telemetry::trace_filter;
pub use tools::{error_line, exit_code};

/// Runs the command the command line asks for. `version` is the binary's
/// (with the git revision it was built from), for the dev banner.
pub async fn run(cli: Cli, version: &str) -> anyhow::Result<()> {
    let server = matches!(cli.command, None | Some(Command::Dev(_) | Command::Serve(_)));
    let telemetry = telemetry::init(cli.log_format, server);
    let result = run_command(cli.command, version).await;
    // Spans still buffered go out before the process ends.
    telemetry.shutdown();
    result
}

async fn run_command(command: Option<Command>, version: &str) -> anyhow::Result<()> {
    match command {
        None => {
            let args = <Cli as clap::Parser>::try_parse_from(["lightbox", "dev"])?;
            match args.command {
                Some(Command::Dev(args)) => serve(args, Some(version)).await,
                _ => anyhow::bail!("`lightbox dev` did not parse"),
            }
        }
        Some(Command::Dev(args)) => serve(args, Some(version)).await,
        Some(Command::Serve(args)) => serve(args, None).await,
        Some(Command::Fault(args)) => tools::fault::run(args).await,
        Some(Command::Health(args)) => tools::health::run(args).await,
        Some(Command::Users(args)) => tools::users::run(args).await,
        Some(Command::Contracts(args)) => tools::contracts::run(args).await,
        Some(Command::Photos(args)) => tools::photos::run(args).await,
        Some(Command::Watch(args)) => tools::watch::run(args).await,
        Some(Command::Jobs(args)) => tools::jobs::run(args).await,
        Some(Command::Subscriptions(args)) => tools::subscriptions::run(args).await,
        Some(Command::Token(args)) => tools::token::run(&args),
        Some(Command::Openapi) => openapi(),
        Some(Command::Certs(args)) => tools::certs::run(&args),
        Some(Command::Bench(args)) => lightbox_bench::run(args).await,
    }
}

/// `lightbox openapi`: the gateway's OpenAPI document.
fn openapi() -> anyhow::Result<()> {
    let document = lightbox_gateway::openapi_document().map_err(anyhow::Error::msg)?;
    println!("{}", serde_json::to_string_pretty(&document)?);
    Ok(())
}

/// Starts the components asked for, prints where they are, and runs them
/// until SIGINT or SIGTERM, then shuts them down gracefully.
/// `dev` carries the version to print in the banner in `lightbox dev`.
async fn serve(args: ServeArgs, dev: Option<&str>) -> anyhow::Result<()> {
    let mut settings = Settings::from_args(&args, dev.is_some())?;
    settings.demo = dev.is_some() && !args.no_demo;
    refuse_plaintext_off_loopback(&args, &settings)?;
    let _reloaders = settings.spawn_tls_reloaders();
    let mut admin = admin_options(&args, dev.is_some())?;
    let _admin_reloader = admin
        .tls
        .as_ref()
        .map(|tls| tls.spawn_reloader(std::time::Duration::from_secs(2)));
    let scrape = settings.metrics.clone();
    admin.metrics = Some(std::sync::Arc::new(move || scrape.encode()));
    let health = ProcessHealth::new();
    settings.server.process_health = Some(health.clone());
    // Bind every listener first: a taken port fails the start, naming it.
    let admin_listener = lightbox_server::bind(args.admin_addr).await?;
    let admin_addr = admin_listener.local_addr()?;
    let mut listeners = Vec::new();
    for component in components(&args.target).into_iter().filter(|c| c.listens()) {
        let listener = lightbox_server::bind(address(&args, component)).await?;
        // In one process, a component reaches another where it really
        // listens (which differs from the flag when the flag's port is 0).
        let scheme = settings.scheme();
        if component == Target::Contracts && args.contracts_url.is_none() {
            settings.contracts_url = format!("{scheme}://{}", listener.local_addr()?);
        }
        if component == Target::Users && args.users_url.is_none() {
            settings.users_url = format!("{scheme}://{}", listener.local_addr()?);
        }
        if component == Target::Photos && args.photos_url.is_none() {
            settings.photos_url = format!("{scheme}://{}", listener.local_addr()?);
        }
        listeners.push((component, listener));
    }
    let mut listeners = listeners.into_iter();
    let mut running = Vec::new();
    for component in components(&args.target) {
        let started = match component.listens() {
            true => match listeners.next() {
                Some((_, listener)) => targets::start(component, &settings, listener).await,
                None => Err(anyhow::anyhow!("no listener was bound")),
            },
            false => targets::start_events(&settings, admin_addr).await,
        }
        .with_context(|| format!("cannot start the {component} component"))?;
        tracing::info!(component = %component, addr = %started.addr, "component started");
        running.push(started);
    }
    // The admin listener outlives the components: while they drain, probes
    // still read their NOT_SERVING.
    let (admin_stop, admin_shutdown) = Shutdown::new();
    let faults = running
        .iter()
        .filter(|c| c.target != Target::Gateway && c.target.listens())
        .map(|c| (c.target.name().to_owned(), c.faults.clone()))
        .collect();
    let services = admin_services(&running, &admin, dev.is_some());
    let admin_task = tokio::spawn(lightbox_server::serve_admin_with(
        admin_listener,
        health.clone(),
        faults,
        services,
        admin,
        admin_shutdown,
    ));
    tracing::info!(addr = %admin_addr, "admin listening");
    if let Some(version) = dev {
        print_banner(&args, &running, admin_addr, version);
    }

    let (trigger, shutdown) = Shutdown::new();
    let trigger = std::sync::Arc::new(trigger);
    let on_signal = std::sync::Arc::clone(&trigger);
    tokio::spawn(async move {
        lightbox_server::ctrl_c_or_term().await;
        tracing::info!("shutdown signal received; draining");
        on_signal.trigger();
    });
    {
        let (health, shutdown) = (health.clone(), shutdown.clone());
        tokio::spawn(async move {
            shutdown.wait().await;
            health.drain().await;
        });
    }
    // Each component runs until the signal, or fails on its own; the first
    // failure stops the others.
    let mut tasks = tokio::task::JoinSet::new();
    for component in running {
        let shutdown = shutdown.clone();
        tasks.spawn(async move { (component.target, component.run_until(shutdown).await) });
    }
    let mut failure = None;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((_, Ok(()))) => {}
            Ok((target, Err(err))) => {
                tracing::error!(component = %target, error = format!("{err:#}"), "component failed; stopping the others");
                failure.get_or_insert(err);
                // The others drain gracefully, as on a signal.
                trigger.trigger();
            }
            Err(err) if err.is_cancelled() => {}
            Err(err) => {
                failure.get_or_insert(anyhow::Error::new(err));
            }
        }
    }
    admin_stop.trigger();
    match admin_task.await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => {
            failure.get_or_insert(anyhow::Error::new(err).context("the admin listener failed"));
        }
        Err(err) => {
            failure.get_or_insert(anyhow::Error::new(err));
        }
    }
    match failure {
        Some(err) => Err(err),
        None => {
            tracing::info!("stopped");
            Ok(())
        }
    }
}

/// A listener off loopback without TLS is refused, unless
/// `--allow-plaintext` says the network is trusted (or encrypted by a mesh).
fn refuse_plaintext_off_loopback(args: &ServeArgs, settings: &Settings) -> anyhow::Result<()> {
    if args.allow_plaintext {
        return Ok(());
    }
    for component in components(&args.target).into_iter().filter(|c| c.listens()) {
        let addr = address(args, component);
        let tls = match component {
            Target::Gateway => settings.gateway_tls.is_some(),
            _ => settings.server.tls.is_some(),
        };
        if !tls && !addr.ip().is_loopback() {
            anyhow::bail!(
                "the {component} component would listen on {addr} without TLS: give --tls-cert and \
                 --tls-key (`lightbox certs` makes development ones), or --allow-plaintext \
                 (LIGHTBOX_ALLOW_PLAINTEXT) on a network you trust"
            );
        }
    }
    Ok(())
}

/// What the admin listener serves, and to whom. In `dev`, fault injection
/// is on and open on loopback; elsewhere it needs `--faults` and a
/// credential: a token, or a client certificate under mutual TLS
/// (`--admin-client-ca`).
fn admin_options(args: &ServeArgs, dev: bool) -> anyhow::Result<AdminOptions> {
    let credential = match &args.admin_token {
        Some(token) => AdminCredential::bearer(token).map_err(|e| anyhow::anyhow!("--admin-token: {e}"))?,
        None => AdminCredential::Open,
    };
    let tls = match (&args.admin_client_ca, &args.tls_cert, &args.tls_key) {
        (None, _, _) => None,
        (Some(ca), Some(cert), Some(key)) => Some(
            lightbox_tls::ServerTls::load(lightbox_tls::ServerTlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: Some(ca.clone()),
            })
            .context("cannot set up mutual TLS on the admin listener (--admin-client-ca)")?,
        ),
        (Some(_), _, _) => {
            anyhow::bail!("--admin-client-ca needs --tls-cert and --tls-key: the admin listener's own certificate")
        }
    };
    let faults = dev || args.faults;
    let open = matches!(credential, AdminCredential::Open) && tls.is_none();
    if faults && open && !dev {
        anyhow::bail!(
            "--faults needs --admin-token (LIGHTBOX_ADMIN_TOKEN) or --admin-client-ca: outside \
             `lightbox dev`, only callers with the credential may inject faults"
        );
    }
    if faults && open && !args.admin_addr.ip().is_loopback() {
        anyhow::bail!(
            "the admin listener {} is not on loopback, so fault injection needs a credential: give \
             --admin-token (LIGHTBOX_ADMIN_TOKEN), or keep --admin-addr on 127.0.0.1",
            args.admin_addr
        );
    }
    Ok(AdminOptions {
        faults,
        credential,
        metrics: None,
        max_message_bytes: args.max_message_bytes,
        tls,
    })
}

/// The services the components add to the admin listener (Photos' jobs,
/// the subscriptions of the events component):
/// behind the credential, so outside `dev` only when there is one (a token
/// or client certificates); else they are left off, saying how to turn
/// them on.
fn admin_services(running: &[Component], admin: &AdminOptions, dev: bool) -> Vec<lightbox_server::AdminService> {
    let services: Vec<_> = running.iter().flat_map(|c| c.admin_services.iter().cloned()).collect();
    let credential = !matches!(admin.credential, AdminCredential::Open) || admin.tls.is_some();
    if dev || credential || services.is_empty() {
        return services;
    }
    let names: Vec<_> = services.iter().map(|s| s.name()).collect();
    tracing::info!(
        services = names.join(", "),
        "admin services off: give --admin-token (LIGHTBOX_ADMIN_TOKEN) to serve them on the admin listener"
    );
    Vec::new()
}

/// The components `targets` name, each once, upstreams first.
pub fn components(targets: &[Target]) -> Vec<Target> {
    Target::COMPONENTS
        .into_iter()
        .filter(|c| targets.iter().any(|t| *t == Target::All || t == c))
        .collect()
}

fn address(args: &ServeArgs, component: Target) -> SocketAddr {
    match component {
        Target::Users => args.users_addr,
        Target::Photos => args.photos_addr,
        Target::Gateway => args.gateway_addr,
        Target::Contracts | Target::All => args.contracts_addr,
        // Its service is on the admin listener.
        Target::Events => args.admin_addr,
    }
}

fn print_banner(args: &ServeArgs, running: &[Component], admin: SocketAddr, version: &str) {
    let storage = match &args.database_url {
        Some(_) => "the database at DATABASE_URL".to_owned(),
        None => format!("SQLite files under {}", args.data_dir.display()),
    };
    let mut text = format!("\nLightbox {version} is running (monolithic mode, {storage}):\n");
    for component in running.iter().filter(|c| c.target.listens()) {
        let scheme = match (component.target == Target::Gateway, args.tls_cert.is_some()) {
            (true, false) => "http",
            (true, true) => "https",
            (false, false) => "grpc",
            (false, true) => "grpcs",
        };
        text.push_str(&format!(
            "  {:<10} {scheme}://{}\n",
            component.target.name(),
            component.addr
        ));
    }
    let runs = |target: Target| running.iter().any(|c| c.target == target);
    let mut serves = vec!["health", "metrics", "faults"];
    if runs(Target::Photos) {
        serves.push("photo jobs");
    }
    if runs(Target::Events) {
        serves.push("event subscriptions");
    }
    text.push_str(&format!("  {:<10} grpc://{admin}   ({})\n", "admin", serves.join(", ")));
    let addr_of =
        |target: Target, default: SocketAddr| running.iter().find(|c| c.target == target).map_or(default, |c| c.addr);
    let users = addr_of(Target::Users, args.users_addr);
    let contracts = addr_of(Target::Contracts, args.contracts_addr);
    let photos = addr_of(Target::Photos, args.photos_addr);
    let gateway = addr_of(Target::Gateway, args.gateway_addr);
    let user = demo::USER_IDS[0];
    // Under TLS, grpcurl trusts the CA and presents this process's
    // certificate (development certificates are client certificates too).
    let grpcurl = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let ca = args
                .tls_ca
                .as_ref()
                .map_or_else(|| "-insecure".to_owned(), |ca| format!("-cacert {}", ca.display()));
            format!("{ca} -cert {} -key {}", cert.display(), key.display())
        }
        _ => "-plaintext".to_owned(),
    };
    text.push_str(&format!(
        "\nTry (grpcurl needs no .proto files: the servers offer reflection):\n\
         \x20 grpcurl {grpcurl} {users} list\n\
         \x20 grpcurl {grpcurl} -d '{{\"pageSize\": 10}}' {users} lightbox.users.v1.UsersService/ListUsers\n\
         \x20 grpcurl {grpcurl} -d '{{\"id\": \"{user}\", \"includeContract\": true}}' {users} lightbox.users.v1.UsersService/GetUser\n\
         \x20 grpcurl {grpcurl} -d '{{\"sinceRevision\": 0}}' {contracts} lightbox.contracts.v1.ContractsService/WatchContracts\n\
         \x20 grpcurl {grpcurl} -d '{{\"userId\": \"{user}\"}}' {photos} lightbox.photos.v1.PhotosService/ListPhotos\n\
         \x20 lightbox fault contracts --addr {admin} --latency 200ms    # then GetUser again; --clear to undo\n\
         (`lightbox` is this binary: `cargo install --locked --path .` puts it on your PATH.)\n"
    ));
    let (web, curl) = match (&args.tls_cert, &args.tls_ca) {
        (Some(_), Some(ca)) => ("https", format!("--cacert {} ", ca.display())),
        (Some(_), None) => ("https", "--insecure ".to_owned()),
        _ => ("http", String::new()),
    };
    match lightbox_gateway::auth::hs256_token(
        lightbox_gateway::auth::DEVELOPMENT_SECRET.as_bytes(),
        &args.jwt_issuer,
        &args.jwt_audience,
        user,
        std::time::Duration::from_secs(24 * 3600),
    ) {
        Ok(token) => text.push_str(&format!(
            "\nThe mobile gateway (a demo token for {user}, valid 24 h; `lightbox token USER_ID` makes more):\n\
             \x20 export TOKEN={token}\n\
             \x20 curl {curl}-H \"Authorization: Bearer $TOKEN\" {web}://{gateway}/v1/users/me/photos\n\
             \x20 curl {curl}-N -H \"Authorization: Bearer $TOKEN\" {web}://{gateway}/v1/users/me/events\n\
             \x20 curl {curl}{web}://{gateway}/openapi.json\n"
        )),
        Err(err) => text.push_str(&format!("\n(no demo token: {err})\n")),
    }
    text.push('\n');
    // The banner is for the person at the terminal, not the logs.
    println!("{text}");
}
