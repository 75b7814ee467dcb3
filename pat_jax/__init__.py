"""pat_jax: PAT (Perspective-Aware Teaching) feature distillation in JAX/Flax."""
__version__ = '0.1.0'
