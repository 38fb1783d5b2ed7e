//! The command line: one `Cli` with every setting, from flags or the
//! environment, each documented (this is what `--help` prints). The
//! servers' settings are here ([`ServeArgs`]); each tool's arguments live
//! beside the tool, in [`crate::tools`].

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{target::Target, tools};

/// Lightbox: event-driven gRPC services that keep answering when their
/// upstreams are slow or down.
#[derive(Debug, Parser)]
#[command(name = "lightbox", about, long_about = None)]
pub struct Cli {
    /// How logs are written.
    #[arg(long, env = "LIGHTBOX_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    /// What to do (default: `dev`).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// How the local copies follow their upstreams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Follow {
    /// Push: a watch stream delivers each change as it commits.
    Watch,
    /// Pull: the copy asks for the changes since its cursor, every interval.
    Poll,
}

/// Log output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Runs every component in one process on SQLite files under the data
    /// directory, with demo data on first start (monolithic mode).
    Dev(ServeArgs),
    /// Runs the components named by `--target` (microservices mode: one
    /// per process, typically on PostgreSQL).
    Serve(ServeArgs),
    /// Injects faults into a running server: latency, errors, or down.
    Fault(tools::fault::FaultArgs),
    /// Checks a process's health on its admin listener: exits 0 when it is
    /// serving (for container health checks).
    Health(tools::health::HealthArgs),
    /// The back office: create, read, update, delete users.
    Users(tools::users::UsersArgs),
    /// The support app: create, read, update, delete contracts.
    Contracts(tools::contracts::ContractsArgs),
    /// Photos: upload records, list, delete.
    Photos(tools::photos::PhotosArgs),
    /// Streams changes as they happen, resuming by itself after drops.
    Watch(tools::watch::WatchArgs),
    /// Lists, retries and discards the photo processing jobs, through the
    /// photos process's admin listener.
    Jobs(tools::jobs::JobsArgs),
    /// Subscriptions of functions to events (users, contracts, photos):
    /// create, list, pause, replay, rotate secrets, dead letters, through
    /// the admin listener of the process delivering events.
    Subscriptions(tools::subscriptions::SubscriptionsArgs),
    /// Prints a development token for a user (the token alone, for
    /// scripts), signed with the development key unless `--jwt-secret` is
    /// given.
    Token(tools::token::TokenArgs),
    /// Prints the gateway's OpenAPI document (generated from the protos).
    Openapi,
    /// Makes a development CA and a certificate for each service, to try
    /// TLS and mutual TLS in one command.
    Certs(tools::certs::CertsArgs),
    /// Measures the seed's questions in one run (slowness, outages, many
    /// users, watch fan-out, etcd as a peer where installed): markdown
    /// tables, `--json`, `--plot DIR` for charts.
    Bench(lightbox_bench::BenchArgs),
}

/// Settings of the servers.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// The components to run: users, contracts, photos, gateway, events
    /// (the delivery of events to functions), or all.
    #[arg(long, env = "LIGHTBOX_TARGET", value_delimiter = ',', default_value = "all")]
    pub target: Vec<Target>,

    /// The database: `postgres://…` or `sqlite://FILE`. Unset: one SQLite
    /// file per component under the data directory. Components sharing one
    /// database keep their tables apart.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,

    /// Where the SQLite files live when no database URL is given.
    #[arg(long, env = "LIGHTBOX_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,

    /// The users service's gRPC address.
    #[arg(long, env = "LIGHTBOX_USERS_ADDR", default_value = "127.0.0.1:50051")]
    pub users_addr: SocketAddr,

    /// The contracts service's gRPC address.
    #[arg(long, env = "LIGHTBOX_CONTRACTS_ADDR", default_value = "127.0.0.1:50052")]
    pub contracts_addr: SocketAddr,

    /// The photos service's gRPC address.
    #[arg(long, env = "LIGHTBOX_PHOTOS_ADDR", default_value = "127.0.0.1:50053")]
    pub photos_addr: SocketAddr,

    /// The mobile gateway's HTTP address.
    #[arg(long, env = "LIGHTBOX_GATEWAY_ADDR", default_value = "127.0.0.1:8080")]
    pub gateway_addr: SocketAddr,

    /// The process's admin listener: gRPC health for probes, Prometheus
    /// metrics at `/metrics`, and fault injection when turned on. Never on
    /// the service ports.
    #[arg(long, env = "LIGHTBOX_ADMIN_ADDR", default_value = "127.0.0.1:50050")]
    pub admin_addr: SocketAddr,

    /// Serve fault injection (`lightbox.admin.v1.FaultService`) on the
    /// admin listener. Needs --admin-token. Always on in `dev`.
    #[arg(long, env = "LIGHTBOX_FAULTS")]
    pub faults: bool,

    /// The bearer token admin calls must carry (`authorization: Bearer
    /// TOKEN`), at least 16 characters. Required for --faults; in `dev`,
    /// required only when the admin listener is not on loopback.
    #[arg(long, env = "LIGHTBOX_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// Serve the admin listener over mutual TLS (with --tls-cert) and take a
    /// client certificate from this CA (PEM) as the admin credential, as
    /// well as the token. Kubernetes' gRPC probes cannot speak TLS: with it,
    /// probe with `lightbox health` instead.
    #[arg(long, env = "LIGHTBOX_ADMIN_CLIENT_CA")]
    pub admin_client_ca: Option<PathBuf>,

    /// The certificate (PEM) the gRPC ports and the gateway serve TLS with,
    /// also presented to upstreams under mutual TLS. Reloaded when the file
    /// changes. Needs --tls-key.
    #[arg(long, env = "LIGHTBOX_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "LIGHTBOX_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Require client certificates signed by this CA (PEM) on the gRPC
    /// ports: mutual TLS. (The gateway's clients are phones: it asks none.)
    #[arg(long, env = "LIGHTBOX_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// The CA (PEM) trusted for upstreams reached at `https://` URLs; with
    /// it, the upstream URLs left unset default to `https://`.
    #[arg(long, env = "LIGHTBOX_TLS_CA")]
    pub tls_ca: Option<PathBuf>,

    /// Serve plaintext on addresses other than loopback (inside a private
    /// network or a service mesh that encrypts). Without it, a listener off
    /// loopback needs --tls-cert.
    #[arg(long, env = "LIGHTBOX_ALLOW_PLAINTEXT")]
    pub allow_plaintext: bool,

    /// Where the gateway reaches the photos service. Unset: the photos
    /// address above.
    #[arg(long, env = "LIGHTBOX_PHOTOS_URL")]
    pub photos_url: Option<String>,

    /// Where the photos service reaches the users service. Unset: the users
    /// address above.
    #[arg(long, env = "LIGHTBOX_USERS_URL")]
    pub users_url: Option<String>,

    /// Where the users and photos services reach the contracts service.
    /// Unset: the contracts address above.
    #[arg(long, env = "LIGHTBOX_CONTRACTS_URL")]
    pub contracts_url: Option<String>,

    /// How long `GetUser` waits for the contracts service.
    #[arg(long, env = "LIGHTBOX_CONTRACT_TIMEOUT", value_parser = humantime::parse_duration, default_value = "1s")]
    pub contract_timeout: Duration,

    /// How long a `FRESH` photo list waits for the synchronous chain.
    #[arg(long, env = "LIGHTBOX_FRESH_TIMEOUT", value_parser = humantime::parse_duration, default_value = "1s")]
    pub fresh_timeout: Duration,

    /// How long a cached read waits for the synchronous path when the user
    /// is not in the local copy yet.
    #[arg(long, env = "LIGHTBOX_MISS_TIMEOUT", value_parser = humantime::parse_duration, default_value = "300ms")]
    pub miss_timeout: Duration,

    /// How many changes a watcher may fall behind before its stream is
    /// ended for it to resume (a progress interval's tick counts as one).
    #[arg(long, env = "LIGHTBOX_WATCHER_BUFFER", default_value_t = 1024)]
    pub watcher_buffer: usize,

    /// How the local copies follow their upstreams: `watch` (push: a watch
    /// stream delivers each change as it commits) or `poll` (pull: ask
    /// `List…Changes` every --poll-interval). Both reach the same state.
    #[arg(long, env = "LIGHTBOX_FOLLOW", value_enum, default_value_t = Follow::Watch)]
    pub follow: Follow,

    /// How often a copy polls its upstream with `--follow poll`.
    #[arg(long, env = "LIGHTBOX_POLL_INTERVAL", value_parser = humantime::parse_duration, default_value = "1s")]
    pub poll_interval: Duration,

    /// How often an idle watch stream gets a progress frame.
    #[arg(long, env = "LIGHTBOX_PROGRESS_INTERVAL", value_parser = humantime::parse_duration, default_value = "5s")]
    pub progress_interval: Duration,

    /// Changes kept in each changelog (older ones are compacted).
    #[arg(long, env = "LIGHTBOX_KEEP_CHANGES", default_value_t = 100_000)]
    pub keep_changes: i64,

    /// Revisions for which deletions are remembered (at least as many as
    /// the changes kept).
    #[arg(long, env = "LIGHTBOX_KEEP_TOMBSTONES", default_value_t = 1_000_000)]
    pub keep_tombstones: i64,

    /// The largest gRPC message accepted or sent, in bytes.
    #[arg(long, env = "LIGHTBOX_MAX_MESSAGE_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_message_bytes: usize,

    /// How long calls in progress may finish after a shutdown signal (and
    /// after the drain delay).
    #[arg(long, env = "LIGHTBOX_DRAIN_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    pub drain_timeout: Duration,

    /// How long health says NOT_SERVING after a shutdown signal before the
    /// listeners close, while every call still succeeds: time for load
    /// balancers and endpoints to move callers away (rolling updates).
    #[arg(long, env = "LIGHTBOX_DRAIN_DELAY", value_parser = humantime::parse_duration, default_value = "0s")]
    pub drain_delay: Duration,

    /// The gateway accepts HS256 tokens signed with this key.
    #[arg(long, env = "LIGHTBOX_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// The gateway accepts RS256 or ES256 tokens signed for this public key
    /// (a PEM file; repeat for several keys).
    #[arg(long, env = "LIGHTBOX_JWT_PUBLIC_KEY", value_delimiter = ',')]
    pub jwt_public_key: Vec<PathBuf>,

    /// The gateway accepts tokens signed with the development key (what
    /// `lightbox token` signs with). Always on in `dev`; never in production.
    #[arg(long, env = "LIGHTBOX_JWT_DEV_KEY")]
    pub jwt_dev_key: bool,

    /// The issuer (`iss`) the gateway requires of tokens.
    #[arg(long, env = "LIGHTBOX_JWT_ISSUER", default_value = lightbox_gateway::auth::DEFAULT_ISSUER)]
    pub jwt_issuer: String,

    /// The audience (`aud`) the gateway requires of tokens.
    #[arg(long, env = "LIGHTBOX_JWT_AUDIENCE", default_value = lightbox_gateway::auth::DEFAULT_AUDIENCE)]
    pub jwt_audience: String,

    /// The gateway's deadline for a request's body to start (then at least 32 KiB/s), and for its upstream call.
    #[arg(long, env = "LIGHTBOX_GATEWAY_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    pub gateway_timeout: Duration,

    /// The largest request body the gateway accepts, in bytes (uploads
    /// have their own limit).
    #[arg(long, env = "LIGHTBOX_GATEWAY_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub gateway_max_body_bytes: usize,

    /// The largest body of an upload (`CreatePhoto` with its image, base64
    /// in JSON) the gateway accepts, in bytes.
    #[arg(long, env = "LIGHTBOX_GATEWAY_MAX_UPLOAD_BYTES", default_value_t = 14 * 1024 * 1024)]
    pub gateway_max_upload_bytes: usize,

    /// Uploads the gateway reads at once (each may hold its whole body in
    /// memory); more get 503 at once.
    #[arg(long, env = "LIGHTBOX_GATEWAY_MAX_UPLOADS", default_value_t = 16)]
    pub gateway_max_uploads: usize,

    /// Requests the gateway serves at once; more get 503 at once.
    #[arg(long, env = "LIGHTBOX_GATEWAY_MAX_REQUESTS", default_value_t = 1024)]
    pub gateway_max_requests: usize,

    /// Event streams the gateway keeps open at once; more get 503.
    #[arg(long, env = "LIGHTBOX_GATEWAY_MAX_EVENT_STREAMS", default_value_t = 10_000)]
    pub gateway_max_event_streams: usize,

    /// Event streams one user may keep open at once (one per device); more get 429.
    #[arg(long, env = "LIGHTBOX_GATEWAY_MAX_EVENT_STREAMS_PER_USER", default_value_t = 8)]
    pub gateway_max_event_streams_per_user: usize,

    /// How often an idle event stream gets a heartbeat comment.
    #[arg(long, env = "LIGHTBOX_GATEWAY_HEARTBEAT", value_parser = humantime::parse_duration, default_value = "15s")]
    pub gateway_heartbeat: Duration,

    /// Updates the gateway queues for one event stream; a phone that falls
    /// this far behind is ended with an `end` event and resumes with
    /// `Last-Event-ID`.
    #[arg(long, env = "LIGHTBOX_GATEWAY_PHONE_QUEUE", default_value_t = 256)]
    pub gateway_phone_queue: usize,

    /// Photo jobs processed at once in this process (the worker pool's
    /// size; 0: none here, other replicas process them). Default: the
    /// number of cores.
    #[arg(long, env = "LIGHTBOX_PHOTO_WORKERS")]
    pub photo_workers: Option<usize>,

    /// How long a worker holds a photo job without renewing its lease
    /// (renewed every third of it); a job whose worker died is run again
    /// this long after its last renewal, plus at most one poll.
    #[arg(long, env = "LIGHTBOX_PHOTO_JOB_LEASE", value_parser = humantime::parse_duration, default_value = "15s")]
    pub photo_job_lease: Duration,

    /// How often the photo workers look for jobs without being woken (jobs
    /// of other replicas, retries coming due, lapsed leases).
    #[arg(long, env = "LIGHTBOX_PHOTO_JOB_POLL", value_parser = humantime::parse_duration, default_value = "2s")]
    pub photo_job_poll: Duration,

    /// Attempts a photo job gets before it is discarded (the dead letter).
    #[arg(long, env = "LIGHTBOX_PHOTO_JOB_ATTEMPTS", default_value_t = 5)]
    pub photo_job_attempts: u32,

    /// Test knob: every photo job attempt lasts at least this long, holding
    /// its lease, so that a test can kill a worker in the middle of one.
    #[arg(long, env = "LIGHTBOX_PHOTO_JOB_MIN_DURATION", value_parser = humantime::parse_duration,
          default_value = "0s", hide = true)]
    pub photo_job_min_duration: Duration,

    /// Networks the delivery of events may reach although they are not
    /// public (private, loopback, link-local addresses are refused
    /// otherwise), comma-separated: `10.0.0.0/8` for in-cluster functions.
    /// `dev` allows loopback.
    #[arg(
        long,
        env = "LIGHTBOX_EVENTS_ALLOW_NETWORKS",
        value_delimiter = ',',
        value_name = "CIDR"
    )]
    pub events_allow_network: Vec<lightbox_events::Cidr>,

    /// Do not load demo data on first start (`dev` only).
    #[arg(long, env = "LIGHTBOX_NO_DEMO")]
    pub no_demo: bool,
}
