"""Consistency models in JAX/Flax: CD, CT and successors; sampling, editing, evaluation."""

from setuptools import find_packages, setup

setup(
    name="consistency",
    version="0.1.0",
    description="Consistency Models (Song et al. 2023) and successors in JAX/Flax",
    packages=find_packages(include=["consistency", "consistency.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "ml-collections>=1.0",
        "numpy>=1.26",
    ],
    extras_require={
        "test": ["pytest>=8", "ruff>=0.6"],
    },
)
