//! `lightbox.admin.v1.FaultService` over a [`Faults`].

use lightbox_api::{
    ApiError,
    admin::{
        ClearFaultRequest, ClearFaultResponse, GetFaultRequest, GetFaultResponse, SetFaultRequest, SetFaultResponse,
        fault_service_server::FaultService,
    },
};
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{FaultSpec, Faults};

/// The admin gRPC service that reads and changes a server's [`Faults`].
/// Wrap it in `FaultServiceServer::new(..)` to serve it ([`crate::serve`]
/// does).
#[derive(Debug, Clone)]
pub struct FaultServiceImpl {
    faults: Faults,
    /// The server's short name ("users"), in the log line of every change:
    /// in monolithic mode several servers log to the same place.
    service_name: Arc<str>,
}

impl FaultServiceImpl {
    /// Serves `faults`, which should be the same (a clone) as the one given
    /// to the [`FaultLayer`](super::FaultLayer). Its log lines name the
    /// server "lightbox" unless [`FaultServiceImpl::with_service_name`] says
    /// otherwise.
    pub fn new(faults: Faults) -> FaultServiceImpl {
        FaultServiceImpl {
            faults,
            service_name: Arc::from("lightbox"),
        }
    }

    /// Names the server in the log ("fault injection on users: down").
    pub fn with_service_name(mut self, name: impl Into<String>) -> FaultServiceImpl {
        self.service_name = Arc::from(name.into());
        self
    }

    /// Logs a change of the fault in force, naming the server.
    fn log_change(&self, before: FaultSpec, after: FaultSpec) {
        let name = &*self.service_name;
        tracing::info!(service = %name, "fault injection on {name}: {after} (was: {before})");
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
        let before = self.faults.get();
        self.faults.set(spec).map_err(ApiError::InvalidArgument)?;
        self.log_change(before, spec);
        Ok(Response::new(SetFaultResponse {
            fault: Some(spec.into()),
        }))
    }

    async fn clear_fault(&self, _request: Request<ClearFaultRequest>) -> Result<Response<ClearFaultResponse>, Status> {
        let before = self.faults.get();
        self.faults.clear();
        self.log_change(before, FaultSpec::default());
        Ok(Response::new(ClearFaultResponse {
            fault: Some(FaultSpec::default().into()),
        }))
    }
}
