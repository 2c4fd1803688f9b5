#!/usr/bin/env bash
# The Eclipse Paho MQTT interoperability suite (unmodified, one process per
# test, shared/conformance/run-paho.sh) against the gateway's embedded
# broker, on a free port of its own. Fails below Mosquitto 2.0.11's score
# on the same machine (issue 19): MQTT 3.1.1 >= 8 of 10, MQTT 5 >= 21 of 27.
#   .ci/paho.sh [BINARY]      (default target/debug/edgebridge)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/debug/edgebridge}
suite=${PAHO_SUITE:-../shared/conformance}
[ -x "$suite/run-paho.sh" ] || [ -f "$suite/run-paho.sh" ] \
  || { echo "!! the Paho suite is not at $suite (set PAHO_SUITE)" >&2; exit 1; }
need_v3=8
need_v5=21

work=$(mktemp -d)
gw_pid=
cleanup() {
  if [ -n "$gw_pid" ]; then kill "$gw_pid" 2>/dev/null || true; wait "$gw_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat >"$work/config.yaml" <<YAML
gateway: { id: paho, data_dir: $work/data }
broker:
  listeners:
    - { bind: "127.0.0.1:$port", protocol: mqtt }
YAML
"$bin" -c "$work/config.yaml" run >"$work/gateway.log" 2>&1 &
gw_pid=$!
for _ in $(seq 100); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
  sleep 0.1
done
echo "gateway on 127.0.0.1:$port (pid $gw_pid)"
# test_flow_control2 loops forever on brokers that do not close it; 30 s
# is ample for every other test.
PAHO_TIMEOUT=${PAHO_TIMEOUT:-30} bash "$suite/run-paho.sh" 127.0.0.1 "$port" all "$work/logs" \
  | tee "$work/results" | grep -v -E '^v[35]: [0-9]+ passed'
# A test that failed is run once more, alone: two of the v5 tests race their
# own clients (test_subscribe_options and test_request_response publish from
# one client the moment another has *sent* its SUBSCRIBE; whichever packet
# the broker reads first wins). A pass on the second run is reported as such.
while read -r label test rest; do
  case "$rest" in *timeout*) continue ;; esac
  mod=client_test; [ "$label" = v5 ] && mod=client_test5
  if timeout -k 5 "${PAHO_TIMEOUT:-30}" python3 "$suite/paho_one.py" "$mod" "$test" 127.0.0.1 "$port" \
    >"$work/logs/${label}_${test}.retry.log" 2>&1; then
    echo "$label $test PASS (on the second run)" | tee -a "$work/results"
  fi
done < <(grep -E '^v[35] test_[a-z0-9_]+ FAIL' "$work/results")
score() { grep -c "^$1 .* PASS" "$work/results" || true; }
total() { grep "^$1 test" "$work/results" | grep -vc "second run" || true; }
v3=$(score v3); v5=$(score v5)
echo "Paho MQTT 3.1.1: $v3 of $(total v3) (needed: $need_v3)"
echo "Paho MQTT 5:     $v5 of $(total v5) (needed: $need_v5)"
if ! kill -0 "$gw_pid" 2>/dev/null; then
  tail -50 "$work/gateway.log" >&2
  echo "!! the gateway died during the suite" >&2
  exit 1
fi
if [ "$v3" -lt "$need_v3" ] || [ "$v5" -lt "$need_v5" ]; then
  for f in $(grep FAIL "$work/results" | sed -n 's/.*(see \(.*\))/\1/p'); do
    echo "--- $f"; tail -15 "$f"
  done >&2
  echo "!! the embedded broker scores below Mosquitto 2.0.11 on the Paho suite" >&2
  exit 1
fi
