//! How the tools fail: a [`Failure`] is one line and an exit code
//! ([`Kind`]). An `Endpoint` is a service (or a process's subscriptions)
//! at an address; a call that fails there becomes a [`Failure`] naming
//! both, and the next step, built once (not from a chain of causes that
//! repeat each other).

use std::time::Duration;

use lightbox_client::{Balanced, ConnectOptions, HealthCheck};
use tonic::{Code, Status};

use super::Service;

/// What kind of failure a command had; its exit code is what scripts see.
///
/// | exit code | meaning |
/// |---:|---|
/// | 0 | done |
/// | 1 | any other failure (internal error, a bug) |
/// | 2 | bad usage (unknown flag, missing argument, bad value for a flag) |
/// | 3 | not found |
/// | 4 | invalid argument |
/// | 5 | conflict: already exists, stale expected revision, failed precondition |
/// | 6 | refused: permission denied, quota reached |
/// | 7 | unavailable or too slow (nothing listening, down, deadline): try again later |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Anything else (exit 1).
    Other,
    /// Bad usage (exit 2): clap's own, or a flag's value the tool refuses.
    Usage,
    /// Not found (exit 3).
    NotFound,
    /// Invalid argument (exit 4).
    Invalid,
    /// Conflict (exit 5).
    Conflict,
    /// Refused (exit 6).
    Refused,
    /// Unavailable or too slow (exit 7).
    Unavailable,
}

impl Kind {
    /// The exit code of this kind of failure.
    pub fn exit_code(self) -> u8 {
        match self {
            Kind::Other => 1,
            Kind::Usage => 2,
            Kind::NotFound => 3,
            Kind::Invalid => 4,
            Kind::Conflict => 5,
            Kind::Refused => 6,
            Kind::Unavailable => 7,
        }
    }

    /// The kind of a failed call's gRPC code.
    pub fn of(code: Code) -> Kind {
        match code {
            Code::NotFound => Kind::NotFound,
            Code::InvalidArgument | Code::OutOfRange => Kind::Invalid,
            Code::AlreadyExists | Code::Aborted | Code::FailedPrecondition => Kind::Conflict,
            Code::PermissionDenied | Code::ResourceExhausted | Code::Unauthenticated => Kind::Refused,
            Code::Unavailable | Code::DeadlineExceeded => Kind::Unavailable,
            _ => Kind::Other,
        }
    }
}

/// A failed command: its one-line message and its [`Kind`].
#[derive(Debug)]
pub struct Failure {
    /// What kind of failure (the exit code).
    pub kind: Kind,
    message: String,
}

impl Failure {
    /// A failure of `kind`, said by `message` (one line).
    pub fn new(kind: Kind, message: impl Into<String>) -> Failure {
        Failure {
            kind,
            message: message.into(),
        }
    }

    /// The exit code scripts see.
    pub fn exit_code(&self) -> u8 {
        self.kind.exit_code()
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

/// The line the binary prints after `error: `: the error and its causes,
/// each said once (a cause whose words are already in the line is left
/// out), on one line.
pub fn error_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        let text = text.trim();
        if text.is_empty() || line.contains(text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(text);
    }
    line.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The exit code of a failed command: its [`Failure`]'s, or 1.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    err.chain()
        .find_map(|cause| cause.downcast_ref::<Failure>())
        .map_or(Kind::Other.exit_code(), Failure::exit_code)
}

/// What an `Endpoint` reaches, for the words of its failures.
///
/// Not a [`Service`] variant: `lightbox watch` and `lightbox fault` take a
/// [`Service`] on the command line, and the subscriptions are neither a
/// feed to watch nor a server to inject faults into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Subject {
    /// A service: on its own port, or on its process's admin listener (its
    /// faults, its health, its photo jobs).
    Service(Service),
    /// The subscriptions of a process delivering events (`lightbox
    /// subscriptions`), on its admin listener only.
    Subscriptions,
}

impl Subject {
    /// Its name, as the tools' commands spell it.
    fn name(self) -> &'static str {
        match self {
            Subject::Service(service) => service.name(),
            Subject::Subscriptions => "subscriptions",
        }
    }
}

impl std::fmt::Display for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A service (or the subscriptions) at an address, as a tool reaches it:
/// the channel, and what to say when a call fails there.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    subject: Subject,
    url: String,
    /// The tool's command group (`users`, `watch`, `fault`, …), for the
    /// `--help` the next step points to.
    command: &'static str,
    /// Reached through its process's admin listener (`lightbox fault`,
    /// `lightbox health`), not its service port.
    admin: bool,
    channel: Balanced,
}

/// Where a process's admin listener is by default (`--admin-addr`).
pub(crate) const DEFAULT_ADMIN_URL: &str = "http://127.0.0.1:50050";

/// The admin credential a tool sends: `authorization: Bearer TOKEN` with
/// every call when there is a token (`--token`, `LIGHTBOX_ADMIN_TOKEN`).
#[derive(Clone)]
pub(crate) struct AdminToken(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl AdminToken {
    /// The credential of `token` (none if absent or empty); a usage error
    /// if it cannot be an HTTP header.
    pub(crate) fn new(token: Option<&str>) -> Result<AdminToken, Failure> {
        match token.map(str::trim) {
            None | Some("") => Ok(AdminToken(None)),
            Some(token) => format!("Bearer {token}")
                .parse()
                .map(|value| AdminToken(Some(value)))
                .map_err(|_| {
                    Failure::new(
                        Kind::Usage,
                        "--token must be printable ASCII (it is sent as an HTTP header)",
                    )
                }),
        }
    }
}

impl tonic::service::Interceptor for AdminToken {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// What the tools trust for `https://` addresses: the CA in
/// `LIGHTBOX_TLS_CA`, and the certificate they present under mutual TLS in
/// `LIGHTBOX_TLS_CERT` and `LIGHTBOX_TLS_KEY` (the servers' variables).
fn client_tls() -> Result<lightbox_tls::ClientTls, Failure> {
    let var = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(std::path::PathBuf::from)
    };
    let ca = var("LIGHTBOX_TLS_CA").ok_or_else(|| {
        Failure::new(
            Kind::Usage,
            "an https:// address needs the CA to trust in LIGHTBOX_TLS_CA (and, for mutual TLS, \
             a certificate in LIGHTBOX_TLS_CERT and LIGHTBOX_TLS_KEY)",
        )
    })?;
    let files = lightbox_tls::ClientTlsFiles {
        ca,
        cert: var("LIGHTBOX_TLS_CERT"),
        key: var("LIGHTBOX_TLS_KEY"),
    };
    lightbox_tls::ClientTls::load(files).map_err(|e| Failure::new(Kind::Usage, format!("TLS: {e}")))
}

/// The URL to reach: `addr` (from `--addr`), or what `variable` says, or
/// `default`.
fn resolve(addr: Option<&str>, variable: &str, default: &str) -> Result<String, Failure> {
    match (addr, std::env::var(variable)) {
        (Some(addr), _) => Ok(addr.to_owned()),
        (None, Ok(addr)) if !addr.is_empty() => {
            super::parse_addr(&addr).map_err(|e| Failure::new(Kind::Usage, format!("{variable}={addr}: {e}")))
        }
        (None, _) => Ok(default.to_owned()),
    }
}

impl Endpoint {
    /// `service` at `addr` (a URL from `--addr`), or where its variable
    /// (`LIGHTBOX_USERS_ADDR`, …, the one `lightbox dev` listens by) says,
    /// or at its local default port. Connects on the first call, so an
    /// unreachable service fails that call (and says so), not this.
    pub(crate) fn new(service: Service, addr: Option<&str>, command: &'static str) -> Result<Endpoint, Failure> {
        let url = resolve(addr, service.env_var(), service.default_url())?;
        Endpoint::at(Subject::Service(service), url, command, false)
    }

    /// The admin listener of the process running `service`: at `addr`, or
    /// where `LIGHTBOX_ADMIN_ADDR` says, or at 127.0.0.1:50050.
    pub(crate) fn admin(service: Service, addr: Option<&str>, command: &'static str) -> Result<Endpoint, Failure> {
        let url = resolve(addr, "LIGHTBOX_ADMIN_ADDR", DEFAULT_ADMIN_URL)?;
        Endpoint::at(Subject::Service(service), url, command, true)
    }

    /// The subscriptions of the process delivering events, on its admin
    /// listener: at `addr`, or where `LIGHTBOX_ADMIN_ADDR` says, or at
    /// 127.0.0.1:50050.
    pub(crate) fn subscriptions(addr: Option<&str>) -> Result<Endpoint, Failure> {
        let url = resolve(addr, "LIGHTBOX_ADMIN_ADDR", DEFAULT_ADMIN_URL)?;
        Endpoint::at(Subject::Subscriptions, url, "subscriptions", true)
    }

    fn at(subject: Subject, url: String, command: &'static str, admin: bool) -> Result<Endpoint, Failure> {
        let target = lightbox_client::Target::parse(&url)
            .map_err(|e| Failure::new(Kind::Usage, format!("--addr {url} is not an address: {e}")))?;
        let tls = match target.addresses().iter().any(|a| a.is_https()) {
            true => Some(client_tls()?),
            false => None,
        };
        let options = ConnectOptions {
            label: Some(subject.name().to_owned()),
            tls,
            // An admin listener must be reached even while its process says
            // NOT_SERVING (to read or clear a fault, to report the status).
            health: match admin {
                true => HealthCheck::Off,
                false => ConnectOptions::default().health,
            },
            ..ConnectOptions::with_connect_timeout(Duration::from_secs(5))
        };
        let channel = lightbox_client::connect(&target, options)
            .map_err(|e| Failure::new(Kind::Usage, format!("--addr {url}: {e}")))?;
        Ok(Endpoint {
            subject,
            url,
            command,
            admin,
            channel,
        })
    }

    /// What is reached, in words: "the users service", or "the admin
    /// listener" of a process.
    fn place(&self) -> String {
        match self.admin {
            true => "the admin listener".to_owned(),
            false => format!("the {} service", self.subject),
        }
    }

    /// The channel to call on (cheap to clone).
    pub(crate) fn channel(&self) -> Balanced {
        self.channel.clone()
    }

    /// The failure of a call that ended with `status`.
    pub(crate) fn failed(&self, status: Status) -> anyhow::Error {
        anyhow::Error::new(Failure::new(Kind::of(status.code()), self.describe(&status, true)))
    }

    /// What happened to a call that ended with `status`, with the next
    /// step if `next_step`: one line naming the service and the address.
    pub(crate) fn describe(&self, status: &Status, next_step: bool) -> String {
        let (place, url) = (self.place(), &self.url);
        if let Some(reason) = connect_error(status) {
            let line = format!("cannot reach {place} at {url} ({reason})");
            return match (next_step, self.admin) {
                (true, false) => {
                    format!("{line}; is it running? Start everything with `lightbox dev`, or pass --addr HOST:PORT")
                }
                (true, true) => {
                    format!("{line}; is the process running? Pass --addr with its admin address (its --admin-addr)")
                }
                (false, _) => line,
            };
        }
        let line = match transport_error(status) {
            // The call started, then its connection failed.
            Some(reason) => format!("lost the connection to {place} at {url} ({reason})"),
            None => {
                let message = status.message().trim();
                let code = code_name(status.code());
                match message.is_empty() {
                    true => format!("{place} at {url} answered {code}"),
                    false => format!("{place} at {url} answered {code}: {message}"),
                }
            }
        };
        match next_step {
            true => format!("{line}; {}", self.next_step(status)),
            false => line,
        }
    }

    /// What to do about a call that ended with `status`.
    fn next_step(&self, status: &Status) -> String {
        let (subject, command) = (self.subject, self.command);
        let subscriptions = subject == Subject::Subscriptions;
        match status.code() {
            Code::Unauthenticated if self.admin => {
                "nothing was changed; give the server's admin token with --token or LIGHTBOX_ADMIN_TOKEN".to_owned()
            }
            Code::Unimplemented if subscriptions => format!(
                "is {} the admin listener (its --admin-addr) of a process delivering events \
                 (`lightbox dev`, or `lightbox serve` with the events target)?",
                self.url
            ),
            Code::NotFound if subscriptions => {
                "check the name; `lightbox subscriptions list` lists the subscriptions".to_owned()
            }
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled if subscriptions => {
                "try again later; the process's log says more".to_owned()
            }
            Code::Aborted | Code::ResourceExhausted if subscriptions => "nothing was changed".to_owned(),
            Code::Unimplemented if self.admin => format!(
                "is {} a process's admin listener (its --admin-addr; 127.0.0.1:50050 by default), \
                 started with --faults?",
                self.url
            ),
            Code::NotFound if subject == Subject::Service(Service::Photos) => {
                "check the id; `lightbox photos list --user USER_ID` lists a user's photos".to_owned()
            }
            Code::NotFound => format!("check the id; `lightbox {subject} list` lists the {subject}"),
            Code::InvalidArgument | Code::OutOfRange => {
                format!("nothing was changed; see `lightbox {command} --help`")
            }
            Code::Aborted => format!(
                "nothing was changed; `lightbox {subject} get ID` shows the current revision, \
                 to pass as --expected-revision"
            ),
            Code::AlreadyExists | Code::FailedPrecondition | Code::PermissionDenied | Code::Unauthenticated => {
                "nothing was changed".to_owned()
            }
            Code::ResourceExhausted if subject == Subject::Service(Service::Photos) => {
                "nothing was changed; `lightbox contracts list --holder USER_ID` shows the owner's contract".to_owned()
            }
            Code::ResourceExhausted => "nothing was changed; try again later".to_owned(),
            Code::Unavailable if status.message().contains("fault injection") => {
                format!("`lightbox fault {subject} --clear` brings it back")
            }
            // The balancer saw the service's health go NOT_SERVING: it is
            // stopping, or `fault --down` took it down (which turns health
            // too, so the fault's own message is never seen then).
            Code::Unavailable if status.message().contains("NOT_SERVING") => format!(
                "it says it is not serving: it is stopping, or it was taken down \
                 (`lightbox fault {subject}` says; `lightbox fault {subject} --clear` brings it back)"
            ),
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => {
                format!("try again later (`lightbox fault {subject}` shows the faults injected into it)")
            }
            Code::Unimplemented => format!(
                "is {} the {subject} service's port? By default users is on 50051, \
                 contracts on 50052, photos on 50053",
                self.url
            ),
            // tonic's words for an answer that was not gRPC at all.
            _ if status.message().contains("while receiving response with status") => match self.admin {
                true => format!("{} does not speak gRPC: is it a process's admin listener?", self.url),
                false => format!(
                    "{} does not speak gRPC: is it the {subject} service's port (not the gateway's)?",
                    self.url
                ),
            },
            _ if self.admin => "the process's log says more".to_owned(),
            _ => format!("the {subject} service's log says more"),
        }
    }
}

/// Why the connection could not be made, if that is why `status` failed
/// (tonic marks it with [`tonic::ConnectError`] in the status's causes).
fn connect_error(status: &Status) -> Option<String> {
    let mut source = std::error::Error::source(status);
    while let Some(err) = source {
        if err.is::<tonic::ConnectError>() {
            return Some(innermost_reason(err));
        }
        source = err.source();
    }
    None
}

/// Why the connection failed, if `status` came from the transport rather
/// than from the server's answer (the server's answers carry no cause).
fn transport_error(status: &Status) -> Option<String> {
    std::error::Error::source(status).map(innermost_reason)
}

/// The deepest cause of `err`, in words: an I/O error by its kind where
/// that says it best ("connection refused").
fn innermost_reason(err: &(dyn std::error::Error + 'static)) -> String {
    let mut deepest = err;
    let mut io = None;
    let mut source = Some(err);
    while let Some(cause) = source {
        if let Some(found) = cause.downcast_ref::<std::io::Error>() {
            io = Some(found);
        }
        deepest = cause;
        source = cause.source();
    }
    let io_kind = io.map(std::io::Error::kind);
    match io_kind {
        Some(std::io::ErrorKind::ConnectionRefused) => "connection refused".to_owned(),
        Some(std::io::ErrorKind::ConnectionReset) => "connection reset".to_owned(),
        Some(std::io::ErrorKind::TimedOut) => "timed out".to_owned(),
        Some(std::io::ErrorKind::AddrNotAvailable) => "address not available".to_owned(),
        Some(std::io::ErrorKind::HostUnreachable) => "host unreachable".to_owned(),
        Some(std::io::ErrorKind::NetworkUnreachable) => "network unreachable".to_owned(),
        _ => deepest.to_string(),
    }
}

/// A gRPC code as the protos and grpcurl spell it (`NOT_FOUND`).
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(service: Service) -> Endpoint {
        Endpoint::new(service, Some("http://127.0.0.1:1"), "users").expect("a valid address")
    }

    #[test]
    fn exit_codes_follow_the_table() {
        let cases = [
            (Code::NotFound, 3),
            (Code::InvalidArgument, 4),
            (Code::OutOfRange, 4),
            (Code::AlreadyExists, 5),
            (Code::Aborted, 5),
            (Code::FailedPrecondition, 5),
            (Code::PermissionDenied, 6),
            (Code::ResourceExhausted, 6),
            (Code::Unavailable, 7),
            (Code::DeadlineExceeded, 7),
            (Code::Internal, 1),
            (Code::Unknown, 1),
        ];
        for (code, exit) in cases {
            assert_eq!(Kind::of(code).exit_code(), exit, "{code:?}");
        }
        assert_eq!(Kind::Usage.exit_code(), 2);
    }

    // A channel needs a runtime, even one that never connects.
    #[tokio::test]
    async fn an_answer_names_the_service_the_address_the_code_and_the_next_step() {
        let users = endpoint(Service::Users);
        let err = users.failed(Status::not_found("no user 42"));
        assert_eq!(exit_code(&err), 3);
        assert_eq!(
            error_line(&err),
            "the users service at http://127.0.0.1:1 answered NOT_FOUND: no user 42; \
             check the id; `lightbox users list` lists the users"
        );
        let down = users.failed(Status::unavailable("users is down (fault injection)"));
        assert_eq!(exit_code(&down), 7);
        assert!(
            error_line(&down).ends_with("; `lightbox fault users --clear` brings it back"),
            "{down}"
        );
        // As the balancer says it once health has turned too.
        let out = users.failed(Status::unavailable(
            "no replica of users is healthy (127.0.0.1:1: health says NOT_SERVING); retry with backoff",
        ));
        assert_eq!(exit_code(&out), 7);
        assert!(
            error_line(&out).ends_with("it is stopping, or it was taken down (`lightbox fault users` says; `lightbox fault users --clear` brings it back)"),
            "{out}"
        );
    }

    #[tokio::test]
    async fn the_subscriptions_next_steps_name_their_own_commands() {
        let subscriptions = Endpoint::subscriptions(Some("http://127.0.0.1:1")).expect("a valid address");
        let missing = subscriptions.failed(Status::not_found("there is no subscription subscriptions/x"));
        assert_eq!(exit_code(&missing), 3);
        assert_eq!(
            error_line(&missing),
            "the admin listener at http://127.0.0.1:1 answered NOT_FOUND: there is no subscription \
             subscriptions/x; check the name; `lightbox subscriptions list` lists the subscriptions"
        );
        let elsewhere = error_line(&subscriptions.failed(Status::unimplemented("")));
        assert!(elsewhere.contains("a process delivering events"), "{elsewhere}");
        let bad = error_line(&subscriptions.failed(Status::invalid_argument("subscription.endpoint")));
        assert!(bad.ends_with("see `lightbox subscriptions --help`"), "{bad}");
        let down = error_line(&subscriptions.failed(Status::unavailable("database")));
        assert!(!down.contains("lightbox fault"), "{down}");
    }

    #[test]
    fn an_error_line_says_each_cause_once() {
        let err = anyhow::anyhow!("tcp connect error: connection refused")
            .context("transport error: tcp connect error: connection refused")
            .context("cannot reach the users server");
        assert_eq!(
            error_line(&err),
            "cannot reach the users server: transport error: tcp connect error: connection refused"
        );
        assert_eq!(exit_code(&err), 1);
    }
}
