//! The shared conformance suite against a live NATS server in core NATS mode
//! (at-most-once): cases that need redelivery or retention are skipped by the
//! capabilities. Skips loudly without `POLYBUS_TEST_NATS_URL`.

mod support;

polybus_conformance::conformance_suite!(support::NatsHarness<true>);
