//! CloudEvents interop with the official Python SDK over RabbitMQ (pika, the
//! SDK's AMQP binding), both directions. Needs `POLYBUS_TEST_AMQP_URL` and
//! `POLYBUS_TEST_PYTHON` (`scripts/brokers.sh`: `ensure_python_clients`).

#[tokio::test(flavor = "multi_thread")]
async fn cloudevents_python_sdk_both_directions() {
    let test = "cloudevents_python_sdk_both_directions";
    let Some(url) = polybus_conformance::broker_url("POLYBUS_TEST_AMQP_URL", test) else {
        return;
    };
    let Some(python) = polybus_conformance::python::interpreter(test) else {
        return;
    };
    let conn = polybus_rabbitmq::connect(&url).await.expect("connect");
    polybus_conformance::python::cloudevents_interop(&conn, &python, "rabbitmq", &url)
        .await
        .expect("interop");
    conn.close().await.expect("close");
}
