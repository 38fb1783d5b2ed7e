//! What a process's components start with: [`Settings`], resolved from the
//! command line (databases, upstream URLs, TLS, tokens, every tuning), or
//! built directly by tests.

use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use lightbox_cache::CacheOptions;
use lightbox_changefeed::{Db, FeedOptions, Retention};
use lightbox_client::Balanced;
use lightbox_events::EventsOptions;
use lightbox_gateway::{AuthConfig, GatewayOptions};
use lightbox_photos::{JobOptions, PhotosOptions};
use lightbox_server::ServerOptions;
use lightbox_tls::{ClientTls, ClientTlsFiles, ServerTls, ServerTlsFiles};
use tokio::task::JoinHandle;

use crate::{config::ServeArgs, metrics::ProcessMetrics, target::Target};

/// Everything a component needs to start, resolved from the command line
/// (or built directly by tests).
#[derive(Debug, Clone)]
pub struct Settings {
    /// One database for every component; `None`: an SQLite file per
    /// component in `data_dir`.
    pub database_url: Option<String>,
    /// Where SQLite files live.
    pub data_dir: PathBuf,
    /// Where the users and photos services reach the contracts service.
    pub contracts_url: String,
    /// Where the photos service reaches the users service.
    pub users_url: String,
    /// Where the gateway reaches the photos service.
    pub photos_url: String,
    /// The gateway's auth and limits.
    pub gateway: GatewayOptions,
    /// `GetUser`'s deadline on the contracts service.
    pub contract_timeout: Duration,
    /// Changefeed tuning.
    pub feed: FeedOptions,
    /// Local copies' tuning (users' copy of contracts, photos' copies).
    pub cache: CacheOptions,
    /// Photos' deadlines on its upstreams.
    pub photos: PhotosOptions,
    /// The delivery of events to functions.
    pub events: EventsOptions,
    /// Server tuning (message size, drain deadline).
    pub server: ServerOptions,
    /// Load the demo data into an empty database on start.
    pub demo: bool,
    /// The process's metrics (the same registry as `server.metrics` and
    /// `gateway.metrics`), which each component reports into.
    pub metrics: ProcessMetrics,
    /// The gateway's TLS (never asking phones for certificates); `None`:
    /// plaintext. The gRPC servers' is `server.tls`.
    pub gateway_tls: Option<ServerTls>,
    /// What clients trust (and present, under mutual TLS) when they reach
    /// an upstream at an `https://` URL.
    pub client_tls: Option<ClientTls>,
}

impl Settings {
    /// Settings from the command line; `dev` accepts development tokens.
    pub fn from_args(args: &ServeArgs, dev: bool) -> anyhow::Result<Settings> {
        let metrics = ProcessMetrics::new();
        let tls = tls(args)?;
        // With a CA to trust, the upstreams left unset are reached over TLS.
        let scheme = match tls.client {
            Some(_) => "https",
            None => "http",
        };
        Ok(Settings {
            database_url: args.database_url.clone(),
            data_dir: args.data_dir.clone(),
            contracts_url: args
                .contracts_url
                .clone()
                .unwrap_or_else(|| format!("{scheme}://{}", args.contracts_addr)),
            users_url: args
                .users_url
                .clone()
                .unwrap_or_else(|| format!("{scheme}://{}", args.users_addr)),
            photos_url: args
                .photos_url
                .clone()
                .unwrap_or_else(|| format!("{scheme}://{}", args.photos_addr)),
            gateway: GatewayOptions {
                request_timeout: args.gateway_timeout,
                max_body_bytes: args.gateway_max_body_bytes,
                max_upload_bytes: args.gateway_max_upload_bytes,
                max_concurrent_uploads: args.gateway_max_uploads,
                max_concurrent_requests: args.gateway_max_requests,
                max_event_streams: args.gateway_max_event_streams,
                max_event_streams_per_user: args.gateway_max_event_streams_per_user,
                heartbeat: args.gateway_heartbeat,
                phone_queue: args.gateway_phone_queue,
                // Three progress intervals without a word: the stream is dead.
                upstream_idle_timeout: args.progress_interval * 3,
                metrics: metrics.registry().clone(),
                ..GatewayOptions::new(auth(args, dev)?)
            },
            contract_timeout: args.contract_timeout,
            cache: CacheOptions {
                // Three progress intervals without a word: the stream is dead.
                idle_timeout: args.progress_interval * 3,
                follow: match args.follow {
                    crate::config::Follow::Watch => lightbox_cache::FollowMode::Watch,
                    crate::config::Follow::Poll => lightbox_cache::FollowMode::poll(args.poll_interval),
                },
                ..CacheOptions::default()
            },
            photos: PhotosOptions {
                fresh_timeout: args.fresh_timeout,
                miss_timeout: args.miss_timeout,
                jobs: photo_jobs(args),
                ..PhotosOptions::default()
            },
            events: events(args, dev),
            feed: FeedOptions {
                watcher_buffer: args.watcher_buffer,
                progress_interval: args.progress_interval,
                retention: Retention {
                    keep_changes: args.keep_changes,
                    keep_tombstones: args.keep_tombstones,
                    ..Retention::default()
                },
                ..FeedOptions::default()
            },
            server: ServerOptions {
                max_message_bytes: args.max_message_bytes,
                drain_timeout: args.drain_timeout,
                drain_delay: args.drain_delay,
                metrics: metrics.registry().clone(),
                tls: tls.grpc,
                ..ServerOptions::default()
            },
            demo: false,
            metrics,
            gateway_tls: tls.gateway,
            client_tls: tls.client,
        })
    }

    /// A client of the service `label` at `spec` (one URL or several,
    /// comma-separated; a DNS name is re-resolved): balanced over its
    /// healthy replicas, over TLS for `https://` URLs, its calls counted in
    /// the process's metrics. Connects on first use.
    pub fn upstream(&self, label: &str, spec: &str, connect_timeout: Duration) -> anyhow::Result<Balanced> {
        let target =
            lightbox_client::Target::parse(spec).with_context(|| format!("the {label} service's address {spec:?}"))?;
        let types = lightbox_metrics::GrpcTypes::from_descriptor_set(lightbox_api::FILE_DESCRIPTOR_SET)
            .context("the descriptors do not decode")?;
        let options = lightbox_client::ConnectOptions {
            label: Some(label.to_owned()),
            tls: self.client_tls.clone(),
            metrics: Some(lightbox_metrics::GrpcClientLayer::new(self.metrics.registry(), &types)),
            ..lightbox_client::ConnectOptions::with_connect_timeout(connect_timeout)
        };
        lightbox_client::connect(&target, options).with_context(|| format!("cannot reach the {label} service"))
    }

    /// The scheme the servers' URLs start with, from what they serve.
    pub fn scheme(&self) -> &'static str {
        match self.client_tls {
            Some(_) => "https",
            None => "http",
        }
    }

    /// Polls every certificate file for changes, until the handles are
    /// dropped (see [`lightbox_tls::ServerTls::spawn_reloader`]).
    pub fn spawn_tls_reloaders(&self) -> Vec<JoinHandle<()>> {
        let every = Duration::from_secs(2);
        let servers = [&self.server.tls, &self.gateway_tls];
        let mut handles: Vec<JoinHandle<()>> = servers
            .into_iter()
            .flatten()
            .map(|tls| tls.spawn_reloader(every))
            .collect();
        handles.extend(self.client_tls.iter().map(|tls| tls.spawn_reloader(every)));
        handles
    }

    /// Opens the database of `component`.
    pub async fn database(&self, component: Target) -> anyhow::Result<Db> {
        match &self.database_url {
            Some(url) => Db::connect(url)
                .await
                .with_context(|| format!("cannot open the {component} database")),
            None => {
                let path = self.data_dir.join(format!("{component}.db"));
                Db::sqlite_file(&path)
                    .await
                    .with_context(|| format!("cannot open the {component} database at {}", path.display()))
            }
        }
    }
}

/// The delivery of events, from the command line: `dev` may deliver to
/// functions on loopback (where `cargo run --example contract_function`
/// listens).
fn events(args: &ServeArgs, dev: bool) -> EventsOptions {
    let mut allowed_networks = args.events_allow_network.clone();
    if dev {
        allowed_networks.extend(
            ["127.0.0.0/8", "::1/128"]
                .into_iter()
                .filter_map(|net| net.parse::<lightbox_events::Cidr>().ok()),
        );
    }
    EventsOptions {
        allowed_networks,
        ..EventsOptions::default()
    }
}

/// How the photos component processes images, from the command line.
fn photo_jobs(args: &ServeArgs) -> JobOptions {
    let defaults = JobOptions::default();
    JobOptions {
        workers: args.photo_workers.unwrap_or(defaults.workers),
        lease: args.photo_job_lease,
        poll_interval: args.photo_job_poll,
        max_attempts: args.photo_job_attempts.max(1),
        min_duration: args.photo_job_min_duration,
        ..defaults
    }
}

/// The TLS of a process, from the command line.
struct Tls {
    /// The gRPC servers' (mutual TLS with a client CA).
    grpc: Option<ServerTls>,
    /// The gateway's (no client certificates).
    gateway: Option<ServerTls>,
    /// The clients'.
    client: Option<ClientTls>,
}

/// Loads the certificates the flags name; a file that does not load fails
/// the start, naming it.
fn tls(args: &ServeArgs) -> anyhow::Result<Tls> {
    let pair = args.tls_cert.clone().zip(args.tls_key.clone());
    let server = |client_ca: Option<PathBuf>| -> anyhow::Result<Option<ServerTls>> {
        pair.clone()
            .map(|(cert, key)| ServerTls::load(ServerTlsFiles { cert, key, client_ca }))
            .transpose()
            .context("cannot load the TLS certificate (--tls-cert, --tls-key, --tls-client-ca)")
    };
    let grpc = server(args.tls_client_ca.clone())?
        .map(|tls| tls.with_alpn(&[b"h2"]))
        .transpose()
        .context("cannot set up TLS for gRPC")?;
    let client = args
        .tls_ca
        .clone()
        .map(|ca| {
            let (cert, key) = pair.clone().unzip();
            ClientTls::load(ClientTlsFiles { ca, cert, key })
        })
        .transpose()
        .context("cannot load the TLS CA (--tls-ca) or this process's certificate")?;
    Ok(Tls {
        grpc,
        gateway: server(None)?,
        client,
    })
}

/// The gateway's token checks from the command line. Production keys come
/// from `--jwt-secret` or `--jwt-public-key`; the development key only with
/// `--jwt-dev-key` or in `dev`.
fn auth(args: &ServeArgs, dev: bool) -> anyhow::Result<AuthConfig> {
    let mut auth = AuthConfig::new(&args.jwt_issuer, &args.jwt_audience);
    if let Some(secret) = &args.jwt_secret {
        auth = auth.with_hs256_secret(secret.as_bytes());
    }
    for path in &args.jwt_public_key {
        let pem = std::fs::read(path).with_context(|| format!("cannot read the public key {}", path.display()))?;
        auth = auth
            .with_public_key_pem(&pem)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    }
    if dev || args.jwt_dev_key {
        auth = auth.with_hs256_secret(lightbox_gateway::auth::DEVELOPMENT_SECRET.as_bytes());
    }
    Ok(auth)
}
