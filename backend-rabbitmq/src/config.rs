//! Configuration: URL, queue type, timeouts, and opening connections.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use lapin::ConnectionProperties;
use polybus_core::{Error, Result, redact_url};

use crate::errors::map_error;
use crate::security::{self, TlsParams};

/// The default `x-delivery-limit` of quorum group queues: RabbitMQ 4.x's own
/// default, applied on every version.
pub const DEFAULT_DELIVERY_LIMIT: u32 = 20;

/// How long an ack above a delivery still being handled waits, by default,
/// for a multiple ack to cover it before it is written on its own
/// ([`RabbitConfig::ack_coalescing`]).
pub const DEFAULT_ACK_COALESCING: Duration = Duration::from_millis(2);

/// The queue type of group queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum QueueType {
    /// Replicated, durable, with a delivery count (the default).
    #[default]
    Quorum,
    /// Classic durable queues.
    Classic,
}

/// How to reach RabbitMQ and how queues are declared. `Debug` hides credentials.
#[derive(Clone)]
#[non_exhaustive]
pub struct RabbitConfig {
    /// `amqp://user:pass@host:port/vhost` (or `amqps://`). The TLS query
    /// parameters (`tls_ca`, `tls_cert`, `tls_key`, `tls_server_name`) are read
    /// into the fields below by [`RabbitConfig::new`].
    pub url: String,
    /// Trust the CA certificates in this PEM file instead of the system roots
    /// (`amqps://` only; URL `tls_ca`).
    pub tls_ca_file: Option<PathBuf>,
    /// The client certificate chain (PEM) for mutual TLS; with
    /// [`tls_client_key`](Self::tls_client_key) (URL `tls_cert`).
    pub tls_client_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM, PKCS#8, PKCS#1 or SEC1; URL `tls_key`).
    pub tls_client_key: Option<PathBuf>,
    /// The name the TLS handshake sends and checks the server's certificate
    /// against, instead of the URL's host (URL `tls_server_name`). Certificate
    /// verification itself is never switched off.
    pub tls_server_name: Option<String>,
    /// The type of group queues (quorum by default).
    pub queue_type: QueueType,
    /// Group queues with single active consumer: one instance of a group
    /// consumes at a time, so per-key order holds across instances.
    pub single_active_consumer: bool,
    /// Make an unroutable message (no group queue bound) an error.
    pub mandatory: bool,
    /// `x-delivery-limit` of quorum group queues (default 20): a message the
    /// broker has delivered more often than this is dead-lettered by the broker
    /// to `<topic>.dlq`. Set explicitly so attempts mean the same on every
    /// RabbitMQ version (4.x has a default of 20, 3.x none); `None` declares no
    /// limit (the broker's default applies).
    pub delivery_limit: Option<u32>,
    /// The largest payload `send` accepts (default 4 MiB).
    pub max_payload: usize,
    /// How long connecting may take (default 5 s).
    pub connect_timeout: Duration,
    /// How long a confirm or a declaration may take, including waiting for the
    /// connection to recover (default 10 s).
    pub request_timeout: Duration,
    /// Coalesced consumer acks (default `Some(2 ms)`): acks of contiguous
    /// delivery tags are written as one `basic.ack` with `multiple = true`,
    /// and an ack above a tag still being handled waits at most this long
    /// before it is written on its own (at once once that tag is known to be
    /// slow). Releases are never delayed. `None`: every ack is its own
    /// `basic.ack`, written at once. A bound too large for a deadline
    /// (`Duration::MAX`) makes such an ack wait for the tags below it,
    /// however long that takes.
    pub ack_coalescing: Option<Duration>,
}

impl fmt::Debug for RabbitConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitConfig")
            .field("url", &redact_url(&self.url))
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_client_cert", &self.tls_client_cert)
            .field("tls_client_key", &self.tls_client_key)
            .field("tls_server_name", &self.tls_server_name)
            .field("queue_type", &self.queue_type)
            .field("single_active_consumer", &self.single_active_consumer)
            .field("mandatory", &self.mandatory)
            .field("delivery_limit", &self.delivery_limit)
            .field("max_payload", &self.max_payload)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("ack_coalescing", &self.ack_coalescing)
            .finish()
    }
}

impl RabbitConfig {
    /// Defaults for `url`, which is checked here.
    pub fn new(url: &str) -> Result<Self> {
        let parsed = url.parse::<lapin::uri::AMQPUri>().map_err(|e| {
            Error::InvalidConfig(format!(
                "RabbitMQ URL {}: {}",
                redact_url(url),
                e.replace(url, "<url>")
            ))
        })?;
        if parsed.authority.port == 0 {
            return Err(Error::InvalidConfig(format!(
                "RabbitMQ URL {}: port 0",
                redact_url(url)
            )));
        }
        let tls = TlsParams::from_query(url);
        Ok(RabbitConfig {
            url: url.to_owned(),
            tls_ca_file: tls.ca_file,
            tls_client_cert: tls.client_cert,
            tls_client_key: tls.client_key,
            tls_server_name: tls.server_name,
            queue_type: QueueType::Quorum,
            single_active_consumer: false,
            mandatory: false,
            delivery_limit: Some(DEFAULT_DELIVERY_LIMIT),
            max_payload: 4 * 1024 * 1024,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            ack_coalescing: Some(DEFAULT_ACK_COALESCING),
        })
    }

    /// Sets the group queue type.
    pub fn queue_type(mut self, queue_type: QueueType) -> Self {
        self.queue_type = queue_type;
        self
    }

    /// Makes unroutable messages an error.
    pub fn mandatory(mut self, mandatory: bool) -> Self {
        self.mandatory = mandatory;
        self
    }

    /// Sets the delivery limit of quorum group queues (`None`: declare none).
    pub fn delivery_limit(mut self, limit: Option<u32>) -> Self {
        self.delivery_limit = limit;
        self
    }

    /// Sets how acks are coalesced (`None`: one `basic.ack` per delivery).
    pub fn ack_coalescing(mut self, bound: Option<Duration>) -> Self {
        self.ack_coalescing = bound;
        self
    }

    /// Sets the connection timeout.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Single-active-consumer group queues.
    pub fn single_active_consumer(mut self, on: bool) -> Self {
        self.single_active_consumer = on;
        self
    }

    /// Trusts the CA certificates in `path` instead of the system roots.
    pub fn tls_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.tls_ca_file = Some(path.into());
        self
    }

    /// A client certificate and key for mutual TLS.
    pub fn tls_client_auth(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.tls_client_cert = Some(cert.into());
        self.tls_client_key = Some(key.into());
        self
    }

    /// Checks the server's certificate against `name` instead of the URL's host.
    pub fn tls_server_name(mut self, name: impl Into<String>) -> Self {
        self.tls_server_name = Some(name.into());
        self
    }

    fn tls_params(&self) -> TlsParams {
        TlsParams {
            ca_file: self.tls_ca_file.clone(),
            client_cert: self.tls_client_cert.clone(),
            client_key: self.tls_client_key.clone(),
            server_name: self.tls_server_name.clone(),
        }
    }

    pub(crate) async fn connection(&self, name: &str) -> Result<lapin::Connection> {
        self.connection_with(name, true).await
    }

    /// A connection; with `recover`, lapin reconnects it and replays its
    /// topology by itself (subscriptions recover their own, see `reconnect`).
    pub(crate) async fn connection_with(&self, name: &str, recover: bool) -> Result<lapin::Connection> {
        let uri = self.url.parse::<lapin::uri::AMQPUri>().map_err(|e| {
            Error::InvalidConfig(format!(
                "RabbitMQ URL {}: {}",
                redact_url(&self.url),
                e.replace(&self.url, "<url>")
            ))
        })?;
        // Files are read (and their errors reported) before any connection.
        let tls = security::tls_for(&uri, &self.url, &self.tls_params())?;
        if recover {
            // lapin's auto-recovery also retries the first connect (TCP and
            // the TLS handshake: an untrusted certificate until the timeout).
            // A connection without recovery first finds out at once whether
            // the broker takes us (refused TCP, TLS, credentials, vhost), with
            // a final error.
            let probe = self
                .open(name, false, &uri, &tls)
                .await
                .map_err(|e| security::probe_error(e, &tls))?;
            let _ = tokio::time::timeout(self.connect_timeout, probe.close(200, "OK".into())).await;
        }
        self.open(name, recover, &uri, &tls).await
    }

    async fn open(
        &self,
        name: &str,
        recover: bool,
        uri: &lapin::uri::AMQPUri,
        tls: &Option<security::Tls>,
    ) -> Result<lapin::Connection> {
        let mut properties = ConnectionProperties::default().with_connection_name(name.into());
        if recover {
            properties = properties.enable_auto_recover();
        }
        let connecting = security::connect(uri.clone(), tls.clone(), properties);
        let what = format!("connecting to {}", redact_url(&self.url));
        match tokio::time::timeout(self.connect_timeout, connecting).await {
            Err(_) => Err(Error::timeout("connecting to RabbitMQ", self.connect_timeout)),
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(match security::connect_error(&what, e.clone()) {
                Some(mapped) => mapped,
                None => map_error(&what, e),
            }),
        }
    }
}
