//! [`Target`]: the components of Lightbox, by the names the command line
//! uses. Both the command line ([`crate::config`]) and the startup code
//! ([`crate::targets`]) read it; it depends on neither.

use std::{fmt, str::FromStr};

/// A component of Lightbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// The users service (IS 1).
    Users,
    /// The contracts service (IS 2).
    Contracts,
    /// The photos service, with its local copies of users and contracts.
    Photos,
    /// The mobile gateway (HTTP/JSON).
    Gateway,
    /// The delivery of events to functions (CloudEvents over HTTP). It has
    /// no port of its own: its `SubscriptionsService` is on the admin
    /// listener.
    Events,
    /// Every component.
    All,
}

impl Target {
    /// Every component `All` stands for, in start order (upstreams first).
    pub const COMPONENTS: [Target; 5] = [
        Target::Contracts,
        Target::Users,
        Target::Photos,
        Target::Events,
        Target::Gateway,
    ];

    /// Whether it serves on a port of its own (every component but
    /// `Events`, which serves on the admin listener).
    pub fn listens(self) -> bool {
        !matches!(self, Target::Events | Target::All)
    }

    /// The component's name, as written on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Target::Users => "users",
            Target::Contracts => "contracts",
            Target::Photos => "photos",
            Target::Gateway => "gateway",
            Target::Events => "events",
            Target::All => "all",
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Target {
    type Err = String;

    fn from_str(s: &str) -> Result<Target, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "users" => Ok(Target::Users),
            "contracts" => Ok(Target::Contracts),
            "photos" => Ok(Target::Photos),
            "gateway" => Ok(Target::Gateway),
            "events" => Ok(Target::Events),
            "all" => Ok(Target::All),
            other => Err(format!(
                "unknown target {other:?}: expected users, contracts, photos, gateway, events or all"
            )),
        }
    }
}
