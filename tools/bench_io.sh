#!/usr/bin/env bash
# Load + save time and peak memory of one model with qfold (examples/roundtrip.rs, default save
# options), against plain `cp` of the same file, measured with /usr/bin/time -v.
#
# Usage: tools/bench_io.sh [MODEL] [RUNS]
#   MODEL defaults to /tmp/qfold_big/resnet50/model.onnx (about 100 MB), exported by
#   tools/export_torchvision.py when missing; RUNS defaults to 5.
#
# The example is built in the dev profile: dependencies (protobuf among them) are compiled at
# opt-level 3 there, qfold's own code at opt-level 0. Loading and saving spend their time in
# protobuf's parser and writer and in the kernel, so the numbers are close to a release build's,
# without rebuilding tract in release.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

MODEL=${1:-/tmp/qfold_big/resnet50/model.onnx}
RUNS=${2:-5}
PYTHON=${PYTHON:-/work/venv/bin/python}

if [ ! -f "$MODEL" ]; then
    if [ "$MODEL" = /tmp/qfold_big/resnet50/model.onnx ]; then
        "$PYTHON" tools/export_torchvision.py /tmp/qfold_big/ --models resnet50
    else
        echo "no model at $MODEL" >&2
        exit 2
    fi
fi
if [ ! -x /usr/bin/time ]; then
    if [ "$(id -u)" -eq 0 ]; then apt-get update && apt-get install -y time; else sudo apt-get update && sudo apt-get install -y time; fi
fi

cargo build --quiet --example roundtrip
BIN=target/debug/examples/roundtrip
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

# Runs "$@" under /usr/bin/time -v; prints "<wall seconds> <max RSS kB>".
measure() {
    /usr/bin/time -v "$@" 2>"$OUT/time.log" >/dev/null || {
        cat "$OUT/time.log" >&2
        return 1
    }
    awk -F': ' '
        /Elapsed \(wall clock\) time/ {
            n = split($2, p, ":"); s = 0
            for (i = 1; i <= n; i++) s = s * 60 + p[i]
            wall = s
        }
        /Maximum resident set size/ { rss = $2 }
        /^load .* s, save .* s$/ { split($0, q, " "); inner = sprintf(" %s %s", q[2], q[5]) }
        END { printf "%.3f %d%s\n", wall, rss, inner }' "$OUT/time.log"
}

# Median of the first column and max of the second over RUNS measurements of "$@".
bench() {
    local label=$1
    shift
    : >"$OUT/runs"
    for _ in $(seq "$RUNS"); do
        measure "$@" >>"$OUT/runs"
        rm -f "$OUT"/copy.onnx "$OUT"/copy.onnx.data
    done
    sort -n "$OUT/runs" | awk -v label="$label" -v runs="$RUNS" '
        { w[NR] = $1; if ($2 > rss) rss = $2; l[NR] = $3; s[NR] = $4 }
        END {
            m = (NR + 1) / 2
            med = (NR % 2) ? w[m] : (w[NR / 2] + w[NR / 2 + 1]) / 2
            printf "%-16s median wall %6.2f s  max RSS %7.1f MB  (%d runs, %.2f .. %.2f s)",
                label, med, rss / 1024, runs, w[1], w[NR]
            if (l[1] != "") printf "  [median run: load %.2f s, save %.2f s]", l[int(m)], s[int(m)]
            printf "\n"
        }'
}

size=$(stat -c %s "$MODEL")
echo "$MODEL: $((size / 1024 / 1024)) MB ($size bytes)"
cat "$MODEL" >/dev/null # warm the page cache for both
bench "cp" cp "$MODEL" "$OUT/copy.onnx"
bench "qfold load+save" "$BIN" "$MODEL" "$OUT/copy.onnx"
