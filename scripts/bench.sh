#!/usr/bin/env bash
# One command: install the tools, build lb and the benchmark programs, run
# lb and the alternatives side by side, and write docs/benchmarks.md.
#
#   scripts/bench.sh                       # everything (about 5 minutes)
#   scripts/bench.sh --duration 3          # shorter runs
#   scripts/bench.sh --only "reuseport,lb rr,fdpass-c"
#   scripts/bench.sh --only "lb proxy,haproxy rr,nginx stream,redis"
#   scripts/bench.sh --baseline /path/to/old/lb --only "lb rr,baseline rr" --out /tmp/x.md
#
# Options are passed to scripts/bench/run.py (see --help there). The C
# floor is scripts/bench/fdpass-master.c.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v haproxy >/dev/null || missing+=(haproxy)
command -v nginx >/dev/null || missing+=(nginx)
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || missing+=(libnginx-mod-stream)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v redis-benchmark >/dev/null || missing+=(redis-tools)
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
command -v node >/dev/null || echo "node not found: the node-cluster rows are skipped" >&2

cargo build --release --quiet
out=target/bench
mkdir -p "$out"
gcc -O2 -Wall -o "$out/backend" scripts/bench/backend.c
gcc -O2 -Wall -shared -fPIC -o "$out/alloccount.so" scripts/bench/alloccount.c
gcc -O2 -Wall -o "$out/fdpass-master" scripts/bench/fdpass-master.c
fdpass=(--fdpass "$out/fdpass-master")

exec python3 scripts/bench/run.py --lb target/release/lb --backend "$out/backend" \
    --alloccount "$out/alloccount.so" "${fdpass[@]}" "$@"
