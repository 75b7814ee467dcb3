#!/bin/bash
# Runs the Fashion-MNIST cross-check sequentially (one training process at a time, 1 thread each).
# Usage: bash run_all.sh "0 1 2" "none kd pat"
# Env: PEER_PY (peer venv python), PAT_OFFICIAL_REPO (original code), XCHECK_DATA (export_jax.py
# output; runs go to $OUT, default $XCHECK_DATA/runs; logs to $XCHECK_DATA/logs), EPOCHS (15).
# Finished runs (their JSON exists) are skipped, so the same command continues an interrupted grid.
set -eo pipefail
PY=${PEER_PY:?set PEER_PY to the peer venv python}
: "${PAT_OFFICIAL_REPO:?set PAT_OFFICIAL_REPO to the extracted original PAT code}"
: "${XCHECK_DATA:?set XCHECK_DATA to the export_jax.py output folder}"
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-$XCHECK_DATA/runs}
mkdir -p "$OUT" "$XCHECK_DATA/logs"
for seed in ${1:-0 1 2}; do
  for m in ${2:-none kd pat}; do
    [ -f "$OUT/${m}_seed${seed}.json" ] && continue
    $PY "$HERE/train_torch.py" --method $m --seed $seed --epochs "${EPOCHS:-15}" --out "$OUT" 2>&1 \
      | { grep -v -i warn | grep -v "detach()" | grep -v "'loss': float" || true; } \
      > "$XCHECK_DATA"/logs/${m}_seed${seed}.log
  done
done
