#!/usr/bin/env bash
# What clients see while lb upgrades itself: wrk with keep-alive and with
# `Connection: close` for 15 s against 2 bundled workers, in rounds that
# alternate a quiet run with one where lb is upgraded 4 times (by
# `lb upgrade` and by SIGUSR2, 3 s apart). Prints wrk's requests, p99, max
# latency and errors per run, and how long each upgrade took to answer.
#   scripts/bench/upgrade.sh [rounds]     (needs wrk; builds nothing: run
#                                          `cargo build --release` first)
set -euo pipefail
rounds=${1:-3}
src=$(cd "$(dirname "$0")/../.." && pwd)/target/release/lb
dir=$(mktemp -d)
port=${PORT:-18090}
trap 'rm -rf "$dir"' EXIT
status_upgrades() {
    "$dir/lb" status --json --control "$dir/c.sock" 2>/dev/null |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["upgrades"])' 2>/dev/null || true
}
run() {
    cp "$src" "$dir/lb"
    "$dir/lb" --listen 127.0.0.1:$port --control "$dir/c.sock" -w 2 2>"$dir/log.$1" &
    local lb=$!
    sleep 1
    wrk -t1 -c50 -d15s --latency "http://127.0.0.1:$port/" >"$dir/ka" 2>&1 &
    local w1=$!
    wrk -t1 -c20 -d15s --latency -H "Connection: close" "http://127.0.0.1:$port/" >"$dir/cl" 2>&1 &
    local w2=$!
    local took=""
    if [ "$1" = upgrades ]; then
        for i in 1 2 3 4; do
            sleep 3
            cp "$src" "$dir/lb.new" && mv "$dir/lb.new" "$dir/lb"
            local n s
            n=$(status_upgrades)
            s=$(date +%s%N)
            if [ $((i % 2)) = 1 ]; then
                "$dir/lb" upgrade --control "$dir/c.sock" >/dev/null
            else
                kill -USR2 $lb
                until [ "$(status_upgrades)" = $((n + 1)) ]; do sleep 0.005; done
            fi
            took="$took $((($(date +%s%N) - s) / 1000000))ms"
        done
    fi
    wait $w1 $w2
    kill -TERM $lb
    wait $lb || echo "lb exited $?"
    for f in ka cl; do
        printf '  %-8s %-10s %s req, p99 %s, max %s, errors: %s\n' "$1" "$f" \
            "$(awk '/requests in/ {print $1}' "$dir/$f")" \
            "$(awk '$1 == "99%" {print $2}' "$dir/$f")" \
            "$(awk '$1 == "Latency" {print $4}' "$dir/$f")" \
            "$(grep -E 'Socket errors|Non-2xx' "$dir/$f" | tr '\n' ' ' || true)"
    done
    [ -n "$took" ] && echo "  upgrades took:$took"
    return 0
}
for r in $(seq 1 "$rounds"); do
    echo "round $r"
    run quiet
    run upgrades
done
