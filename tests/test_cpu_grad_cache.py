"""The CPU gradient-buffer cache (ops._CpuGradCache): reuse only when no one else holds the buffer."""
import threading

import pytest
import torch

import vespo_ext
from vespo_ext import ops

pytestmark = pytest.mark.skipif(ops._cpu_grad_cache._free_probe is None,
                                reason="the cache could not calibrate its probe on this torch: it is off")

T, V = 512, 8192  # 16 MiB of fp32 gradient: at the cache's threshold


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, V, generator=g)
    y = torch.randint(0, V, (T,), generator=g)
    old = torch.randn(T, generator=g) - 9.0
    adv = torch.randn(4, generator=g)
    cu = torch.arange(5) * (T // 4)
    return x, y, old, adv, cu


def _grad(x, y, old, adv, cu):
    xr = x.clone().requires_grad_()
    loss = vespo_ext.vespo_loss(xr, y, old, adv, cu_seqlens=cu)
    (g,) = torch.autograd.grad(loss, xr)
    return g


def _ptr(t):
    return t.untyped_storage().data_ptr()


def test_live_gradient_is_never_reused_and_freed_one_is():
    ops.clear_cpu_buffer_cache()
    args = _inputs()
    g1 = _grad(*args)
    expected = g1.clone()
    g2 = _grad(*args)  # g1 is alive: must get other memory
    assert _ptr(g1) != _ptr(g2)
    assert torch.equal(g1, expected) and torch.equal(g2, expected)
    p2 = _ptr(g2)
    del g1, g2
    g3 = _grad(*args)
    assert _ptr(g3) == p2  # the cached buffer came back
    assert torch.equal(g3, expected)


def test_storage_reference_blocks_reuse():
    ops.clear_cpu_buffer_cache()
    args = _inputs(1)
    g = _grad(*args)
    keep = g.untyped_storage()  # only the storage is kept, not the tensor
    p = _ptr(g)
    snapshot = g.clone()
    del g
    g2 = _grad(*_inputs(2))
    assert _ptr(g2) != p
    assert torch.equal(torch.tensor([], dtype=torch.float32).set_(keep).view(T, V), snapshot)


def test_different_inputs_after_reuse_give_their_own_values():
    ops.clear_cpu_buffer_cache()
    a, b = _inputs(3), _inputs(4)
    ga = _grad(*a).clone()
    gb = _grad(*b)  # reuses the buffer of the freed first gradient
    ref_b = vespo_ext.reference.vespo_loss  # the gradient must be b's, not a leftover of a
    xb = b[0].double().requires_grad_()
    (gr,) = torch.autograd.grad(ref_b(xb, b[1], b[2].double(), b[3].double(), cu_seqlens=b[4]), xb)
    assert (gb.double() - gr).abs().max() <= 2e-4 * gr.abs().max()
    assert not torch.equal(ga, gb)


def test_threads_never_share_a_buffer():
    ops.clear_cpu_buffer_cache()
    args = _inputs(5)
    results, errors = [], []

    def work():
        try:
            for _ in range(3):
                results.append(_grad(*args))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    ptrs = [_ptr(g) for g in results]
    assert len(set(ptrs)) == len(ptrs)  # all alive at once: all distinct
    assert all(torch.equal(g, results[0]) for g in results)
