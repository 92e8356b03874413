#!/usr/bin/env bash
# Benchmarks wasm-exec against the official wasmtime CLI on the same module (not a timed test;
# never run in CI). Prints wall time per event for:
#   (a) one wasm-exec process per event, compiling the .wasm
#   (b) one wasm-exec process per event, loading a precompiled .cwasm (--trust-precompiled)
#   (k) one wasm-exec process per event, its compiled module loaded from a warm --cache-dir
#       (the verified cache `jobico up` uses: no operator flag, nothing a tenant can plant)
#   (c) N_EVENTS events in one wasm-exec process
#   (w) one `wasmtime run` process per event on the .wasm (the baseline), and (a) as a ratio of it
#   (wp) one `wasmtime run --allow-precompiled` process per event on its own `wasmtime compile`
#       output (the baseline for (b)), and (b) as a ratio of it
#
#   scripts/bench-wasm-exec.sh [RUNS=200] [N_EVENTS=1000]
#
# Environment: MODULE (default samples/echo.wasm, a WASI echo), WASM_EXEC (binary; default the
# static release build, built if missing), WASMTIME (CLI; default: on PATH, else installed with
# `cargo install wasmtime-cli --locked` into target/bench-tools; that takes long on 2 cores),
# SKIP_WASMTIME=1 to skip the baseline. LARGE_KB (default "400 3000"; empty to skip): generated
# modules of about these sizes (the WASI echo plus filler functions, like a real program's
# code), each measured for (a), (b) and (k) over LARGE_RUNS (default 5) runs.
set -euo pipefail

runs="${1:-200}"
n_events="${2:-1000}"
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

module="${MODULE:-samples/echo.wasm}"
target=x86_64-unknown-linux-gnu
wasm_exec="${WASM_EXEC:-target/$target/release/wasm-exec}"
if [[ ! -x "$wasm_exec" ]]; then
    SKIP_DOCKER=1 scripts/build-exec-image.sh
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
data='{"firstName":"Ada","lastName":"Lovelace"}'
event="{\"id\":\"bench\",\"data\":$data}"
printf '%s' "$data" > "$work/data.json"
"$wasm_exec" compile "$module" -o "$work/module.cwasm" --log warn
python3 - "$n_events" "$data" > "$work/events.json" <<'PY'
import json, sys
n, data = int(sys.argv[1]), json.loads(sys.argv[2])
print(json.dumps([{"id": f"event-{i}", "data": data} for i in range(n)]))
PY

# per_run_us STDIN COMMAND...: checks the command works once, then prints its mean wall time
# over $runs runs, in µs, with STDIN as its standard input.
per_run_us() {
    local input="$1" start end
    shift
    "$@" < "$input" > "$work/check.out" 2>&1 || { echo "failed: $*" >&2; cat "$work/check.out" >&2; exit 1; }
    start=$(date +%s%N)
    for ((i = 0; i < runs; i++)); do
        "$@" < "$input" > /dev/null 2>&1
    done
    end=$(date +%s%N)
    echo $(( (end - start) / runs / 1000 ))
}

common=(--events-json "$event" --termination-log /dev/null --log warn)
a=$(per_run_us /dev/null "$wasm_exec" "$module" "${common[@]}")
b=$(per_run_us /dev/null "$wasm_exec" "$work/module.cwasm" --trust-precompiled "${common[@]}")
"$wasm_exec" "$module" --cache-dir "$work/cache" "${common[@]}" > /dev/null 2>&1
k=$(per_run_us /dev/null "$wasm_exec" "$module" --cache-dir "$work/cache" "${common[@]}")

start=$(date +%s%N)
"$wasm_exec" "$work/module.cwasm" --trust-precompiled --events "$work/events.json" --termination-log /dev/null --log warn > "$work/batch.out"
end=$(date +%s%N)
tail -1 "$work/batch.out" | grep -q "\"succeeded\":$n_events," || { echo "batch failed" >&2; exit 1; }
c_total_us=$(( (end - start) / 1000 ))

echo "module: $module ($(stat -c %s "$module") bytes), wasm-exec: $wasm_exec ($(stat -c %s "$wasm_exec") bytes)"
echo "(a) process per event, compiling .wasm:  ${a} µs/event"
echo "(b) process per event, loading .cwasm:    ${b} µs/event"
echo "(k) process per event, from --cache-dir:  ${k} µs/event"
awk -v t="$c_total_us" -v n="$n_events" 'BEGIN {
    printf "(c) %d events in one process:          %.1f µs/event, %.0f events/s (whole process %.1f ms)\n", n, t / n, n / (t / 1e6), t / 1000 }'

# Large modules: compile per process against the compiled form loaded.
large_runs="${LARGE_RUNS:-5}"
for kb in ${LARGE_KB-400 3000}; do
    python3 - "$kb" samples/echo.wat > "$work/large.wat" <<'PY'
import sys
kb, echo = int(sys.argv[1]), open(sys.argv[2]).read().rstrip()
assert echo.endswith(")")
# ~32 bytes of binary per function: enough of them for the size asked.
n = kb * 1024 // 32
body = "".join(
    f"  (func $f{i} (param i32) (result i32)\n"
    f"    (i32.add (i32.mul (local.get 0) (i32.const {i + 3})) (i32.xor (local.get 0) (i32.const {i * 7 + 1})))\n"
    f"    (i32.sub (i32.const {i}))\n"
    f"    (i32.rotl (i32.const 5)))\n"
    for i in range(n))
print(echo[:-1] + body + ")")
PY
    cargo run --quiet --locked -p jobico -- wat2wasm "$work/large.wat" -o "$work/large.wasm"
    "$wasm_exec" compile "$work/large.wasm" -o "$work/large.cwasm" --log warn
    rm -rf "$work/large-cache"
    "$wasm_exec" "$work/large.wasm" --cache-dir "$work/large-cache" "${common[@]}" > /dev/null 2>&1
    saved_runs="$runs"
    runs="$large_runs"
    la=$(per_run_us /dev/null "$wasm_exec" "$work/large.wasm" "${common[@]}")
    lb=$(per_run_us /dev/null "$wasm_exec" "$work/large.cwasm" --trust-precompiled "${common[@]}")
    lk=$(per_run_us /dev/null "$wasm_exec" "$work/large.wasm" --cache-dir "$work/large-cache" "${common[@]}")
    runs="$saved_runs"
    awk -v s="$(stat -c %s "$work/large.wasm")" -v c="$(stat -c %s "$work/large.cwasm")" \
        -v a="$la" -v b="$lb" -v k="$lk" 'BEGIN {
        printf "large module %.0f KB (compiled %.1f MB): (a) compiling %.1f ms, (b) .cwasm %.1f ms, (k) cache %.1f ms per process: (a)/(k) %.0fx\n",
            s / 1024, c / 1048576, a / 1000, b / 1000, k / 1000, a / k }'
done

if [[ "${SKIP_WASMTIME:-0}" == 1 ]]; then
    exit 0
fi
wasmtime="${WASMTIME:-$(command -v wasmtime || true)}"
if [[ -z "$wasmtime" ]]; then
    # 48.0.8: the newest wasmtime that builds with this repository's Rust 1.95.
    cargo install wasmtime-cli --locked --version 48.0.8 --root target/bench-tools
    wasmtime=target/bench-tools/bin/wasmtime
fi
w=$(per_run_us "$work/data.json" "$wasmtime" run "$module")
"$wasmtime" compile "$module" -o "$work/wasmtime.cwasm"
wp=$(per_run_us "$work/data.json" "$wasmtime" run --allow-precompiled "$work/wasmtime.cwasm")
echo "(w)  $("$wasmtime" --version) run, process per event:                      ${w} µs/event"
echo "(wp) $("$wasmtime" --version) run --allow-precompiled .cwasm, process per event: ${wp} µs/event"
awk -v a="$a" -v b="$b" -v w="$w" -v wp="$wp" 'BEGIN {
    printf "ratios (lower is faster): (a)/(w) %.2f, (b)/(w) %.2f, (b)/(wp) %.2f\n", a / w, b / w, b / wp }'
