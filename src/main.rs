//! `lightbox`: the one binary. Parses the command line and hands over to
//! [`lightbox_app::run`]; exits 0 on success, 2 for usage errors (from
//! clap), otherwise prints a one-line error and exits with the code of its
//! kind (see `lightbox_app::tools::Kind`; 1 for any other failure).

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
            eprintln!("error: {}", lightbox_app::error_line(&err));
            ExitCode::from(lightbox_app::exit_code(&err))
        }
    }
}
