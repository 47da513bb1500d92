//! The shared conformance suite against a live NATS server in JetStream mode.
//! Skips loudly without `POLYBUS_TEST_NATS_URL`.

mod support;

polybus_conformance::conformance_suite!(support::NatsHarness<false>);
