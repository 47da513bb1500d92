//! CloudEvents interop with the official Python SDK over NATS JetStream
//! (nats-py; `ce-` headers as the SDK's HTTP binding writes them, which is the
//! NATS binding's binary mode in its 1.0.3 draft, and structured mode), both
//! directions. Needs `POLYBUS_TEST_NATS_URL` and `POLYBUS_TEST_PYTHON`
//! (`scripts/brokers.sh`: `ensure_python_clients`).

#[tokio::test(flavor = "multi_thread")]
async fn cloudevents_python_sdk_both_directions() {
    let test = "cloudevents_python_sdk_both_directions";
    let Some(url) = polybus_conformance::broker_url("POLYBUS_TEST_NATS_URL", test) else {
        return;
    };
    let Some(python) = polybus_conformance::python::interpreter(test) else {
        return;
    };
    let conn = polybus_nats::connect(&url).await.expect("connect");
    polybus_conformance::python::cloudevents_interop(&conn, &python, "nats", &url)
        .await
        .expect("interop");
    conn.close().await.expect("close");
}
