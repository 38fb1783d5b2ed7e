//! `lightbox`: the one binary. Parses the command line and hands over to
//! [`lightbox_app::run`]; exits 0 on success, otherwise prints a one-line
//! error and exits 1, 2 for usage errors (from clap), or the code the
//! command-line tools give the kind of failure.

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};

/// The version, with the git revision it was built from (see `build.rs`).
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("LIGHTBOX_GIT_REVISION"), ")");

#[tokio::main]
async fn main() -> ExitCode {
    let matches = lightbox_app::Cli::command().version(VERSION).get_matches();
    let cli = match lightbox_app::Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(err) => err.exit(),
    };
    match lightbox_app::run(cli, VERSION).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            // The tools say what kind of failure it was (see `lightbox_app::tools::Failure`).
            match err.downcast_ref::<lightbox_app::tools::Failure>() {
                Some(failure) => ExitCode::from(failure.exit_code),
                None => ExitCode::FAILURE,
            }
        }
    }
}
