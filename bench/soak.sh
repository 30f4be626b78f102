#!/usr/bin/env bash
# The suite on N fresh clones in a row, each exactly as CI runs it (.ci/run: install or the
# cached venv, then `make test`): prints one line per clone and "passed K/N" at the end.
#   bench/soak.sh [N=20] [COMMIT=HEAD]
# A clone's log stays in $SOAK_DIR/<i>.log (default /tmp/t2i-soak) when it fails.
set -uo pipefail
n=${1:-20}
commit=${2:-HEAD}
repo="$(cd "$(dirname "$0")/.." && pwd)"
dir=${SOAK_DIR:-/tmp/t2i-soak}
mkdir -p "$dir"
passed=0
for i in $(seq 1 "$n"); do
  clone="$dir/clone"
  rm -rf "$clone"
  git clone -q --no-local "$repo" "$clone" && git -C "$clone" checkout -q "$commit" || exit 2
  start=$(date +%s)
  if "$clone/.ci/run" > "$dir/$i.log" 2>&1; then
    passed=$((passed + 1))
    result=passed
    rm -f "$dir/$i.log"
  else
    result="FAILED (log $dir/$i.log: $(grep -E '^(FAILED|ERROR)' "$dir/$i.log" | head -3 | tr '\n' ' '))"
  fi
  echo "clone $i/$n: $result in $(( $(date +%s) - start )) s"
done
rm -rf "$dir/clone"
echo "passed $passed/$n on $(git -C "$repo" rev-parse --short "$commit")"
[ "$passed" -eq "$n" ]
