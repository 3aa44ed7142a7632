"""Consistency models in JAX/Flax."""


def __getattr__(name: str):
    """ConsistencyPipeline on first use: `import consistency` stays light."""
    if name == "ConsistencyPipeline":
        from consistency.experiment.pipeline import ConsistencyPipeline

        return ConsistencyPipeline
    raise AttributeError(f"module 'consistency' has no attribute {name!r}")
