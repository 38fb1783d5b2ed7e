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
//!   health, reflection, the admin service and the fault layer to a
//!   service's routes and drains on shutdown; [`ServerOptions`],
//!   [`ServeError`].
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

pub mod fault;
mod server;
pub mod shutdown;

pub use fault::{FaultLayer, FaultServiceImpl, FaultSpec, Faults};
pub use server::{ServeError, ServerOptions, bind, serve};
pub use shutdown::{Shutdown, ShutdownTrigger, ctrl_c_or_term};
