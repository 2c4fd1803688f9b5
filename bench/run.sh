#!/usr/bin/env bash
# The performance suite (issue 8) in one command: builds the release
# binary and runs benches/suite.rs, which prints one table.
#   bench/run.sh                 full run (about 13 minutes; results in BENCHMARKS.md)
#   bench/run.sh --smoke         a few seconds per scenario (CI)
#   bench/run.sh --only long --long 1800   memory scenarios for 30 minutes (outage: 10)
# Extra arguments go to the suite (--messages N, --rounds N, --long SECONDS, --outage SECONDS,
# --only short|long|bridge|latency|pipeline, --smoke).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x /usr/sbin/mosquitto ] || { echo "bench/run.sh needs /usr/sbin/mosquitto" >&2; exit 2; }
if [ "${1:-}" = "--smoke" ] && [ -n "${BENCH_DEBUG:-}" ]; then
  # CI: a debug build is enough to keep the suite working.
  cargo build --locked --bin edgebridge
  exec cargo bench --locked --profile dev --bench suite -- "$@"
fi
cargo build --locked --release --bin edgebridge
exec cargo bench --locked --bench suite -- "$@"
