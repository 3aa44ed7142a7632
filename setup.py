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
        "absl-py",
        "numpy>=1.26",
        "scipy",  # FID's matrix square root (already a jax dependency)
        "ml_dtypes",  # bfloat16 tensors in checkpoints (already a jax dependency)
        # Data: tfds ArrayRecord sources read without TensorFlow, batched by grain.
        "tensorflow-datasets>=4.9",
        "importlib_resources",  # tensorflow-datasets 4.9.10 on Python 3.11 imports it
        "grain>=0.2",
        "scikit-learn",  # the bundled 8x8 digits, the offline dataset
        "pillow",  # image folders, centre crops, PNG grids
        "tensorboardX",  # TensorBoard event files without TensorFlow
    ],
    extras_require={
        # pytest-xdist: the suite on both cores (-n 2; XLA compiles on one core at a time).
        "test": ["pytest>=8", "pytest-xdist>=3.5", "ruff>=0.6"],
    },
)
