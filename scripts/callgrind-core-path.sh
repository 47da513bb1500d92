#!/usr/bin/env bash
# Instructions per message through the core path, counted with callgrind as the
# difference between two message counts (so setup, teardown and machine noise
# cancel out): (Ir(N2) - Ir(N1)) / (N2 - N1), for each pipeline of
# benches/core_path.rs (bare tokio mpsc, polybus without middleware, polybus with
# four pass-through middleware).
#
#   scripts/callgrind-core-path.sh                 # N1=10000 N2=30000, every pipeline
#   N1=5000 N2=15000 scripts/callgrind-core-path.sh polybus4
#   KEEP=1 scripts/callgrind-core-path.sh polybus4 # keep the callgrind.out files
#                                                  # (then: callgrind_annotate <file>)
#   FEATURES=metrics,opentelemetry scripts/callgrind-core-path.sh polybus4 observed4
#       # a build with the observability features: polybusN with the hooks
#       # compiled in and nothing installed, observedN with a Prometheus
#       # recorder and an OpenTelemetry SDK tracer installed
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${HOME:-/tmp}/.cache/polybus-ci-target}"
N1="${N1:-10000}"
N2="${N2:-30000}"
pipelines=("$@")
[ ${#pipelines[@]} -gt 0 ] || pipelines=(raw polybus0 polybus4)

command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }
features=()
[ -z "${FEATURES:-}" ] || features=(--features "$FEATURES")
bin=$(cargo bench --bench core_path "${features[@]}" --no-run --message-format=json 2>/dev/null |
  sed -n 's/.*"executable":"\([^"]*core_path[^"]*\)".*/\1/p' | tail -n 1)
[ -x "$bin" ] || { echo "could not build benches/core_path.rs" >&2; exit 1; }
out="${OUT_DIR:-$(mktemp -d)}"
mkdir -p "$out"

count() { # pipeline messages -> total instructions
  local file="$out/callgrind.out.$1.$2"
  POLYBUS_BENCH_ONLY="$1" POLYBUS_BENCH_MESSAGES="$2" POLYBUS_BENCH_RUNS=1 \
    valgrind --tool=callgrind --callgrind-out-file="$file" "$bin" >/dev/null 2>&1
  sed -n 's/^summary: *\([0-9]*\).*/\1/p' "$file"
}

printf '%-10s %14s %14s %12s\n' pipeline "Ir($N1)" "Ir($N2)" "Ir/message"
for p in "${pipelines[@]}"; do
  a=$(count "$p" "$N1")
  b=$(count "$p" "$N2")
  printf '%-10s %14d %14d %12d\n' "$p" "$a" "$b" $(((b - a) / (N2 - N1)))
done
if [ -n "${KEEP:-}" ]; then
  echo "callgrind files in $out"
else
  rm -rf "$out"
fi
