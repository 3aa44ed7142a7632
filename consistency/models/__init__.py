"""Networks: sigma-agnostic Flax modules (they know nothing of noise levels or configs)."""
