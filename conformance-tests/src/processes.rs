//! Helper processes a security test starts itself (issue 16): a private
//! `nats-server` with a configuration of its own, or a `socat` TLS endpoint
//! presenting a certificate the client must refuse. Each is killed when its
//! guard is dropped.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{broker_url, brokers_required, loud};

/// A child process, killed and reaped on drop.
#[derive(Debug)]
pub struct Process(Child);

impl Process {
    /// The process id (for signals such as `nats-server --signal reload=<pid>`).
    pub fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `program` with `args` (output discarded). When it is not installed
/// the test skips loudly, or fails when brokers are required.
pub fn spawn(program: &str, args: &[&str], test: &str) -> Option<Process> {
    match Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(child) => Some(Process(child)),
        Err(e) => {
            assert!(!brokers_required(), "{test}: cannot start {program}: {e}");
            loud(&format!("SKIP {test}: cannot start {program}: {e}"));
            None
        }
    }
}

/// Waits until something listens on 127.0.0.1:`port`; false after `timeout`.
pub fn wait_for_port(port: u16, timeout: Duration) -> bool {
    let started = Instant::now();
    while started.elapsed() < timeout {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A file of the test certificates (`POLYBUS_TEST_TLS_DIR`, made by
/// `scripts/brokers.sh` `ensure_test_certs`), or a loud skip without them.
pub fn tls_file(name: &str, test: &str) -> Option<PathBuf> {
    broker_url("POLYBUS_TEST_TLS_DIR", test).map(|dir| PathBuf::from(dir).join(name))
}

/// The server certificates every client must refuse, each with the words its
/// TLS error must contain: expired, not yet valid, and issued for another name
/// (`wrong.polybus.test`). All share `server-key.pem`.
pub const REFUSED_SERVER_CERTS: [(&str, &str); 3] = [
    ("server-expired.pem", "expired"),
    ("server-future.pem", "not valid yet"),
    ("server-wrong-name.pem", "not valid for name"),
];

/// A `socat` TLS endpoint on a free port presenting `cert` (with the test
/// server key), for clients that speak TLS first (AMQP, Kafka). What comes
/// after the handshake is thrown away: these endpoints exist to be refused.
pub fn refused_tls_endpoint(cert: &str, test: &str) -> Option<(Process, u16)> {
    let cert = tls_file(cert, test)?;
    let key = tls_file("server-key.pem", test)?;
    let port = crate::free_port().ok()?;
    let listen = format!(
        "OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,verify=0,cert={},key={}",
        cert.display(),
        key.display()
    );
    let process = spawn("socat", &[&listen, "SYSTEM:cat >/dev/null"], test)?;
    assert!(
        wait_for_port(port, Duration::from_secs(5)),
        "socat did not listen on {port}"
    );
    Some((process, port))
}
