//! Server certificates AMQP clients must refuse (issue 16): expired, not yet
//! valid, and issued for another name, each presented by a `socat` TLS
//! endpoint started here (the check is the client's, made during the
//! handshake, before any AMQP), each refused with an `Error::Tls` naming the
//! cause within the connect timeout. Needs `POLYBUS_TEST_TLS_DIR`
//! (`scripts/brokers.sh` `ensure_test_certs`) and `socat`.

use std::time::{Duration, Instant};

use polybus_conformance::processes::{REFUSED_SERVER_CERTS, refused_tls_endpoint, tls_file};
use polybus_conformance::timeout_multiplier;
use polybus_core::Error;
use polybus_rabbitmq::RabbitConfig;

const TEST: &str = "expired_future_and_misnamed_server_certificates_are_refused";

#[test]
fn expired_future_and_misnamed_server_certificates_are_refused() {
    let Some(ca) = tls_file("ca.pem", TEST) else {
        return;
    };
    let timeout = Duration::from_secs_f64(3.0 * timeout_multiplier());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for (cert, cause) in REFUSED_SERVER_CERTS {
        let Some((_endpoint, port)) = refused_tls_endpoint(cert, TEST) else {
            return;
        };
        let config = RabbitConfig::new(&format!("amqps://u:p@localhost:{port}/%2f"))
            .unwrap()
            .tls_ca_file(&ca)
            .connect_timeout(timeout);
        let started = Instant::now();
        let result = rt.block_on(polybus_rabbitmq::connect_with(config));
        let took = started.elapsed();
        match result {
            Err(e @ Error::Tls { .. }) => {
                assert!(
                    e.to_string().contains(cause),
                    "{cert}: the error must say '{cause}': {e}"
                );
                assert!(!e.is_retryable());
                assert!(took < timeout + Duration::from_secs(1), "{cert} took {took:?}");
            }
            Err(e) => panic!("{cert}: expected Error::Tls ({cause}), got {e:?}"),
            Ok(_) => panic!("{cert}: the connection must be refused"),
        }
    }
}
