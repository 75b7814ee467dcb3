#!/usr/bin/env bash
# From nothing to a run on every worker of a Cloud TPU VM slice.
#
#   launch/tpu_vm.sh NAME ZONE create            # TPU_TYPE (v4-32), TPU_VERSION, SPOT=1
#   launch/tpu_vm.sh NAME ZONE setup             # this checkout's commit + Python 3.11 venv on all workers
#   launch/tpu_vm.sh NAME ZONE run -- --config=configs/cifar_convnext_deit.py --workdir=/mnt/shared/run
#   launch/tpu_vm.sh NAME ZONE logs [WORKER|all] # follow one worker's log (default 0), or the tail of all
#   launch/tpu_vm.sh NAME ZONE kill              # stop pat_jax on all workers (a stale one holds the TPU)
#   launch/tpu_vm.sh NAME ZONE delete
#   DRY_RUN=1 launch/tpu_vm.sh ...               # print the gcloud commands instead of running them
#
# setup ships the commit you have checked out (git archive HEAD: no credentials on the
# workers, no uncommitted changes) and installs Python 3.11 with uv, because TPU VM images
# ship an older Python without python3-venv. run starts the same command on all workers,
# detached, one log per worker (~/pat_jax.log), with PAT_JAX_DISTRIBUTED=1: JAX finds the
# other workers through the metadata server (pat_jax/sharding.py). The workdir must be a folder
# every worker sees: a bucket (--workdir=gs://BUCKET/run) or a mounted shared filesystem. Re-run
# `run` with the same arguments to resume.
set -euo pipefail
NAME=${1:?usage: launch/tpu_vm.sh NAME ZONE create|setup|run|logs|kill|delete}
ZONE=${2:?zone}
CMD=${3:?create|setup|run|logs|kill|delete}
shift 3
[ "${1:-}" = "--" ] && shift

# pkill -f matches whole command lines, and the remote `bash -c SCRIPT` has SCRIPT in its own:
# no script below may contain the text the pattern matches, or the shell kills itself before
# it starts anything. Hence '[p]at_jax[.]main' (not matched by its own text) and
# `python -m $M.main` with M=pat_jax set on the worker.
# (PAT_JAX_PROCESS: another name to look for; the tests use one that nothing else runs.)
PROC=${PAT_JAX_PROCESS:-pat_jax.main}
PATTERN="[${PROC:0:1}]$(printf %s "${PROC:1}" | sed 's/[.]/[.]/g')"
KILL="pkill -f '$PATTERN' || true"
REMOTE_DIR='$HOME/pat_jax'  # expanded on the worker

do_() {  # run, or print under DRY_RUN=1
  if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}
ssh_workers() {  # ssh_workers WORKER COMMAND
  do_ gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker="$1" --command "$2"
}

remote_script() {  # the shell text each worker runs for CMD (printed by `script` for tests)
  case "$1" in
    setup) cat <<EOF
set -e
command -v uv >/dev/null || [ -x ~/.local/bin/uv ] || curl -LsSf https://astral.sh/uv/install.sh | sh
export PATH=~/.local/bin:\$PATH
rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar xzf ~/pat_jax.tar.gz -C $REMOTE_DIR
[ -x ~/venv/bin/python ] || uv venv --python 3.11 ~/venv
uv pip install --python ~/venv/bin/python -q -e "$REMOTE_DIR[tpu]"
timeout 300 ~/venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.devices()[0].device_kind)' || true
EOF
    ;;
    run) shift; cat <<EOF
$KILL
sleep 1
cd $REMOTE_DIR && M=pat_jax && PAT_JAX_DISTRIBUTED=1 nohup ~/venv/bin/python -m \$M.main $(printf '%q ' "$@")> ~/pat_jax.log 2>&1 < /dev/null &
echo "\$(hostname): started (log ~/pat_jax.log)"
EOF
    ;;
    kill) cat <<EOF
$KILL
sleep 2
pgrep -fa '$PATTERN' && echo "\$(hostname): still running" || echo "\$(hostname): stopped"
EOF
    ;;
  esac
}

case "$CMD" in
  create)
    do_ gcloud compute tpus tpu-vm create "$NAME" --zone "$ZONE" \
      --accelerator-type "${TPU_TYPE:-v4-32}" --version "${TPU_VERSION:-tpu-ubuntu2204-base}" \
      ${SPOT:+--spot} ;;
  delete)
    do_ gcloud compute tpus tpu-vm delete "$NAME" --zone "$ZONE" --quiet ;;
  setup)
    cd "$(dirname "$0")/.."
    git diff --quiet HEAD -- || echo "warning: uncommitted changes are not shipped (git archive HEAD $(git rev-parse --short HEAD))" >&2
    ARCHIVE=$(mktemp -d)/pat_jax.tar.gz
    do_ git archive --format=tar.gz -o "$ARCHIVE" HEAD
    do_ gcloud compute tpus tpu-vm scp "$ARCHIVE" "$NAME":~/pat_jax.tar.gz --zone "$ZONE" --worker=all
    ssh_workers all "$(remote_script setup)" ;;
  run)
    [ $# -gt 0 ] || { echo "run needs pat_jax.main's arguments after --" >&2; exit 2; }
    ssh_workers all "$(remote_script run "$@")" ;;
  kill)
    ssh_workers all "$(remote_script kill)" ;;
  logs)
    W=${1:-0}
    if [ "$W" = all ]; then
      ssh_workers all "tail -n ${LINES:-20} ~/pat_jax.log | sed \"s/^/\$(hostname): /\""
    else
      ssh_workers "$W" "tail -n 100 -f ~/pat_jax.log"
    fi ;;
  script)  # for tests: the text a worker runs
    remote_script "$@" ;;
  *) echo "unknown command $CMD (create|setup|run|logs|kill|delete)" >&2; exit 2 ;;
esac
