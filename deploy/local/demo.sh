#!/usr/bin/env bash
# Starts the whole mesh on the embedded default in a fresh data directory, runs the user
# journey against it, stops everything. Exits 0 only if the journey succeeded.
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=.venv/bin
data=$(mktemp -d -t cardcheck-demo.XXXXXX)
export CARDCHECK_DATA_DIR="$data"
log="$data/up.log"

"$bin/cardcheck" up >"$log" 2>&1 &
up=$!
stop() {
  kill -TERM "$up" 2>/dev/null || true
  wait "$up" 2>/dev/null || true
  rm -rf "$data"
}
trap stop EXIT

for _ in $(seq 1 600); do
  if grep -q "all five services SERVING" "$log"; then break; fi
  if ! kill -0 "$up" 2>/dev/null; then
    echo "cardcheck up failed to start the mesh:" >&2
    cat "$log" >&2
    exit 1
  fi
  sleep 0.1
done
grep -q "all five services SERVING" "$log" || { echo "the mesh did not come up:" >&2; cat "$log" >&2; exit 1; }

if ! "$bin/cardcheck" demo; then
  echo >&2; echo "the services' logs:" >&2; cat "$log" >&2
  exit 1
fi
