#!/bin/bash
# Instructions a request of one whole gateway worker (server, gateway, upstream client), by
# callgrind: a warm-up, then instrumentation on for one wrk run, off, dumped. Unlike CPU time it
# does not drift with the machine's load; unlike `hotpath.py --instructions` it counts the server.
#
#   bench/worker_instructions.sh CONFIG PORT PATH [HEADER]
#   e.g. bench/worker_instructions.sh /tmp/plain.yaml 18098 /bridge/bench/ "X-Foo: bar"
#
# CONFIG must listen on 127.0.0.1:PORT and reach a running upstream. Needs valgrind and wrk.
# Leaves the callgrind file at $OUT (default /tmp/worker.cg) for `callgrind_annotate`.
set -euo pipefail
CFG=$1 PORT=$2 URLPATH=$3 HEADER=${4:-"X-Bench: 1"} OUT=${OUT:-/tmp/worker.cg}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
valgrind --tool=callgrind --trace-children=yes --instr-atstart=no \
  --callgrind-out-file="$WORK/cg.%p" python -m bridgeway serve --config "$CFG" --workers 1 \
  > "$WORK/log" 2>&1 &
SUPERVISOR=$!
for _ in $(seq 1 120); do curl -sf -o /dev/null "http://127.0.0.1:$PORT/health/ready" && break; sleep 1; done
WORKER=$(pgrep -P "$(pgrep -f "config $CFG" | head -1)" | head -1 || true)
WORKER=${WORKER:-$(pgrep -f "config $CFG" | sort -n | tail -1)}
wrk -t1 -c8 -d5s -H "$HEADER" "http://127.0.0.1:$PORT$URLPATH" > /dev/null
callgrind_control -i on "$WORKER" > /dev/null
RUN=$(wrk -t1 -c8 -d15s -H "$HEADER" "http://127.0.0.1:$PORT$URLPATH")
callgrind_control -i off "$WORKER" > /dev/null
callgrind_control -d "$WORKER" > /dev/null
sleep 1
REQUESTS=$(echo "$RUN" | awk '/requests in/ {print $1}')
FILE=$(ls -t "$WORK"/cg."$WORKER"* | head -1)
IR=$(grep -m1 "^totals:" "$FILE" | awk '{print $2}')
cp "$FILE" "$OUT"
echo "requests=$REQUESTS instructions=$IR per_request=$((IR / REQUESTS)) (callgrind file: $OUT)"
kill -INT "$SUPERVISOR"; wait "$SUPERVISOR" 2>/dev/null || true
