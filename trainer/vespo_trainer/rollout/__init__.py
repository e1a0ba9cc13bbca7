"""Rollout backends: the interface and the registry (base.py), Hugging Face generate (hf.py), vLLM (vllm.py).
Both return the batch of batch.py."""
