#!/usr/bin/env bash
# Compares two builds of the device harness (not a test): runs OLD and NEW
# devbench binaries in turn, N times each, and prints every row's ratio to
# the host and the device's CPU per request/frame, run by run. A change to
# a device's hot path moves its CPU per frame by a few per cent while runs
# minutes apart differ by more: only binaries taking turns, on a quiet
# machine, tell the two apart.
#   cp target/release/devbench /tmp/devbench-old   # before the change
#   cargo build --release -p tests --bin devbench  # after it
#   scripts/devbench-ab.sh /tmp/devbench-old target/release/devbench 3 --only net --rounds 3 --no-vhost
# Root, as devbench. Needs python3 for the summary.
set -euo pipefail
if [ $# -lt 3 ]; then
    sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
old=$1 new=$2 n=$3
shift 3
vmm="$(dirname "$0")/../${CARGO_TARGET_DIR:-target}/release/vmm"
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for _ in $(seq "$n"); do
    for side in old new; do
        bin=$old
        [ "$side" = new ] && bin=$new
        "$bin" --vmm "$vmm" "$@" | grep -E '^  (net|blk) ' | sed "s/^/$side /"
    done
done >"$out"
python3 - "$out" <<'PY'
import collections, re, sys
rows = collections.defaultdict(lambda: collections.defaultdict(list))
pat = re.compile(r"\s+(.*?)\s{2,}\S+ \S+\s+\S+ \S+\s+(\S+)\s+\S+\s+\S+\s+(\S+) µs\s+\S+ µs")
for line in open(sys.argv[1]):
    side, body = line.split(" ", 1)
    m = pat.match(body)
    if m:
        rows[m.group(1)][side].append((m.group(2), m.group(3)))
for name, sides in rows.items():
    print(name)
    for side in ("old", "new"):
        runs = sides[side]
        print(f"   {side}  ratio {' '.join(r for r, _ in runs):<24} device CPU/op {' '.join(c for _, c in runs)} µs")
PY
