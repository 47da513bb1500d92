//! Kafka backend for [polybus](https://docs.rs/polybus), on
//! [rdkafka](https://docs.rs/rdkafka) with its bundled librdkafka (a C compiler
//! and `make` are all a fresh machine needs to build it).
//!
//! * **Producer**: `acks=all` with idempotence; the message key is the Kafka key
//!   (so it picks the partition), the id travels as the `polybus-id` header, the
//!   timestamp as the record's timestamp, user headers as Kafka headers. `send`
//!   resolves on the delivery report; concurrent sends pipeline.
//! * **Consumer**: consumer groups with manual offsets. Per partition, polybus
//!   keeps the offsets handed out and not yet acknowledged, and commits the
//!   lowest of them (or the next offset when none is held): never past an
//!   unsettled message. It commits every [`KafkaConfig::commit_interval`], on
//!   close, and when partitions are revoked — after the runner has finished or
//!   given back what it held from them. `release` keeps the offset back and hands
//!   the message out again. Each assigned partition has a librdkafka queue of
//!   its own, read only while the runner has room; librdkafka stops fetching a
//!   full one ([`KafkaConfig::buffer`]).
//! * **Topics** are created through the admin client with
//!   [`KafkaConfig::partitions`] partitions, with their `<topic>.dlq`.
//!
//! ```no_run
//! # async fn demo() -> polybus_core::Result<()> {
//! let bus = polybus_kafka::connect("kafka://127.0.0.1:9092").await?;
//! bus.consumer.declare_topic("rides").await?; // `rides` and `rides.dlq`
//! # Ok(()) }
//! ```
//!
//! Security: TLS (CA file, mutual TLS) and SASL (PLAIN, SCRAM-SHA-256/512)
//! are typed [`KafkaConfig`] fields and URL options, mapped to librdkafka's
//! properties; other librdkafka properties pass through [`KafkaConfig::set`]
//! or the URL's query. A refused login or TLS handshake fails `connect` at
//! once with [`Error::Unauthenticated`] or [`Error::Tls`]. Secrets never
//! appear in `Debug` output, errors or logs.

#![deny(unsafe_code)] // allowed in `raw_headers` alone (audited, see there)

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use polybus_core::{Connection, Error, Result};
use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

mod catch_up;
mod consumer;
mod credentials;
mod group_offsets;
mod offsets;
mod poll;
mod producer;
mod raw_headers;
mod rebalance;
mod security;
mod subscription;

pub use consumer::KafkaConsumer;
pub use producer::KafkaProducer;
pub use security::SaslMechanism;

/// The default [`KafkaConfig::buffer`] (librdkafka's `queued.min.messages` default).
pub const DEFAULT_BUFFER: usize = 100_000;

/// The default byte bound of each partition's fetch queue, in KiB
/// (`queued.max.messages.kbytes`; librdkafka's own is 64 MiB).
pub const DEFAULT_QUEUE_KBYTES: usize = 4 * 1024;

const BACKEND: &str = "kafka";

/// Room kept in [`KafkaConfig::max_message_bytes`] for the key, the headers and
/// the record's framing: the largest payload `send` accepts is that less this.
pub const HEADER_ROOM: usize = 16 * 1024;

/// How to reach Kafka and how topics, groups and subscriptions behave.
///
/// `Debug` never shows credentials or other secret properties.
#[derive(Clone)]
#[non_exhaustive]
pub struct KafkaConfig {
    /// Bootstrap brokers, `host:port` each.
    pub brokers: Vec<String>,
    /// Partitions of topics created by `declare_topic` (default 4).
    pub partitions: i32,
    /// Replicas of topics created by `declare_topic` (default 1; use 3 in
    /// production clusters).
    pub replication: i32,
    /// How long connecting (the first metadata request) may take (default 10 s).
    pub connect_timeout: Duration,
    /// How long an admin, metadata or commit request may take (default 10 s).
    pub request_timeout: Duration,
    /// How long `send` waits for the delivery report, retries included
    /// (librdkafka's `message.timeout.ms`, default 30 s).
    pub delivery_timeout: Duration,
    /// The group session timeout (default 10 s): a member that stops
    /// heartbeating is removed from its group after this long.
    pub session_timeout: Duration,
    /// librdkafka's `max.poll.interval.ms` (default 5 min, at least the
    /// session timeout): a member that does not poll for this long leaves its
    /// group and its partitions go elsewhere. The subscription's poll thread
    /// polls whatever the handlers do, so a slow handler never triggers it; it
    /// is the backend's ack deadline in its capabilities.
    pub max_poll_interval: Duration,
    /// How often settled offsets are committed while consuming (default 1 s).
    pub commit_interval: Duration,
    /// How long a revocation waits for the runner to finish or give back the
    /// revoked partitions' messages before committing (default 10 s; must stay
    /// below [`max_poll_interval`](Self::max_poll_interval), which `connect`
    /// checks, and the group's rebalance timeout). What it cannot wait for is
    /// redelivered to the new owner: duplicates, never loss.
    pub revoke_timeout: Duration,
    /// How many fetched records librdkafka keeps ready per assigned partition
    /// (`queued.min.messages`, default 100,000, librdkafka's own default;
    /// bytes are bounded too, by `queued.max.messages.kbytes`, 4 MiB per
    /// partition unless set, which is the bound that holds for small records).
    /// The subscription takes records from these queues only while its runner
    /// has room, so a slow handler never makes memory grow with the backlog,
    /// and nothing is paused or fetched twice.
    ///
    /// A small count starves a partition: librdkafka fetches again only once
    /// its queue is below it, so with 1,000 (the default before) one partition
    /// of 100-byte records consumed at about a fifth of the rate it does with
    /// 100,000 (BENCHMARKS.md, "Kafka consumer fetch buffering").
    pub buffer: usize,
    /// The largest record the producer sends, headers and key included
    /// (librdkafka's `message.max.bytes`, default 1,000,000; the broker's
    /// `message.max.bytes` must allow it).
    pub max_message_bytes: usize,
    /// How keyed records are spread over partitions (librdkafka's
    /// `partitioner`). Default [`Partitioner::Murmur2Random`]: the Java
    /// client's partitioner (also kafka-python's and franz-go's), so polybus and
    /// those clients put the same key on the same partition.
    pub partitioner: Partitioner,
    /// Connect over TLS (`security.protocol` `SSL`, or `SASL_SSL` with SASL),
    /// verifying the broker's certificate and host name against the system's
    /// roots or [`tls_ca_file`](Self::tls_ca_file). URL `tls=true`; any
    /// `tls_*` option or TLS file turns it on too.
    pub tls: bool,
    /// Trust the CAs in this PEM file instead of the system's (URL `tls_ca`;
    /// librdkafka's `ssl.ca.location`).
    pub tls_ca_file: Option<PathBuf>,
    /// The client certificate (PEM) for mutual TLS, with
    /// [`tls_client_key`](Self::tls_client_key) (URL `tls_cert`).
    pub tls_client_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM, unencrypted; URL `tls_key`).
    pub tls_client_key: Option<PathBuf>,
    /// The SASL mechanism (URL `sasl_mechanism`). Credentials without one are
    /// refused: librdkafka would never send them.
    pub sasl_mechanism: Option<SaslMechanism>,
    /// The SASL user name (URL `user@`).
    pub sasl_username: Option<String>,
    /// The SASL password (URL `:password@`), set with [`sasl`](Self::sasl);
    /// never shown.
    sasl_password: Option<String>,
    /// Extra librdkafka properties (TLS, SASL, tuning), for producer and
    /// consumers alike.
    properties: BTreeMap<String, String>,
}

/// How the producer picks a partition for a keyed record. Switching changes
/// where existing keys go: records of one key written before and after the
/// switch land on different partitions, and their relative order is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Partitioner {
    /// Murmur2 of the key bytes, as the Java client's default partitioner
    /// (`toPositive(murmur2(key)) % partitions`); records without a key go to a
    /// random partition. An empty key is a key: it always lands on the same
    /// partition.
    #[default]
    Murmur2Random,
    /// CRC32 of the key (librdkafka's own default, `consistent_random`), for
    /// topics whose keys were written that way by librdkafka-based clients.
    ConsistentRandom,
}

impl Partitioner {
    fn librdkafka_name(self) -> &'static str {
        match self {
            Partitioner::Murmur2Random => "murmur2_random",
            Partitioner::ConsistentRandom => "consistent_random",
        }
    }
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let properties: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(k, v)| (k.as_str(), if is_secret(k) { "***" } else { v.as_str() }))
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("partitions", &self.partitions)
            .field("replication", &self.replication)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("delivery_timeout", &self.delivery_timeout)
            .field("session_timeout", &self.session_timeout)
            .field("max_poll_interval", &self.max_poll_interval)
            .field("commit_interval", &self.commit_interval)
            .field("revoke_timeout", &self.revoke_timeout)
            .field("buffer", &self.buffer)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("partitioner", &self.partitioner)
            .field("tls", &self.tls)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_client_cert", &self.tls_client_cert)
            .field("tls_client_key", &self.tls_client_key)
            .field("sasl_mechanism", &self.sasl_mechanism)
            .field("sasl_username", &self.sasl_username)
            .field("sasl_password", &self.sasl_password.as_ref().map(|_| "***"))
            .field("properties", &properties)
            .finish()
    }
}

/// Whether a librdkafka property holds a secret (passwords, keys, tokens).
fn is_secret(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    [
        "pass",
        "private",
        "credential",
        "secret",
        "jaas",
        "token",
        "oauthbearer.config",
        "key.pem",
        "ssl.key",
    ]
    .iter()
    .any(|s| key.contains(s))
}

/// Properties polybus sets itself; setting them would break its guarantees.
const OWN_PROPERTIES: &[&str] = &[
    "bootstrap.servers",
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "enable.idempotence",
    "acks",
    "request.required.acks",
    "auto.offset.reset",
];

impl KafkaConfig {
    /// Defaults for these brokers (`host:port` each).
    pub fn new(brokers: Vec<String>) -> Self {
        KafkaConfig {
            brokers,
            partitions: 4,
            replication: 1,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            delivery_timeout: Duration::from_secs(30),
            session_timeout: Duration::from_secs(10),
            max_poll_interval: Duration::from_secs(300),
            commit_interval: Duration::from_secs(1),
            revoke_timeout: Duration::from_secs(10),
            buffer: DEFAULT_BUFFER,
            max_message_bytes: 1_000_000,
            partitioner: Partitioner::default(),
            tls: false,
            tls_ca_file: None,
            tls_client_cert: None,
            tls_client_key: None,
            sasl_mechanism: None,
            sasl_username: None,
            sasl_password: None,
            properties: BTreeMap::new(),
        }
    }

    /// Parses `kafka://[user:password@]host:port[,host:port…][?option=value&…]`.
    ///
    /// A broker list is not a URL authority, so it is parsed here: every entry
    /// needs a host and a port (IPv6 hosts in brackets). Options: `partitions`,
    /// `replication`, `tls=true`, `tls_ca=<path>`, `tls_cert=<path>`,
    /// `tls_key=<path>`, `sasl_mechanism=SCRAM-SHA-512|SCRAM-SHA-256|PLAIN`,
    /// and any librdkafka property (a name with a dot, such as
    /// `ssl.key.password`). A user and password are the SASL credentials
    /// (percent-encoded characters are decoded) and need `sasl_mechanism`.
    pub fn from_url(url: &str) -> Result<Self> {
        // Errors show no query (its values may be secrets), and no part of the
        // URL at all when it has credentials.
        let has_credentials = url.contains('@');
        let shown = if has_credentials {
            "kafka://***".to_owned()
        } else {
            url.split('?').next().unwrap_or_default().to_owned()
        };
        let invalid = |why: String| Error::InvalidConfig(format!("Kafka URL {shown}: {why}"));
        let rest = url
            .strip_prefix("kafka://")
            .ok_or_else(|| invalid("expected kafka://host:port[,host:port…]".into()))?;
        // The user information ends at the first `@` (it cannot hold one
        // unencoded); the query starts at the first `?` after it.
        let (credentials, rest) = match rest.split_once('@') {
            Some((c, r)) => (Some(c), r),
            None => (None, rest),
        };
        let (hosts, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let hosts = hosts.strip_suffix('/').unwrap_or(hosts);
        if hosts.contains('/') {
            return Err(invalid("a Kafka URL has no path".into()));
        }
        let mut brokers = Vec::new();
        for (i, entry) in hosts.split(',').enumerate() {
            let broker = parse_broker(entry.trim()).map_err(|why| {
                if has_credentials {
                    invalid(format!("broker #{} is not host:port", i + 1))
                } else {
                    invalid(why)
                }
            })?;
            brokers.push(broker);
        }
        let mut config = KafkaConfig::new(brokers);
        if let Some(credentials) = credentials {
            let (user, password) = credentials
                .split_once(':')
                .ok_or_else(|| invalid("credentials must be user:password".into()))?;
            config.sasl_username = Some(polybus_core::percent_decode(user));
            config.sasl_password = Some(polybus_core::percent_decode(password));
        }
        for pair in query.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| invalid(format!("option '{pair}' has no value")))?;
            let value = polybus_core::percent_decode(value);
            match key {
                "partitions" => {
                    config.partitions = value.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                        invalid(format!("partitions must be a positive number, not '{value}'"))
                    })?;
                }
                "replication" => {
                    config.replication = value.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                        invalid(format!("replication must be a positive number, not '{value}'"))
                    })?;
                }
                "tls" => {
                    config.tls = match value.as_str() {
                        "true" | "1" => true,
                        "false" | "0" => false,
                        _ => return Err(invalid(format!("tls must be true or false, not '{value}'"))),
                    };
                }
                "tls_ca" => config.tls_ca_file = Some(PathBuf::from(value)),
                "tls_cert" => config.tls_client_cert = Some(PathBuf::from(value)),
                "tls_key" => config.tls_client_key = Some(PathBuf::from(value)),
                "tls_server_name" => {
                    return Err(invalid(
                        "librdkafka has no server name override: the broker's advertised host \
                         name is verified"
                            .into(),
                    ));
                }
                "sasl_mechanism" => {
                    config.sasl_mechanism = Some(SaslMechanism::parse(&value).ok_or_else(|| {
                        invalid(format!(
                            "sasl_mechanism must be SCRAM-SHA-512, SCRAM-SHA-256 or PLAIN, not '{value}'"
                        ))
                    })?);
                }
                key if key.contains('.') => {
                    if OWN_PROPERTIES.contains(&key) {
                        return Err(invalid(format!(
                            "'{key}' is set by polybus and cannot be changed"
                        )));
                    }
                    config = config.set(key, value);
                }
                other => return Err(invalid(format!("unknown option '{other}'"))),
            }
        }
        Ok(config)
    }

    /// Sets a librdkafka property for producer and consumers (TLS, SASL,
    /// tuning). Properties polybus relies on (`acks`, `enable.auto.commit`, …)
    /// are set by polybus and override these.
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.insert(key.into(), value.into());
        self
    }

    /// Sets the partitions of topics created by `declare_topic`.
    pub fn partitions(mut self, partitions: i32) -> Self {
        self.partitions = partitions.max(1);
        self
    }

    /// Sets the group session timeout.
    pub fn session_timeout(mut self, timeout: Duration) -> Self {
        self.session_timeout = timeout;
        self
    }

    /// Sets how long connecting may take.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The largest payload `send` accepts.
    pub fn max_payload(&self) -> usize {
        self.max_message_bytes.saturating_sub(HEADER_ROOM)
    }

    /// The librdkafka settings shared by every client: brokers, extra properties.
    fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        for (key, value) in &self.properties {
            config.set(key, value);
        }
        config
            .set("bootstrap.servers", self.brokers.join(","))
            .set("socket.connection.setup.timeout.ms", millis(self.connect_timeout))
            .set("message.max.bytes", self.max_message_bytes.to_string())
            .set("log_level", "3");
        security::apply(self, &mut config);
        config
    }

    /// Checks the settings before any client is built.
    fn validate(&self) -> Result<()> {
        if self.brokers.is_empty() {
            return Err(Error::InvalidConfig("Kafka needs at least one broker".into()));
        }
        if self.partitions < 1 || self.replication < 1 {
            return Err(Error::InvalidConfig(
                "Kafka partitions and replication must be at least 1".into(),
            ));
        }
        if self.max_message_bytes <= HEADER_ROOM {
            return Err(Error::InvalidConfig(format!(
                "max_message_bytes must be more than the {HEADER_ROOM} bytes kept for headers"
            )));
        }
        let day = Duration::from_secs(24 * 3600);
        for (name, value) in [
            ("connect_timeout", self.connect_timeout),
            ("request_timeout", self.request_timeout),
            ("delivery_timeout", self.delivery_timeout),
            ("session_timeout", self.session_timeout),
            ("commit_interval", self.commit_interval),
            ("max_poll_interval", self.max_poll_interval),
            ("revoke_timeout", self.revoke_timeout),
        ] {
            if value.is_zero() || value > day {
                return Err(Error::InvalidConfig(format!(
                    "Kafka {name} must be more than zero and at most a day, not {value:?}"
                )));
            }
        }
        if self.max_poll_interval < self.session_timeout {
            return Err(Error::InvalidConfig(
                "Kafka max_poll_interval must be at least the session timeout".into(),
            ));
        }
        if self.revoke_timeout >= self.max_poll_interval {
            // A revocation waits inside librdkafka's poll: past max.poll.interval.ms
            // the member would be thrown out of its group in the middle of it.
            return Err(Error::InvalidConfig(format!(
                "Kafka revoke_timeout ({:?}) must be below max_poll_interval ({:?})",
                self.revoke_timeout, self.max_poll_interval
            )));
        }
        if self.buffer == 0 {
            return Err(Error::InvalidConfig("Kafka buffer must be at least 1".into()));
        }
        if let Some(key) = self
            .properties
            .keys()
            .find(|k| OWN_PROPERTIES.contains(&k.as_str()))
        {
            return Err(Error::InvalidConfig(format!(
                "'{key}' is set by polybus and cannot be changed"
            )));
        }
        self.validate_security()
    }
}

fn parse_broker(entry: &str) -> std::result::Result<String, String> {
    if entry.is_empty() {
        return Err("empty broker in the list".into());
    }
    let (host, port) = if let Some(v6) = entry.strip_prefix('[') {
        let (host, port) = v6
            .split_once("]:")
            .ok_or_else(|| format!("broker '{entry}' needs [ipv6]:port"))?;
        (host, port)
    } else {
        entry
            .rsplit_once(':')
            .ok_or_else(|| format!("broker '{entry}' needs a port (host:port)"))?
    };
    if host.is_empty() || host.contains(':') && !entry.starts_with('[') {
        return Err(format!("broker '{entry}' has no valid host"));
    }
    if !host
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'))
    {
        return Err(format!("broker '{entry}' has an invalid host"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(entry.to_owned()),
        _ => Err(format!("bad port '{port}' in broker '{entry}'")),
    }
}

fn millis(d: Duration) -> String {
    d.as_millis().max(1).to_string()
}

/// Connects to `url` (`kafka://host:port,…`) with default settings.
pub async fn connect(url: &str) -> Result<Connection> {
    connect_with(KafkaConfig::from_url(url)?).await
}

/// Connects with `config`: checks the brokers answer (within
/// [`KafkaConfig::connect_timeout`]) and builds a producer and a consumer.
pub async fn connect_with(config: KafkaConfig) -> Result<Connection> {
    config.validate()?;
    let consumer = KafkaConsumer::connect(config.clone()).await?;
    let producer = KafkaProducer::new(&config)?;
    Ok(Connection {
        producer: std::sync::Arc::new(producer),
        consumer: std::sync::Arc::new(consumer),
    })
}

/// Maps a librdkafka error to polybus's error, by meaning.
pub(crate) fn map_error(what: &str, e: KafkaError) -> Error {
    if let KafkaError::ClientConfig(_, description, key, value) = &e {
        // The value may be a secret: name the property only, and keep no source
        // (its text holds the value).
        let description = if !value.is_empty() && description.contains(value.as_str()) {
            "invalid value".to_owned()
        } else {
            description.clone()
        };
        return Error::InvalidConfig(format!("{what}: librdkafka property '{key}': {description}"));
    }
    let code = e.rdkafka_error_code();
    use RDKafkaErrorCode as C;
    match code {
        // The record itself is refused: sending it again cannot help.
        Some(C::MessageSizeTooLarge | C::InvalidMessageSize | C::MessageBatchTooLarge) => {
            Error::MessageRejected {
                backend: BACKEND,
                message: format!("{what}: the broker refused the record as too large: {e}"),
                source: Some(Box::new(e)),
            }
        }
        Some(C::InvalidTimestamp) => Error::MessageRejected {
            backend: BACKEND,
            message: format!(
                "{what}: the broker refused the record's timestamp (outside the topic's \
                 message.timestamp.*.max.ms): {e}"
            ),
            source: Some(Box::new(e)),
        },
        Some(C::UnknownTopicOrPartition | C::UnknownTopic | C::UnknownPartition) => Error::NotFound {
            what: format!("{what}: {e}"),
        },
        Some(
            C::BrokerTransportFailure
            | C::AllBrokersDown
            | C::Resolve
            | C::NetworkException
            | C::LeaderNotAvailable
            | C::NotLeaderForPartition
            | C::CoordinatorNotAvailable
            | C::NotCoordinator,
        ) => Error::Connection {
            backend: BACKEND,
            message: format!("{what}: {e}"),
            source: Some(Box::new(e)),
        },
        Some(C::MessageTimedOut | C::OperationTimedOut | C::RequestTimedOut) => Error::Connection {
            backend: BACKEND,
            message: format!("{what} timed out: {e}"),
            source: Some(Box::new(e)),
        },
        Some(C::Authentication | C::SaslAuthenticationFailed) => Error::Unauthenticated {
            backend: BACKEND,
            message: format!("{what}: {e}"),
            source: Some(Box::new(e)),
        },
        Some(C::SSL) => Error::Tls {
            backend: BACKEND,
            message: format!("{what}: {e}"),
            source: Some(Box::new(e)),
        },
        Some(
            C::TopicAuthorizationFailed
            | C::GroupAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::TransactionalIdAuthorizationFailed
            | C::DelegationTokenAuthorizationFailed,
        ) => Error::PermissionDenied {
            backend: BACKEND,
            message: format!("{what}: {e}"),
            source: Some(Box::new(e)),
        },
        Some(
            C::InvalidConfig
            | C::InvalidArgument
            | C::InvalidTopic
            | C::Fatal
            | C::UnsupportedVersion
            | C::UnsupportedFeature
            | C::InvalidReplicationFactor
            | C::InvalidPartitions
            | C::InvalidReplicaAssignment
            | C::PolicyViolation
            | C::InvalidRequest
            | C::InvalidRequiredAcks
            | C::InvalidRecord,
        ) => Error::Backend {
            backend: BACKEND,
            message: format!("{what}: {e}"),
            retryable: false,
            source: Some(Box::new(e)),
        },
        _ => Error::Backend {
            backend: BACKEND,
            message: format!("{what}: {e}"),
            retryable: !matches!(e, KafkaError::ClientConfig(..) | KafkaError::ClientCreation(_)),
            source: Some(Box::new(e)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_lists_parse() {
        let c = KafkaConfig::from_url("kafka://a:9092,b.example:9093,[::1]:9094").unwrap();
        assert_eq!(c.brokers, ["a:9092", "b.example:9093", "[::1]:9094"]);
        assert_eq!(c.partitions, 4);
        let c = KafkaConfig::from_url("kafka://a:1/?partitions=8&security.protocol=SSL").unwrap();
        assert_eq!(c.partitions, 8);
        assert_eq!(c.properties["security.protocol"], "SSL");
    }

    #[test]
    fn bad_urls_are_typed_errors() {
        for bad in [
            "kafka://",
            "kafka://host",
            "kafka://host:",
            "kafka://host:0",
            "kafka://host:99999",
            "kafka://:9092",
            "kafka://a:1,,b:2",
            "kafka://a:1/topic",
            "kafka://a:1?partitions=0",
            "kafka://a:1?colour=red",
            "kafka://a:1?acks=0",
            "kafka://a:1?enable.auto.commit=true",
            "kafka://a b:1",
            "http://a:1",
            "kafka://user@a:1",
        ] {
            match KafkaConfig::from_url(bad) {
                Err(Error::InvalidConfig(_)) => {}
                other => panic!("{bad}: expected InvalidConfig, got {other:?}"),
            }
        }
    }

    #[test]
    fn absurd_settings_are_refused() {
        let mut c = KafkaConfig::new(vec!["a:1".into()]);
        c.revoke_timeout = Duration::MAX;
        assert!(matches!(c.validate(), Err(Error::InvalidConfig(_))));
        let mut c = KafkaConfig::new(vec!["a:1".into()]);
        c.commit_interval = Duration::ZERO;
        assert!(matches!(c.validate(), Err(Error::InvalidConfig(_))));
        let c = KafkaConfig::new(vec!["a:1".into()]).set("acks", "0");
        assert!(matches!(c.validate(), Err(Error::InvalidConfig(_))));
    }

    #[test]
    fn revoke_timeout_stays_below_max_poll_interval() {
        // A revocation blocks the poll thread; past max.poll.interval.ms the
        // member would be thrown out of the group in the middle of it.
        let mut c = KafkaConfig::new(vec!["a:1".into()]);
        c.max_poll_interval = Duration::from_secs(20);
        c.revoke_timeout = Duration::from_secs(20);
        assert!(matches!(c.validate(), Err(Error::InvalidConfig(_))));
        c.revoke_timeout = Duration::from_secs(19);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn records_the_broker_refuses_are_not_retried() {
        for code in [
            RDKafkaErrorCode::InvalidTimestamp,
            RDKafkaErrorCode::MessageBatchTooLarge,
            RDKafkaErrorCode::MessageSizeTooLarge,
        ] {
            let e = map_error("sending", KafkaError::MessageProduction(code));
            assert!(!e.is_retryable(), "{code:?} is not retryable: {e}");
        }
    }

    #[test]
    fn bad_properties_do_not_echo_their_value() {
        let c = KafkaConfig::new(vec!["a:1".into()]).set("no.such.property", "hunter2");
        let e = KafkaProducer::new(&c).unwrap_err();
        assert!(matches!(e, Error::InvalidConfig(_)), "{e}");
        assert!(!e.to_string().contains("hunter2"), "{e}");
        let c = KafkaConfig::new(vec!["a:1".into()]).set("sasl.oauthbearer.client.secret", "hunter2");
        if let Err(e) = KafkaProducer::new(&c) {
            assert!(!e.to_string().contains("hunter2"), "{e}");
        }
    }

    #[test]
    fn secrets_stay_out_of_debug_and_errors() {
        let c = KafkaConfig::from_url("kafka://alice:s3cr%40t@a:9092?security.protocol=SASL_SSL").unwrap();
        assert_eq!(c.sasl_password.as_deref(), Some("s3cr@t"));
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cr"), "{shown}");
        assert!(shown.contains("alice"), "the user is not a secret: {shown}");
        for leaky in [
            "kafka://alice:s3cret@a:9092?x=1",
            "kafka://alice:s3cret@a",
            "kafka://u:s3cret@a:1,b",
            "kafka://b:1?sasl.password=s3cret&partitions=x",
            "kafka://b:1?sasl.password=s3cret&partitions",
        ] {
            let err = KafkaConfig::from_url(leaky).unwrap_err();
            assert!(!err.to_string().contains("s3c"), "{leaky}: {err}");
        }
        let c = KafkaConfig::from_url("kafka://alice:s3c%3Fret@a:1").unwrap();
        assert_eq!(c.sasl_password.as_deref(), Some("s3c?ret"));
        // An unencoded `?` in the password still ends up in the password.
        let c = KafkaConfig::from_url("kafka://alice:s3c?ret@a:1?partitions=2").unwrap();
        assert_eq!(c.sasl_password.as_deref(), Some("s3c?ret"));
        assert_eq!((c.brokers.as_slice(), c.partitions), (&["a:1".to_owned()][..], 2));
        let c = KafkaConfig::new(vec!["a:1".into()])
            .set("sasl.oauthbearer.assertion.private.key.passphrase", "pw2");
        assert!(!format!("{c:?}").contains("pw2"));
        let c = KafkaConfig::new(vec!["a:1".into()]).set("ssl.key.password", "pw1");
        assert!(!format!("{c:?}").contains("pw1"));
    }
}
