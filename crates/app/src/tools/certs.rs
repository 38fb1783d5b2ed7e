//! `lightbox certs`: a development CA and a certificate per service, so
//! that trying TLS and mutual TLS takes one command.

use std::path::PathBuf;

use clap::Args;

use super::{Failure, Kind, output::emit};

/// The certificates made: one per component, and one for an operator (the
/// CLI, grpcurl).
const NAMES: &[&str] = &["users", "contracts", "photos", "gateway", "events", "operator"];

/// Arguments of `lightbox certs`.
#[derive(Debug, Clone, Args)]
pub struct CertsArgs {
    /// The directory to write `ca.pem`, `ca.key`, and `NAME.pem`, `NAME.key`
    /// for users, contracts, photos, gateway, events and operator.
    #[arg(long, default_value = "certs")]
    pub out: PathBuf,

    /// Another host name or IP address every certificate names (besides
    /// its service's name, localhost, 127.0.0.1 and ::1); repeat for more.
    #[arg(long = "host", value_name = "HOST")]
    pub hosts: Vec<String>,

    /// Replace existing files (the CA too: certificates made before stop
    /// being trusted).
    #[arg(long)]
    pub force: bool,
}

/// Runs `lightbox certs`: writes the files and prints how to use them.
pub fn run(args: &CertsArgs) -> anyhow::Result<()> {
    let written = lightbox_tls::generate_dev_certs(&args.out, NAMES, &args.hosts, args.force).map_err(|e| {
        let kind = match e {
            lightbox_tls::TlsError::Exists { .. } => Kind::Conflict,
            _ => Kind::Other,
        };
        Failure::new(
            kind,
            format!("{e}; nothing was written (--force replaces existing files)"),
        )
    })?;
    let dir = args.out.display();
    let mut text = String::from("wrote:\n");
    for path in &written {
        text.push_str(&format!("  {}\n", path.display()));
    }
    text.push_str(&format!(
        "Every service with mutual TLS, in one process:\n  \
         lightbox dev --tls-cert {dir}/users.pem --tls-key {dir}/users.key \\\n    \
         --tls-client-ca {dir}/ca.pem --tls-ca {dir}/ca.pem\n\
         (development certificates only: never use them outside your machine)"
    ));
    emit(&text)?;
    Ok(())
}
