//! TLS, authentication and permission errors for RabbitMQ (issue 16).
//!
//! * `amqps://user:password@host:port/vhost`: lapin sends the URL's
//!   (percent-decoded) user and password with PLAIN.
//! * TLS files are read by polybus (so an unreadable file is
//!   [`Error::InvalidConfig`] naming it, before any connection) into a rustls
//!   connector: a CA file replaces the system roots (without one, the platform
//!   verifier checks against the system's trust store), a client certificate and
//!   key give mutual TLS, and a server name override is the name the handshake
//!   sends (SNI) and checks the certificate against. Verification is never off.
//! * Connect errors are mapped by meaning: refused credentials are
//!   [`Error::Unauthenticated`], an unknown vhost or one the user may not
//!   open too, TLS failures [`Error::Tls`]; a refused operation on an exchange
//!   or queue (`ACCESS_REFUSED`) is [`Error::PermissionDenied`]. None is retryable.

use std::error::Error as StdError;
use std::path::{Path, PathBuf};

use lapin::tcp::{AMQPUriTcpExt, RustlsConnector, RustlsConnectorConfig, TLSConfig};
use lapin::uri::{AMQPScheme, AMQPUri};
use polybus_core::{Error, Result, redact_url};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::BACKEND;

/// The TLS settings of a connection, as fields or URL query parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct TlsParams {
    pub(crate) ca_file: Option<PathBuf>,
    pub(crate) client_cert: Option<PathBuf>,
    pub(crate) client_key: Option<PathBuf>,
    pub(crate) server_name: Option<String>,
}

impl TlsParams {
    /// Reads `tls_ca`, `tls_cert`, `tls_key` and `tls_server_name` from the
    /// URL's query (lapin ignores parameters it does not know).
    pub(crate) fn from_query(url: &str) -> TlsParams {
        let mut params = TlsParams::default();
        let Some((_, query)) = url.split_once('?') else {
            return params;
        };
        for pair in query.split('&') {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = polybus_core::percent_decode(value);
            match key {
                "tls_ca" => params.ca_file = Some(value.into()),
                "tls_cert" => params.client_cert = Some(value.into()),
                "tls_key" => params.client_key = Some(value.into()),
                "tls_server_name" => params.server_name = Some(value),
                _ => {}
            }
        }
        params
    }

    fn any(&self) -> bool {
        self.ca_file.is_some()
            || self.client_cert.is_some()
            || self.client_key.is_some()
            || self.server_name.is_some()
    }
}

fn file_error(what: &str, path: &Path, e: impl std::fmt::Display) -> Error {
    Error::InvalidConfig(format!("RabbitMQ {what} '{}': {e}", path.display()))
}

fn read_file(what: &str, path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| file_error(what, path, e.kind()))
}

/// What an `amqps://` connection needs: the rustls connector and the name the
/// handshake checks.
#[derive(Clone)]
pub(crate) struct Tls {
    connector: RustlsConnector,
    server_name: String,
}

/// The TLS setup for `uri`; `None` for `amqp://` (and an error if TLS files are
/// configured for it: they would be silently unused).
pub(crate) fn tls_for(uri: &AMQPUri, url: &str, params: &TlsParams) -> Result<Option<Tls>> {
    if uri.scheme == AMQPScheme::AMQP {
        if params.any() {
            return Err(Error::InvalidConfig(format!(
                "RabbitMQ URL {}: TLS settings need an amqps:// URL",
                redact_url(url)
            )));
        }
        return Ok(None);
    }
    let config = match &params.ca_file {
        Some(ca) => {
            let pem = read_file("TLS CA file", ca)?;
            let certs = CertificateDer::pem_slice_iter(&pem)
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| file_error("TLS CA file", ca, e))?;
            if certs.is_empty() {
                return Err(file_error("TLS CA file", ca, "no certificate in it"));
            }
            // Only these roots: the system's are not consulted.
            RustlsConnectorConfig::default().with_parsable_certificates(certs)
        }
        None => RustlsConnectorConfig::new_with_platform_verifier(),
    };
    let connector = match (&params.client_cert, &params.client_key) {
        (Some(cert), Some(key)) => {
            let pem = read_file("TLS client certificate", cert)?;
            let chain = CertificateDer::pem_slice_iter(&pem)
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| file_error("TLS client certificate", cert, e))?;
            if chain.is_empty() {
                return Err(file_error("TLS client certificate", cert, "no certificate in it"));
            }
            // Never show the key file's content (nor rustls's view of it).
            let key_der = PrivateKeyDer::from_pem_slice(&read_file("TLS client key", key)?)
                .map_err(|_| file_error("TLS client key", key, "no readable private key in it"))?;
            config
                .connector_with_single_cert(chain, key_der)
                .map_err(|e| file_error("TLS client certificate", cert, e))?
        }
        (None, None) => config
            .connector_with_no_client_auth()
            .map_err(|e| Error::InvalidConfig(format!("RabbitMQ TLS: {e}")))?,
        _ => {
            return Err(Error::InvalidConfig(
                "RabbitMQ: tls_client_cert and tls_client_key go together".into(),
            ));
        }
    };
    let server_name = params
        .server_name
        .clone()
        .unwrap_or_else(|| uri.authority.host.clone());
    rustls::pki_types::ServerName::try_from(server_name.as_str())
        .map_err(|e| Error::InvalidConfig(format!("RabbitMQ TLS server name '{server_name}': {e}")))?;
    Ok(Some(Tls {
        connector,
        server_name,
    }))
}

/// Opens a lapin connection to `uri`, over `tls` when given. lapin calls the
/// connect function again for every reconnection, with the same TLS setup.
pub(crate) async fn connect(
    uri: AMQPUri,
    tls: Option<Tls>,
    properties: lapin::ConnectionProperties,
) -> lapin::Result<lapin::Connection> {
    use lapin::Connect;
    let runtime = lapin::runtime::default_runtime()?;
    let Some(tls) = tls else {
        return uri
            .connect_with_config(properties, Default::default(), runtime)
            .await;
    };
    lapin::Connection::connector(
        uri,
        runtime,
        async move |uri: AMQPUri, runtime| {
            let mut plain = uri;
            plain.scheme = AMQPScheme::AMQP;
            let stream = plain
                .connect_with_config_async(TLSConfig::default(), &runtime)
                .await?;
            Ok(stream.into_rustls(&tls.connector, &tls.server_name).await?)
        },
        properties,
    )
    .await
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
        {
            if let Some(tls) = inner.downcast_ref::<rustls::Error>() {
                return Some(tls.to_string());
            }
            if let Some(found) = find_tls_error(inner) {
                return Some(found);
            }
        }
        current = err.source();
    }
    None
}

/// The error of the first connection to a broker, made without recovery to
/// find out whether the broker takes us. Over TLS 1.3 a server that refuses
/// the client's certificate (or its absence) says so with an alert after the
/// client has finished its side of the handshake; the client has written the
/// AMQP header by then, and the server's reset usually discards the alert
/// before it is read. A connection reset or closed right after a successful
/// TCP connect and TLS handshake, on the first connect, is reported as that
/// refusal (not retryable); later losses stay retryable connection errors.
pub(crate) fn probe_error(e: Error, tls: &Option<Tls>) -> Error {
    use std::io::ErrorKind as K;
    let Error::Connection { message, source, .. } = &e else {
        return e;
    };
    if tls.is_none() {
        return e;
    }
    let reset = source
        .as_deref()
        .and_then(|s| s.downcast_ref::<lapin::Error>())
        .is_some_and(|l| {
            matches!(l.kind(), lapin::ErrorKind::IOError(io)
                if matches!(io.kind(), K::ConnectionReset | K::ConnectionAborted | K::UnexpectedEof | K::BrokenPipe))
        });
    if !reset {
        return e;
    }
    let message = message.clone();
    let Error::Connection { source, .. } = e else {
        unreachable!()
    };
    Error::Tls {
        backend: BACKEND,
        message: format!(
            "{message} (right after the TLS handshake: the broker refused the client certificate, or its absence)"
        ),
        source,
    }
}

/// The AMQP reply of a broker refusal: its code and text.
fn refusal(e: &lapin::Error) -> Option<(u16, String)> {
    let lapin::ErrorKind::ProtocolError(amqp) = e.kind() else {
        return None;
    };
    Some((amqp.get_id(), amqp.get_message().as_str().to_owned()))
}

/// Whether the broker refused access (`ACCESS_REFUSED`, 403).
pub(crate) fn is_access_refused(e: &lapin::Error) -> bool {
    refusal(e).is_some_and(|(code, _)| code == 403)
}

/// Maps a failed connect by meaning; `what` is already redacted.
pub(crate) fn connect_error(what: &str, e: lapin::Error) -> Option<Error> {
    if let Some(tls) = find_tls_error(&e) {
        return Some(Error::Tls {
            backend: BACKEND,
            message: format!("{what}: {tls}"),
            source: Some(Box::new(e)),
        });
    }
    let (code, text) = refusal(&e)?;
    match code {
        // ACCESS_REFUSED at login: wrong user or password (RabbitMQ sends it
        // when the client announces `authentication_failure_close`, as lapin does).
        403 => Some(Error::Unauthenticated {
            backend: BACKEND,
            message: format!("{what}: the broker refused the credentials: {text}"),
            source: Some(Box::new(e)),
        }),
        // NOT_ALLOWED at connection.open: an unknown vhost, or one this user
        // has no permissions in.
        530 => Some(Error::PermissionDenied {
            backend: BACKEND,
            message: format!("{what}: the broker refused the virtual host: {text}"),
            source: Some(Box::new(e)),
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_come_from_the_query() {
        let url = "amqps://u:p@h:5671/v?heartbeat=5&tls_ca=/a%20b/ca.pem&tls_cert=/c.pem&tls_key=/k.pem&tls_server_name=broker.internal";
        let uri: AMQPUri = url.parse().unwrap();
        let p = TlsParams::from_query(url);
        assert_eq!(p.ca_file, Some(PathBuf::from("/a b/ca.pem")));
        assert_eq!(p.client_cert, Some(PathBuf::from("/c.pem")));
        assert_eq!(p.client_key, Some(PathBuf::from("/k.pem")));
        assert_eq!(p.server_name.as_deref(), Some("broker.internal"));
        assert_eq!(uri.query.heartbeat, Some(5));
    }

    #[test]
    fn tls_files_on_plain_amqp_are_refused() {
        let url = "amqp://h:5672/%2f?tls_ca=/ca.pem";
        let uri: AMQPUri = url.parse().unwrap();
        let p = TlsParams::from_query(url);
        assert!(matches!(tls_for(&uri, url, &p), Err(Error::InvalidConfig(_))));
    }
}
