//! The whole conformance suite against a real Kafka-protocol broker named by
//! `POLYBUS_TEST_KAFKA_BROKERS` (`host:port[,host:port]`; `.ci/run` starts
//! tansu). Without the variable every case is a loud SKIP (a failure under
//! `POLYBUS_TEST_REQUIRE_BROKERS=1`).

mod support;

type BrokerHarness = support::KafkaHarness<true>;

polybus_conformance::conformance_suite!(BrokerHarness);
