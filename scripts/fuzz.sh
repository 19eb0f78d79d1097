#!/usr/bin/env bash
# Builds and runs the fuzz targets in fuzz/ (cargo fuzz, libFuzzer), each for
# a fixed time or a fixed number of executions, and prints per target the
# executions done and their rate. Exits non-zero, naming the target and the
# input that crashed it, if any target finds something (a panic, a failed
# assertion, a hang of more than 10 s on one input, AddressSanitizer).
#
#   scripts/fuzz.sh                      # every target, 60 s each
#   scripts/fuzz.sh --seconds 3          # what ./test.sh runs
#   scripts/fuzz.sh --runs 10000000 virtio_blk emulator
#   scripts/fuzz.sh --runs 10000000 --seconds 1800   # whichever comes first
#   scripts/fuzz.sh --seconds 300 --refresh-seeds i8042
#   scripts/fuzz.sh --list
#
# Toolchain: with a nightly toolchain installed (rustup), the targets are
# built with it and AddressSanitizer. Without one they are built with the
# stable toolchain and `--sanitizer none`: libFuzzer and its coverage
# instrumentation need only stable `-C` flags, and the harnesses' panics,
# assertions and Rust's overflow checks still catch what they catch; only
# ASan's checks of unsafe code (our iovecs into guest memory) are lost.
# VMM_FUZZ_NIGHTLY=0 forces the stable way, =1 the nightly one. cargo-fuzz
# itself is installed if missing.
#
# Corpora: libFuzzer writes what it finds into the first corpus directory,
# so each target runs with a scratch one first (fuzz/corpus-scratch/T,
# kept between runs, not in git) and the committed seeds second
# (fuzz/corpus/T, only read). --refresh-seeds replaces the committed seeds
# with a few inputs from what the run reached (the 32 that add the most
# coverage features, picked greedily from libFuzzer's merge; hand-written
# seeds, those not named by a SHA-1, stay). Crashing
# inputs land in fuzz/artifacts/T/, each target's libFuzzer output in
# fuzz/artifacts/T.log.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//'
}

seconds=
runs=
seed_files=32
# Greedy set cover over a libFuzzer merge control file (line 1: number of
# inputs, line 2: ignored, then their paths; "FT <index> <features...>"
# lines): prints up to k paths, each adding the most features not yet
# covered.
greedy_cover='
NR == 1 { n = $1; next }
NR == 2 { next }
NR <= n + 2 { path[NR - 3] = $0; next }
$1 == "FT" {
    nf[$2] = NF - 2
    for (i = 3; i <= NF; i++) feat[$2, i - 2] = $i
}
END {
    for (round = 0; round < k; round++) {
        best = -1; gain = 0
        for (f in nf) {
            if (f in taken) continue
            g = 0
            for (i = 1; i <= nf[f]; i++) if (!((feat[f, i]) in have)) g++
            if (g > gain) { gain = g; best = f }
        }
        if (best < 0) break
        taken[best] = 1
        for (i = 1; i <= nf[best]; i++) have[feat[best, i]] = 1
        print path[best]
    }
}'

refresh=0
list=0
targets=()
while (($#)); do
    case "$1" in
        --seconds)
            seconds=${2:?--seconds needs a number}
            shift 2
            ;;
        --runs)
            runs=${2:?--runs needs a number}
            shift 2
            ;;
        --refresh-seeds)
            refresh=1
            shift
            ;;
        --list)
            list=1
            shift
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        -*)
            echo "fuzz.sh: unknown option $1 (see --help)" >&2
            exit 2
            ;;
        *)
            targets+=("$1")
            shift
            ;;
    esac
done
if [ -z "$seconds$runs" ]; then
    seconds=60
fi
for n in ${seconds:+"$seconds"} ${runs:+"$runs"}; do
    if ! [[ "$n" =~ ^[0-9]+$ ]] || [ "$n" = 0 ]; then
        echo "fuzz.sh: '$n' is not a positive whole number" >&2
        exit 2
    fi
done

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "==> installing cargo-fuzz (cargo install cargo-fuzz --locked: builds the 'cargo fuzz' subcommand, about a minute)"
    cargo install cargo-fuzz --locked
fi

nightly=${VMM_FUZZ_NIGHTLY:-}
why="VMM_FUZZ_NIGHTLY=0"
if [ -z "$nightly" ]; then
    nightly=0
    why="no nightly toolchain installed"
    if command -v rustup >/dev/null && rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
        nightly=1
    fi
fi
if [ "$nightly" = 1 ]; then
    toolchain=(+nightly)
    sanitizer=address
    flavour="nightly toolchain, AddressSanitizer"
else
    toolchain=()
    sanitizer=none
    flavour="stable toolchain, no sanitizer: $why"
fi
# One target directory per flavour, so that switching does not rebuild.
target_dir="fuzz/target/$sanitizer"
fuzz=(cargo "${toolchain[@]}" fuzz)
build_opts=(--sanitizer "$sanitizer" --target-dir "$target_dir")

all=$("${fuzz[@]}" list)
if ((list)); then
    echo "$all"
    exit 0
fi
if ((${#targets[@]} == 0)); then
    mapfile -t targets <<<"$all"
fi
for t in "${targets[@]}"; do
    if ! grep -qx "$t" <<<"$all"; then
        echo "fuzz.sh: no target '$t'; the targets are:" $all >&2
        exit 2
    fi
done

echo "==> building the fuzz targets ($flavour)"
"${fuzz[@]}" build "${build_opts[@]}"

limit=()
what=()
if [ -n "$runs" ]; then
    limit+=(-runs="$runs")
    what+=("$runs executions")
fi
if [ -n "$seconds" ]; then
    limit+=(-max_total_time="$seconds")
    what+=("$seconds s")
fi
echo "==> fuzzing each target for ${what[0]}${what[1]:+ or ${what[1]}, whichever comes first}"
failed=()
for t in "${targets[@]}"; do
    scratch="fuzz/corpus-scratch/$t"
    seeds="fuzz/corpus/$t"
    artifacts="fuzz/artifacts/$t"
    log="fuzz/artifacts/$t.log"
    mkdir -p "$scratch" "$seeds" "$artifacts"
    start=$(date +%s)
    status=0
    "${fuzz[@]}" run "${build_opts[@]}" "$t" "$scratch" "$seeds" -- \
        "${limit[@]}" -timeout=10 -print_final_stats=1 \
        -artifact_prefix="$artifacts/" >"$log" 2>&1 || status=$?
    elapsed=$(($(date +%s) - start))
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
    if [ "$status" != 0 ]; then
        crash=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)
        echo "FAIL $t after ${execs:-?} executions: ${crash:-no input saved} (log: $log)"
        grep -m1 -A2 -E "panicked at|ERROR: (AddressSanitizer|libFuzzer)" "$log" | sed 's/^/    /' || true
        failed+=("$t")
        continue
    fi
    printf '%-16s %12s executions %8s exec/s %6s s\n' "$t" "${execs:-?}" "${rate:-?}" "$elapsed"
    if ((refresh)); then
        # The inputs of the run, as libFuzzer's merge sees them (features
        # per input), then greedily the few that add the most features:
        # seeds are a starting point, the scratch corpus keeps the rest.
        cover="fuzz/corpus-scratch/$t.cover"
        rm -rf "$cover" "$cover.control"
        mkdir -p "$cover"
        "${fuzz[@]}" run "${build_opts[@]}" "$t" "$cover" "$scratch" "$seeds" -- \
            -set_cover_merge=1 -merge_control_file="$cover.control" >>"$log" 2>&1
        rm -rf "$cover.pick"
        mkdir -p "$cover.pick"
        awk -v k="$seed_files" "$greedy_cover" "$cover.control" |
            while read -r f; do cp "$f" "$cover.pick/"; done
        # Hand-written seeds (not named by libFuzzer's SHA-1) stay.
        find "$seeds" -type f -regextype posix-extended ! -regex '.*/[0-9a-f]{40}' \
            -exec cp {} "$cover.pick/" \;
        rm -rf "$seeds" "$cover" "$cover.control"
        mv "$cover.pick" "$seeds"
        echo "    seeds: $(find "$seeds" -type f | wc -l) files, $(du -sb "$seeds" | cut -f1) bytes"
    fi
done
if ((${#failed[@]})); then
    echo "fuzz.sh: ${#failed[@]} target(s) found a problem: ${failed[*]}" >&2
    exit 1
fi
