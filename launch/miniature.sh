#!/usr/bin/env bash
# The Fashion-MNIST miniature of the paper's tables (docs/RESULTS.md), as one resumable grid.
#
#   bash launch/miniature.sh [ROOT] [PART...]      ROOT default workdirs/miniature
#
# PART: headline (student alone / KD / PAT, ViT and MLP students), methods (FitNet, PAT with the
# quirks corrected), table2 (25/50/75% of the training subset, ViT), table3 (RAA only, AFP only);
# default: all four, in that order. Seeds: SEEDS (default 0,1,2). Every run of a part goes
# through pat_jax.sweep: finished runs are skipped, interrupted ones resume, so the same command
# continues a grid that was stopped (Ctrl-C, a reboot, another session). All runs share one
# teacher (ROOT/teacher). Extra config overrides for every run: EXTRA="--set=num_epochs=5".
# At the end: python -m pat_jax.report ROOT/vit ROOT/mlp --out ROOT/report.
set -euo pipefail
ROOT=${1:-workdirs/miniature}
shift || true
PARTS=${*:-headline methods table2 table3}
SEEDS=${SEEDS:-0,1,2}
PY=${PYTHON:-python}
sweep() {  # sweep CONFIG SUBDIR ARG...
  local config=$1 sub=$2; shift 2
  local args=()
  for a in "$@"; do args+=("--arg=$a"); done
  # shellcheck disable=SC2086  # EXTRA is a list of flags
  $PY -m pat_jax.sweep --config="configs/$config" --workdir="$ROOT/$sub" --seeds="$SEEDS" \
    --set=teacher.workdir="$ROOT/teacher" "${args[@]}" ${EXTRA:-}
}
status=0
for part in $PARTS; do
  case $part in
    headline) sweep fmnist_vit.py vit student kd '' || status=1
              sweep fmnist_mlp.py mlp student kd '' || status=1 ;;
    methods)  sweep fmnist_vit.py vit fitnet corrected || status=1
              sweep fmnist_mlp.py mlp fitnet corrected || status=1 ;;
    table2)   sweep fmnist_vit.py vit fraction=0.25,student fraction=0.25 fraction=0.5,student \
                fraction=0.5 fraction=0.75,student fraction=0.75 || status=1 ;;
    table3)   sweep fmnist_vit.py vit no_afp no_raa || status=1
              sweep fmnist_mlp.py mlp no_afp no_raa || status=1 ;;
    *) echo "unknown part '$part': use headline, methods, table2, table3" >&2; exit 2 ;;
  esac
done
$PY -m pat_jax.report "$ROOT/vit" "$ROOT/mlp" --out "$ROOT/report" || status=1
exit $status
