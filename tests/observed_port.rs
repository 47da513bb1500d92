//! `examples/observed.rs`'s handling of its listening address: an address it
//! could not tell anyone to scrape, or cannot listen on, is a clear error
//! before anything is served. Its own test binary: installing the exporter is
//! process-global.
#![cfg(all(feature = "metrics", feature = "memory"))]

use std::net::SocketAddr;

#[path = "../examples/observed.rs"]
#[allow(dead_code, unreachable_pub)]
mod observed;

/// Port 0 made the exporter listen on a port the system picked, and the
/// example printed `scrape http://127.0.0.1:0/metrics`: nobody could find it.
/// A port already taken and an unparsable `METRICS_ADDR` name what is wrong.
#[test]
fn an_address_nobody_could_scrape_is_refused_with_a_clear_error() {
    let zero: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let error = observed::install_exporter(zero)
        .expect_err("port 0 is refused")
        .to_string();
    assert!(error.contains("port 0"), "{error}");

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let error = observed::install_exporter(addr)
        .expect_err("the port is taken")
        .to_string();
    assert!(error.contains(&addr.to_string()), "{error}");

    let error = observed::metrics_addr(Some("localhost")).expect_err("not an address");
    assert!(error.contains("METRICS_ADDR"), "{error}");
    assert_eq!(
        observed::metrics_addr(None).unwrap(),
        "127.0.0.1:9464".parse::<SocketAddr>().unwrap()
    );
}
