"""Consistency models in JAX/Flax."""
