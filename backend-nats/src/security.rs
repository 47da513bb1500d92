//! TLS, authentication and permission errors for NATS (issue 16).
//!
//! * Credentials come from the URL (`user:password@`, or a lone `token@`) or
//!   from [`NatsConfig`] fields (token, NKey seed, credentials file); they are
//!   handed to async-nats as options, never left in the server addresses it logs.
//! * TLS: a CA file replaces the system roots; a client certificate and key
//!   give mutual TLS; a server name override checks the certificate against
//!   another name than the URL's host. Verification is never switched off.
//! * Connect errors are mapped by meaning: refused credentials are
//!   [`Error::Unauthenticated`], TLS failures (untrusted or expired
//!   certificate, wrong name, a client certificate the server refused)
//!   [`Error::Tls`]; none is retryable.
//! * Permission violations arrive asynchronously (`-ERR 'Permissions
//!   Violation for Publish to "x"'`) through the client's event callback;
//!   [`Violations::guard`] races an operation against them and fails it with
//!   [`Error::PermissionDenied`] as soon as the one it caused arrives, instead
//!   of letting it time out.

use std::error::Error as StdError;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use async_nats::ConnectOptions;
use async_nats::rustls;
use polybus_core::{Error, Result, percent_decode};
use tokio::sync::broadcast;

use crate::markers::Markers;
use crate::{BACKEND, NatsConfig};

/// What a permission violation refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Denied {
    Publish,
    Subscribe,
}

/// One `-ERR 'Permissions Violation for … to "subject"'` from the server.
#[derive(Debug, Clone)]
pub(crate) struct Violation {
    pub(crate) denied: Denied,
    pub(crate) subject: String,
}

impl Violation {
    /// Parses the server's text; `None` for any other server error.
    pub(crate) fn parse(text: &str) -> Option<Violation> {
        let rest = text.trim().trim_matches('\'');
        let lower = rest.to_ascii_lowercase();
        let rest_after = |prefix: &str| lower.strip_prefix(prefix).map(|_| &rest[prefix.len()..]);
        let (denied, tail) = if let Some(t) = rest_after("permissions violation for publish to ") {
            (Denied::Publish, t)
        } else if let Some(t) = rest_after("permissions violation for subscription to ") {
            (Denied::Subscribe, t)
        } else {
            return None;
        };
        // `"subject"`, possibly followed by ` using queue "q"`.
        let subject = tail.trim().strip_prefix('"')?.split('"').next()?.to_owned();
        Some(Violation { denied, subject })
    }

    /// The error for the call this violation belongs to.
    pub(crate) fn error(&self) -> Error {
        let what = match self.denied {
            Denied::Publish => "publish to",
            Denied::Subscribe => "subscribe to",
        };
        Error::PermissionDenied {
            backend: BACKEND,
            message: format!("the server refused to let this user {what} '{}'", self.subject),
            source: None,
        }
    }

    /// Whether this violation is about `topic`: its subject, its dead-letter
    /// subject, or a JetStream API request for its stream.
    pub(crate) fn concerns(&self, topic: &str) -> bool {
        let stream = crate::stream_name(topic);
        let dead_letters = crate::stream_name(&polybus_core::names::dead_letter_topic(topic));
        self.subject == topic
            || (self.subject.starts_with("$JS.")
                && self
                    .subject
                    .split('.')
                    .any(|token| token == stream || token == dead_letters))
    }
}

/// How often [`Violations::round_trip`] lets the event task run after the
/// server's answer before it concludes nothing was refused.
const SETTLE_YIELDS: usize = 3;

/// The permission violations one NATS connection reported.
#[derive(Clone)]
pub(crate) struct Violations {
    tx: broadcast::Sender<Arc<Violation>>,
    /// The core producer's markers (see [`crate::markers`]), if this connection has them.
    markers: Option<Arc<Markers>>,
}

impl Default for Violations {
    fn default() -> Self {
        Violations {
            tx: broadcast::channel(1024).0,
            markers: None,
        }
    }
}

impl Violations {
    /// Violations of a connection that uses markers (the core producer's).
    pub(crate) fn with_markers() -> Self {
        Violations {
            markers: Some(Arc::new(Markers::default())),
            ..Violations::default()
        }
    }

    /// The core producer's markers, if this connection has them.
    pub(crate) fn markers(&self) -> Option<&Arc<Markers>> {
        self.markers.as_ref()
    }

    /// Handles a slow-consumer event of subscription `sid`; returns whether
    /// it was a marker's (every one on a connection with markers is).
    pub(crate) fn marker_event(&self, sid: u64) -> bool {
        match &self.markers {
            Some(markers) => {
                markers.event(sid);
                true
            }
            None => false,
        }
    }

    /// The connection was lost: the markers on their way may be lost too.
    pub(crate) fn disconnected(&self) {
        if let Some(markers) = &self.markers {
            markers.retire(None);
        }
    }

    /// Records a server error; returns whether it was a permission violation.
    pub(crate) fn record(&self, text: &str) -> bool {
        match Violation::parse(text) {
            Some(v) => {
                let _ = self.tx.send(Arc::new(v));
                true
            }
            None => false,
        }
    }

    /// A receiver of the violations reported from now on (a subscription
    /// keeps one for its whole life, so none is missed between two `next`s).
    pub(crate) fn watch(&self) -> broadcast::Receiver<Arc<Violation>> {
        self.tx.subscribe()
    }

    /// Makes a round trip to the server (see [`crate::round_trip`]) after
    /// commands sent on this connection since `seen` was made, and fails with
    /// [`Error::PermissionDenied`] if the server refused one that `concerns`
    /// the caller, or refused the round trip itself (a user who may not publish
    /// to `_POLYBUS.PING.>` or subscribe to `_INBOX.>`).
    ///
    /// The server handles a connection's commands in order, so its `-ERR` for
    /// an earlier command is read before the round trip's answer; async-nats
    /// hands the `-ERR` to the event callback through a queue served by
    /// another task, which may run a moment after this one is woken. So after
    /// the answer this yields a few times, letting that task record what it has
    /// already been given: no extra round trip, a few microseconds on the
    /// happy path.
    pub(crate) async fn round_trip(
        &self,
        client: &async_nats::Client,
        timeout: std::time::Duration,
        seen: &mut broadcast::Receiver<Arc<Violation>>,
        concerns: impl Fn(&Violation) -> bool,
    ) -> Result<()> {
        let probe = crate::probe_subject(client);
        let inbox = client.new_inbox();
        let inbox_prefix = inbox.rsplit_once('.').map_or(inbox.as_str(), |(p, _)| p);
        let refused = |v: &Violation| {
            let about_probe = (v.denied == Denied::Publish && v.subject == probe)
                || (v.denied == Denied::Subscribe && v.subject.starts_with(inbox_prefix));
            if about_probe {
                Some(Error::PermissionDenied {
                    backend: BACKEND,
                    message: format!(
                        "{} (polybus confirms core NATS sends and subscriptions with a request to \
                         `_POLYBUS.PING.>` answered on `_INBOX.>`: allow the user to publish to the \
                         first and subscribe to the second)",
                        v.error()
                    ),
                    source: None,
                })
            } else if concerns(v) {
                Some(v.error())
            } else {
                None
            }
        };
        // More violations than the watch holds arrived between two reads: a
        // refusal of this call may be among those dropped, so it cannot say
        // "not refused".
        let lagged = |missed: u64| Error::Backend {
            backend: BACKEND,
            message: format!(
                "cannot tell whether the NATS server refused this: {missed} permission violations \
                 were reported faster than they could be read; try again"
            ),
            retryable: true,
            source: None,
        };
        let answered = crate::round_trip_to(client, timeout, probe.clone());
        tokio::pin!(answered);
        loop {
            tokio::select! {
                biased;
                got = seen.recv() => match got {
                    Ok(v) => {
                        if let Some(e) = refused(&v) {
                            return Err(e);
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => return Err(lagged(missed)),
                    Err(broadcast::error::RecvError::Closed) => return answered.as_mut().await,
                },
                done = &mut answered => {
                    done?;
                    break;
                }
            }
        }
        let mut drain = || loop {
            match seen.try_recv() {
                Ok(v) => {
                    if let Some(e) = refused(&v) {
                        return Err(e);
                    }
                }
                Err(broadcast::error::TryRecvError::Lagged(missed)) => return Err(lagged(missed)),
                Err(_) => return Ok(()),
            }
        };
        drain()?;
        for _ in 0..SETTLE_YIELDS {
            tokio::task::yield_now().await;
            drain()?;
        }
        Ok(())
    }

    /// Runs `operation`, failing it with [`Error::PermissionDenied`] as soon as
    /// the connection reports a violation that `concerns` it.
    pub(crate) async fn guard<T>(
        &self,
        concerns: impl Fn(&Violation) -> bool,
        operation: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let mut rx = self.tx.subscribe();
        tokio::pin!(operation);
        loop {
            tokio::select! {
                biased;
                done = &mut operation => return done,
                seen = rx.recv() => match seen {
                    Ok(v) if concerns(&v) => return Err(v.error()),
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return operation.await,
                },
            }
        }
    }
}

/// Splits `scheme://userinfo@host` into the address without credentials and
/// the (percent-decoded) user and password; a user without a password is a token.
pub(crate) fn split_userinfo(server: &str) -> (String, Option<(String, Option<String>)>) {
    let Some((scheme, rest)) = server.split_once("://") else {
        return (server.to_owned(), None);
    };
    match rest.rsplit_once('@') {
        None => (server.to_owned(), None),
        Some((info, host)) => {
            let (user, pass) = match info.split_once(':') {
                Some((u, p)) => (percent_decode(u), Some(percent_decode(p))),
                None => (percent_decode(info), None),
            };
            (format!("{scheme}://{host}"), Some((user, pass)))
        }
    }
}

fn file_error(what: &str, path: &Path, e: impl std::fmt::Display) -> Error {
    Error::InvalidConfig(format!("NATS {what} '{}': {e}", path.display()))
}

fn read_file(what: &str, path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| file_error(what, path, e))
}

/// A certificate verifier that checks the server's certificate against a
/// configured name instead of the host it connects to.
#[derive(Debug)]
struct NameOverride {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    name: rustls::pki_types::ServerName<'static>,
}

impl rustls::client::danger::ServerCertVerifier for NameOverride {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> std::result::Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A rustls configuration trusting only the configured CA file, with the
/// client certificate if any and the server name override if any.
fn client_config(config: &NatsConfig, ca: &Path) -> Result<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let pem = read_file("TLS CA file", ca)?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| file_error("TLS CA file", ca, e))?;
        roots.add(cert).map_err(|e| file_error("TLS CA file", ca, e))?;
    }
    if roots.is_empty() {
        return Err(file_error("TLS CA file", ca, "no certificate in it"));
    }
    let roots = Arc::new(roots);
    // An explicit provider: rustls cannot pick a process default by itself when
    // another crate in the process (lapin, say) enables a second one.
    let builder =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::InvalidConfig(format!("NATS TLS: {e}")))?
            .with_root_certificates(Arc::clone(&roots));
    let mut tls = match (&config.tls_client_cert, &config.tls_client_key) {
        (Some(cert), Some(key)) => {
            let pem = read_file("TLS client certificate", cert)?;
            let chain = CertificateDer::pem_slice_iter(&pem)
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| file_error("TLS client certificate", cert, e))?;
            // Never show the key file's content (nor rustls's view of it).
            let key_der = PrivateKeyDer::from_pem_slice(&read_file("TLS client key", key)?)
                .map_err(|_| file_error("TLS client key", key, "no readable private key in it"))?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| file_error("TLS client certificate", cert, e))?
        }
        _ => builder.with_no_client_auth(),
    };
    if let Some(name) = &config.tls_server_name {
        let name = rustls::pki_types::ServerName::try_from(name.clone())
            .map_err(|e| Error::InvalidConfig(format!("NATS TLS server name '{name}': {e}")))?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots,
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .map_err(|e| Error::InvalidConfig(format!("NATS TLS verifier: {e}")))?;
        tls.dangerous()
            .set_certificate_verifier(Arc::new(NameOverride { inner, name }));
    }
    Ok(tls)
}

/// async-nats builds its own rustls configuration when polybus does not (no CA
/// file given, or a server that asks for TLS): rustls then needs a process-level
/// default crypto provider, and it panics if it cannot pick one — which happens
/// as soon as another crate in the process (lapin, for example) enables a second
/// provider. Installs ring (what async-nats is built with) as the default if
/// nothing is installed yet; an application that installs its own first keeps it.
pub(crate) fn ensure_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race to another installer is fine: a default exists then.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// The user JWT and NKey seed of a `.creds` file (the first and second
/// decorated blocks, as `nsc` writes them).
fn parse_credentials(text: &str) -> std::result::Result<(String, String), &'static str> {
    let mut blocks = Vec::new();
    let mut lines = text.lines().map(str::trim);
    while let Some(line) = lines.next() {
        if line.starts_with("---") && line.contains("BEGIN") {
            match lines.find(|l| !l.is_empty()) {
                Some(body) if !body.starts_with("---") => blocks.push(body.to_owned()),
                _ => return Err("not a valid credentials file"),
            }
        }
    }
    match <[String; 2]>::try_from(blocks) {
        Ok([jwt, seed]) if seed.starts_with('S') => Ok((jwt, seed)),
        _ => Err("not a valid credentials file"),
    }
}

/// Reads and parses a credentials file; the error names the reason, never
/// what was read.
/// (A small local file, read at connects only: blocking is fine.)
fn read_credentials(path: &Path) -> std::result::Result<(String, nkeys::KeyPair), String> {
    let text = std::fs::read_to_string(path).map_err(|e| io_reason(&e))?;
    let (jwt, seed) = parse_credentials(&text).map_err(str::to_owned)?;
    let key = nkeys::KeyPair::from_seed(&seed).map_err(|_| "the NKey seed in it is not valid".to_owned())?;
    Ok((jwt, key))
}

/// Connect options with the configured credentials and TLS settings; the
/// URL's credentials (`userinfo`) come first, then the config's fields.
///
/// A credentials file is read now (an unreadable or malformed one is
/// `InvalidConfig` naming it) and again at every connect and reconnect,
/// through async-nats's auth callback (its own `credentials_file` reads the
/// file once): replacing the file rotates the credentials of live
/// connections at their next reconnect (an expired user JWT makes the server
/// close the connection, so a renewed file keeps it going).
pub(crate) fn options(
    config: &NatsConfig,
    userinfo: Option<(String, Option<String>)>,
) -> Result<ConnectOptions> {
    ensure_crypto_provider();
    let (user, token) = match (userinfo, &config.user, &config.password, &config.token) {
        (Some((user, Some(pass))), ..) => (Some((user, pass)), None),
        (Some((token, None)), ..) => (None, Some(token)),
        (None, Some(user), Some(pass), _) => (Some((user.clone(), pass.clone())), None),
        (None, _, _, Some(token)) => (None, Some(token.clone())),
        _ => (None, None),
    };
    let mut options = match &config.credentials_file {
        Some(path) => {
            read_credentials(path).map_err(|why| file_error("credentials file", path, why))?;
            let path = path.clone();
            // The callback replaces every other credential: it sends them too.
            ConnectOptions::with_auth_callback(move |nonce| {
                let (path, user, token) = (path.clone(), user.clone(), token.clone());
                async move {
                    let (jwt, key) = read_credentials(&path).map_err(|why| {
                        tracing::warn!(target: "polybus_nats", file = %path.display(), %why, "NATS credentials file unusable at reconnect");
                        async_nats::AuthError::new(format!("credentials file '{}': {why}", path.display()))
                    })?;
                    let signature = key
                        .sign(&nonce)
                        .map_err(|_| async_nats::AuthError::new("cannot sign the server's nonce"))?;
                    let mut auth = async_nats::Auth::new();
                    auth.jwt = Some(jwt);
                    auth.signature = Some(signature);
                    if let Some((user, pass)) = user {
                        auth.username = Some(user);
                        auth.password = Some(pass);
                    }
                    auth.token = token;
                    Ok(auth)
                }
            })
        }
        None => {
            let mut options = ConnectOptions::new();
            if let Some((user, pass)) = user {
                options = options.user_and_password(user, pass);
            }
            if let Some(token) = token {
                options = options.token(token);
            }
            if let Some(seed) = &config.nkey_seed {
                options = options.nkey(seed.trim().to_owned());
            }
            options
        }
    };
    if config.tls_required || config.tls_ca_file.is_some() || config.tls_client_cert.is_some() {
        options = options.require_tls(true);
    }
    match (&config.tls_client_cert, &config.tls_client_key) {
        (Some(_), None) | (None, Some(_)) => {
            return Err(Error::InvalidConfig(
                "NATS: tls_client_cert and tls_client_key go together".into(),
            ));
        }
        _ => {}
    }
    match &config.tls_ca_file {
        Some(ca) => options = options.tls_client_config(client_config(config, ca)?),
        None if config.tls_server_name.is_some() => {
            return Err(Error::InvalidConfig(
                "NATS: tls_server_name needs tls_ca_file (the system roots cannot be combined with a name override)"
                    .into(),
            ));
        }
        None => {
            if let (Some(cert), Some(key)) = (&config.tls_client_cert, &config.tls_client_key) {
                read_file("TLS client certificate", cert)?;
                read_file("TLS client key", key)?;
                options = options.add_client_certificate(cert.clone(), key.clone());
            }
        }
    }
    Ok(options)
}

/// An I/O error's reason without anything read from the file.
fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "not found".into(),
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => "not a valid credentials file".into(),
    }
}

/// The rustls error somewhere in `e`'s chain (io errors hide theirs in `get_ref`).
fn find_tls_error(e: &(dyn StdError + 'static)) -> Option<String> {
    let mut current = Some(e);
    while let Some(err) = current {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(tls.to_string());
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
            && let Some(tls) = inner.downcast_ref::<rustls::Error>()
        {
            return Some(tls.to_string());
        }
        current = err.source();
    }
    None
}

/// Maps a failed connect by meaning; `servers` are already redacted.
pub(crate) fn connect_error(e: async_nats::ConnectError, servers: &str) -> Error {
    use async_nats::ConnectErrorKind as K;
    let message = format!("cannot connect to {servers}: {e}");
    if let Some(tls) = find_tls_error(&e) {
        return Error::Tls {
            backend: BACKEND,
            message: format!("cannot connect to {servers}: {tls}"),
            source: Some(Box::new(e)),
        };
    }
    match e.kind() {
        K::Tls => Error::Tls {
            backend: BACKEND,
            message,
            source: Some(Box::new(e)),
        },
        K::ServerParse => Error::InvalidConfig(message),
        // Wrong credentials do not get better by trying again.
        K::Authentication | K::AuthorizationViolation => Error::Unauthenticated {
            backend: BACKEND,
            message,
            source: Some(Box::new(e)),
        },
        _ => Error::Connection {
            backend: BACKEND,
            message,
            source: Some(Box::new(e)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn violations_parse() {
        let v = Violation::parse("Permissions Violation for Publish to \"secret.x\"").unwrap();
        assert_eq!((v.denied, v.subject.as_str()), (Denied::Publish, "secret.x"));
        let v = Violation::parse("'permissions violation for subscription to \"a.b\" using queue \"q\"'")
            .unwrap();
        assert_eq!((v.denied, v.subject.as_str()), (Denied::Subscribe, "a.b"));
        assert!(Violation::parse("Maximum Payload Violation").is_none());
        let v = Violation::parse("Permissions Violation for Publish to \"$JS.API.STREAM.CREATE.secret~x\"")
            .unwrap();
        assert!(v.concerns("secret.x"));
        assert!(!v.concerns("secret"));
        let v = Violation::parse("Permissions Violation for Publish to \"$JS.API.STREAM.INFO.secret~dlq\"")
            .unwrap();
        assert!(v.concerns("secret"));
        assert!(!v.concerns("other"));
        assert!(!v.error().is_retryable());
    }

    #[test]
    fn credentials_files_are_parsed() {
        let text = "-----BEGIN NATS USER JWT-----\neyJ.a.b\n------END NATS USER JWT------\n\n\
                    ****** IMPORTANT ******\nNKEY Seed printed below.\n\n\
                    -----BEGIN USER NKEY SEED-----\nSUAB\n------END USER NKEY SEED------\n";
        assert_eq!(parse_credentials(text), Ok(("eyJ.a.b".into(), "SUAB".into())));
        assert!(parse_credentials("eyJ.a.b\nSUAB").is_err());
        assert!(parse_credentials("-----BEGIN NATS USER JWT-----\neyJ.a.b\n------END------\n").is_err());
    }

    #[test]
    fn userinfo_is_split_and_decoded() {
        let (addr, info) = split_userinfo("tls://u%40x:p%3Aw@h:1");
        assert_eq!(addr, "tls://h:1");
        assert_eq!(info, Some(("u@x".into(), Some("p:w".into()))));
        let (addr, info) = split_userinfo("nats://tok@h:1");
        assert_eq!((addr.as_str(), info), ("nats://h:1", Some(("tok".into(), None))));
        assert_eq!(split_userinfo("nats://h:1"), ("nats://h:1".into(), None));
    }
}

#[cfg(test)]
mod lag_tests {
    use super::*;

    /// A round trip (the subscribe check, the connect check) whose violation
    /// watch lagged past its own refusal cannot say it was not refused: more
    /// than the watch holds (1,024) arrived between two reads, the refusal
    /// among the ones dropped.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_round_trip_that_lagged_past_a_refusal_is_not_ok() {
        let Ok(url) = std::env::var("POLYBUS_TEST_NATS_URL") else {
            assert!(
                std::env::var_os("POLYBUS_TEST_REQUIRE_BROKERS").is_none(),
                "POLYBUS_TEST_REQUIRE_BROKERS is set but POLYBUS_TEST_NATS_URL is not"
            );
            eprintln!("skipping: POLYBUS_TEST_NATS_URL is not set");
            return;
        };
        let client = async_nats::connect(url)
            .await
            .expect("connecting to POLYBUS_TEST_NATS_URL");
        let violations = Violations::default();
        let mut seen = violations.watch();
        // The refusal this round trip is about, then a burst of others
        // recorded before the task reads its watch.
        violations.record("Permissions Violation for Subscription to \"secret.mine\"");
        for i in 0..1100 {
            violations.record(&format!(
                "Permissions Violation for Publish to \"secret.other.{i}\""
            ));
        }
        let checked = violations
            .round_trip(&client, std::time::Duration::from_secs(5), &mut seen, |v| {
                v.subject == "secret.mine"
            })
            .await;
        let error = checked.expect_err("a round trip whose refusal was lagged past");
        assert!(error.is_retryable(), "{error:?}");
    }
}
