//! [`Target`]: the replicas of one service, as an operator writes them —
//! a comma-separated list of URLs, each an IP address, `localhost`, or a
//! DNS name that is resolved again and again.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr},
    str::FromStr,
};

use http::Uri;

use crate::ClientError;

/// Where the replicas of one service are: one or more [`Address`]es.
///
/// Parsed from `http://a:50051,http://b:50051`, `https://users:50051` or
/// `users-1:50051,users-2:50051` (a bare `HOST:PORT` is `http://`). See
/// [`Target::parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    addresses: Vec<Address>,
}

/// One address of a [`Target`]: a scheme, a host and a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    https: bool,
    host: Host,
    port: u16,
}

/// What an address's host is, which says how it becomes socket addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Host {
    /// An IP literal: one endpoint, never resolved.
    Ip(IpAddr),
    /// `localhost`: 127.0.0.1, never resolved (deterministic, and the same
    /// on every machine whatever its hosts file says about `::1`).
    Localhost,
    /// A DNS name (lowercase): resolved every `dns_refresh`, each address
    /// one endpoint.
    Dns(String),
}

impl Target {
    /// Parses a comma-separated list of addresses. Each is `http://HOST:PORT`,
    /// `https://HOST:PORT` (the port defaults to 80 and 443) or a bare
    /// `HOST:PORT` (plaintext; the port is required). `HOST` is an IP address
    /// (`[::1]` for IPv6), `localhost`, or a DNS name. Whitespace around
    /// items is ignored; an empty item, a path, a query or user info is an
    /// error.
    ///
    /// ```
    /// use lightbox_client::Target;
    ///
    /// let target = Target::parse("http://10.0.0.1:50051, users.lightbox.svc:50051").unwrap();
    /// assert_eq!(target.addresses().len(), 2);
    /// assert!(target.addresses()[1].is_dns());
    /// assert_eq!(target.to_string(), "http://10.0.0.1:50051,http://users.lightbox.svc:50051");
    /// ```
    pub fn parse(spec: &str) -> Result<Target, ClientError> {
        if spec.trim().is_empty() {
            return Err(ClientError::Empty);
        }
        let addresses = spec
            .split(',')
            .enumerate()
            .map(|(i, item)| match item.trim() {
                "" => Err(ClientError::EmptyItem {
                    spec: spec.to_owned(),
                    position: i + 1,
                }),
                item => Address::parse(item),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Target { addresses })
    }

    /// The addresses, in the order given.
    pub fn addresses(&self) -> &[Address] {
        &self.addresses
    }

    /// Whether some address is a DNS name (so the endpoint set can change).
    pub fn needs_resolution(&self) -> bool {
        self.addresses.iter().any(Address::is_dns)
    }
}

impl FromStr for Target {
    type Err = ClientError;

    fn from_str(spec: &str) -> Result<Target, ClientError> {
        Target::parse(spec)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, address) in self.addresses.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{address}")?;
        }
        Ok(())
    }
}

impl Address {
    fn parse(item: &str) -> Result<Address, ClientError> {
        let invalid = |reason: &str| ClientError::InvalidAddress {
            address: item.to_owned(),
            reason: reason.to_owned(),
        };
        let bare = !item.contains("://");
        let url = match bare {
            true => format!("http://{item}"),
            false => item.to_owned(),
        };
        let uri: Uri = url
            .parse()
            .map_err(|err: http::uri::InvalidUri| invalid(&err.to_string()))?;
        let https = match uri.scheme_str() {
            Some(scheme) if scheme.eq_ignore_ascii_case("http") => false,
            Some(scheme) if scheme.eq_ignore_ascii_case("https") => true,
            Some(scheme) => {
                return Err(ClientError::UnsupportedScheme {
                    address: item.to_owned(),
                    scheme: scheme.to_owned(),
                });
            }
            None => return Err(invalid("no scheme")),
        };
        let authority = uri.authority().ok_or_else(|| invalid("no host"))?;
        if authority.as_str().contains('@') {
            return Err(invalid("user info (user@) is not supported"));
        }
        if let Some(path) = uri.path_and_query()
            && path.as_str() != "/"
            && !path.as_str().is_empty()
        {
            return Err(invalid("a gRPC address has no path or query"));
        }
        // `Authority::port` hides a port that is not a u16 (it would
        // default to 80 silently): read it here.
        let text = authority.as_str();
        let port_text = text.rfind(':').map(|i| &text[i + 1..]).filter(|p| !p.contains(']'));
        let port = match (port_text.map(str::parse::<u16>), bare, https) {
            (Some(Ok(0) | Err(_)), _, _) => return Err(invalid("the port must be 1 to 65535")),
            (Some(Ok(port)), _, _) => port,
            (None, true, _) => return Err(invalid("no port: write HOST:PORT")),
            (None, false, true) => 443,
            (None, false, false) => 80,
        };
        let host = authority.host();
        let unbracketed = host.trim_start_matches('[').trim_end_matches(']');
        let host = if let Ok(ip) = unbracketed.parse::<IpAddr>() {
            Host::Ip(ip)
        } else if host.starts_with('[') {
            return Err(invalid("not an IPv6 address between the brackets"));
        } else if host.eq_ignore_ascii_case("localhost") {
            Host::Localhost
        } else if host.is_empty() {
            return Err(invalid("no host"));
        } else {
            Host::Dns(host.to_ascii_lowercase())
        };
        Ok(Address { https, host, port })
    }

    /// `true` for `https://`: the connection is TLS.
    pub fn is_https(&self) -> bool {
        self.https
    }

    /// The host as it goes into `:authority` and the TLS server name: the
    /// DNS name, `localhost`, or the IP address (no brackets).
    pub fn host(&self) -> String {
        match &self.host {
            Host::Ip(ip) => ip.to_string(),
            Host::Localhost => "localhost".to_owned(),
            Host::Dns(name) => name.clone(),
        }
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether the host is a DNS name, resolved every `dns_refresh`.
    pub fn is_dns(&self) -> bool {
        matches!(self.host, Host::Dns(_))
    }

    /// The IP address of an address that needs no resolution (an IP
    /// literal; `localhost` is 127.0.0.1); `None` for a DNS name.
    pub fn fixed_ip(&self) -> Option<IpAddr> {
        match &self.host {
            Host::Ip(ip) => Some(*ip),
            Host::Localhost => Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            Host::Dns(_) => None,
        }
    }

    /// `host:port` as the `:authority` header says it (IPv6 in brackets).
    pub(crate) fn authority(&self) -> String {
        match &self.host {
            Host::Ip(IpAddr::V6(ip)) => format!("[{ip}]:{}", self.port),
            _ => format!("{}:{}", self.host(), self.port),
        }
    }

    /// `http` or `https`.
    pub(crate) fn scheme(&self) -> &'static str {
        match self.https {
            true => "https",
            false => "http",
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme(), self.authority())
    }
}
