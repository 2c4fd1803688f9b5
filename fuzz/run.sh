#!/usr/bin/env bash
# Builds every fuzz target and runs each for a while (default 30 s).
#   fuzz/run.sh                 # all targets, 30 s each
#   FUZZ_SECONDS=600 fuzz/run.sh config_load modbus_rtu
#   FUZZ_SKIP="mqtt_broker" fuzz/run.sh     # all but these
#   FUZZ_RUNS=3000 FUZZ_SEED=1 fuzz/run.sh  # a fixed number of runs from a
#                                           # fixed seed: repeatable (CI)
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`); installs it when
# missing. Works on the stable toolchain: cargo-fuzz passes nightly-only
# flags (-Zsanitizer=address, -Cpasses=sancov-module...), which stable rustc
# accepts with RUSTC_BOOTSTRAP=1.
# The committed seeds in fuzz/corpus/<target> are read only; new inputs go
# to a temporary corpus. A crash leaves its input in
# fuzz/artifacts/<target>/ and makes this script fail.
set -euo pipefail
cd "$(dirname "$0")"
export RUSTC_BOOTSTRAP=1
seconds="${FUZZ_SECONDS:-30}"
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo fuzz list)
fi
echo "== building fuzz targets"
cargo fuzz build
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
failed=()
for t in "${targets[@]}"; do
  # FUZZ_SKIP: space-separated targets not to run (see .ci/run for why).
  if [[ " ${FUZZ_SKIP:-} " == *" $t "* ]]; then
    echo "== skipping $t (FUZZ_SKIP)"
    continue
  fi
  mkdir -p "$work/$t" "corpus/$t"
  if [ -n "${FUZZ_RUNS:-}" ]; then
    opts=(-runs="$FUZZ_RUNS" -seed="${FUZZ_SEED:-0}")
    what="$FUZZ_RUNS runs (seed ${FUZZ_SEED:-random})"
  else
    opts=(-max_total_time="$seconds")
    what="${seconds}s"
  fi
  opts+=(-timeout=10 -rss_limit_mb=2048 -print_final_stats=1)
  case "$t" in
    config_load) opts+=(-max_len=8192 -dict=dict/yaml.dict) ;;
    # -timeout: one input plus the probe; a broker that stops serving
    # fails the probe's own 5 s deadline long before this.
    mqtt_broker) opts+=(-max_len=4096 -detect_leaks=0 -timeout=30) ;;
    *) opts+=(-max_len=4096) ;;
  esac
  echo "== fuzzing $t for $what"
  if ! cargo fuzz run "$t" "$work/$t" "corpus/$t" -- "${opts[@]}" 2>"$work/$t.log"; then
    tail -60 "$work/$t.log"
    failed+=("$t")
  else
    grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb)|^Done' "$work/$t.log" || true
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzzing found problems in: ${failed[*]} (inputs in fuzz/artifacts/)"
  exit 1
fi
echo "fuzzing: ${#targets[@]} targets ran without a finding"
