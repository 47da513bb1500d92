//! librdkafka's in-process mock cluster, with its initial rebalance delay set to
//! zero (the default 3 s would make every group join slow) and topics created
//! through its own API (it has no CreateTopics).

#![allow(unsafe_code)]

use std::ffi::{CStr, CString};

use polybus_core::{Error, Result};
use rdkafka::ClientConfig;
use rdkafka::producer::{BaseProducer, Producer as _};

/// A mock Kafka cluster of one broker, alive as long as this value.
pub struct MockKafka {
    /// The client whose handle owns the cluster.
    owner: BaseProducer,
    bootstrap: String,
}

impl MockKafka {
    /// Starts a mock cluster.
    pub fn new() -> Result<Self> {
        let owner: BaseProducer = ClientConfig::new()
            .set("test.mock.num.brokers", "1")
            .set("log_level", "3")
            .create()
            .map_err(|e| Error::InvalidConfig(format!("creating the mock cluster: {e}")))?;
        let mock = MockKafka {
            owner,
            bootstrap: String::new(),
        };
        let cluster = mock.cluster();
        // SAFETY: `cluster` is the live mock cluster owned by `mock.owner`; the
        // returned string is owned by the cluster and copied at once.
        let bootstrap = unsafe {
            rdkafka_sys::rd_kafka_mock_group_initial_rebalance_delay_ms(cluster, 0);
            CStr::from_ptr(rdkafka_sys::rd_kafka_mock_cluster_bootstraps(cluster))
                .to_string_lossy()
                .into_owned()
        };
        Ok(MockKafka { bootstrap, ..mock })
    }

    fn cluster(&self) -> *mut rdkafka_sys::rd_kafka_mock_cluster_t {
        // SAFETY: the producer's handle is valid while `self.owner` lives; it was
        // created with `test.mock.num.brokers`, so it has a mock cluster.
        let cluster = unsafe { rdkafka_sys::rd_kafka_handle_mock_cluster(self.owner.client().native_ptr()) };
        assert!(!cluster.is_null(), "the client has no mock cluster");
        cluster
    }

    /// The cluster's bootstrap servers.
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    /// Creates `topic` with `partitions` partitions (an existing topic is fine).
    pub fn create_topic(&self, topic: &str, partitions: i32) -> Result<()> {
        let name = CString::new(topic).map_err(|_| Error::InvalidConfig(format!("topic {topic:?}")))?;
        // SAFETY: the cluster is alive (owned by `self.owner`), `name` outlives the call.
        let err =
            unsafe { rdkafka_sys::rd_kafka_mock_topic_create(self.cluster(), name.as_ptr(), partitions, 1) };
        use rdkafka_sys::rd_kafka_resp_err_t as E;
        match err {
            E::RD_KAFKA_RESP_ERR_NO_ERROR | E::RD_KAFKA_RESP_ERR_TOPIC_ALREADY_EXISTS => Ok(()),
            other => Err(Error::InvalidConfig(format!(
                "mock cluster refused topic {topic}: {other:?}"
            ))),
        }
    }
}

impl MockKafka {
    /// Makes the next `count` Produce requests fail with `error` (librdkafka's
    /// mock error injection).
    pub fn fail_produce_requests(&self, error: rdkafka_sys::rd_kafka_resp_err_t, count: usize) {
        let errors = vec![error; count];
        // SAFETY: the cluster is alive; the array holds `count` errors and is
        // read during the call only. Produce is API key 0.
        unsafe {
            rdkafka_sys::rd_kafka_mock_push_request_errors_array(self.cluster(), 0, count, errors.as_ptr());
        }
    }
}
