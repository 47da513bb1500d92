#!/usr/bin/env bash
# Makes sure the brokers the test suites need are running on 127.0.0.1, installing
# them from Debian packages when they are missing, and exports the variables the
# tests read. Source it, then call what you need:
#   . scripts/brokers.sh && ensure_nats && ensure_rabbitmq && ensure_kafka && cargo test --workspace
# Brokers this script started are stopped by `stop_started_brokers` (CI traps it).

POLYBUS_STARTED_PIDS=()

_polybus_port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

_polybus_wait_port() {
  local host=$1 port=$2 what=$3
  for _ in $(seq 1 300); do
    _polybus_port_open "$host" "$port" && return 0
    sleep 0.2
  done
  echo "polybus: $what did not start listening on $host:$port" >&2
  return 1
}

_polybus_apt_install() {
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "polybus: installing Debian package(s) $*" >&2
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >&2
}

ensure_nats() {
  export POLYBUS_TEST_NATS_URL="${POLYBUS_TEST_NATS_URL:-nats://127.0.0.1:4222}"
  if ! command -v nats-server >/dev/null 2>&1; then
    _polybus_apt_install nats-server || return 1
  fi
  if _polybus_port_open 127.0.0.1 4222; then
    echo "polybus: NATS already listening on 127.0.0.1:4222" >&2
    return 0
  fi
  local store="${POLYBUS_NATS_STORE:-${HOME:-/tmp}/.cache/polybus-nats-store}"
  mkdir -p "$store"
  echo "polybus: starting nats-server with JetStream on 127.0.0.1:4222 (store $store)" >&2
  nats-server -a 127.0.0.1 -p 4222 -js -sd "$store" -l "$store/nats-server.log" &
  POLYBUS_STARTED_PIDS+=($!)
  _polybus_wait_port 127.0.0.1 4222 nats-server
}

ensure_rabbitmq() {
  export POLYBUS_TEST_AMQP_URL="${POLYBUS_TEST_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
  if ! command -v rabbitmq-server >/dev/null 2>&1; then
    _polybus_apt_install rabbitmq-server || return 1
  fi
  if _polybus_port_open 127.0.0.1 5672; then
    echo "polybus: RabbitMQ already listening on 127.0.0.1:5672" >&2
    return 0
  fi
  echo "polybus: starting RabbitMQ on 127.0.0.1:5672" >&2
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo rabbitmq-server -detached >&2 || return 1
  POLYBUS_STARTED_RABBITMQ=1
  _polybus_wait_port 127.0.0.1 5672 rabbitmq-server || return 1
  $sudo rabbitmqctl await_startup >&2 || true
}

# Kafka: tansu (Apache-2.0, speaks the Kafka protocol), built once per machine
# with `cargo install` into a cache outside the clone (about 10 minutes cold),
# run with in-memory storage (it keeps nothing once stopped).
ensure_kafka() {
  export POLYBUS_TEST_KAFKA_BROKERS="${POLYBUS_TEST_KAFKA_BROKERS:-127.0.0.1:9092}"
  if _polybus_port_open 127.0.0.1 9092; then
    echo "polybus: a Kafka broker is already listening on 127.0.0.1:9092" >&2
    return 0
  fi
  local tools="${POLYBUS_TOOLS:-${HOME:-/tmp}/.cache/polybus-tools}"
  local tansu="$tools/bin/tansu"
  if [ ! -x "$tansu" ]; then
    echo "polybus: building tansu into $tools (once per machine, ~10 min)" >&2
    CARGO_TARGET_DIR="$tools/build" cargo install tansu --locked --features dynostore,libsql \
      --root "$tools" >&2 || return 1
  fi
  echo "polybus: starting tansu on 127.0.0.1:9092 (memory storage)" >&2
  "$tansu" broker --listener-url tcp://127.0.0.1:9092 --advertised-listener-url tcp://127.0.0.1:9092 \
    --storage-engine memory://tansu/ >"$tools/tansu.log" 2>&1 &
  POLYBUS_STARTED_PIDS+=($!)
  _polybus_wait_port 127.0.0.1 9092 tansu
}

stop_started_brokers() {
  if [ "${POLYBUS_STARTED_RABBITMQ:-}" = 1 ]; then
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo rabbitmqctl stop >/dev/null 2>&1 || true
    POLYBUS_STARTED_RABBITMQ=
  fi
  for pid in "${POLYBUS_STARTED_PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  POLYBUS_STARTED_PIDS=()
}
