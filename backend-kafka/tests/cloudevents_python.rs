//! CloudEvents interop with the official Python SDK over Kafka (the SDK's Kafka
//! binding, kafka-python), both directions. Needs a real broker in
//! `POLYBUS_TEST_KAFKA_BROKERS` (tansu in CI; the mock cluster is in-process,
//! out of Python's reach) and `POLYBUS_TEST_PYTHON` (`scripts/brokers.sh`:
//! `ensure_python_clients`).

#[tokio::test(flavor = "multi_thread")]
async fn cloudevents_python_sdk_both_directions() {
    let test = "cloudevents_python_sdk_both_directions";
    let Some(brokers) = polybus_conformance::broker_url("POLYBUS_TEST_KAFKA_BROKERS", test) else {
        return;
    };
    let Some(python) = polybus_conformance::python::interpreter(test) else {
        return;
    };
    let conn = polybus_kafka::connect(&format!("kafka://{brokers}"))
        .await
        .expect("connect");
    polybus_conformance::python::cloudevents_interop(&conn, &python, "kafka", &brokers)
        .await
        .expect("interop");
    conn.close().await.expect("close");
}
