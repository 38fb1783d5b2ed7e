//! `lightbox fault`: sets, shows or clears the faults a running server
//! injects, through its admin service.

use anyhow::Context;
use lightbox_api::admin::{
    ClearFaultRequest, Fault, GetFaultRequest, SetFaultRequest, fault_service_client::FaultServiceClient,
};

use crate::{config::FaultArgs, targets::Target};

/// The local default address of each component.
fn default_addr(target: Target) -> anyhow::Result<&'static str> {
    match target {
        Target::Users => Ok("http://127.0.0.1:50051"),
        Target::Contracts => Ok("http://127.0.0.1:50052"),
        Target::Photos => Ok("http://127.0.0.1:50053"),
        Target::Gateway | Target::All => {
            anyhow::bail!("name one gRPC component (users, contracts or photos): faults are injected into those")
        }
    }
}

pub(crate) async fn run(args: FaultArgs) -> anyhow::Result<()> {
    let addr = match &args.addr {
        Some(addr) if addr.contains("://") => addr.clone(),
        Some(addr) => format!("http://{addr}"),
        None => default_addr(args.target)?.to_owned(),
    };
    let mut client = FaultServiceClient::connect(addr.clone())
        .await
        .with_context(|| format!("cannot reach the {} server at {addr}", args.target))?;
    let refused = |status: tonic::Status| anyhow::anyhow!("the {} server refused: {}", args.target, status.message());
    let fault = if args.clear {
        client
            .clear_fault(ClearFaultRequest {})
            .await
            .map_err(refused)?
            .into_inner()
            .fault
    } else if args.latency.is_none() && args.error_rate.is_none() && !args.down {
        client
            .get_fault(GetFaultRequest {})
            .await
            .map_err(refused)?
            .into_inner()
            .fault
    } else {
        let latency = args.latency.map(pbjson_types::Duration::from);
        let fault = Fault {
            latency,
            error_rate: args.error_rate.unwrap_or(0.0),
            down: args.down,
        };
        client
            .set_fault(SetFaultRequest { fault: Some(fault) })
            .await
            .map_err(refused)?
            .into_inner()
            .fault
    };
    println!("{}: {}", args.target, describe(&fault.unwrap_or_default()));
    Ok(())
}

fn describe(fault: &Fault) -> String {
    let mut parts = Vec::new();
    if fault.down {
        parts.push("down".to_owned());
    }
    if let Some(latency) = fault.latency.filter(|l| l.seconds != 0 || l.nanos != 0) {
        parts.push(format!(
            "latency {}ms",
            latency.seconds * 1000 + i64::from(latency.nanos) / 1_000_000
        ));
    }
    if fault.error_rate > 0.0 {
        parts.push(format!("error rate {}", fault.error_rate));
    }
    if parts.is_empty() {
        "no fault".to_owned()
    } else {
        parts.join(", ")
    }
}
