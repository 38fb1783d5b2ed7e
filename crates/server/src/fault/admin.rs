//! `lightbox.admin.v1.FaultService` over a [`Faults`].

use lightbox_api::{
    ApiError,
    admin::{
        ClearFaultRequest, ClearFaultResponse, GetFaultRequest, GetFaultResponse, SetFaultRequest, SetFaultResponse,
        fault_service_server::FaultService,
    },
};
use tonic::{Request, Response, Status};

use super::{FaultSpec, Faults};

/// The admin gRPC service that reads and changes a server's [`Faults`].
/// Wrap it in `FaultServiceServer::new(..)` to serve it ([`crate::serve`]
/// does).
#[derive(Debug, Clone)]
pub struct FaultServiceImpl {
    faults: Faults,
}

impl FaultServiceImpl {
    /// Serves `faults`, which should be the same (a clone) as the one given
    /// to the [`FaultLayer`](super::FaultLayer).
    pub fn new(faults: Faults) -> FaultServiceImpl {
        FaultServiceImpl { faults }
    }
}

#[tonic::async_trait]
impl FaultService for FaultServiceImpl {
    async fn get_fault(&self, _request: Request<GetFaultRequest>) -> Result<Response<GetFaultResponse>, Status> {
        Ok(Response::new(GetFaultResponse {
            fault: Some(self.faults.get().into()),
        }))
    }

    async fn set_fault(&self, request: Request<SetFaultRequest>) -> Result<Response<SetFaultResponse>, Status> {
        let fault = request.into_inner().fault.ok_or_else(|| {
            ApiError::InvalidArgument("fault is required (ClearFault removes every fault)".to_owned())
        })?;
        let spec = FaultSpec::try_from(fault)?;
        self.faults.set(spec).map_err(ApiError::InvalidArgument)?;
        tracing::info!(
            latency = ?spec.latency,
            error_rate = spec.error_rate,
            down = spec.down,
            "fault injection changed"
        );
        Ok(Response::new(SetFaultResponse {
            fault: Some(spec.into()),
        }))
    }

    async fn clear_fault(&self, _request: Request<ClearFaultRequest>) -> Result<Response<ClearFaultResponse>, Status> {
        self.faults.clear();
        tracing::info!("fault injection cleared");
        Ok(Response::new(ClearFaultResponse {
            fault: Some(FaultSpec::default().into()),
        }))
    }
}
