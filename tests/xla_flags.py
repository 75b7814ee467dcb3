"""XLA_FLAGS for the test processes (pytest's own and the training runs it starts).

The tests run tiny models for a few steps, so compilation dominates their time. LLVM's
optimisation level 0 roughly halves XLA:CPU's compile time (one 1-device PAT step on the tiny
models: 90 s -> 55 s) and leaves the numbers alone: it changes how fast the generated loops
run, not the floating-point operations they do (XLA:CPU does not use fast-math), and the
golden, parity and trajectory tests pass under it at their usual tolerances.

At level 0, XLA:CPU's older element-wise emitters (`--xla_cpu_use_fusion_emitters=false`)
compile the same fusions faster than its MLIR fusion emitters: the 1-device PAT step of
tests/test_pat.py compiles in about a third less time, and the whole suite takes about two
to three minutes less (docs/BENCHMARKS.md, "Test suite compile flags"). At LLVM's default
level they compile slower, so training keeps the default emitters; only how the element-wise
loops are generated differs, and every test passes at its usual tolerance under both.
"""

FAST_COMPILE = ' '.join(['--xla_backend_optimization_level=0',
                         '--xla_cpu_use_fusion_emitters=false'])


def flags(num_devices: int) -> str:
  """XLA_FLAGS for a process with `num_devices` fake CPU devices."""
  return f'--xla_force_host_platform_device_count={num_devices} {FAST_COMPILE}'
