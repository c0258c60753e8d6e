#!/usr/bin/env bash
# The main job on embedded defaults: a local broker, a fem-coder agent, and
# tool calls routed through the broker, with their results printed.
#   ./demo.sh             (FEM_DEMO_LISTEN=127.0.0.1:8443 by default)
set -euo pipefail
cd "$(dirname "$0")"

listen="${FEM_DEMO_LISTEN:-127.0.0.1:8443}"
url="https://${listen}"
demo="$PWD/.fem-demo"
# Where cargo puts the binaries (CARGO_TARGET_DIR, when set, moves them).
bin="${CARGO_TARGET_DIR:-$PWD/target}/debug"

echo "==> building fem-broker, fem-coder and fem (cargo build --workspace --bins)"
cargo build --quiet --workspace --bins

rm -rf "$demo"
mkdir -p "$demo/work" "$demo/keys"
echo "this file is inside fem-coder's allowed root" > "$demo/work/hello.txt"

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

wait_for() { # file pattern
  for _ in $(seq 1 300); do
    grep -q "$2" "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "timed out waiting for '$2' in $1:" >&2
  cat "$1" >&2
  return 1
}

echo "==> starting fem-broker --listen $listen (data in $demo/broker)"
"$bin/fem-broker" --listen "$listen" --data-dir "$demo/broker" --broker-id demo-broker \
  >"$demo/broker.log" 2>&1 &
pids+=($!)
wait_for "$demo/broker.log" "fem-broker listening"
grep -o 'fingerprint=[0-9a-f]*' "$demo/broker.log" | sed 's/^/    certificate /'

ca="$demo/broker/tls/ca.pem"
echo "==> starting fem-coder --agent demo-coder (work dir $demo/work, key $demo/keys/agent.key)"
"$bin/fem-coder" --broker "$url" --ca "$ca" --agent demo-coder --work-dir "$demo/work" \
  --key "$demo/keys/agent.key" >"$demo/coder.log" 2>&1 &
pids+=($!)
wait_for "$demo/coder.log" "fem-coder registered"
grep -o 'sandbox level level=[a-z]*.*' "$demo/coder.log" | sed 's/^/    /' 

fem() { "$bin/fem" "$@"; }

echo
echo "==> fem call --capability shell.run --tool shell.run --args '{\"argv\":[\"echo\",\"hello from fem\"]}'"
fem call --broker "$url" --ca "$ca" --capability shell.run --tool shell.run \
  --args '{"argv":["echo","hello from fem"]}'

echo
echo "==> fem call --agent demo-coder --tool code.execute (python)"
fem call --broker "$url" --ca "$ca" --agent demo-coder --tool code.execute \
  --args '{"language":"python","code":"import sys; print(\"python\", sys.version.split()[0], \"says\", 6*7)"}'

echo
echo "==> fem call --agent demo-coder --tool file.read --args '{\"path\":\"hello.txt\"}'"
fem call --broker "$url" --ca "$ca" --agent demo-coder --tool file.read --args '{"path":"hello.txt"}'

echo
echo "==> a refused call: file.read outside the allowed roots (exit code 2, typed error on stderr)"
set +e
fem call --broker "$url" --ca "$ca" --agent demo-coder --tool file.read --args '{"path":"/etc/passwd"}'
status=$?
set -e
if [ "$status" -ne 2 ]; then
  echo "expected exit code 2 for a refused call, got $status" >&2
  exit 1
fi

echo
echo "==> an escape the sandbox refuses: code.execute tries to read the agent's own key"
key="$demo/keys/agent.key"
out=$(fem call --broker "$url" --ca "$ca" --agent demo-coder --tool code.execute \
  --args "{\"language\":\"python\",\"code\":\"print(open('$key').read())\"}")
printf '%s\n' "$out" | python3 -c 'import json, sys
r = json.load(sys.stdin)
print("    sandbox level:", r["sandbox"]["level"], "| exit code:", r["exit_code"])
print("    " + (r["stderr"].strip().splitlines() or [""])[-1])'
if printf '%s' "$out" | grep -q "$(cat "$key")"; then
  echo "the key leaked to the child" >&2
  exit 1
fi

echo
echo "==> fem tools --capability 'shell.*'"
fem tools --broker "$url" --ca "$ca" --capability 'shell.*' | grep -E '"(agentId|name)"'

echo
echo "demo OK (logs in $demo/)"
