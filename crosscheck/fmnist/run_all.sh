#!/bin/bash
# Runs the Fashion-MNIST cross-check sequentially (one training process at a time, 1 thread each).
# Usage: bash run_all.sh "0 1 2" "none kd pat"
# Env: PEER_PY (peer venv python), PAT_OFFICIAL_REPO (original code), XCHECK_DATA (export_jax.py
# output), STUDENT (mini_deit, the default, or mini_resmlp; passed as --student), EPOCHS (15).
# Runs go to $OUT and logs to $LOGS: $XCHECK_DATA/runs and $XCHECK_DATA/logs for mini_deit,
# $XCHECK_DATA/runs_mlp and $XCHECK_DATA/logs_mlp for mini_resmlp.
# Finished runs (their JSON exists) are skipped, so the same command continues an interrupted grid.
set -eo pipefail
PY=${PEER_PY:?set PEER_PY to the peer venv python}
: "${PAT_OFFICIAL_REPO:?set PAT_OFFICIAL_REPO to the extracted original PAT code}"
: "${XCHECK_DATA:?set XCHECK_DATA to the export_jax.py output folder}"
HERE=$(cd "$(dirname "$0")" && pwd)
STUDENT=${STUDENT:-mini_deit}
case "$STUDENT" in
  mini_deit) SUFFIX= ;;
  mini_resmlp) SUFFIX=_mlp ;;
  *) echo "unknown STUDENT=$STUDENT (mini_deit or mini_resmlp)" >&2; exit 2 ;;
esac
OUT=${OUT:-$XCHECK_DATA/runs$SUFFIX}
LOGS=${LOGS:-$XCHECK_DATA/logs$SUFFIX}
mkdir -p "$OUT" "$LOGS"
for seed in ${1:-0 1 2}; do
  for m in ${2:-none kd pat}; do
    [ -f "$OUT/${m}_seed${seed}.json" ] && continue
    $PY "$HERE/train_torch.py" --student "$STUDENT" --method $m --seed $seed --epochs "${EPOCHS:-15}" \
      --out "$OUT" 2>&1 \
      | { grep -v -i warn | grep -v "detach()" | grep -v "'loss': float" || true; } \
      > "$LOGS"/${m}_seed${seed}.log
  done
done
