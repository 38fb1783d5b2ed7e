//! `lightbox health`: asks a process's admin listener whether it is
//! serving, for container health checks (the image ships no other gRPC
//! health probe).

use clap::Args;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

use super::{Failure, Kind, Service, failure::Endpoint, output::emit, parse_addr};

/// Arguments of `lightbox health`.
#[derive(Debug, Clone, Args)]
pub struct HealthArgs {
    /// The process's admin listener, `HOST:PORT` or a URL (its
    /// --admin-addr; default: LIGHTBOX_ADMIN_ADDR, or 127.0.0.1:50050).
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_addr)]
    pub addr: Option<String>,

    /// The service to ask about (a full proto name such as
    /// `lightbox.users.v1.UsersService`); default: the whole process.
    #[arg(long, default_value = "")]
    pub service: String,
}

/// Runs `lightbox health`: prints `SERVING` and exits 0, or prints the
/// status and exits 7 (unavailable) when the process is not serving.
pub async fn run(args: HealthArgs) -> anyhow::Result<()> {
    // The process may run any component: the health check is the same.
    let endpoint = Endpoint::admin(Service::Users, args.addr.as_deref(), "health")?;
    let mut client = HealthClient::new(endpoint.channel());
    let status = client
        .check(HealthCheckRequest {
            service: args.service.clone(),
        })
        .await
        .map_err(|status| endpoint.failed(status))?
        .into_inner()
        .status;
    let status = ServingStatus::try_from(status).unwrap_or(ServingStatus::Unknown);
    let what = match args.service.as_str() {
        "" => "the process".to_owned(),
        service => service.to_owned(),
    };
    match status {
        ServingStatus::Serving => {
            emit("SERVING")?;
            Ok(())
        }
        other => Err(Failure::new(
            Kind::Unavailable,
            format!("{what} is {} (draining, or a component is down)", other.as_str_name()),
        )
        .into()),
    }
}
