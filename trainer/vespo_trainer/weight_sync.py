"""Learner -> rollout weight transfer in buckets through Ray's object store.

The learner cuts its (gathered, CPU) state dict into ordered buckets of at most `bucket_mb` MiB
(a single larger tensor travels alone), puts each in the object store and hands the list of
references to every rollout worker, which fetches and loads them one at a time: peak extra memory
on a worker is one bucket, not a second model.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterable, Iterator, List, Optional

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


def publish(model, bucket_mb: float, gather=None, *, put: bool = True, stats: Optional[dict] = None) -> List:
    """Put the weights in the object store; returns the bucket refs in order.

    `gather` (optional) is a context-manager factory that makes a list of parameters whole
    (DeepSpeed ZeRO-3 GatheredParameters, a collective: every rank must walk the same buckets);
    without it the tensors are read as they are. put=False walks (and gathers) without putting:
    the other ranks of a ZeRO-3 world. `stats`, if given, receives "buckets" and
    "resident_peak_bytes": the most full-size parameter bytes held at once while a bucket was
    gathered (the whole model without ZeRO-3; about one bucket plus the persistent small
    parameters with it).
    """
    import ray

    refs, seen = [], set()
    params = dict(model.named_parameters())
    tensors = []
    for name, t in model.state_dict(keep_vars=True).items():
        # tied weights (embedding = lm_head) travel once: the same object, or the same storage; a
        # ZeRO-3 parameter is empty outside a gather, so only its identity tells
        key = (t.data_ptr(), tuple(t.shape)) if t.numel() else id(t)
        if key not in seen:
            seen.add(key)
            tensors.append((name, t))
    peak, count = 0, 0
    for bucket in iter_buckets(tensors, bucket_mb):
        names = list(bucket)
        ctx = gather([params[n] for n in names if n in params]) if gather else contextlib.nullcontext()
        with ctx:
            peak = max(peak, sum(p.data.numel() * p.element_size() for p in model.parameters()))
            if put:  # copy: a parameter may be a view into a flat buffer (ZeRO 1-2), which pickles whole
                refs.append(ray.put({n: bucket[n].detach().to("cpu", copy=True) for n in names}))
        count += 1
    if stats is not None:
        stats.update(buckets=count, resident_peak_bytes=peak)
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
