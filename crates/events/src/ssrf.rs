//! Where deliveries may go: endpoints are resolved and refused when any
//! address is private, loopback, link-local (cloud metadata at
//! 169.254.169.254 included), unique-local, multicast, documentation or
//! otherwise not a public unicast address, unless an allow-listed network
//! contains it (an in-cluster function on 10.0.0.0/8; the tests' 127.0.0.1).
//!
//! The check runs twice: when a subscription is made (a clear error for
//! the operator) and on every connection, through the HTTP client's own DNS
//! resolver ([`GuardedResolver`]): the address checked is the address
//! connected to, so a name that re-resolves to a private address later (DNS
//! rebinding) is refused too. IP literals never reach a resolver, so
//! [`AddressPolicy::check_literal`] runs before each request as well.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    str::FromStr,
    sync::Arc,
};

/// A network: an address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;

    /// `10.0.0.0/8`, `::1/128`, or a bare address (a network of one).
    fn from_str(text: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|e| format!("{text:?} is not a network: {e}"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .map_err(|e| format!("{text:?}: bad prefix length: {e}"))?,
            None => max,
        };
        if prefix > max {
            return Err(format!("{text:?}: a prefix of {prefix} is longer than the address"));
        }
        Ok(Cidr { addr, prefix })
    }
}

impl Cidr {
    /// Whether the network holds `ip` (IPv4-mapped IPv6 addresses count as
    /// their IPv4 address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// The address of `ip` with IPv4-mapped IPv6 (`::ffff:a.b.c.d`) unwrapped.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Whether `ip` is anything but a public unicast address.
pub fn is_non_public(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => non_public_v4(v4),
        IpAddr::V6(v6) => non_public_v6(v6),
    }
}

fn non_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_documentation()
        || a == 0 // "this network"
        || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
        || a >= 240 // reserved
}

fn non_public_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (first & 0xfe00) == 0xfc00 // unique local fc00::/7
        || (first & 0xffc0) == 0xfe80 // link-local fe80::/10
        || (first & 0xffc0) == 0xfec0 // site-local (deprecated) fec0::/10
        || (first == 0x2001 && ip.segments()[1] == 0x0db8) // documentation
        // NAT64 (64:ff9b::/96) reaches the IPv4 address it embeds.
        || (first == 0x0064 && ip.segments()[1] == 0xff9b && {
            let [.., a, b, c, d] = ip.octets();
            non_public_v4(Ipv4Addr::new(a, b, c, d))
        })
}

/// Which addresses deliveries may connect to: public unicast, and the
/// allow-listed networks.
#[derive(Debug, Clone, Default)]
pub struct AddressPolicy {
    allowed: Vec<Cidr>,
}

/// A refused endpoint address (also the error the resolver hands the HTTP
/// client, found again in its error's sources).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct Refused(pub String);

impl AddressPolicy {
    /// Public addresses, and those in `allowed`.
    pub fn new(allowed: Vec<Cidr>) -> AddressPolicy {
        AddressPolicy { allowed }
    }

    /// Whether deliveries may connect to `ip`.
    pub fn permits(&self, ip: IpAddr) -> bool {
        !is_non_public(ip) || self.allowed.iter().any(|net| net.contains(ip))
    }

    fn refuse(&self, host: &str, ip: IpAddr) -> Refused {
        Refused(format!(
            "endpoint host {host} resolves to {ip}, a private, loopback, link-local or otherwise non-public \
             address; allow its network on the delivery component to deliver there"
        ))
    }

    /// Checks a host that is an IP literal (`None`: it is a name, checked
    /// when resolved).
    pub fn check_literal(&self, host: &str) -> Option<Result<(), Refused>> {
        let ip: IpAddr = host.trim_start_matches('[').trim_end_matches(']').parse().ok()?;
        Some(if self.permits(ip) {
            Ok(())
        } else {
            Err(self.refuse(host, ip))
        })
    }

    /// Resolves `host:port` and checks every address.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, Refused> {
        if let Ok(ip) = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
            return match self.permits(ip) {
                true => Ok(vec![SocketAddr::new(ip, port)]),
                false => Err(self.refuse(host, ip)),
            };
        }
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| Refused(format!("endpoint host {host} does not resolve: {e}")))?
            .collect();
        if addrs.is_empty() {
            return Err(Refused(format!("endpoint host {host} has no address")));
        }
        // Every address: the client may pick any of them.
        if let Some(bad) = addrs.iter().find(|addr| !self.permits(addr.ip())) {
            return Err(self.refuse(host, bad.ip()));
        }
        Ok(addrs)
    }
}

/// The HTTP client's resolver: the system's, with the [`AddressPolicy`]
/// applied to what it returns.
#[derive(Debug, Clone)]
pub struct GuardedResolver(pub Arc<AddressPolicy>);

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = Arc::clone(&self.0);
        let host = name.as_str().to_owned();
        Box::pin(async move {
            // Port 0: the client puts the URL's port in.
            let addrs = policy.resolve(&host, 0).await?;
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("an address")
    }

    #[test]
    fn non_public_addresses_are_refused() {
        let policy = AddressPolicy::default();
        for refused in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "192.0.2.1",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
            "2001:db8::1",
        ] {
            assert!(!policy.permits(ip(refused)), "{refused} must be refused");
        }
        for allowed in ["93.184.216.34", "8.8.8.8", "2606:4700::1111", "64:ff9b::808:808"] {
            assert!(policy.permits(ip(allowed)), "{allowed} is public");
        }
    }

    #[test]
    fn the_allow_list_opens_networks() {
        let policy = AddressPolicy::new(vec![
            "127.0.0.1".parse().expect("cidr"),
            "10.0.0.0/8".parse().expect("cidr"),
        ]);
        assert!(policy.permits(ip("127.0.0.1")));
        assert!(policy.permits(ip("::ffff:127.0.0.1")));
        assert!(!policy.permits(ip("127.0.0.2")));
        assert!(policy.permits(ip("10.200.0.9")));
        assert!(!policy.permits(ip("11.0.0.0")) || !is_non_public(ip("11.0.0.0")));
        assert!(!policy.permits(ip("192.168.0.1")));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("::/0".parse::<Cidr>().map(|c| c.contains(ip("::1"))).unwrap_or(false));
    }

    #[tokio::test]
    async fn names_are_checked_once_resolved() {
        let policy = AddressPolicy::default();
        // localhost resolves from /etc/hosts: no network needed.
        assert!(policy.resolve("localhost", 80).await.is_err());
        assert!(policy.check_literal("[::1]").is_some_and(|r| r.is_err()));
        assert!(policy.check_literal("example.com").is_none());
        let open = AddressPolicy::new(vec!["127.0.0.0/8".parse().expect("cidr"), "::1".parse().expect("cidr")]);
        assert!(open.resolve("localhost", 80).await.is_ok());
    }
}
