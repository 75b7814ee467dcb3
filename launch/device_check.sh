#!/usr/bin/env bash
# The accelerator checks, as one prepared script (a lent GPU runs it as is, in one call):
#
#   launch/device_check.sh [OUT_DIR]          # default $OUT, else ./device_check
#   launch/device_check.sh --dry-run [OUT]    # print the commands only
#
# 1. Step benchmark: PAT, KD and the student alone, bf16 at batch BATCH (128), each program
#    compiled cold into an empty persistent cache; then PAT again from that cache (the
#    restart compile time); PAT at 2x and 4x the batch while it fits (the largest that fits);
#    PAT in fp32. The first PAT line's compile_s is a fresh start's wait (one program: the
#    first step is the same program as the rest).
# 2. Where the time goes: a jax.profiler trace of 5 PAT steps, summed per op and per source
#    line into the table (pat_jax.profile_summary), and PAT's step split into its parts
#    (`--breakdown`, last).
# 3. Fast forms (pat_jax/kernels): PAT with the CPU's forms, PAT with the teacher unrolled
#    (teacher.scan_blocks=False), and each op's forms timed alone (OUT/kernels.jsonl).
# The runs go in that order of importance, under one time budget (BUDGET_S, default 450 s: the
# whole script within 8 minutes, inside one 10-minute device call): each run gets at most what
# is left, a run that compiles a new PAT program is not started with less time left than
# pat_bf16 took, and runs after the budget is spent are listed as skipped, so the tables always
# come out. ONLY="label ..." runs just those
# (a second call for what the first skipped; labels as in the table, `kernels` for the forms),
# added to the results and caches already in OUT_DIR and WORK_DIR.
#
# OUT_DIR gets only the results: device_check.jsonl (one JSON line per run; a failed one
# {"error": ...}, a skipped one {"skipped": ...}), device_check.md (the tables, also printed),
# kernels.jsonl, logs.tar.gz (each run's log and output) and profile.tar.gz (the trace, for
# TensorBoard or xprof, when under 15 MB). Caches, logs and the trace are written to WORK_DIR:
# OUT_DIR/work, or /tmp/device_check_work when OUT_DIR is the device tool's $OUT (which brings
# back only a few files).
# Env: CONFIG (configs/cifar_convnext_deit.py), BATCH (128), STEPS (10), PYTHON (python, else
# python3), STUDENT_ARG (the student alone's config argument: `student`; `none` for
# configs/digits_demo.py), BUDGET_S, ONLY, WORK_DIR, MIN_RUN_S (20: a run is not started with
# less time left).
# A machine without pat_jax's pure-Python pins (a lent GPU has JAX, flax and optax, not
# ml_collections): `bash launch/device_wheels.sh` here puts their wheels in .whl/; carry .whl and
# this script installs them under /tmp/site when an import fails (docs/BENCHMARKS.md).
# CPU smoke: CONFIG=configs/digits_demo.py STUDENT_ARG=none BATCH=8 STEPS=2 launch/device_check.sh
set -uo pipefail
DRY=0
[ "${1:-}" = "--dry-run" ] && { DRY=1; shift; }
OUT_DIR=${1:-${OUT:-device_check}}
CONFIG=${CONFIG:-configs/cifar_convnext_deit.py}
BATCH=${BATCH:-128}
STEPS=${STEPS:-10}
BUDGET_S=${BUDGET_S:-450}
ONLY=${ONLY:-}
PY=${PYTHON:-$(command -v python > /dev/null && echo python || echo python3)}
START=$SECONDS
cd "$(dirname "$0")/.."
mkdir -p "$OUT_DIR"
if [ -n "${OUT:-}" ] && [ "$(cd "$OUT_DIR" && pwd -P)" = "$(cd "$OUT" 2> /dev/null && pwd -P)" ]; then
  WORK=${WORK_DIR:-/tmp/device_check_work}
else
  WORK=${WORK_DIR:-$OUT_DIR/work}
fi
JSONL=$OUT_DIR/device_check.jsonl
CACHE=$WORK/jax_cache

# Every import the benchmarks need, checked before any device time goes to compiling.
IMPORTS='import jax, flax, optax, ml_collections, pat_jax.bench, pat_jax.kernels.bench'
if [ "$DRY" = 0 ]; then
  if [ -z "$ONLY" ]; then  # a fresh check; with ONLY the runs are added to the last one's
    rm -rf "$WORK" "$OUT_DIR/kernels.jsonl"; : > "$JSONL"
  fi
  mkdir -p "$WORK"
  if ! "$PY" -c "$IMPORTS" 2> "$WORK/imports.log"; then
    if compgen -G '.whl/*.whl' > /dev/null; then
      echo "installing .whl/*.whl under /tmp/site" >&2
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    if ! "$PY" -c "$IMPORTS" 2> "$WORK/imports.log"; then
      tail -n 3 "$WORK/imports.log" >&2
      echo "device_check: $PY cannot import what the benchmarks need (above). Fetch the" \
        "wheels here with 'bash launch/device_wheels.sh' and carry .whl." >&2
      exit 2
    fi
  fi
fi

wanted() { [ -z "$ONLY" ] || [[ " $ONLY " == *" $1 "* ]]; }

# Seconds a run that compiles a new PAT program needs: once pat_bf16 has run, its wall time
# (start-up, compile, steps) plus a tenth; a run that could not finish in the time left is not
# started, which leaves the time to the cheaper runs after it.
PAT_NEED=0

run() {  # run LABEL NEED OUTFILE CMD...: under the time left; failed or skipped: a line in $JSONL
  local label=$1 need=$2 out=$3; shift 3
  if [ "$DRY" = 1 ]; then printf '%q ' "$@"; echo; return 0; fi
  local t=$((BUDGET_S - (SECONDS - START)))
  if [ "$t" -lt "${MIN_RUN_S:-20}" ]; then  # too little left to compile anything
    printf '{"label": "%s", "skipped": "time budget (BUDGET_S=%s) spent"}\n' "$label" \
      "$BUDGET_S" >> "$JSONL"
    return 1
  fi
  if [ "$t" -lt "$need" ]; then
    printf '{"label": "%s", "skipped": "needs about %s s (as pat_bf16 took), %s s left"}\n' \
      "$label" "$need" "$t" >> "$JSONL"
    return 1
  fi
  echo "== $label (${t} s left)" >&2
  timeout --kill-after=10 "$t" "$@" > "$out" 2> "$WORK/$label.log"
  local rc=$?
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    printf '{"label": "%s", "error": "stopped after %s s, at the end of the time budget"}\n' \
      "$label" "$t" >> "$JSONL"
  elif [ "$rc" != 0 ]; then
    printf '{"label": "%s", "error": "exit %s, see %s.log"}\n' "$label" "$rc" "$label" >> "$JSONL"
  fi
  return "$rc"
}

bench() {  # bench LABEL CONFIG_ARG [bench flags...]: one JSON line, labelled, into $JSONL
  local label=$1 arg=$2; shift 2
  wanted "$label" || return 0
  local need=0  # a new PAT program needs about what pat_bf16 took; the cached ones less
  [ -z "$arg" ] && [ "$label" != pat_bf16_cached ] && [ "$label" != pat_bf16_profiled ] \
    && need=$PAT_NEED
  local began=$SECONDS
  run "$label" "$need" "$WORK/$label.json" "$PY" -m pat_jax.bench "--config=$CONFIG$arg" \
    --json "--steps=$STEPS" "--compilation_cache=$CACHE" "$@" || return 1
  [ "$DRY" = 1 ] && return 0
  [ "$label" = pat_bf16 ] && PAT_NEED=$(((SECONDS - began) * 11 / 10))
  local line; line=$(tail -n 1 "$WORK/$label.json")
  if [ "${line:0:1}" = "{" ]; then
    printf '{"label": "%s", %s\n' "$label" "${line:1}" >> "$JSONL"
  else
    printf '{"label": "%s", "error": "no JSON line, see %s.log"}\n' "$label" "$label" >> "$JSONL"
    return 1
  fi
}

B="--config.batch_size=$BATCH"
bench pat_bf16 "" "$B" --config.dtype=bfloat16
bench kd_bf16 ":kd" "$B" --config.dtype=bfloat16
bench student_bf16 ":${STUDENT_ARG:-student}" "$B" --config.dtype=bfloat16
bench pat_bf16_cached "" "$B" --config.dtype=bfloat16   # the same programs: a restart's compile
bench pat_bf16_profiled "" "$B" --config.dtype=bfloat16 --steps=5 "--profile_dir=$WORK/profile"
for m in 2 4; do  # the largest batch that fits: stop at the first that does not
  bench "pat_bf16_batch$((BATCH * m))" "" "--config.batch_size=$((BATCH * m))" \
    --config.dtype=bfloat16 || break
done
bench pat_fp32 "" "$B" --config.dtype=float32
# Which form of each op is faster on this backend (pat_jax/kernels: the table's GPU/TPU column
# is reasoned, not yet measured): PAT with the CPU's forms and with the ConvNeXt teacher's
# blocks unrolled (teacher.scan_blocks=False; on by default), then each op alone.
bench pat_bf16_cpu_forms "" "$B" --config.dtype=bfloat16 --steps=5 \
  "--compilation_cache=$WORK/jax_cache_forms" \
  --kernels=gelu=rule,depthwise_conv=shift,pointwise_conv=matmul,patchify_conv=matmul,taps_dot=rule
bench pat_bf16_unrolled "" "$B" --config.dtype=bfloat16 --config.teacher.scan_blocks=False
if wanted kernels; then
  run kernels 0 "$OUT_DIR/kernels.jsonl" "$PY" -m pat_jax.kernels.bench --json "--batch=$BATCH" \
    --dtype=bfloat16 --repeats=5
fi
bench pat_bf16_breakdown "" "$B" --config.dtype=bfloat16 --breakdown --steps=5
[ "$DRY" = 1 ] && exit 0

"$PY" - "$JSONL" "$OUT_DIR/device_check.md" "$OUT_DIR/kernels.jsonl" <<'EOF'
import json, os, sys
rows = {}  # by label; a later line (a second call with ONLY) replaces an earlier one in place
for line in open(sys.argv[1]):
  if line.strip():
    row = json.loads(line)
    rows[row['label']] = row
rows = list(rows.values())
head = ['run', 'device', 'batch', 'dtype', 's/step (min-max)', 'img/s', 'MFU', 'compile s',
        'peak GB']
out = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
for r in rows:
  if 'error' in r or 'skipped' in r:
    out.append(f"| {r['label']} | {r.get('error') or 'skipped: ' + r['skipped']} |"
               + ' |' * (len(head) - 2))
    continue
  num = lambda k, f='{:.1f}': f.format(r[k]) if r.get(k) is not None else '–'
  mfu = f"{100 * r['mfu']:.1f}%" if r.get('mfu') else '–'
  peak = f"{r['peak_bytes'] / 1e9:.2f}" if r.get('peak_bytes') else '–'
  step = (f"{r['step_time_s']:.4f} ({r['step_time_min_s']:.4f}-{r['step_time_max_s']:.4f})"
          if 'step_time_s' in r else '(compile only)')
  out.append(f"| {r['label']} | {r['device']} | {r['batch_size']} | {r['dtype']} | {step} | "
             f"{num('img_per_s', '{:,.0f}')} | {mfu} | {num('compile_s')} | {peak} |")
ok = {r['label']: r for r in rows if 'error' not in r and 'skipped' not in r}
split = [f"{label} {r['trace_s']:.1f} + {r['lower_s']:.1f} + {r['backend_compile_s']:.1f} "
         f"(set-up before it {r['setup_s']:.1f}; kept step: {r.get('step_cache', '–')})"
         for label, r in ok.items() if 'trace_s' in r]
if split:
  out += ['', 'Compile s, as tracing + lowering + XLA (or loading from the cache): ' + '; '.join(split)]
if 'pat_bf16_breakdown' in ok:
  from pat_jax import bench
  extra = {k: v for k, v in ok['pat_bf16_breakdown'].items()
           if k.endswith('_s') and k not in bench.RESULT_SECONDS}
  out += ['', 'PAT step, by part (s): ' + ', '.join(f'{k} {v:.4f}' for k, v in extra.items())]
if 'pat_bf16_profiled' in ok:
  profile = ok['pat_bf16_profiled'].get('profile', {'error': 'missing'})
  if 'error' in profile:
    out += ['', f"Profile summary: {profile['error']}"]
  else:
    from pat_jax import profile_summary
    out += ['', 'Where the PAT step\'s time goes (traced steps, ms per step):', '',
            profile_summary.markdown(profile)]
cases = []
if os.path.exists(sys.argv[3]):
  for line in open(sys.argv[3]):
    try:
      case = json.loads(line)
    except ValueError:
      continue  # a line cut off at the end of the budget
    if 'case' in case:
      cases.append(case)
if cases:  # the per-backend table's column for this device (pat_jax/kernels)
  out += ['', 'Each op\'s forms alone (pat_jax.kernels.bench, ms, forward + backward):', '',
          '| case | what | dtype | ms per form | default | fastest |', '|---|---|---|---|---|---|']
  for c in cases:
    forms = ', '.join(f'{k} {v:.3f}' for k, v in c['ms'].items())
    out.append(f"| {c['case']} | {c['what']} | {c['dtype']} | {forms} | {c['default']} | "
               f"{c['fastest']} |")
text = '\n'.join(out) + '\n'
open(sys.argv[2], 'w').write(text)
print(text)
EOF
# The logs and each run's output in one file, the trace in another (the device tool brings
# back a few files only, each under 16 MB).
tar -czf "$OUT_DIR/logs.tar.gz" -C "$WORK" --exclude=jax_cache --exclude=jax_cache_forms \
  --exclude=profile .
if [ -d "$WORK/profile" ]; then
  tar -czf "$WORK/profile.tar.gz" -C "$WORK" profile
  if [ "$(stat -c %s "$WORK/profile.tar.gz")" -lt 15000000 ]; then
    mv "$WORK/profile.tar.gz" "$OUT_DIR/"
  else
    echo "the trace is over 15 MB: left in $WORK/profile" >&2
  fi
fi
