#!/usr/bin/env bash
# The accelerator checks, as one prepared script (a lent GPU runs it as is; ~8 minutes on an
# H100/H200 with the paper pair):
#
#   launch/device_check.sh [OUT_DIR]          # default $OUT, else ./device_check
#   launch/device_check.sh --dry-run [OUT]    # print the commands only
#
# 1. Step benchmark: PAT, KD and the student alone, bf16 at batch BATCH (128), each program
#    compiled cold into an empty persistent cache; then PAT again from that cache (the
#    restart compile time); PAT in fp32; PAT at 2x and 4x the batch while it fits (the
#    largest that fits). The first PAT line's compile_s is a fresh start's wait (one program:
#    the first step is the same program as the rest).
# 2. Where the time goes: a jax.profiler trace of 5 PAT steps (OUT/profile, for TensorBoard or
#    xprof), summed per op and per source line into the table (pat_jax.profile_summary), and
#    PAT's step split into its parts (`--breakdown`).
# 3. Fast forms (pat_jax/kernels): each op's forms timed alone (OUT/kernels.jsonl), PAT with the
#    CPU's forms, and PAT with the teacher unrolled (teacher.scan_blocks=False).
# Writes OUT/device_check.jsonl (one JSON line per benchmark, a failed one as {"error": ...})
# and OUT/device_check.md (a table), and prints the table. Env: CONFIG (default
# configs/cifar_convnext_deit.py), BATCH (128), STEPS (10), PYTHON (python), STUDENT_ARG (the
# config argument of the student alone: `student`; `none` for configs/digits_demo.py).
# CPU smoke: CONFIG=configs/digits_demo.py STUDENT_ARG=none BATCH=8 STEPS=2 launch/device_check.sh
set -uo pipefail
DRY=0
[ "${1:-}" = "--dry-run" ] && { DRY=1; shift; }
OUT_DIR=${1:-${OUT:-device_check}}
CONFIG=${CONFIG:-configs/cifar_convnext_deit.py}
BATCH=${BATCH:-128}
STEPS=${STEPS:-10}
PY=${PYTHON:-python}
cd "$(dirname "$0")/.."
mkdir -p "$OUT_DIR"
JSONL=$OUT_DIR/device_check.jsonl
CACHE=$OUT_DIR/jax_cache
[ "$DRY" = 1 ] || { : > "$JSONL"; rm -rf "$CACHE" "$OUT_DIR/profile"; }

bench() {  # bench LABEL CONFIG_ARG [bench flags...]: one JSON line, labelled, into $JSONL
  local label=$1 arg=$2; shift 2
  local cmd=("$PY" -m pat_jax.bench "--config=$CONFIG$arg" --json "--steps=$STEPS"
             "--compilation_cache=$CACHE" "$@")
  if [ "$DRY" = 1 ]; then printf '%q ' "${cmd[@]}"; echo; return 0; fi
  echo "== $label" >&2
  local line rc
  line=$("${cmd[@]}" 2> "$OUT_DIR/$label.log" | tail -n 1); rc=${PIPESTATUS[0]}
  if [ "$rc" = 0 ] && [ "${line:0:1}" = "{" ]; then
    printf '{"label": "%s", %s\n' "$label" "${line:1}" >> "$JSONL"
  else
    printf '{"label": "%s", "error": "exit %s, see %s.log"}\n' "$label" "$rc" "$label" >> "$JSONL"
    return 1
  fi
}

B="--config.batch_size=$BATCH"
bench pat_bf16 "" "$B" --config.dtype=bfloat16
bench kd_bf16 ":kd" "$B" --config.dtype=bfloat16
bench student_bf16 ":${STUDENT_ARG:-student}" "$B" --config.dtype=bfloat16
bench pat_bf16_cached "" "$B" --config.dtype=bfloat16   # the same programs: a restart's compile
bench pat_bf16_profiled "" "$B" --config.dtype=bfloat16 --steps=5 "--profile_dir=$OUT_DIR/profile"
bench pat_fp32 "" "$B" --config.dtype=float32
for m in 2 4; do  # the largest batch that fits: stop at the first that does not
  bench "pat_bf16_batch$((BATCH * m))" "" "--config.batch_size=$((BATCH * m))" \
    --config.dtype=bfloat16 || break
done
bench pat_bf16_breakdown "" "$B" --config.dtype=bfloat16 --breakdown --steps=5
# Which form of each op is faster on this backend (pat_jax/kernels: the table's GPU/TPU column
# is reasoned, not yet measured), and PAT with the CPU's forms and with the ConvNeXt teacher's
# blocks unrolled (teacher.scan_blocks=False; on by default).
bench pat_bf16_cpu_forms "" "$B" --config.dtype=bfloat16 --steps=5 \
  "--compilation_cache=$OUT_DIR/jax_cache_forms" \
  --kernels=gelu=rule,depthwise_conv=shift,pointwise_conv=matmul,patchify_conv=matmul,taps_dot=rule
bench pat_bf16_unrolled "" "$B" --config.dtype=bfloat16 --config.teacher.scan_blocks=False
KCMD=("$PY" -m pat_jax.kernels.bench --json "--batch=$BATCH" --dtype=bfloat16 --repeats=5)
if [ "$DRY" = 1 ]; then printf '%q ' "${KCMD[@]}"; echo; exit 0; fi
"${KCMD[@]}" > "$OUT_DIR/kernels.jsonl" 2> "$OUT_DIR/kernels.log" || echo "kernels bench failed" >&2

"$PY" - "$JSONL" "$OUT_DIR/device_check.md" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
head = ['run', 'device', 'batch', 'dtype', 's/step (min-max)', 'img/s', 'MFU', 'compile s',
        'peak GB']
out = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
for r in rows:
  if 'error' in r:
    out.append(f"| {r['label']} | {r['error']} |" + ' |' * (len(head) - 2))
    continue
  num = lambda k, f='{:.1f}': f.format(r[k]) if r.get(k) is not None else '–'
  mfu = f"{100 * r['mfu']:.1f}%" if r.get('mfu') else '–'
  peak = f"{r['peak_bytes'] / 1e9:.2f}" if r.get('peak_bytes') else '–'
  step = (f"{r['step_time_s']:.4f} ({r['step_time_min_s']:.4f}-{r['step_time_max_s']:.4f})"
          if 'step_time_s' in r else '(compile only)')
  out.append(f"| {r['label']} | {r['device']} | {r['batch_size']} | {r['dtype']} | {step} | "
             f"{num('img_per_s', '{:,.0f}')} | {mfu} | {num('compile_s')} | {peak} |")
parts = [r for r in rows if r.get('label') == 'pat_bf16_breakdown' and 'error' not in r]
if parts:
  extra = {k: v for k, v in parts[0].items() if k.endswith('_s') and k not in (
      'step_time_s', 'step_time_min_s', 'step_time_max_s', 'compile_s', 'img_per_s')}
  out += ['', 'PAT step, by part (s): ' + ', '.join(f'{k} {v:.4f}' for k, v in extra.items())]
traced = [r for r in rows if r.get('label') == 'pat_bf16_profiled' and 'error' not in r]
if traced and 'error' not in traced[0].get('profile', {'error': 1}):
  from pat_jax import profile_summary
  out += ['', 'Where the PAT step\'s time goes (traced steps, ms per step; OUT/profile):', '',
          profile_summary.markdown(traced[0]['profile'])]
elif traced:
  out += ['', f"Profile summary: {traced[0].get('profile', {}).get('error', 'missing')}"]
text = '\n'.join(out) + '\n'
open(sys.argv[2], 'w').write(text)
print(text)
EOF
