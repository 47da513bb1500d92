//! Configuration: URL, queue type, timeouts, and opening connections.

use std::fmt;
use std::time::Duration;

use lapin::ConnectionProperties;
use polybus_core::{Error, Result, redact_url};

use crate::BACKEND;
use crate::errors::map_error;

/// The default `x-delivery-limit` of quorum group queues: RabbitMQ 4.x's own
/// default, applied on every version.
pub const DEFAULT_DELIVERY_LIMIT: u32 = 20;

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
    /// `amqp://user:pass@host:port/vhost` (or `amqps://`).
    pub url: String,
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
}

impl fmt::Debug for RabbitConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitConfig")
            .field("url", &redact_url(&self.url))
            .field("queue_type", &self.queue_type)
            .field("single_active_consumer", &self.single_active_consumer)
            .field("mandatory", &self.mandatory)
            .field("delivery_limit", &self.delivery_limit)
            .field("max_payload", &self.max_payload)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
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
        Ok(RabbitConfig {
            url: url.to_owned(),
            queue_type: QueueType::Quorum,
            single_active_consumer: false,
            mandatory: false,
            delivery_limit: Some(DEFAULT_DELIVERY_LIMIT),
            max_payload: 4 * 1024 * 1024,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
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

    pub(crate) async fn connection(&self, name: &str) -> Result<lapin::Connection> {
        self.connection_with(name, true).await
    }

    /// A connection; with `recover`, lapin reconnects it and replays its
    /// topology by itself (subscriptions recover their own, see `reconnect`).
    pub(crate) async fn connection_with(&self, name: &str, recover: bool) -> Result<lapin::Connection> {
        let mut properties = ConnectionProperties::default().with_connection_name(name.into());
        if recover {
            properties = properties.enable_auto_recover();
        }
        // lapin's auto-recovery also retries the first connect until the timeout;
        // a broker that refuses TCP outright is reported at once instead.
        if let Ok(uri) = self.url.parse::<lapin::uri::AMQPUri>() {
            let address = (uri.authority.host.clone(), uri.authority.port);
            match tokio::time::timeout(self.connect_timeout, tokio::net::TcpStream::connect(address)).await {
                Err(_) => return Err(Error::timeout("connecting to RabbitMQ", self.connect_timeout)),
                Ok(Err(e)) => {
                    return Err(Error::Connection {
                        backend: BACKEND,
                        message: format!("connecting to {}: {e}", redact_url(&self.url)),
                        source: Some(Box::new(e)),
                    });
                }
                Ok(Ok(_probe)) => {}
            }
        }
        let connecting = lapin::Connection::connect(&self.url, properties);
        match tokio::time::timeout(self.connect_timeout, connecting).await {
            Err(_) => Err(Error::timeout("connecting to RabbitMQ", self.connect_timeout)),
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(map_error(&format!("connecting to {}", redact_url(&self.url)), e)),
        }
    }
}
