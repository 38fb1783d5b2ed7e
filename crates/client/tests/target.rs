//! `Target::parse`: what operators write, and the messages for what they
//! should not.

#![allow(clippy::unwrap_used)]

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use lightbox_client::{Backoff, Target};

#[test]
fn lists_urls_and_bare_host_ports() {
    let target =
        Target::parse(" http://10.0.0.1:50051 ,https://Users.Lightbox.svc:8443,users-2:50051,[::1]:7").unwrap();
    let a = target.addresses();
    assert_eq!(a.len(), 4);
    assert_eq!(
        (a[0].is_https(), a[0].fixed_ip()),
        (false, Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))))
    );
    assert_eq!(
        (a[1].is_https(), a[1].host(), a[1].port()),
        (true, "users.lightbox.svc".to_owned(), 8443)
    );
    assert!(a[1].is_dns() && a[2].is_dns() && !a[0].is_dns());
    assert_eq!((a[2].is_https(), a[2].host()), (false, "users-2".to_owned()));
    assert_eq!(a[3].fixed_ip(), Some(IpAddr::V6(Ipv6Addr::LOCALHOST)));
    assert!(target.needs_resolution());
    assert_eq!(
        target.to_string(),
        "http://10.0.0.1:50051,https://users.lightbox.svc:8443,http://users-2:50051,http://[::1]:7"
    );
    assert_eq!(Target::parse(&target.to_string()).unwrap(), target);
}

#[test]
fn urls_default_their_port_and_localhost_needs_no_lookup() {
    let target: Target = "https://localhost,http://127.0.0.1/".parse().unwrap();
    let a = target.addresses();
    assert_eq!(
        (a[0].port(), a[0].fixed_ip()),
        (443, Some(IpAddr::V4(Ipv4Addr::LOCALHOST)))
    );
    assert_eq!(a[1].port(), 80);
    assert!(!target.needs_resolution());
}

#[test]
fn mistakes_say_what_to_write() {
    let cases = [
        (
            "",
            "no address given: expected one or more comma-separated addresses, e.g. http://users-1:50051,http://users-2:50051 or users:50051",
        ),
        ("a:1,,b:2", "address 2 of \"a:1,,b:2\" is empty: remove the extra comma"),
        (
            "users",
            "\"users\" is not a valid address (no port: write HOST:PORT); write http://HOST:PORT, https://HOST:PORT or HOST:PORT",
        ),
        (
            "grpc://users:1",
            "\"grpc://users:1\" uses the scheme \"grpc\": only http:// and https:// are supported",
        ),
        (
            "http://users:1/v1",
            "\"http://users:1/v1\" is not a valid address (a gRPC address has no path or query); write http://HOST:PORT, https://HOST:PORT or HOST:PORT",
        ),
        (
            "http://me@users:1",
            "\"http://me@users:1\" is not a valid address (user info (user@) is not supported); write http://HOST:PORT, https://HOST:PORT or HOST:PORT",
        ),
    ];
    for (spec, message) in cases {
        assert_eq!(Target::parse(spec).unwrap_err().to_string(), message, "{spec:?}");
    }
    assert!(Target::parse("http://users:99999").is_err());
    assert!(Target::parse("users:0").is_err());
    assert!(Target::parse("http://[users]:1").is_err());
}

#[test]
fn backoff_doubles_up_to_its_cap_with_jitter() {
    let backoff = Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(1),
    };
    for _ in 0..100 {
        let first = backoff.delay(1);
        assert!(
            first >= Duration::from_millis(50) && first <= Duration::from_millis(100),
            "{first:?}"
        );
        let third = backoff.delay(3);
        assert!(
            third >= Duration::from_millis(200) && third <= Duration::from_millis(400),
            "{third:?}"
        );
        let late = backoff.delay(40);
        assert!(
            late >= Duration::from_millis(500) && late <= Duration::from_secs(1),
            "{late:?}"
        );
    }
}
