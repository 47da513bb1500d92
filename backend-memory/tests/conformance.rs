//! The shared conformance suite, run against the in-memory backend.

use std::time::Duration;

use polybus_conformance::{Harness, Setup, timeout_multiplier};
use polybus_core::{Capabilities, Connection, Result, async_trait};
use polybus_memory::{MemoryBroker, MemoryConfig};

struct MemoryHarness {
    broker: MemoryBroker,
}

#[async_trait]
impl Harness for MemoryHarness {
    async fn setup() -> Setup<Self> {
        // A short ack deadline, so the runner's keep-alives are exercised.
        let deadline = Duration::from_secs_f64(1.0 * timeout_multiplier());
        Setup::Ready(MemoryHarness {
            broker: MemoryBroker::with_config(MemoryConfig::default().ack_deadline(deadline)),
        })
    }

    fn capabilities(&self) -> Capabilities {
        self.broker.capabilities()
    }

    async fn connect(&self) -> Result<Connection> {
        Ok(self.broker.connection())
    }

    async fn drained(&self, topic: &str, group: &str) -> Result<bool> {
        Ok(self.broker.is_settled(topic, group))
    }
}

polybus_conformance::conformance_suite!(MemoryHarness);
