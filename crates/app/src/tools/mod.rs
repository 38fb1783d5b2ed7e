//! The command-line tools: the seed's Back Office App (`lightbox users`),
//! Support App (`lightbox contracts`), `lightbox photos`, the streaming
//! watcher (`lightbox watch`), fault injection (`lightbox fault`), health
//! checks (`lightbox health`), the photo jobs (`lightbox jobs`), the event
//! subscriptions (`lightbox subscriptions`) and development tokens
//! (`lightbox token`).
//!
//! Output is a readable table by default, and with `--json` the proto3 JSON
//! mapping of the call's response, written by the gateway's own code
//! ([`lightbox_gateway::json`]) so the two never differ (NDJSON for
//! `watch`: one line per frame). Errors are one line on stderr naming the
//! service, the address tried and the next step; the exit code says what
//! kind of failure it was, for scripts: see [`Kind`].
//!
//! # Layout
//!
//! - [`users`], [`contracts`], [`photos`]: create, get, list, update,
//!   delete, one module per service, each with its arguments and its table.
//! - [`watch`]: `lightbox watch`, which streams a feed and resumes by itself.
//! - [`fault`]: `lightbox fault`, the client of a process's admin listener.
//! - [`jobs`]: `lightbox jobs`, the photo processing jobs, on the admin
//!   listener too.
//! - [`subscriptions`]: `lightbox subscriptions`, the subscriptions of
//!   functions to events and their dead letters, on the admin listener of
//!   the process delivering events.
//! - [`health`]: `lightbox health`, a health check of a process, for
//!   container health checks.
//! - [`token`]: `lightbox token`, a development token for the gateway.
//! - [`failure`]: [`Failure`] and its exit code ([`Kind`]); `Endpoint`, a
//!   service (or the subscriptions) at an address, which turns a failed
//!   call into a [`Failure`] that names both and says what to do next;
//!   [`error_line`] and [`exit_code`], what the binary prints and returns.
//! - `output` (private): tables, JSON through the gateway's mapping, and
//!   stdout.
//!
//! Here: [`Service`] (which service a tool reaches, its default port) and
//! [`Common`] (`--addr`, `--json`).

pub mod certs;
pub mod contracts;
pub mod failure;
pub mod fault;
pub mod health;
pub mod jobs;
mod output;
pub mod photos;
pub mod subscriptions;
pub mod token;
pub mod users;
pub mod watch;

use clap::{Args, ValueEnum};
use tonic::Status;

pub use failure::{Failure, Kind, error_line, exit_code};

/// A gRPC service the tools reach, each on its own port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Service {
    /// The users service (local default port 50051).
    Users,
    /// The contracts service (local default port 50052).
    Contracts,
    /// The photos service (local default port 50053).
    Photos,
}

impl Service {
    /// Its name, as written on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Service::Users => "users",
            Service::Contracts => "contracts",
            Service::Photos => "photos",
        }
    }

    /// The variable that moves it, for `lightbox dev` (where it listens)
    /// and for the tools (where they call it) alike.
    pub fn env_var(self) -> &'static str {
        match self {
            Service::Users => "LIGHTBOX_USERS_ADDR",
            Service::Contracts => "LIGHTBOX_CONTRACTS_ADDR",
            Service::Photos => "LIGHTBOX_PHOTOS_ADDR",
        }
    }

    /// Where `lightbox dev` serves it by default.
    pub fn default_url(self) -> &'static str {
        match self {
            Service::Users => "http://127.0.0.1:50051",
            Service::Contracts => "http://127.0.0.1:50052",
            Service::Photos => "http://127.0.0.1:50053",
        }
    }
}

impl std::fmt::Display for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where to reach a service, and how to print.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// The service's address, `HOST:PORT` or a URL, or its replicas'
    /// comma-separated (default: its local default port).
    #[arg(long, global = true, value_name = "HOST:PORT", value_parser = parse_addr)]
    pub addr: Option<String>,
    /// Print the proto3 JSON mapping of the response (as the gateway writes
    /// it) instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

/// `--addr`: `HOST:PORT` (plain-text HTTP/2) or a URL, or several of them
/// comma-separated (the replicas of one service: calls go to a healthy one,
/// and `watch` resumes on another when its replica dies), as the URLs the
/// tools connect to. A malformed one is a usage error (exit 2), told by clap.
pub(crate) fn parse_addr(addr: &str) -> Result<String, String> {
    let urls = addr
        .split(',')
        .map(|one| parse_one_addr(one.trim()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(urls.join(","))
}

/// One address of `--addr`.
fn parse_one_addr(addr: &str) -> Result<String, String> {
    const EXPECTED: &str = "expected HOST:PORT, such as 127.0.0.1:50051, or a URL (several: comma-separated)";
    let is_url = addr.contains("://");
    let url = if is_url {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    };
    let uri: tonic::codegen::http::Uri = url.parse().map_err(|e| format!("{e}; {EXPECTED}"))?;
    // A bare HOST:PORT must name its port; a URL may rely on its scheme's.
    if uri.host().is_none_or(str::is_empty) || (!is_url && uri.port().is_none()) {
        return Err(EXPECTED.to_owned());
    }
    Ok(url)
}

/// A lifecycle state on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum StatusArg {
    /// Active.
    Active,
    /// Suspended.
    Suspended,
    /// Terminated (contracts only).
    Terminated,
}

/// The update mask of the fields given; an invalid-argument failure naming
/// `flags` (of `lightbox {command}`) when none was.
pub(crate) fn mask(paths: Vec<&str>, flags: &str, command: &str) -> Result<Option<pbjson_types::FieldMask>, Failure> {
    if paths.is_empty() {
        return Err(Failure::new(
            Kind::Invalid,
            format!("nothing to update: give {flags} (see `lightbox {command} --help`)"),
        ));
    }
    Ok(Some(pbjson_types::FieldMask {
        paths: paths.into_iter().map(str::to_owned).collect(),
    }))
}

/// Every page of a listing: `fetch` gets the page after a token and answers
/// its items and the next token (empty on the last page).
pub(crate) async fn all_pages<T, F, Fut>(mut fetch: F) -> Result<Vec<T>, Status>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<T>, String), Status>>,
{
    let (mut all, mut token) = (Vec::new(), String::new());
    loop {
        let (items, next) = fetch(token).await?;
        all.extend(items);
        if next.is_empty() {
            return Ok(all);
        }
        token = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_host_port_or_urls() {
        assert_eq!(parse_addr("127.0.0.1:50051").as_deref(), Ok("http://127.0.0.1:50051"));
        assert_eq!(parse_addr("localhost:1").as_deref(), Ok("http://localhost:1"));
        assert_eq!(
            parse_addr("https://users.example.com").as_deref(),
            Ok("https://users.example.com")
        );
        assert_eq!(
            parse_addr("127.0.0.1:1, http://127.0.0.1:2").as_deref(),
            Ok("http://127.0.0.1:1,http://127.0.0.1:2")
        );
        for bad in [
            "",
            "127.0.0.1",
            "no port",
            "127.0.0.1:port",
            ":50051",
            "127.0.0.1:1,",
            "a:1,,b:2",
        ] {
            assert!(parse_addr(bad).is_err(), "{bad:?} accepted");
        }
    }
}
