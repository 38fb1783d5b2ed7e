//! `lightbox.admin.v1.FaultService` over the [`Faults`] of a process's
//! components.

use std::sync::Arc;

use lightbox_api::{
    ApiError,
    admin::{
        ClearFaultRequest, ClearFaultResponse, GetFaultRequest, GetFaultResponse, SetFaultRequest, SetFaultResponse,
        fault_service_server::FaultService,
    },
};
use tonic::{Request, Response, Status};

use super::{FaultSpec, Faults};

/// The admin gRPC service that reads and changes the [`Faults`] of the
/// components of one process, each by its short name ("users"). Wrap it in
/// `FaultServiceServer::new(..)` to serve it ([`crate::serve_admin`] does,
/// behind its credential check).
#[derive(Debug, Clone)]
pub struct FaultServiceImpl {
    /// Each component's short name and its faults (the same cell its
    /// [`FaultLayer`](super::FaultLayer) reads).
    components: Arc<[(String, Faults)]>,
}

impl FaultServiceImpl {
    /// Serves the faults of `components`: each a short name ("users") and
    /// the [`Faults`] given to that component's
    /// [`FaultLayer`](super::FaultLayer).
    pub fn new(components: impl IntoIterator<Item = (String, Faults)>) -> FaultServiceImpl {
        FaultServiceImpl {
            components: components.into_iter().collect(),
        }
    }

    /// The component a request names; an empty name means the only one.
    fn component(&self, name: &str) -> Result<(&str, &Faults), ApiError> {
        let names = || {
            self.components
                .iter()
                .map(|(name, _)| name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        match (name, &*self.components) {
            ("", [(only, faults)]) => Ok((only, faults)),
            ("", []) => Err(ApiError::FailedPrecondition(
                "this process runs no component that faults can be injected into".to_owned(),
            )),
            ("", _) => Err(ApiError::InvalidArgument(format!(
                "this process runs {}: name one in `component`",
                names()
            ))),
            (name, components) => components
                .iter()
                .find(|(candidate, _)| candidate == name)
                .map(|(name, faults)| (name.as_str(), faults))
                .ok_or_else(|| {
                    ApiError::NotFound(format!("this process runs no {name:?} component; it runs {}", names()))
                }),
        }
    }
}

/// Logs a change of the fault in force, naming the component: in
/// monolithic mode several log to the same place.
fn log_change(name: &str, before: FaultSpec, after: FaultSpec) {
    tracing::info!(service = %name, "fault injection on {name}: {after} (was: {before})");
}

#[tonic::async_trait]
impl FaultService for FaultServiceImpl {
    async fn get_fault(&self, request: Request<GetFaultRequest>) -> Result<Response<GetFaultResponse>, Status> {
        let (name, faults) = self.component(&request.get_ref().component)?;
        Ok(Response::new(GetFaultResponse {
            fault: Some(faults.get().into()),
            component: name.to_owned(),
        }))
    }

    async fn set_fault(&self, request: Request<SetFaultRequest>) -> Result<Response<SetFaultResponse>, Status> {
        let request = request.into_inner();
        let (name, faults) = self.component(&request.component)?;
        let fault = request.fault.ok_or_else(|| {
            ApiError::InvalidArgument("fault is required (ClearFault removes every fault)".to_owned())
        })?;
        let spec = FaultSpec::try_from(fault)?;
        let before = faults.get();
        faults.set(spec).map_err(ApiError::InvalidArgument)?;
        log_change(name, before, spec);
        Ok(Response::new(SetFaultResponse {
            fault: Some(spec.into()),
            component: name.to_owned(),
        }))
    }

    async fn clear_fault(&self, request: Request<ClearFaultRequest>) -> Result<Response<ClearFaultResponse>, Status> {
        let (name, faults) = self.component(&request.get_ref().component)?;
        let before = faults.get();
        faults.clear();
        log_change(name, before, FaultSpec::default());
        Ok(Response::new(ClearFaultResponse {
            fault: Some(FaultSpec::default().into()),
            component: name.to_owned(),
        }))
    }
}
