//! NATS backend for [polybus](https://docs.rs/polybus), on
//! [async-nats](https://docs.rs/async-nats).
//!
//! Two modes:
//!
//! * **JetStream** (the default): at-least-once. A topic is a stream (Limits
//!   retention) over the subject named like the topic; a group is a durable pull
//!   consumer with explicit acks. Acks are `+ACK`, releases are `-NAK` (with a
//!   delay when asked), keep-alives are in-progress acks (`+WPI`), and every
//!   message carries `Nats-Msg-Id` so the server drops duplicate publishes.
//!   Fetched messages not yet handed to the runner get keep-alives too, so
//!   nothing held is redelivered while AckWait runs.
//! * **Core NATS** (`?mode=core`, or [`Mode::Core`]): at-most-once. A group is a
//!   queue group; nothing is stored or acknowledged; `send` resolves after a
//!   round trip to the server (the server has read the message).
//!
//! ```no_run
//! # async fn demo() -> polybus_core::Result<()> {
//! let bus = polybus_nats::connect("nats://127.0.0.1:4222").await?;
//! bus.consumer.declare_topic("rides").await?; // stream `rides` over subject `rides`
//! # Ok(()) }
//! ```
//!
//! Names: a topic `orders.created` is the subject `orders.created` and the stream
//! `orders~created` (stream and consumer names cannot hold `.`; `~` is outside
//! the portable grammar, so the mapping is one to one).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use polybus_core::{Bytes, Connection, Error, Result, redact_url};

mod consumer_config;
mod core_mode;
mod headers;
mod jetstream;
mod markers;
mod poison;
mod security;
mod status;
mod subscription;

pub use core_mode::{CoreConsumer, CoreProducer, DropCounter};
pub use jetstream::{JetStreamConsumer, JetStreamProducer};

const BACKEND: &str = "nats";

/// Room left in the server's `max_payload` for the library's and the user's
/// headers: the largest payload `send` accepts is `max_payload` less this.
pub const HEADER_ROOM: usize = 16 * 1024;

/// Which NATS API carries the messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Mode {
    /// JetStream streams and durable pull consumers: at-least-once (the default).
    #[default]
    JetStream,
    /// Plain subjects and queue groups: at-most-once, nothing stored.
    Core,
}

/// Where JetStream keeps a topic's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Storage {
    /// On disk (the default): survives a server restart.
    #[default]
    File,
    /// In memory: faster, lost when the server stops.
    Memory,
}

/// How to reach NATS and how topics and groups are created.
///
/// `Debug` never shows credentials.
#[derive(Clone)]
#[non_exhaustive]
pub struct NatsConfig {
    /// Server URLs (`nats://[user:pass@]host:port`, `tls://…`), tried in order.
    /// Credentials in them are taken out and sent as the user and password
    /// (a user without a password is a token).
    pub servers: Vec<String>,
    /// User name, when not in the URL (with [`password`](Self::password)).
    pub user: Option<String>,
    /// Password for [`user`](Self::user). Never shown in `Debug`.
    pub password: Option<String>,
    /// Authentication token, when not in the URL. Never shown in `Debug`.
    pub token: Option<String>,
    /// NKey seed (`SU…`) to sign the server's nonce with. Never shown in
    /// `Debug`; from a URL, give a file instead (`?nkey_file=path`).
    pub nkey_seed: Option<String>,
    /// A credentials file (`.creds`: a user JWT and its NKey seed), for servers
    /// in operator/JWT mode. Read at each connect, so replacing the file
    /// rotates the credentials for every later connection and reconnection.
    pub credentials_file: Option<PathBuf>,
    /// Require TLS even with a `nats://` URL (set by `tls://` URLs and by any
    /// TLS file below).
    pub tls_required: bool,
    /// PEM file of the certificate authorities to trust instead of the system's.
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate (chain) for mutual TLS, with [`tls_client_key`](Self::tls_client_key).
    pub tls_client_cert: Option<PathBuf>,
    /// PEM private key of the client certificate.
    pub tls_client_key: Option<PathBuf>,
    /// The name the server's certificate must carry when it is not the URL's
    /// host (needs [`tls_ca_file`](Self::tls_ca_file)). Verification itself
    /// is never switched off.
    pub tls_server_name: Option<String>,
    /// JetStream (default) or core NATS.
    pub mode: Mode,
    /// How long connecting may take before it fails (default 5 s).
    pub connect_timeout: Duration,
    /// How long a request (PubAck, stream and consumer API) may take (default 10 s).
    pub request_timeout: Duration,
    /// JetStream AckWait: a held message is redelivered after this long without an
    /// ack or keep-alive (default 30 s; the runner sends keep-alives every third).
    pub ack_wait: Duration,
    /// JetStream MaxDeliver for new groups; `None` (the default) is unlimited, so
    /// the server never silently stops delivering a message the runner still
    /// retries (the runner's max attempts decides when to dead-letter).
    pub max_deliver: Option<u32>,
    /// JetStream MaxAckPending for new groups, shared by all instances (default
    /// 1024). Set at creation only; runners of the group whose bounds add up to
    /// more are throttled by the server.
    pub max_ack_pending: usize,
    /// Where streams are kept (default on disk).
    pub storage: Storage,
    /// Stream replicas (default 1).
    pub replicas: usize,
    /// The oldest message a stream keeps; zero (default) keeps them regardless of age.
    pub max_age: Duration,
    /// The most bytes a stream keeps; `None` (default) is unlimited.
    pub max_bytes: Option<u64>,
    /// The most messages a stream keeps; `None` (default) is unlimited.
    pub max_messages: Option<u64>,
    /// The window in which a repeated `Nats-Msg-Id` is dropped (default 2 min).
    pub duplicate_window: Duration,
    /// How long one pull request waits on the server for messages (default 5 s;
    /// shortened to a group consumer's `max_expires`).
    pub pull_expiry: Duration,
    /// How long a JetStream subscription keeps retrying pull requests the server
    /// answers with a transient status (Exceeded MaxWaiting, Leadership Change,
    /// JetStream unavailable, an unknown status) before it ends with a
    /// retryable error (default 30 s).
    pub pull_retry_limit: Duration,
    /// How many messages async-nats buffers per subscription before it drops
    /// them (default 65,536). Core NATS subscriptions lose messages beyond it
    /// when the runner is slower than the publishers; the loss is counted (see
    /// [`CoreConsumer::dropped`]). JetStream subscriptions never fill it (they
    /// pull only what the runner has room for).
    pub subscription_capacity: usize,
}

impl fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let servers: Vec<String> = self.servers.iter().map(|s| redact_url(s)).collect();
        f.debug_struct("NatsConfig")
            .field("servers", &servers)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("nkey_seed", &self.nkey_seed.as_ref().map(|_| "***"))
            .field("credentials_file", &self.credentials_file)
            .field("tls_required", &self.tls_required)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_client_cert", &self.tls_client_cert)
            .field("tls_client_key", &self.tls_client_key)
            .field("tls_server_name", &self.tls_server_name)
            .field("mode", &self.mode)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("ack_wait", &self.ack_wait)
            .field("max_deliver", &self.max_deliver)
            .field("max_ack_pending", &self.max_ack_pending)
            .field("storage", &self.storage)
            .field("replicas", &self.replicas)
            .field("max_age", &self.max_age)
            .field("max_bytes", &self.max_bytes)
            .field("max_messages", &self.max_messages)
            .field("duplicate_window", &self.duplicate_window)
            .field("pull_expiry", &self.pull_expiry)
            .field("pull_retry_limit", &self.pull_retry_limit)
            .field("subscription_capacity", &self.subscription_capacity)
            .finish()
    }
}

impl NatsConfig {
    /// Parses `nats://[user:pass@|token@]host:port[,host:port…][?option=value&…]`.
    ///
    /// `tls://` URLs (and `nats+tls://`) require TLS. Credentials are
    /// percent-decoded. Options: `mode=core|jetstream`, `tls_ca=<pem file>`,
    /// `tls_cert=<pem file>` and `tls_key=<pem file>` (mutual TLS),
    /// `tls_server_name=<name>`, `creds=<credentials file>`,
    /// `nkey_file=<file holding an NKey seed>`. Other settings are fields.
    pub fn from_url(url: &str) -> Result<Self> {
        let invalid = |why: String| Error::InvalidConfig(format!("NATS URL {}: {why}", redact_url(url)));
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| invalid("expected nats://host:port".into()))?;
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "nats" => "nats",
            "tls" | "nats+tls" => "tls",
            other => return Err(invalid(format!("unknown scheme '{other}'"))),
        };
        // Credentials end at the last '@'; the query starts after them.
        let (credentials, rest) = match rest.rsplit_once('@') {
            Some((c, h)) => (Some(c), h),
            None => (None, rest),
        };
        let (hosts, query) = match rest.split_once('?') {
            Some((h, q)) => (h, Some(q)),
            None => (rest, None),
        };
        let hosts = hosts.trim_end_matches('/');
        if hosts.contains('/') {
            return Err(invalid("a NATS URL has no path".into()));
        }
        let mut servers = Vec::new();
        for host in hosts.split(',') {
            let host = host.trim();
            if host.is_empty() {
                return Err(invalid("empty host".into()));
            }
            if let Some((_, port)) = host.rsplit_once(':')
                && !port.ends_with(']')
                && port.parse::<u16>().is_err()
            {
                return Err(invalid(format!("bad port '{port}'")));
            }
            let server = match credentials {
                Some(c) => format!("{scheme}://{c}@{host}"),
                None => format!("{scheme}://{host}"),
            };
            server
                .parse::<async_nats::ServerAddr>()
                .map_err(|e| invalid(format!("bad server address '{host}': {e}")))?;
            servers.push(server);
        }
        let mut config = NatsConfig::new(servers);
        config.tls_required = scheme == "tls";
        for pair in query.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let path = || {
                if value.is_empty() {
                    Err(invalid(format!("option '{key}' needs a file")))
                } else {
                    Ok(PathBuf::from(polybus_core::percent_decode(value)))
                }
            };
            match (key, value) {
                ("tls_ca" | "tls_ca_file", _) => config.tls_ca_file = Some(path()?),
                ("tls_cert" | "tls_client_cert", _) => config.tls_client_cert = Some(path()?),
                ("tls_key" | "tls_client_key", _) => config.tls_client_key = Some(path()?),
                ("tls_server_name", name) if !name.is_empty() => {
                    config.tls_server_name = Some(polybus_core::percent_decode(name))
                }
                ("creds" | "credentials_file", _) => config.credentials_file = Some(path()?),
                ("nkey_file", _) => {
                    let file = path()?;
                    let seed = std::fs::read_to_string(&file).map_err(|e| {
                        invalid(format!(
                            "cannot read the NKey seed file '{}': {}",
                            file.display(),
                            e.kind()
                        ))
                    })?;
                    config.nkey_seed = Some(seed.trim().to_owned());
                }
                ("mode", "jetstream" | "js") => config.mode = Mode::JetStream,
                ("mode", "core") => config.mode = Mode::Core,
                ("mode", other) => {
                    return Err(invalid(format!(
                        "mode must be 'jetstream' or 'core', not '{other}'"
                    )));
                }
                (other, _) => return Err(invalid(format!("unknown option '{other}'"))),
            }
        }
        Ok(config)
    }

    /// Defaults for these servers.
    pub fn new(servers: Vec<String>) -> Self {
        NatsConfig {
            servers,
            user: None,
            password: None,
            token: None,
            nkey_seed: None,
            credentials_file: None,
            tls_required: false,
            tls_ca_file: None,
            tls_client_cert: None,
            tls_client_key: None,
            tls_server_name: None,
            mode: Mode::JetStream,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            ack_wait: Duration::from_secs(30),
            max_deliver: None,
            max_ack_pending: 1024,
            storage: Storage::File,
            replicas: 1,
            max_age: Duration::ZERO,
            max_bytes: None,
            max_messages: None,
            duplicate_window: Duration::from_secs(120),
            pull_expiry: Duration::from_secs(5),
            pull_retry_limit: Duration::from_secs(30),
            subscription_capacity: 64 * 1024,
        }
    }

    /// Sets the mode.
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// Sets the connection timeout.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets the request timeout.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets JetStream's AckWait for new groups (at least 1 s).
    pub fn ack_wait(mut self, ack_wait: Duration) -> Self {
        self.ack_wait = ack_wait.max(Duration::from_secs(1));
        self
    }

    /// Sets where streams are stored.
    pub fn storage(mut self, storage: Storage) -> Self {
        self.storage = storage;
        self
    }

    /// Sets how many messages async-nats buffers per subscription (at least 1).
    pub fn subscription_capacity(mut self, capacity: usize) -> Self {
        self.subscription_capacity = capacity.max(1);
        self
    }

    fn validate(&self) -> Result<()> {
        if self.servers.is_empty() {
            return Err(Error::InvalidConfig("NATS: no server given".into()));
        }
        if self.ack_wait < Duration::from_secs(1) {
            return Err(Error::InvalidConfig("NATS: ack_wait must be at least 1 s".into()));
        }
        if self.max_deliver == Some(0)
            || self.replicas == 0
            || self.max_ack_pending == 0
            || self.subscription_capacity == 0
        {
            return Err(Error::InvalidConfig(
                "NATS: max_deliver, replicas, max_ack_pending and subscription_capacity must be at least 1"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Opens one NATS connection whose permission violations are reported to
    /// `violations` (see [`security::Violations::guard`]); messages the client
    /// drops because a subscription's buffer is full are counted in `drops`
    /// (and logged).
    pub(crate) async fn client_watched(
        &self,
        name: &str,
        drops: Option<DropCounter>,
        violations: &security::Violations,
    ) -> Result<async_nats::Client> {
        self.validate()?;
        // Credentials leave the addresses: async-nats does not read them there,
        // and the addresses appear in its logs.
        let mut userinfo = None;
        let mut addrs = Vec::new();
        for server in &self.servers {
            let (addr, info) = security::split_userinfo(server);
            userinfo = userinfo.or(info);
            addrs.push(addr.parse::<async_nats::ServerAddr>().map_err(|e| {
                Error::InvalidConfig(format!("NATS server address {}: {e}", redact_url(server)))
            })?);
        }
        let violations = violations.clone();
        let options = security::options(self, userinfo)?
            .name(name)
            .connection_timeout(self.connect_timeout)
            .request_timeout(Some(self.request_timeout))
            .max_reconnects(None)
            .subscription_capacity(self.subscription_capacity)
            .event_callback(move |event| {
                let drops = drops.clone();
                let violations = violations.clone();
                async move {
                    if let async_nats::Event::ServerError(async_nats::ServerError::Other(text)) = &event
                        && violations.record(text)
                    {
                        tracing::debug!(target: "polybus_nats", %event, "NATS permission violation");
                        return;
                    }
                    match &event {
                        async_nats::Event::SlowConsumer(sid) if violations.marker_event(*sid) => return,
                        async_nats::Event::Disconnected => violations.disconnected(),
                        _ => {}
                    }
                    match (&event, &drops) {
                        (async_nats::Event::SlowConsumer(_), Some(drops)) => drops.record(),
                        (async_nats::Event::Disconnected, Some(drops)) => drops.record_loss(),
                        (async_nats::Event::SlowConsumer(_), None) => {
                            tracing::warn!(target: "polybus_nats", %event, "NATS client dropped a message (subscription buffer full)");
                        }
                        _ => tracing::debug!(target: "polybus_nats", %event, "NATS connection event"),
                    }
                }
            });
        let connecting = options.connect(addrs);
        // The connection timeout applies to each attempt; bound the whole connect too.
        match tokio::time::timeout(self.connect_timeout + Duration::from_millis(500), connecting).await {
            Err(_) => Err(Error::timeout("connecting to NATS", self.connect_timeout)),
            Ok(Ok(client)) => Ok(client),
            Ok(Err(e)) => {
                let servers: Vec<String> = self.servers.iter().map(|s| redact_url(s)).collect();
                Err(security::connect_error(e, &servers.join(",")))
            }
        }
    }
}

/// A NATS client error as a polybus error.
pub(crate) fn backend_error(
    what: &str,
    e: impl std::error::Error + Send + Sync + 'static,
    retryable: bool,
) -> Error {
    Error::Backend {
        backend: BACKEND,
        message: format!("{what}: {e}"),
        retryable,
        source: Some(Box::new(e)),
    }
}

/// Waits until the server has processed everything this client sent before: a
/// request to a subject nobody serves comes back as "no responders" only after
/// the server has read every earlier command on the connection. (async-nats's
/// `flush` only empties the client's write buffer.)
pub(crate) async fn round_trip(client: &async_nats::Client, timeout: Duration) -> Result<()> {
    round_trip_to(client, timeout, probe_subject(client)).await
}

/// A subject nobody serves, for [`round_trip`].
pub(crate) fn probe_subject(client: &async_nats::Client) -> String {
    format!("_POLYBUS.PING.{}", client.new_inbox().replace('.', "_"))
}

/// [`round_trip`] with a request to `probe`.
pub(crate) async fn round_trip_to(
    client: &async_nats::Client,
    timeout: Duration,
    probe: String,
) -> Result<()> {
    match tokio::time::timeout(timeout, client.request(probe, Bytes::new())).await {
        Err(_) => Err(Error::timeout("a round trip to the NATS server", timeout)),
        Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => Ok(()),
        Ok(Err(e)) => Err(Error::Connection {
            backend: BACKEND,
            message: format!("round trip to the NATS server: {e}"),
            source: Some(Box::new(e)),
        }),
        Ok(Ok(_)) => Ok(()),
    }
}

/// Connects with a URL (`nats://host:port`, `?mode=core` for core NATS): a
/// producer and a consumer, each on its own NATS connection.
pub async fn connect(url: &str) -> Result<Connection> {
    connect_with(NatsConfig::from_url(url)?).await
}

/// Connects with a full configuration.
pub async fn connect_with(config: NatsConfig) -> Result<Connection> {
    Ok(match config.mode {
        Mode::JetStream => Connection {
            producer: std::sync::Arc::new(JetStreamProducer::connect(&config).await?),
            consumer: std::sync::Arc::new(JetStreamConsumer::connect(&config).await?),
        },
        Mode::Core => Connection {
            producer: std::sync::Arc::new(CoreProducer::connect(&config).await?),
            consumer: std::sync::Arc::new(CoreConsumer::connect(&config).await?),
        },
    })
}

/// The JetStream stream (or consumer) name for a portable topic (or group) name:
/// `.` becomes `~`, which the portable grammar does not allow, so no two names meet.
pub fn stream_name(portable: &str) -> String {
    portable.replace('.', "~")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let c = NatsConfig::from_url("nats://127.0.0.1:4222").unwrap();
        assert_eq!(c.servers, vec!["nats://127.0.0.1:4222"]);
        assert_eq!(c.mode, Mode::JetStream);
        let c = NatsConfig::from_url("nats://u:secret@a:1,b:2/?mode=core").unwrap();
        assert_eq!(c.servers, vec!["nats://u:secret@a:1", "nats://u:secret@b:2"]);
        assert_eq!(c.mode, Mode::Core);
        assert!(!format!("{c:?}").contains("secret"), "{c:?}");
        for bad in [
            "127.0.0.1:4222",
            "http://a:1",
            "nats://",
            "nats://a:1,,b:2",
            "nats://a:port",
            "nats://a:1/path",
            "nats://a:1?mode=x",
            "nats://a:1?colour=red",
        ] {
            let err = NatsConfig::from_url(bad).unwrap_err();
            assert!(matches!(err, Error::InvalidConfig(_)), "{bad}: {err:?}");
        }
        for leaky in [
            "nats://u:hunter2@a:x",
            "nats://u:hunter2?x@h:1",
            "nats://s3cr?hunter2@h",
        ] {
            match NatsConfig::from_url(leaky) {
                Err(err) => assert!(!err.to_string().contains("hunter2"), "{err}"),
                Ok(c) => assert!(!format!("{c:?}").contains("hunter2"), "{c:?}"),
            }
        }
    }

    #[test]
    fn names_map_one_to_one() {
        assert_eq!(stream_name("orders.created"), "orders~created");
        assert_ne!(stream_name("a.b_c"), stream_name("a_b.c"));
        assert_eq!(stream_name("rides.dlq"), "rides~dlq");
    }
}
