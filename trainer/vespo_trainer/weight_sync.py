"""Learner -> rollout weight transfer in buckets through Ray's object store.

The learner cuts its (gathered, CPU) state dict into ordered buckets of at most `bucket_mb` MiB
(a single larger tensor travels alone), puts each in the object store and hands the list of
references to every rollout worker, which fetches and loads them one at a time: peak extra memory
on a worker is one bucket, not a second model.
"""
from __future__ import annotations

from typing import Dict, Iterable, Iterator, List

import torch


def iter_buckets(named_tensors: Iterable, bucket_mb: float) -> Iterator[Dict[str, torch.Tensor]]:
    limit = int(bucket_mb * 2**20)
    bucket: Dict[str, torch.Tensor] = {}
    size = 0
    for name, t in named_tensors:
        nbytes = getattr(t, "ds_numel", t.numel()) * t.element_size()  # ZeRO-3: the full size
        if bucket and size + nbytes > limit:
            yield bucket
            bucket, size = {}, 0
        bucket[name] = t
        size += nbytes
    if bucket:
        yield bucket


def publish(model, bucket_mb: float, gather=None) -> List:
    """Put the weights in the object store; returns the bucket refs in order.

    `gather` (optional) is a context-manager factory that makes a list of parameters whole
    (DeepSpeed ZeRO-3 GatheredParameters); without it the tensors are read as they are.
    """
    import ray

    refs, seen = [], set()
    params = dict(model.named_parameters())
    tensors = []
    for name, t in model.state_dict(keep_vars=True).items():
        key = (t.data_ptr(), t.shape) if t.numel() else None
        if key is None or key not in seen:  # tied weights (embedding = lm_head) travel once
            seen.add(key)
            tensors.append((name, t))
    for bucket in iter_buckets(tensors, bucket_mb):
        names = list(bucket)
        ctx = gather([params[n] for n in names if n in params]) if gather else None
        if ctx is not None:
            with ctx:
                refs.append(ray.put({n: bucket[n].detach().to("cpu", copy=True) for n in names}))
        else:
            refs.append(ray.put({n: bucket[n].detach().to("cpu") for n in names}))
    return refs


@torch.no_grad()
def load_buckets(model, refs: List) -> int:
    """Fetch and copy each bucket into `model` (casting to its dtype/device); returns bytes received."""
    import ray

    own = model.state_dict()
    received = 0
    for ref in refs:
        bucket = ray.get(ref)
        for name, t in bucket.items():
            if name not in own:
                raise KeyError(f"weight sync: the rollout model has no tensor {name!r}")
            own[name].copy_(t)
            received += t.numel() * t.element_size()
        del bucket
    return received
