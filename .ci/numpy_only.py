"""CI stage: the installed wheel in a venv with NumPy and no torch (.ci/run).

import vespo_ext, then the DLPack/NumPy forward and backward on a small case against the NumPy
float64 reference (vespo_ext._doctor), with int64 cu_seqlens and float32/float16 logits; int32
cu_seqlens must either give the same result or be refused with an error naming cu_seqlens
(accepting int32 is another change's; this check passes either way). torch must never load."""
import importlib.util
import sys

import numpy as np

assert importlib.util.find_spec("torch") is None, "this venv must not have torch"
import vespo_ext  # noqa: E402
from vespo_ext import _doctor, dlpack_api  # noqa: E402

print(f"numpy-only: vespo_ext {vespo_ext.__version__} from {vespo_ext.__path__[0]}, numpy {np.__version__}")
c = _doctor.small_case(seed=3)
ok, msg = _doctor.check_dlpack()
print(f"numpy-only: float32 forward+backward vs reference: {msg}")
assert ok, msg

for dtype, budget in ((np.float16, 1e-2),):
    logits = c["logits"].astype(dtype)
    ref_loss, ref_grad = _doctor.reference_vespo_numpy(logits.astype(np.float64), c["labels"], c["old"], c["adv"],
                                                       c["cu"], c["mask"])
    f = dlpack_api.forward(logits, c["labels"], c["old"], c["adv"], c["cu"], mask=c["mask"])
    g = dlpack_api.backward(logits, c["labels"], f, mask=c["mask"])
    assert g.dtype == dtype and g.shape == logits.shape
    err = np.abs(g.astype(np.float64) - ref_grad).max() / np.abs(ref_grad).max()
    lerr = abs(float(f["loss"][0]) - ref_loss) / abs(ref_loss)
    print(f"numpy-only: {np.dtype(dtype).name} logits: loss rel.err {lerr:.1e}, grad err {err:.1e} (budget {budget:g})")
    assert lerr <= 2e-4 and err <= budget

f64 = dlpack_api.forward(c["logits"], c["labels"], c["old"], c["adv"], c["cu"], mask=c["mask"])
try:
    f32 = dlpack_api.forward(c["logits"], c["labels"], c["old"], c["adv"], c["cu"].astype(np.int32), mask=c["mask"])
except (ValueError, TypeError) as exc:
    assert "cu_seqlens" in str(exc), f"an int32 cu_seqlens refusal must name the argument: {exc}"
    print(f"numpy-only: int32 cu_seqlens refused ({exc})")
else:
    assert np.array_equal(f32["loss"], f64["loss"]) and np.array_equal(f32["dlogp"], f64["dlogp"])
    print("numpy-only: int32 cu_seqlens accepted, same result as int64")

try:
    dlpack_api.forward(c["logits"].astype(np.float64), c["labels"], c["old"], c["adv"], c["cu"], mask=c["mask"])
except ValueError as exc:
    assert "logits" in str(exc), exc
else:
    raise AssertionError("float64 logits must be refused")
assert sys.modules.get("torch") is None, "torch was imported"
print("numpy-only: OK")
