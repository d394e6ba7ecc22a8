"""Megatron-style tensor parallelism inside a worker group (NCCL on CUDA, gloo on CPU)."""
