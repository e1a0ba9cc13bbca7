"""Learner -> rollout weight transfer in buckets through Ray's object store.

The learner cuts its (gathered, CPU) state dict into ordered buckets of at most `bucket_mb` MiB
(a single larger tensor travels alone), packs each bucket into ONE flat byte array plus a small
table (name, dtype, shape, offset), puts it in the object store and hands the list of references to
every rollout worker, which fetches and loads them one at a time: peak extra memory on a worker is
one bucket, not a second model. A flat NumPy buffer travels out of band (zero copy on the same
node); a dict of torch tensors would be pickled tensor by tensor, many times slower (measured:
benchmarks/results/README.md, "Trainer").

The transport is a small "channel" with two methods, so a collective path plugs in without touching
the learner or the workers: `send(bucket) -> handle` on the learner's rank 0 and
`receive(handles) -> (name, tensor) iterator` on a worker. ObjectStoreChannel is the one here (CPU,
any node). An NCCL channel (GPU) would keep a process group of learner rank 0 + the rollout engines:
send broadcasts the flat bucket from a CUDA buffer and returns its table (name, dtype, shape, offset);
receive allocates the flat buffer, joins the broadcast and yields the same views.
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


class ObjectStoreChannel:
    """Buckets as flat byte arrays through Ray's object store; a handle is an ObjectRef."""

    @staticmethod
    def send(bucket: Dict[str, torch.Tensor]):
        import ray

        return ray.put(pack_bucket(bucket))

    @staticmethod
    def receive(handles: List) -> Iterator:
        """(name, tensor) of every bucket in order; one bucket in memory at a time (copy the tensors out)."""
        import ray

        for ref in handles:
            packed = ray.get(ref)
            yield from unpack_bucket(packed)
            del packed


def publish(model, bucket_mb: float, gather=None, *, put: bool = True, stats: Optional[dict] = None,
            channel=ObjectStoreChannel) -> List:
    """Send the weights bucket by bucket through `channel`; returns the handles (object refs) in order.

    `gather` (optional) is a context-manager factory that makes a list of parameters whole
    (DeepSpeed ZeRO-3 GatheredParameters, a collective: every rank must walk the same buckets);
    without it the tensors are read as they are. put=False walks (and gathers) without putting:
    the other ranks of a ZeRO-3 world. `stats`, if given, receives "buckets" and
    "resident_peak_bytes": the most full-size parameter bytes held at once while a bucket was
    gathered (the whole model without ZeRO-3; about one bucket plus the persistent small
    parameters with it).
    """
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
            if put:  # pack_bucket copies into one flat buffer (a view into a ZeRO 1-2 flat buffer never travels)
                refs.append(channel.send(bucket))
        count += 1
    if stats is not None:
        stats.update(buckets=count, resident_peak_bytes=peak)
    return refs


def pack_bucket(bucket: Dict[str, torch.Tensor]) -> dict:
    """{"meta": [(name, dtype, shape, offset, nbytes)], "data": uint8 NumPy array} (one copy into the buffer)."""
    meta, offset = [], 0
    for name, t in bucket.items():
        nbytes = t.numel() * t.element_size()
        meta.append((name, str(t.dtype).replace("torch.", ""), tuple(t.shape), offset, nbytes))
        offset += -(-nbytes // 64) * 64  # 64-byte aligned: every dtype can be viewed in place
    flat = torch.empty(offset, dtype=torch.uint8)
    for (_, _, _, off, nbytes), t in zip(meta, bucket.values()):
        if nbytes:
            flat[off:off + nbytes] = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return {"meta": meta, "data": flat.numpy()}


def unpack_bucket(packed: dict) -> Iterator:
    """(name, tensor) views into the packed buffer (read-only memory: copy out, never write)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the object store's buffer is read-only; we only read it
        data = torch.from_numpy(packed["data"])
    for name, dtype, shape, off, nbytes in packed["meta"]:
        yield name, data[off:off + nbytes].view(getattr(torch, dtype)).reshape(shape)


@torch.no_grad()
def load_buckets(model, handles: List, channel=ObjectStoreChannel) -> int:
    """Receive every bucket and copy it into `model` (casting to its dtype/device); returns bytes received."""
    own = model.state_dict()
    received = 0
    for name, t in channel.receive(handles):
        if name not in own:
            raise KeyError(f"weight sync: the rollout model has no tensor {name!r}")
        own[name].copy_(t)
        received += t.numel() * t.element_size()
    return received
