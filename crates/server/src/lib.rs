//! What every Lightbox gRPC server shares: health, reflection, message
//! limits, graceful shutdown with a deadline, and fault injection.
//!
//! # Layout
//!
//! - [`shutdown`]: [`Shutdown`], the stop signal passed into every
//!   long-running task, its [`ShutdownTrigger`], and [`ctrl_c_or_term`].
//! - [`fault`]: the fault in force ([`Faults`], [`FaultSpec`]), the admin
//!   service that changes it ([`FaultServiceImpl`]), and the tower layer
//!   that applies it ([`FaultLayer`]), ending running streams when "down".
//! - `server` (re-exported here): [`bind`] then [`serve`], which adds
//!   health, reflection and the fault layer to a service's routes and
//!   drains on shutdown; [`ServerOptions`], [`ServeError`].
//! - `health` (re-exported): [`ProcessHealth`], the whole process's health,
//!   which every server of the process copies its statuses into.
//! - `admin` (re-exported): [`serve_admin`], the process's admin listener:
//!   its health, metrics, and fault injection behind an
//!   [`AdminCredential`] ([`AdminOptions`]); [`serve_admin_with`] adds the
//!   components' own [`AdminService`]s behind it too.
//!
//! # Use
//!
//! ```ignore
//! let listener = lightbox_server::bind(addr).await?;          // fail fast on a port clash
//! let (trigger, shutdown) = Shutdown::new();
//! let routes = Routes::new(UsersServiceServer::new(users));
//! let server = tokio::spawn(lightbox_server::serve(
//!     listener, routes, &["lightbox.users.v1.UsersService"],
//!     Faults::new(), shutdown, ServerOptions::default(),
//! ));
//! lightbox_server::ctrl_c_or_term().await;
//! trigger.trigger();
//! server.await??;                                              // returns within drain_timeout
//! ```

mod admin;
pub mod fault;
mod health;
mod server;
pub mod shutdown;

pub use admin::{
    AdminCredential, AdminOptions, AdminService, METRICS_CONTENT_TYPE, MIN_TOKEN_LEN, MetricsText, serve_admin,
    serve_admin_with,
};
pub use fault::{FaultLayer, FaultServiceImpl, FaultSpec, Faults};
pub use health::ProcessHealth;
pub use server::{ServeError, ServerOptions, bind, http2, serve};
pub use shutdown::{Shutdown, ShutdownTrigger, ctrl_c_or_term};
