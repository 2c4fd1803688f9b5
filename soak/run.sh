#!/usr/bin/env bash
# Fault-injection soak: builds the gateway (debug profile, like the tests)
# and runs soak/soak.py against it. See soak/README.md.
#   soak/run.sh            # short: 3 minutes of faults
#   soak/run.sh 1800       # the full 30-minute soak
#   SOAK_OUT=soak/last soak/run.sh 180   # keep logs and result.json there
set -euo pipefail
cd "$(dirname "$0")/.."
duration="${1:-180}"
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || {
  echo "needs mosquitto and mosquitto-clients (apt-get install mosquitto mosquitto-clients)"; exit 2; }
command -v mosquitto_sub >/dev/null 2>&1 || { echo "needs mosquitto-clients"; exit 2; }
PATH="$PATH:/usr/sbin"
cargo build --locked --bin edgebridge
out_args=()
[ -n "${SOAK_OUT:-}" ] && out_args=(--out "$SOAK_OUT")
exec python3 soak/soak.py --binary target/debug/edgebridge --duration "$duration" "${out_args[@]}"
