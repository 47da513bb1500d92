"""CloudEvents interop with the official Python SDK (`cloudevents` on PyPI).

Events are built and parsed by the SDK's own protocol bindings and carried by
the brokers' Python clients: Kafka (SDK Kafka binding, kafka-python), RabbitMQ
(SDK AMQP binding, pika: application properties as the 0-9-1 headers table,
`content-type` as the content_type property) and NATS (the SDK HTTP binding's
`ce-` headers, the NATS 1.0.3 draft's binary mode, and structured mode, nats-py).

    python cloudevents_interop.py <kafka|rabbitmq|nats> <address> <topic> produce <n>
    python cloudevents_interop.py <kafka|rabbitmq|nats> <address> <topic> consume <n>

`produce` sends n events (even: binary mode, odd: structured mode) of type
`interop.ride-created` from `/python-sdk` with data {"ride_id", "seq"}, subject
`ride-<i>`, id `py-<i>` and extension `traceparent`. `consume` prints `READY`
once subscribed, then one JSON line per event the SDK parsed, and exits after n
events (or fails after 30 s). Used by the backends' `cloudevents_python` tests.
"""

import asyncio
import json
import sys
import time

from cloudevents.core.bindings import amqp, http, kafka
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

FORMAT = JSONFormat()
TIMEOUT = 30.0


def build(i):
    return CloudEvent(
        {
            "type": "interop.ride-created",
            "source": "/python-sdk",
            "id": f"py-{i}",
            "subject": f"ride-{i}",
            "datacontenttype": "application/json",
            "traceparent": "00-python",
        },
        {"ride_id": f"ride-{i}", "seq": i},
    )


def describe(event):
    data = event.get_data()
    if isinstance(data, (bytes, bytearray)):
        data = json.loads(data)
    elif isinstance(data, str):
        data = json.loads(data)
    time_ = event.get_time()
    return json.dumps(
        {
            "id": event.get_id(),
            "source": event.get_source(),
            "type": event.get_type(),
            "subject": event.get_subject(),
            "time": time_.timestamp() if time_ else None,
            "datacontenttype": event.get_datacontenttype(),
            "data": data,
        }
    )


def emit(line):
    print(line, flush=True)


# --- Kafka ------------------------------------------------------------------

def kafka_produce(address, topic, n):
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=address.split(","), acks="all")
    for i in range(n):
        event = build(i)
        message = kafka.to_binary(event, FORMAT) if i % 2 == 0 else kafka.to_structured(event, FORMAT)
        headers = [(k, v if isinstance(v, bytes) else str(v).encode()) for k, v in message.headers.items()]
        producer.send(topic, value=message.value, key=f"ride-{i}".encode(), headers=headers).get(timeout=TIMEOUT)
    producer.flush()
    producer.close()


def kafka_consume(address, topic, n):
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=address.split(","),
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=int(TIMEOUT * 1000),
    )
    emit("READY")
    seen = 0
    for record in consumer:
        message = kafka.KafkaMessage(
            headers={k: v for k, v in (record.headers or [])},
            key=record.key,
            value=record.value,
        )
        emit(describe(kafka.from_kafka(message, FORMAT)))
        seen += 1
        if seen == n:
            return
    raise SystemExit(f"timed out with {seen} of {n} events")


# --- RabbitMQ ---------------------------------------------------------------

def rabbit_connection(address):
    import pika

    return pika.BlockingConnection(pika.URLParameters(address))


def rabbitmq_produce(address, topic, n):
    import pika

    connection = rabbit_connection(address)
    channel = connection.channel()
    channel.confirm_delivery()
    for i in range(n):
        event = build(i)
        message = amqp.to_binary(event, FORMAT) if i % 2 == 0 else amqp.to_structured(event, FORMAT)
        headers = dict(message.application_properties)
        headers["polybus-key"] = f"ride-{i}"
        properties = pika.BasicProperties(
            content_type=message.properties.get("content-type"),
            headers=headers,
            delivery_mode=2,
        )
        channel.basic_publish(topic, topic, message.application_data, properties, mandatory=False)
    connection.close()


def rabbitmq_consume(address, topic, n):
    connection = rabbit_connection(address)
    channel = connection.channel()
    queue = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(queue, topic, "#")
    emit("READY")
    seen = 0
    deadline = time.monotonic() + TIMEOUT
    for method, properties, body in channel.consume(queue, inactivity_timeout=1.0):
        if method is None:
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out with {seen} of {n} events")
            continue
        message = amqp.AMQPMessage(
            properties={"content-type": properties.content_type} if properties.content_type else {},
            application_properties=dict(properties.headers or {}),
            application_data=body,
        )
        emit(describe(amqp.from_amqp(message, FORMAT)))
        channel.basic_ack(method.delivery_tag)
        seen += 1
        if seen == n:
            break
    connection.close()


# --- NATS -------------------------------------------------------------------

async def nats_produce(address, topic, n):
    import nats

    nc = await nats.connect(address)
    js = nc.jetstream()
    for i in range(n):
        event = build(i)
        message = http.to_binary(event, FORMAT) if i % 2 == 0 else http.to_structured(event, FORMAT)
        headers = dict(message.headers)
        headers["polybus-key"] = f"ride-{i}"
        await js.publish(topic, message.body, headers=headers, timeout=TIMEOUT)
    await nc.close()


async def nats_consume(address, topic, n):
    import nats

    nc = await nats.connect(address)
    sub = await nc.subscribe(topic)
    await nc.flush()
    emit("READY")
    for seen in range(n):
        try:
            msg = await sub.next_msg(timeout=TIMEOUT)
        except Exception:
            raise SystemExit(f"timed out with {seen} of {n} events")
        message = http.HTTPMessage(headers=dict(msg.headers or {}), body=msg.data)
        emit(describe(http.from_http(message, FORMAT)))
    await nc.close()


def main():
    backend, address, topic, mode, n = sys.argv[1:6]
    n = int(n)
    if backend == "kafka":
        (kafka_produce if mode == "produce" else kafka_consume)(address, topic, n)
    elif backend == "rabbitmq":
        (rabbitmq_produce if mode == "produce" else rabbitmq_consume)(address, topic, n)
    elif backend == "nats":
        asyncio.run((nats_produce if mode == "produce" else nats_consume)(address, topic, n))
    else:
        raise SystemExit(f"unknown backend {backend}")
    if mode == "produce":
        emit(f"SENT {n}")


if __name__ == "__main__":
    main()
