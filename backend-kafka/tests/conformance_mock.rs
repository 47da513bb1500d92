//! The whole conformance suite against librdkafka's in-process mock cluster (one
//! per case). Needs no broker: it runs in a plain `cargo test`.

mod support;

type MockHarness = support::KafkaHarness<false>;

polybus_conformance::conformance_suite!(MockHarness);
