#!/usr/bin/env bash
# Compile every pod config (configs/pods/*.yaml) for v5e-256 and v5p-128 with libtpu on this host
# and keep one JSON report per (config, topology) in experiments/results/pod_compile/.
#
#   make tpu-tools && bash experiments/compile_pods.sh [NAME_FILTER]
#   SIZES="1.3b 760m" bash experiments/compile_pods.sh     # these sizes, in this order
#
# Resumable: a pair whose report exists is skipped, so rerunning picks up where a stopped run
# left off; several copies can run at once (a pair being compiled holds NAME.running).
# Smallest sizes first. Each compile's log (stderr and the printed report) is kept beside its
# JSON; a compile that does not fit (exit 3) still writes its report.
set -u
cd "$(dirname "$0")/.."
OUT=experiments/results/pod_compile
mkdir -p "$OUT"
MEMZOO=${MEMZOO:-.venv/bin/memzoo}
FILTER=${1:-}
for size in ${SIZES:-170m 340m 760m 1.3b}; do
  for family in hybrid_gdn titans_mac mom; do
    cfg=configs/pods/${family}_${size}.yaml
    [[ -n "$FILTER" && "$cfg" != *"$FILTER"* ]] && continue
    for topo in v5e:16x16 v5p:4x4x4; do
      name=${family}_${size}_${topo/:/_}
      [[ -f "$OUT/$name.json" || -f "$OUT/$name.running" ]] && continue
      echo $$ >"$OUT/$name.running"
      echo "$(date -u +%FT%TZ) compiling $name"
      start=$(date +%s)
      JAX_PLATFORMS=cpu "$MEMZOO" compile "$cfg" "topology=$topo" --json "$OUT/$name.json" \
        >"$OUT/$name.log" 2>&1
      code=$?
      rm -f "$OUT/$name.running"
      echo "$(date -u +%FT%TZ) $name exit $code after $(($(date +%s) - start)) s"
    done
  done
done
