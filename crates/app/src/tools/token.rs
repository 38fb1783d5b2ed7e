//! `lightbox token USER_ID`: a development token for the gateway, alone on
//! stdout (for `export TOKEN=$(lightbox token …)`).

use std::time::Duration;

use clap::Args;

use super::{Failure, Kind, output::emit};

/// Arguments of `lightbox token`.
#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// The user the token is for (its subject).
    pub user_id: String,

    /// How long the token is valid.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "24h")]
    pub ttl: Duration,

    /// The HS256 key to sign with (default: the development key).
    #[arg(long, env = "LIGHTBOX_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// The token's issuer.
    #[arg(long, env = "LIGHTBOX_JWT_ISSUER", default_value = lightbox_gateway::auth::DEFAULT_ISSUER)]
    pub jwt_issuer: String,

    /// The token's audience.
    #[arg(long, env = "LIGHTBOX_JWT_AUDIENCE", default_value = lightbox_gateway::auth::DEFAULT_AUDIENCE)]
    pub jwt_audience: String,
}

/// Runs `lightbox token …`.
pub fn run(args: &TokenArgs) -> anyhow::Result<()> {
    let secret = args
        .jwt_secret
        .as_deref()
        .unwrap_or(lightbox_gateway::auth::DEVELOPMENT_SECRET);
    let token = lightbox_gateway::auth::hs256_token(
        secret.as_bytes(),
        &args.jwt_issuer,
        &args.jwt_audience,
        &args.user_id,
        args.ttl,
    )
    .map_err(|e| Failure::new(Kind::Other, format!("cannot sign a token for {}: {e}", args.user_id)))?;
    emit(&token)?;
    Ok(())
}
