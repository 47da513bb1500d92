//! Server certificates NATS clients must refuse (issue 16): expired, not yet
//! valid, and issued for another name, each presented by a private
//! `nats-server` started here, each refused with an `Error::Tls` that names the
//! cause, within the connect timeout. Needs `POLYBUS_TEST_TLS_DIR`
//! (`scripts/brokers.sh` `ensure_test_certs`) and `nats-server`.

use std::time::{Duration, Instant};

use polybus_conformance::processes::{REFUSED_SERVER_CERTS, spawn, tls_file, wait_for_port};
use polybus_conformance::{free_port, timeout_multiplier};
use polybus_core::Error;
use polybus_nats::NatsConfig;

const TEST: &str = "expired_future_and_misnamed_server_certificates_are_refused";

#[test]
fn expired_future_and_misnamed_server_certificates_are_refused() {
    let Some(ca) = tls_file("ca.pem", TEST) else {
        return;
    };
    let Some(key) = tls_file("server-key.pem", TEST) else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("polybus-nats-certs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let timeout = Duration::from_secs_f64(3.0 * timeout_multiplier());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for (cert, cause) in REFUSED_SERVER_CERTS {
        let cert = tls_file(cert, TEST).unwrap();
        let port = free_port().unwrap();
        let conf = dir.join(format!("{port}.conf"));
        std::fs::write(
            &conf,
            format!(
                "listen: 127.0.0.1:{port}\ntls {{ cert_file: \"{}\", key_file: \"{}\", timeout: 2 }}\n",
                cert.display(),
                key.display()
            ),
        )
        .unwrap();
        let Some(_server) = spawn("nats-server", &["-c", conf.to_str().unwrap()], TEST) else {
            return;
        };
        assert!(
            wait_for_port(port, Duration::from_secs(5)),
            "nats-server on {port}"
        );
        let url = format!("tls://localhost:{port}?mode=core&tls_ca={}", ca.display());
        let config = NatsConfig::from_url(&url).unwrap().connect_timeout(timeout);
        let started = Instant::now();
        let result = rt.block_on(polybus_nats::connect_with(config));
        let took = started.elapsed();
        match result {
            Err(e @ Error::Tls { .. }) => {
                assert!(
                    e.to_string().contains(cause),
                    "{cert:?}: the error must say '{cause}': {e}"
                );
                assert!(!e.is_retryable());
                assert!(took < timeout + Duration::from_secs(1), "{cert:?} took {took:?}");
            }
            Err(e) => panic!("{cert:?}: expected Error::Tls ({cause}), got {e:?}"),
            Ok(_) => panic!("{cert:?}: the connection must be refused"),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
