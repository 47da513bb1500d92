#!/usr/bin/env bash
# Heap bytes per delivery a runner holds in backoff, measured with valgrind's
# massif (peak heap) as the difference between two counts, so setup cancels
# out: a runner holding N deliveries in backoff (benches/core_path.rs,
# POLYBUS_BENCH_HELD=N), minus the same N messages only published (the memory
# broker keeps every message in its log by design), per delivery.
#
#   scripts/held-memory.sh            # N1=5000 N2=10000
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${HOME:-/tmp}/.cache/polybus-ci-target}"
N1="${N1:-5000}"
N2="${N2:-10000}"
command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }
bin=$(cargo bench --bench core_path --no-run --message-format=json 2>/dev/null |
  sed -n 's/.*"executable":"\([^"]*core_path[^"]*\)".*/\1/p' | tail -n 1)
[ -x "$bin" ] || { echo "could not build benches/core_path.rs" >&2; exit 1; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

peak() { # mode messages -> "heap extra" at the peak snapshot
  local file="$out/massif.$1.$2"
  POLYBUS_BENCH_HELD="$2" POLYBUS_BENCH_HELD_MODE="$1" \
    valgrind --tool=massif --massif-out-file="$file" "$bin" >/dev/null 2>&1
  awk -F= '/^mem_heap_B/ {h=$2} /^mem_heap_extra_B/ {if (h + $2 > best) {best = h + $2; bh = h; be = $2}} END {print bh, be}' "$file"
}

read -r h1 e1 < <(peak held "$N1")
read -r h2 e2 < <(peak held "$N2")
read -r p1 q1 < <(peak published "$N1")
read -r p2 q2 < <(peak published "$N2")
n=$((N2 - N1))
printf 'held in backoff:  %6d B/delivery requested, %6d B with allocator overhead\n' $(((h2 - h1) / n)) $(((h2 + e2 - h1 - e1) / n))
printf 'published only:   %6d B/message requested,  %6d B with allocator overhead\n' $(((p2 - p1) / n)) $(((p2 + q2 - p1 - q1) / n))
printf 'held minus log:   %6d B/delivery requested, %6d B with allocator overhead\n' \
  $(((h2 - h1 - p2 + p1) / n)) $(((h2 + e2 - h1 - e1 - p2 - q2 + p1 + q1) / n))
