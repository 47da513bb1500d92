#!/usr/bin/env bash
# Makes sure the brokers the test suites need are running on 127.0.0.1, installing
# them from Debian packages when they are missing, and exports the variables the
# tests read. Source it, then call what you need:
#   . scripts/brokers.sh && ensure_nats && ensure_rabbitmq && cargo test --workspace
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
