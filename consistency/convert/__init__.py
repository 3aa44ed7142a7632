"""Readers for official checkpoints (jcm msgpack, cm .pt, diffusers folders)."""
