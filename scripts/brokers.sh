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

# Python clients for interop tests (kafka-python's partitioner; the official
# CloudEvents SDK with kafka-python, pika and nats-py for the CloudEvents
# interop tests), in a venv outside the clone, made once per machine (and
# completed when a client is missing); exports POLYBUS_TEST_PYTHON.
ensure_python_clients() {
  local venv="${POLYBUS_VENV:-${HOME:-/tmp}/.cache/polybus-venv}"
  if ! "$venv/bin/python" -c "import kafka, cloudevents.core.bindings.amqp, pika, nats" >/dev/null 2>&1; then
    echo "polybus: installing Python clients into $venv" >&2
    [ -x "$venv/bin/pip" ] || python3 -m venv "$venv" >&2 || return 1
    "$venv/bin/pip" install -q "kafka-python==3.0.12" "cloudevents==2.2.0" "pika==1.4.4" \
      "nats-py==2.16.0" >&2 || return 1
  fi
  export POLYBUS_TEST_PYTHON="$venv/bin/python"
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

# ---------------------------------------------------------------------------
# Secured brokers (issue 16): private processes on free ports beside the shared
# ones, never touching them. Everything they need (certificates, configuration,
# data, logs) lives under $POLYBUS_SECURE_DIR (default ~/.cache/polybus-secure),
# outside the clone. The tests read the POLYBUS_TEST_*_SECURE_* variables.

POLYBUS_SECURE_DIR="${POLYBUS_SECURE_DIR:-${HOME:-/tmp}/.cache/polybus-secure}"

# The first port from $1 on which nothing listens on 127.0.0.1.
_polybus_free_port() {
  local port=$1
  while _polybus_port_open 127.0.0.1 "$port"; do port=$((port + 1)); done
  echo "$port"
}

# A test certificate authority, a server certificate for localhost/127.0.0.1, a
# client certificate (mTLS), a second, untrusted CA, and server certificates
# that must be refused (expired, not yet valid, another name), made with
# openssl once and again when they expire within a day. Exports
# POLYBUS_TEST_TLS_DIR.
ensure_test_certs() {
  local dir="$POLYBUS_SECURE_DIR/certs"
  export POLYBUS_TEST_TLS_DIR="$dir"
  # socat: the TLS endpoints the tests start to present refused certificates,
  # and the TLS terminator in front of the secured Kafka broker.
  command -v socat >/dev/null 2>&1 || _polybus_apt_install socat || return 1
  # Made again when one is missing (an older script made fewer) or the server
  # certificate expires within a day.
  local have=1 f
  for f in client-key.pem rogue-client.pem server-expired.pem server-future.pem server-wrong-name.pem; do
    [ -f "$dir/$f" ] || have=0
  done
  if [ "$have" = 1 ] && openssl x509 -checkend 86400 -noout -in "$dir/server.pem" >/dev/null 2>&1; then
    return 0
  fi
  echo "polybus: generating test certificates in $dir" >&2
  mkdir -p "$dir" && chmod 700 "$dir"
  (
    set -e
    cd "$dir"
    local subj
    for ca in ca rogue-ca; do
      openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=polybus test $ca" \
        -keyout "$ca-key.pem" -out "$ca.pem" 2>/dev/null
    done
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >server.ext
    printf 'extendedKeyUsage=clientAuth\n' >client.ext
    for who in server client; do
      subj="/CN=polybus-test-$who"
      [ "$who" = server ] && subj="/CN=localhost"
      openssl req -newkey rsa:2048 -nodes -subj "$subj" -keyout "$who-key.pem" -out "$who.csr" 2>/dev/null
      openssl x509 -req -in "$who.csr" -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days 30 \
        -extfile "$who.ext" -out "$who.pem" 2>/dev/null
    done
    # A client certificate from the untrusted CA (refused by mTLS servers).
    openssl req -newkey rsa:2048 -nodes -subj "/CN=polybus-rogue-client" -keyout rogue-client-key.pem \
      -out rogue-client.csr 2>/dev/null
    openssl x509 -req -in rogue-client.csr -CA rogue-ca.pem -CAkey rogue-ca-key.pem -CAcreateserial -days 30 \
      -extfile client.ext -out rogue-client.pem 2>/dev/null
    chmod 600 ./*-key.pem
  ) || { echo "polybus: openssl failed" >&2; return 1; }
  _polybus_bad_certs "$dir"
}

# Server certificates that must be refused, signed by the test CA (made once
# per CA): expired (valid in 2020 only), not yet valid (from 2099), and one for
# another name (`wrong.polybus.test`, not localhost). `openssl ca` sets the
# dates: OpenSSL 3.0's `x509 -req` cannot.
_polybus_bad_certs() {
  local dir=$1
  [ -f "$dir/server-future.pem" ] && [ "$dir/server-future.pem" -nt "$dir/ca.pem" ] && return 0
  (
    set -e
    cd "$dir"
    rm -rf ca-db && mkdir -p ca-db/new && : >ca-db/index.txt && echo 1000 >ca-db/serial
    cat >ca-db/ca.cnf <<CNF
[ ca ]
default_ca = test_ca
[ test_ca ]
database = ca-db/index.txt
new_certs_dir = ca-db/new
serial = ca-db/serial
default_md = sha256
policy = any
unique_subject = no
[ any ]
commonName = supplied
[ localhost ]
subjectAltName = DNS:localhost,IP:127.0.0.1
extendedKeyUsage = serverAuth
[ wrong ]
subjectAltName = DNS:wrong.polybus.test
extendedKeyUsage = serverAuth
CNF
    local sign=(openssl ca -batch -notext -config ca-db/ca.cnf -cert ca.pem -keyfile ca-key.pem -in server.csr)
    "${sign[@]}" -extensions localhost -startdate 20200101000000Z -enddate 20200102000000Z -out server-expired.pem 2>/dev/null
    "${sign[@]}" -extensions localhost -startdate 20990101000000Z -enddate 20990102000000Z -out server-future.pem 2>/dev/null
    "${sign[@]}" -extensions wrong -days 30 -out server-wrong-name.pem 2>/dev/null
  ) || { echo "polybus: openssl could not make the refused server certificates" >&2; return 1; }
}

# Two private nats-server processes with JetStream:
#  * TLS (server certificate only) with users: `polybus` (password, full
#    access) and `limited` (password; may not publish or subscribe to
#    `secret` and `secret.>`, nor use the JetStream API for the stream `secret`);
#  * mutual TLS (`verify: true`) with token authentication.
# NKey and JWT/credentials-file servers need keys generated by the tests (with
# the nkeys crate), so backend-nats/tests/security.rs starts those itself.
# Exports POLYBUS_TEST_NATS_SECURE_URL (TLS + user/password),
# POLYBUS_TEST_NATS_LIMITED_URL, POLYBUS_TEST_NATS_MTLS_URL (token) and
# POLYBUS_TEST_TLS_DIR.
ensure_secure_nats() {
  ensure_test_certs || return 1
  command -v nats-server >/dev/null 2>&1 || _polybus_apt_install nats-server || return 1
  local dir="$POLYBUS_SECURE_DIR/nats" certs="$POLYBUS_SECURE_DIR/certs"
  mkdir -p "$dir"
  local pw_file="$dir/passwords"
  if [ ! -f "$pw_file" ]; then
    printf '%s %s %s\n' "$(openssl rand -hex 12)" "$(openssl rand -hex 12)" "$(openssl rand -hex 16)" >"$pw_file"
    chmod 600 "$pw_file"
  fi
  local pass limited token
  read -r pass limited token <"$pw_file"
  if [ -n "${POLYBUS_TEST_NATS_SECURE_URL:-}" ] && [ -n "${POLYBUS_TEST_NATS_MTLS_URL:-}" ]; then
    echo "polybus: secured NATS already configured" >&2
    return 0
  fi
  local started=$SECONDS tls_port mtls_port
  tls_port=$(_polybus_free_port 14222)
  cat >"$dir/tls.conf" <<CONF
listen: 127.0.0.1:$tls_port
server_name: polybus_secure_tls
jetstream { store_dir: "$dir/store-tls" }
tls { cert_file: "$certs/server.pem", key_file: "$certs/server-key.pem", ca_file: "$certs/ca.pem", timeout: 2 }
authorization {
  users = [
    { user: polybus, password: "$pass" }
    { user: limited, password: "$limited", permissions: {
        publish: { deny: ["secret.>", "secret", "\$JS.API.STREAM.*.secret", "\$JS.API.CONSUMER.*.secret", "\$JS.API.CONSUMER.*.secret.>", "\$JS.API.CONSUMER.*.*.secret.>"] }
        subscribe: { deny: ["secret.>", "secret"] }
    } }
  ]
}
CONF
  nats-server -c "$dir/tls.conf" -l "$dir/tls.log" &
  POLYBUS_STARTED_PIDS+=($!)
  mtls_port=$(_polybus_free_port $((tls_port + 1)))
  cat >"$dir/mtls.conf" <<CONF
listen: 127.0.0.1:$mtls_port
server_name: polybus_secure_mtls
jetstream { store_dir: "$dir/store-mtls" }
tls { cert_file: "$certs/server.pem", key_file: "$certs/server-key.pem", ca_file: "$certs/ca.pem", verify: true, timeout: 2 }
authorization { token: "$token" }
CONF
  nats-server -c "$dir/mtls.conf" -l "$dir/mtls.log" &
  POLYBUS_STARTED_PIDS+=($!)
  _polybus_wait_port 127.0.0.1 "$tls_port" "secured nats-server (TLS)" || return 1
  _polybus_wait_port 127.0.0.1 "$mtls_port" "secured nats-server (mTLS)" || return 1
  local q="tls_ca=$certs/ca.pem"
  export POLYBUS_TEST_NATS_SECURE_URL="tls://polybus:$pass@localhost:$tls_port?$q"
  export POLYBUS_TEST_NATS_LIMITED_URL="tls://limited:$limited@localhost:$tls_port?$q"
  export POLYBUS_TEST_NATS_MTLS_URL="tls://$token@localhost:$mtls_port?$q&tls_cert=$certs/client.pem&tls_key=$certs/client-key.pem"
  echo "polybus: secured nats-servers on 127.0.0.1:$tls_port (TLS) and :$mtls_port (mTLS) in $((SECONDS - started)) s" >&2
}

# A private RabbitMQ node (own node name, ports, data, logs and Erlang cookie
# under $POLYBUS_SECURE_DIR/rabbitmq) with only a TLS listener, peer
# verification (`verify_peer`, `fail_if_no_peer_cert`), no plugins, and the
# user `polybus` in the vhost `polybus-secure`. The node name can be changed
# with POLYBUS_SECURE_RABBITMQ_NODE (two on one machine need two). Exports
# POLYBUS_TEST_AMQP_SECURE_URL (amqps, with the CA and client certificate).
ensure_secure_rabbitmq() {
  ensure_test_certs || return 1
  local dir="$POLYBUS_SECURE_DIR/rabbitmq" certs="$POLYBUS_SECURE_DIR/certs"
  local node="${POLYBUS_SECURE_RABBITMQ_NODE:-polybus_secure@localhost}" bin=/usr/lib/rabbitmq/bin
  mkdir -p "$dir/mnesia" "$dir/log"
  [ -f "$dir/password" ] || { openssl rand -hex 12 >"$dir/password"; chmod 600 "$dir/password"; }
  local pass started=$SECONDS port dist
  pass=$(cat "$dir/password")
  : >"$dir/enabled_plugins"
  port=$(_polybus_free_port 15671)
  dist=$(_polybus_free_port 25672)
  [ "$dist" = "$port" ] && dist=$(_polybus_free_port $((port + 1)))
  cat >"$dir/rabbitmq.conf" <<CONF
listeners.tcp = none
listeners.ssl.default = 127.0.0.1:$port
ssl_options.cacertfile = $certs/ca.pem
ssl_options.certfile = $certs/server.pem
ssl_options.keyfile = $certs/server-key.pem
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = true
loopback_users = none
CONF
  local env=(HOME="$dir" RABBITMQ_NODENAME="$node" RABBITMQ_NODE_PORT="$port" RABBITMQ_DIST_PORT="$dist"
    RABBITMQ_MNESIA_BASE="$dir/mnesia" RABBITMQ_LOG_BASE="$dir/log" RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf"
    RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" RABBITMQ_PID_FILE="$dir/pid")
  env "${env[@]}" "$bin/rabbitmq-server" >"$dir/log/startup.log" 2>&1 &
  POLYBUS_STARTED_PIDS+=($!)
  POLYBUS_SECURE_RABBITMQ_ENV=("${env[@]}")
  _polybus_wait_port 127.0.0.1 "$port" "secured RabbitMQ" || return 1
  env "${env[@]}" "$bin/rabbitmqctl" -n "$node" await_startup --timeout 60 >/dev/null 2>&1 || {
    echo "polybus: the secured RabbitMQ node did not start (see $dir/log)" >&2; return 1; }
  local ctl=(env "${env[@]}" "$bin/rabbitmqctl" -n "$node" -q)
  "${ctl[@]}" add_vhost polybus-secure >/dev/null 2>&1 || true
  "${ctl[@]}" add_user polybus "$pass" >/dev/null 2>&1 || "${ctl[@]}" change_password polybus "$pass" >/dev/null
  "${ctl[@]}" set_permissions -p polybus-secure polybus '.*' '.*' '.*' >/dev/null
  "${ctl[@]}" delete_user guest >/dev/null 2>&1 || true
  export POLYBUS_TEST_AMQP_SECURE_URL="amqps://polybus:$pass@localhost:$port/polybus-secure"
  # rabbitmqctl finds the node's Erlang cookie through HOME.
  export POLYBUS_TEST_AMQP_SECURE_CTL="env HOME=$dir $bin/rabbitmqctl -n $node"
  echo "polybus: secured RabbitMQ node $node on 127.0.0.1:$port in $((SECONDS - started)) s" >&2
}

# A private tansu (Kafka protocol) that requires SASL. tansu 0.6.0 checks
# SCRAM-SHA-256/512 against credentials it stores (SQLite storage here: its
# memory storage keeps none), and accepts PLAIN with any password. Its TLS
# cannot be used: `--cert` and `--key` are mutually exclusive in its command
# line, and its listener never wraps connections in TLS. So TLS is a socat
# terminator in front of a second tansu, requiring a client certificate.
# The SCRAM users are stored by `tansu user create` on a first start without
# authentication, then the broker restarts with `--authentication`.
#   $1 directory, $2 port to listen on, $3 port to advertise, then user
#   mechanism password triples.
_polybus_tansu_sasl() {
  local dir=$1 port=$2 advertised=$3 tansu=$POLYBUS_TANSU pid
  shift 3
  mkdir -p "$dir" && rm -f "$dir"/tansu.db*
  local args=(broker --listener-url "tcp://127.0.0.1:$port" --advertised-listener-url "tcp://localhost:$advertised"
    --storage-engine sqlite://tansu.db)
  (cd "$dir" && exec "$tansu" "${args[@]}") >"$dir/setup.log" 2>&1 &
  pid=$!
  _polybus_wait_port 127.0.0.1 "$port" "tansu (storing SCRAM users)" || { kill "$pid"; return 1; }
  while [ $# -ge 3 ]; do
    "$tansu" user create --broker "tcp://127.0.0.1:$port" "$1" "$3" --mechanism "$2" >>"$dir/setup.log" 2>&1 ||
      { echo "polybus: tansu user create $1 failed (see $dir/setup.log)" >&2; kill "$pid"; return 1; }
    shift 3
  done
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  local tries=0
  while _polybus_port_open 127.0.0.1 "$port" && [ "$tries" -lt 100 ]; do sleep 0.1; tries=$((tries + 1)); done
  (cd "$dir" && exec "$tansu" "${args[@]}" --authentication) >"$dir/tansu.log" 2>&1 &
  POLYBUS_STARTED_PIDS+=($!)
  _polybus_wait_port 127.0.0.1 "$port" "tansu (SASL)"
}

# Two private tansu brokers requiring SASL, beside the shared one:
#  * SASL_PLAINTEXT, users `polybus` (SCRAM-SHA-512) and `polybus256`
#    (SCRAM-SHA-256);
#  * SASL_SSL through socat (TLS 1.2+, client certificate required: mTLS),
#    user `polybus` (SCRAM-SHA-512).
# Exports POLYBUS_TEST_KAFKA_SASL_URL, POLYBUS_TEST_KAFKA_SASL256_URL,
# POLYBUS_TEST_KAFKA_SECURE_URL (SASL_SSL + mTLS) and POLYBUS_TEST_TLS_DIR.
ensure_secure_kafka() {
  ensure_test_certs || return 1
  local tools="${POLYBUS_TOOLS:-${HOME:-/tmp}/.cache/polybus-tools}"
  POLYBUS_TANSU="$tools/bin/tansu"
  [ -x "$POLYBUS_TANSU" ] || ensure_kafka || return 1
  if [ -n "${POLYBUS_TEST_KAFKA_SASL_URL:-}" ] && [ -n "${POLYBUS_TEST_KAFKA_SECURE_URL:-}" ]; then
    echo "polybus: secured Kafka already configured" >&2
    return 0
  fi
  local dir="$POLYBUS_SECURE_DIR/kafka" certs="$POLYBUS_SECURE_DIR/certs"
  mkdir -p "$dir"
  local pw_file="$dir/passwords"
  if [ ! -f "$pw_file" ]; then
    printf '%s %s\n' "$(openssl rand -hex 12)" "$(openssl rand -hex 12)" >"$pw_file"
    chmod 600 "$pw_file"
  fi
  local pass pass256 started=$SECONDS sasl_port tls_inner tls_port
  read -r pass pass256 <"$pw_file"
  sasl_port=$(_polybus_free_port 19092)
  _polybus_tansu_sasl "$dir/sasl" "$sasl_port" "$sasl_port" polybus scram512 "$pass" polybus256 scram256 "$pass256" ||
    return 1
  tls_inner=$(_polybus_free_port $((sasl_port + 1)))
  tls_port=$(_polybus_free_port $((tls_inner + 1)))
  _polybus_tansu_sasl "$dir/tls" "$tls_inner" "$tls_port" polybus scram512 "$pass" || return 1
  socat "OPENSSL-LISTEN:$tls_port,bind=127.0.0.1,reuseaddr,fork,cert=$certs/server.pem,key=$certs/server-key.pem,cafile=$certs/ca.pem,verify=1" \
    "TCP:127.0.0.1:$tls_inner" 2>"$dir/socat.log" &
  POLYBUS_STARTED_PIDS+=($!)
  _polybus_wait_port 127.0.0.1 "$tls_port" "socat (TLS in front of tansu)" || return 1
  export POLYBUS_TEST_KAFKA_SASL_URL="kafka://polybus:$pass@localhost:$sasl_port?sasl_mechanism=SCRAM-SHA-512"
  export POLYBUS_TEST_KAFKA_SASL256_URL="kafka://polybus256:$pass256@localhost:$sasl_port?sasl_mechanism=SCRAM-SHA-256"
  export POLYBUS_TEST_KAFKA_SECURE_URL="kafka://polybus:$pass@localhost:$tls_port?sasl_mechanism=SCRAM-SHA-512&tls_ca=$certs/ca.pem&tls_cert=$certs/client.pem&tls_key=$certs/client-key.pem"
  echo "polybus: secured tansu on 127.0.0.1:$sasl_port (SASL) and :$tls_port (SASL + mTLS via socat) in $((SECONDS - started)) s" >&2
}

