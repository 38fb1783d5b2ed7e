//! `lightbox fault`: sets, shows or clears the faults a running server
//! injects, through its process's admin listener (which faults never
//! reach, so a "down" server can be brought back).

use std::time::Duration;

use clap::Args;
use lightbox_api::admin::{
    ClearFaultRequest, Fault, GetFaultRequest, SetFaultRequest, fault_service_client::FaultServiceClient,
};
use lightbox_server::FaultSpec;

use super::{
    Failure, Kind, Service,
    failure::{AdminToken, Endpoint},
    output::emit,
    parse_addr,
};

/// Arguments of `lightbox fault`.
#[derive(Debug, Clone, Args)]
pub struct FaultArgs {
    /// The server to act on (faults are injected into the gRPC servers, not
    /// the gateway).
    #[arg(value_enum)]
    pub target: Service,

    /// The admin listener of the process running it, `HOST:PORT` or a URL
    /// (its --admin-addr; default: LIGHTBOX_ADMIN_ADDR, or 127.0.0.1:50050).
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_addr)]
    pub addr: Option<String>,

    /// The server's admin token (its --admin-token); `lightbox dev` needs
    /// none on loopback.
    #[arg(long, env = "LIGHTBOX_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Latency to add to every call, e.g. `200ms`.
    #[arg(long, value_parser = humantime::parse_duration, group = "fault")]
    pub latency: Option<Duration>,

    /// Share of calls to fail with UNAVAILABLE, from 0 to 1.
    #[arg(long, group = "fault")]
    pub error_rate: Option<f64>,

    /// Refuse every call, and end the streams in progress.
    #[arg(long, group = "fault")]
    pub down: bool,

    /// Remove every fault.
    #[arg(long, group = "fault")]
    pub clear: bool,
}

/// Runs `lightbox fault …`; prints the fault in force afterwards
/// ("contracts: down").
pub async fn run(args: FaultArgs) -> anyhow::Result<()> {
    let endpoint = Endpoint::admin(args.target, args.addr.as_deref(), "fault")?;
    let token = AdminToken::new(args.token.as_deref())?;
    let mut client = FaultServiceClient::with_interceptor(endpoint.channel(), token);
    let failed = |status| endpoint.failed(status);
    let component = args.target.name().to_owned();
    let fault = if args.clear {
        client
            .clear_fault(ClearFaultRequest { component })
            .await
            .map_err(failed)?
            .into_inner()
            .fault
    } else if args.latency.is_none() && args.error_rate.is_none() && !args.down {
        client
            .get_fault(GetFaultRequest { component })
            .await
            .map_err(failed)?
            .into_inner()
            .fault
    } else {
        let fault = Fault {
            latency: args.latency.map(pbjson_types::Duration::from),
            error_rate: args.error_rate.unwrap_or(0.0),
            down: args.down,
        };
        client
            .set_fault(SetFaultRequest {
                fault: Some(fault),
                component,
            })
            .await
            .map_err(failed)?
            .into_inner()
            .fault
    };
    // The server's own words for it, as its log says it.
    let spec = FaultSpec::try_from(fault.unwrap_or_default()).map_err(|e| {
        Failure::new(
            Kind::Other,
            format!("the {} server answered a fault this tool cannot read: {e}", args.target),
        )
    })?;
    emit(&format!("{}: {spec}", args.target))?;
    Ok(())
}
