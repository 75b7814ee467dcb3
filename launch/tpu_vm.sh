#!/usr/bin/env bash
# Run a pat_jax command on every worker of a Cloud TPU VM slice.
#
#   launch/tpu_vm.sh NAME ZONE setup                      # once: clone/update repo, venv, jax[tpu]
#   launch/tpu_vm.sh NAME ZONE run -- --config=configs/cifar_convnext_deit.py --workdir=gs://B/run
#   launch/tpu_vm.sh NAME ZONE kill                       # stop stale pat_jax processes (they hold the TPU)
#   launch/tpu_vm.sh NAME ZONE logs                       # tail worker 0's log
#
# `run` starts the same command on all workers, detached, one log per worker in ~/pat_jax.log;
# JAX discovers the pod and calls jax.distributed.initialize() itself (pat_jax.sharding), and
# pat_jax.main refuses to run on CPU when a TPU is present. REPO defaults to this checkout's origin.
set -euo pipefail
NAME=${1:?TPU name}; ZONE=${2:?zone}; CMD=${3:?setup|run|kill|logs}; shift 3
[ "${1:-}" = "--" ] && shift
REPO=${REPO:-$(git config --get remote.origin.url)}
ssh_all() { gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command "$1"; }
case "$CMD" in
  setup)
    ssh_all "set -e; [ -d pat_jax ] || git clone $REPO pat_jax; cd pat_jax && git pull --ff-only;
             python3 -m venv ~/venv && . ~/venv/bin/activate && pip install -q -e '.[tpu]'" ;;
  kill)
    ssh_all "pkill -f 'pat_jax.main' || true; sleep 2; sudo lsof -w /dev/accel0 || true" ;;
  run)
    ARGS=$(printf '%q ' "$@")
    ssh_all "pkill -f 'pat_jax.main' || true; cd pat_jax && . ~/venv/bin/activate &&
             nohup python -m pat_jax.main $ARGS > ~/pat_jax.log 2>&1 &" ;;
  logs)
    gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=0 --command "tail -f ~/pat_jax.log" ;;
  *) echo "unknown command $CMD (setup|run|kill|logs)" >&2; exit 2 ;;
esac
