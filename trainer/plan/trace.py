"""Tracing one training step on tensors without data: live memory by category, and FLOPs.

Built on PyTorch's own machinery, not on its `MemTracker`: a probe of the stock
`torch.distributed._tools.mem_tracker.MemTracker` needed fixes for frozen parameters and for a module called twice
per step (the adapters-off reference), and its per-module bookkeeping at every op made an SDXL step crawl.
:class:`StepTracer` is one `TorchDispatchMode` that keeps what a step plan needs and nothing more:

- **memory**: every tensor storage an op creates is counted from its creation until Python frees it (a weak
  reference on the `UntypedStorage`, as `MemTracker` does), under the category and component current at its
  creation (:meth:`StepTracer.phase`); parameters, gradients and optimizer states are registered explicitly
  (:meth:`StepTracer.register`); a gradient moves to ``gradients`` when autograd accumulates it. Sizes are
  rounded up to `granularity` bytes (512: the CUDA caching allocator's smallest block). The peak keeps a
  copy of the per-category totals at that moment and where the step was.
- **FLOPs**: each op in `torch.utils.flop_counter`'s formula registry (the formulas `FlopCounterMode` uses,
  plus CPU's flash attention, which the registry lacks) adds its count to the current phase, in the same
  pass: one trace instead of two (with `FlopCounterMode` and a memory tracker both active, a probe saw the
  memory doubled; here nothing is counted twice). Recomputation under gradient checkpointing is kept apart
  (:func:`checkpoint_func`), so model FLOPs and executed FLOPs are both known.

:func:`cuda_autocast` makes CPU autocast follow CUDA's op lists: CPU autocast runs layer/group norms,
upsampling and reductions in bf16 where CUDA runs them in float32 (and so saves float32 copies for backward).
"""

from __future__ import annotations

import contextlib
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map_only
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop, sdpa_flop
from torch.utils.weak import WeakIdKeyDictionary

CATEGORIES = ("weights", "gradients", "optimizer states", "activations", "temporaries")

aten = torch.ops.aten
# aten's op names start with "_" where they are internal to PyTorch; getattr reads them as the dispatcher names them
CPU_FLASH = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu")  # noqa: B009
CPU_FLASH_BACKWARD = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward")  # noqa: B009
LOCAL_SCALAR = getattr(aten, "_local_scalar_dense").default  # noqa: B009 - `tensor.item()` as dispatched
FLOP_FORMULAS = {
    **flop_registry,
    # CPU's fused attention (what SDPA runs on CPU, fake or real) computes what CUDA's flash attention does
    # (the registered formulas already take tensors)
    CPU_FLASH: sdpa_flop,
    CPU_FLASH_BACKWARD: sdpa_backward_flop,
}


def gemm_4bit_flop(A, B, shapeB, *args, out_val=None, **kwargs) -> int:
    """bitsandbytes' 4-bit matmul (`--quantize nf4`, trainer/quantize.py): A (..., K) times the (N, K) weight."""
    n, k = shapeB
    return 2 * (A.numel() // A.shape[-1]) * n * k


def gemm_4bit_transient(A, B, shapeB, absmax, blocksize, quant_type, bias=None, absmax_8bit=None, *args, **kwargs
                        ) -> int:
    """Bytes bitsandbytes' 4-bit matmul holds inside its kernel, unseen by a dispatch mode: the weight dequantized
    to A's dtype (its CUDA fallback past 1536 rows and its CPU kernel: `_dequant_linear_fallback`,
    `_gemm_4bit_default_impl`), and with double quantization the float32 block scales. Counted whatever the
    row count (CUDA's fused kernel below 1536 rows holds less): an upper bound of one layer's weight."""
    n, k = shapeB
    return n * k * A.element_size() + (4 * absmax_8bit.numel() if absmax_8bit is not None else 0)


def bitsandbytes_ops() -> tuple[dict, dict]:
    """({op: FLOP formula}, {op: bytes held inside}) for bitsandbytes' 4-bit matmul, when bitsandbytes is loaded
    (a quantized model imported it); ({}, {}) otherwise."""
    import sys

    if "bitsandbytes" not in sys.modules:
        return {}, {}
    op = torch.ops.bitsandbytes.gemm_4bit
    return {op: gemm_4bit_flop}, {op: gemm_4bit_transient}


def cpu_attention_formulas() -> dict:
    """CPU's fused-attention formulas as `FlopCounterMode(custom_mapping=...)` takes them (already taking tensors,
    so marked raw: the mode would otherwise wrap them a second time)."""
    out = {}
    for op, formula in ((CPU_FLASH, sdpa_flop), (CPU_FLASH_BACKWARD, sdpa_backward_flop)):
        def raw(*args, formula=formula, **kwargs):
            return formula(*args, **kwargs)
        raw._get_raw = True  # noqa: SLF001 - FlopCounterMode's own flag for formulas that take tensors
        out[op] = raw
    return out


class _Storage:
    __slots__ = ("nbytes", "key")

    def __init__(self, nbytes: int, key: tuple[str, str]):
        self.nbytes, self.key = nbytes, key


class StepTracer(TorchDispatchMode):
    """Live bytes by (category, component), their peak, and FLOPs by phase, of what runs inside it."""

    def __init__(self, granularity: int = 512, memory: bool = True, fake_conditions: bool = False):
        super().__init__()
        self.granularity, self.memory, self.fake_conditions = granularity, memory, fake_conditions
        self.live: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.refs: dict[int, weakref.ref] = {}
        self.totals: dict[tuple[str, str], int] = defaultdict(int)
        self.current = self.peak = 0
        self.peak_totals: dict[tuple[str, str], int] = {}
        self.peak_at = ""
        self.key: tuple[str, str] = ("temporaries", "other")
        self.where = "start"
        self.flops: dict[str, int] = defaultdict(int)
        self.flop_phase = "other"
        self.stack: list = []
        self.formulas, self.transients = FLOP_FORMULAS, {}

    def __enter__(self):
        # looked up when the step starts: the models, built by now, imported bitsandbytes if they are quantized
        bnb_formulas, self.transients = bitsandbytes_ops()
        self.formulas = {**FLOP_FORMULAS, **bnb_formulas}
        return super().__enter__()

    # -- phases ------------------------------------------------------------------------------------------
    def enter(self, category: str, component: str, where: str | None = None, flops: str | None = None) -> None:
        """From now on new storages count as (category, component); `where` names the moment (for the peak),
        `flops` the FLOP phase (default `where`). :meth:`leave` returns to the previous phase."""
        self.stack.append((self.key, self.where, self.flop_phase))
        self.key, self.where = (category, component), where or f"{component} {category}"
        self.flop_phase = flops or self.where

    def leave(self) -> None:
        self.key, self.where, self.flop_phase = self.stack.pop()

    @contextlib.contextmanager
    def phase(self, category: str, component: str, where: str | None = None, flops: str | None = None
              ) -> Iterator[None]:
        self.enter(category, component, where, flops)
        try:
            yield
        finally:
            self.leave()

    # -- memory ------------------------------------------------------------------------------------------
    def _size(self, st: torch.UntypedStorage) -> int:
        n = st.nbytes()
        g = self.granularity
        return -(-n // g) * g if g > 1 else n

    def _add(self, st: torch.UntypedStorage, key: tuple[str, str]) -> None:
        entry = _Storage(self._size(st), key)
        self.live[st] = entry
        ref = weakref.ref(st, lambda r, e=entry: self._free(r, e))
        self.refs[id(ref)] = ref
        self.totals[key] += entry.nbytes
        self.current += entry.nbytes
        if self.current > self.peak:
            self.peak, self.peak_totals, self.peak_at = self.current, dict(self.totals), self.where

    def _free(self, ref: weakref.ref, entry: _Storage) -> None:
        self.refs.pop(id(ref), None)
        self.totals[entry.key] -= entry.nbytes
        self.current -= entry.nbytes

    def register(self, tensors, category: str, component: str) -> None:
        """Count existing tensors (parameters, optimizer states) as (category, component); a storage already
        counted moves there."""
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            entry = self.live.get(st)
            if entry is None:
                self._add(st, (category, component))
            elif entry.key != (category, component):
                self.totals[entry.key] -= entry.nbytes
                entry.key = (category, component)
                self.totals[entry.key] += entry.nbytes

    def watch_gradients(self, params, component: str) -> list:
        """Gradients of `params` count as (gradients, component) once autograd has accumulated them."""
        def hook(p):
            self.register([p.grad], "gradients", component)
        return [p.register_post_accumulate_grad_hook(hook) for p in params]

    # -- dispatch ----------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.fake_conditions and func is LOCAL_SCALAR and args[0].dtype == torch.bool:
            # a fake tensor has no value: a condition on data (the step's "are all pair weights 1?") reads
            # True, what it is for the planned batch; any other read of a value fails as before
            return True
        out = func(*args, **(kwargs or {}))
        formula = self.formulas.get(func.overloadpacket)
        if formula is not None:
            self.flops[self.flop_phase] += int(formula(*args, **(kwargs or {}), out_val=out))
        if self.memory:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    st = t.untyped_storage()
                    if st not in self.live:
                        self._add(st, self.key)
            inside = self.transients.get(func.overloadpacket)
            if inside is not None:  # held inside the op beside its output, freed before it returned
                self._spike(inside(*args, **(kwargs or {})), ("temporaries", "dequantized weights"))
        return out

    def _spike(self, nbytes: int, key: tuple[str, str]) -> None:
        """`nbytes` live for an instant on top of what is live now."""
        n = -(-nbytes // self.granularity) * self.granularity if self.granularity > 1 else nbytes
        if self.current + n > self.peak:
            self.peak, self.peak_totals, self.peak_at = self.current + n, dict(self.totals), self.where
            self.peak_totals[key] = self.peak_totals.get(key, 0) + n

    def summary(self) -> dict[str, dict[str, int]]:
        """At the peak: {category: {component: bytes}} (zeros dropped)."""
        out: dict[str, dict[str, int]] = {c: {} for c in CATEGORIES}
        for (category, component), n in self.peak_totals.items():
            if n:
                out.setdefault(category, {})[component] = n
        return out


def checkpoint_func(tracer_phase: Callable[[], contextlib.AbstractContextManager]) -> Callable:
    """A `gradient_checkpointing_func` for diffusers' `enable_gradient_checkpointing`: exactly its default
    (`torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)`), with the second call of
    each block (the recomputation in backward) run inside `tracer_phase()`."""
    from torch.utils.checkpoint import checkpoint

    def func(module, *args, **kwargs):
        calls = [0]

        def run(*a, **k):
            calls[0] += 1
            if calls[0] == 1:
                return module(*a, **k)
            with tracer_phase():
                return module(*a, **k)

        return checkpoint(run, *args, use_reentrant=False, **kwargs)

    return func


# -- CUDA's autocast op lists on CPU ---------------------------------------------------------------------
# Ops CUDA autocast runs in float32 that CPU autocast leaves in the input's dtype (PyTorch's
# aten/src/ATen/autocast_mode.h, AT_FORALL_FP32 less the losses CPU also casts; checked against the installed
# dispatcher by tests/test_plan.py).
CUDA_FP32 = (
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
    "sinh", "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "softplus", "layer_norm",
    "native_layer_norm", "group_norm", "frobenius_norm.dim", "nuclear_norm", "nuclear_norm.dim",
    "cosine_similarity", "dist", "pdist", "renorm", "logsumexp", "upsample_nearest1d", "_upsample_nearest_exact1d",
    "upsample_nearest2d", "_upsample_nearest_exact2d", "upsample_nearest3d", "_upsample_nearest_exact3d",
    "upsample_linear1d", "upsample_bilinear2d", "_upsample_bilinear2d_aa", "upsample_trilinear3d",
    "upsample_bicubic2d", "_upsample_bicubic2d_aa",
)
# ... and ops CUDA runs with dtype=float32 unless a dtype is given (AT_FORALL_FP32_SET_OPT_DTYPE): where the
# dtype argument sits (an index, or "kw" for keyword-only).
CUDA_FP32_SET_OPT_DTYPE = {
    "softmax.int": 2, "log_softmax.int": 2, "cumprod": "kw", "cumsum": "kw", "linalg_vector_norm": "kw",
    "linalg_matrix_norm": "kw", "linalg_matrix_norm.str_ord": "kw", "sum": "kw", "sum.dim_IntList": "kw",
}


def _eligible(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64


def _fp32_kernel(op):
    def kernel(*args, **kwargs):
        with torch.autocast("cpu", enabled=False):
            args, kwargs = tree_map_only(torch.Tensor, lambda t: t.float() if _eligible(t) else t, (args, kwargs))
            return op(*args, **kwargs)
    return kernel


def _set_opt_dtype_kernel(op, where):
    def kernel(*args, **kwargs):
        with torch.autocast("cpu", enabled=False):
            if args and _eligible(args[0]):
                if where == "kw":
                    kwargs = {**kwargs, "dtype": kwargs.get("dtype") or torch.float32}
                elif len(args) > where and args[where] is None:
                    args = (*args[:where], torch.float32, *args[where + 1:])
                elif len(args) <= where and kwargs.get("dtype") is None:
                    kwargs = {**kwargs, "dtype": torch.float32}
            return op(*args, **kwargs)
    return kernel


def _overload(name: str):
    packet, _, overload = name.partition(".")
    return getattr(getattr(aten, packet), overload or "default")


@contextlib.contextmanager
def cuda_autocast() -> Iterator[None]:
    """While active, CPU autocast casts like CUDA autocast (kernels registered on the AutocastCPU key, removed
    on exit). Autocast itself stays off until a `torch.autocast("cpu", ...)` turns it on."""
    lib = torch.library.Library("aten", "IMPL")
    try:
        for name in CUDA_FP32:
            lib.impl(name, _fp32_kernel(_overload(name)), "AutocastCPU")
        for name, where in CUDA_FP32_SET_OPT_DTYPE.items():
            lib.impl(name, _set_opt_dtype_kernel(_overload(name), where), "AutocastCPU")
        yield
    finally:
        del lib  # its finalizer removes the registrations
