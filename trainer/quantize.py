"""`--quantize nf4`: the frozen base's linear weights stored in 4 bits (QLoRA), the LoRA adapters trained in bf16/fp32.

QLoRA (Dettmers et al. 2023, arXiv 2305.14314): every `torch.nn.Linear` of the denoiser keeps its weight as 4-bit
NormalFloat codes in blocks of 64, one absmax scale per block, and the scales themselves quantized to 8 bits in
blocks of 256 ("double quantization": about 4.13 bits per weight in all, against 16 in bf16). A forward
dequantizes one layer's weight to the compute dtype, multiplies and frees it; LoRA adds its low-rank update on
top, and the reference is the same quantized layers with the adapters off. The kernels are bitsandbytes' own
(`bitsandbytes.functional.quantize_4bit`, `bitsandbytes.matmul_4bit`: the library's CPU, CUDA and fake-tensor
implementations).

Why not diffusers' `BitsAndBytesConfig` loading: it refuses to run without a GPU, so neither the planner (fake
tensors) nor the tests here could take the path users take. :class:`NF4Linear` holds bitsandbytes' quantized
data as ordinary parameters and buffers instead of bitsandbytes' `Params4bit` (whose `QuantState` lives outside
the module): so `.to(device)`, the planner's meta and fake tensors, and memory accounting all see every byte,
and one code path serves a run, the planner and its CPU validation. The layer is a `torch.nn.Linear` subclass so
peft wraps it with its standard LoRA layer.
"""

from __future__ import annotations

import torch

from prefpipe.core.errors import PrefpipeError

BLOCKSIZE = 64  # QLoRA's block of 4-bit codes per absmax
NESTED_BLOCKSIZE = 256  # QLoRA's block of 8-bit absmax codes per float32 scale


def bitsandbytes():
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise PrefpipeError("--quantize nf4 needs bitsandbytes: pip install 'prefpipe[quantize]'") from e
    return bnb


class NF4Linear(torch.nn.Linear):
    """A frozen linear layer whose weight is NF4 with double-quantized scales (see the module docstring).

    Parameters and buffers: `weight` (uint8, two 4-bit codes per byte, shape ``(ceil(out*in/2), 1)``, frozen),
    `absmax` (uint8 codes of the per-block scales), `absmax_scale` (float32, one per 256 scales),
    `absmax_code` (the 256-entry 8-bit code), `absmax_offset` (float32 scalar), `bias` (in the weight dtype).
    """

    def __init__(self, in_features: int, out_features: int, compute_dtype: torch.dtype) -> None:
        torch.nn.Module.__init__(self)  # not nn.Linear's: it would allocate a full-precision weight
        self.in_features, self.out_features, self.compute_dtype = in_features, out_features, compute_dtype

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, compute_dtype: torch.dtype, device=None) -> NF4Linear:
        """Quantize `linear`'s weight on `device` (default its own; a meta weight gives meta codes: the planner
        quantizes on the meta device, then gives the codes fake or random tensors). The layer's input and output
        are unchanged but for the rounding of its weight."""
        bnb = bitsandbytes()
        device = torch.device(device) if device is not None else linear.weight.device
        layer = cls(linear.in_features, linear.out_features, compute_dtype)
        weight = linear.weight.detach().to(device)
        packed, state = bnb.functional.quantize_4bit(weight, blocksize=BLOCKSIZE, compress_statistics=False,
                                                     quant_type="nf4", quant_storage=torch.uint8)
        del weight
        # the double quantization of `quantize_4bit(compress_statistics=True)`, with the 8-bit code passed in:
        # bitsandbytes would cache its default code on the first device it meets (the planner's meta device)
        offset = state.absmax.mean()
        scales, nested = bnb.functional.quantize_blockwise(state.absmax - offset, code=dynamic_code(device),
                                                           blocksize=NESTED_BLOCKSIZE)
        layer.weight = torch.nn.Parameter(packed, requires_grad=False)
        layer.register_buffer("absmax", scales)
        layer.register_buffer("absmax_scale", nested.absmax)
        layer.register_buffer("absmax_code", nested.code)
        layer.register_buffer("absmax_offset", offset.reshape(()))
        bias = None
        if linear.bias is not None:
            bias = torch.nn.Parameter(linear.bias.detach().to(device), requires_grad=False)
        layer.bias = bias
        return layer

    def quant_state(self):
        """bitsandbytes' `QuantState` over this layer's own tensors (wherever they are now)."""
        from bitsandbytes.functional import QuantState

        nested = QuantState(absmax=self.absmax_scale, code=self.absmax_code, blocksize=NESTED_BLOCKSIZE,
                            dtype=torch.float32)
        return QuantState(absmax=self.absmax, shape=torch.Size((self.out_features, self.in_features)),
                          blocksize=BLOCKSIZE, quant_type="nf4", dtype=self.compute_dtype,
                          offset=self.absmax_offset, state2=nested)

    def dequantized(self) -> torch.Tensor:
        """The weight as it multiplies, ``(out, in)`` in the compute dtype."""
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(self.weight, self.quant_state()).to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """bitsandbytes' `Linear4bit.forward` (input in the compute dtype, `matmul_4bit`), without its CPU inference
        repacking, and with autocast's output dtype: under autocast the output stays in the compute dtype, as an
        unquantized linear's would (bitsandbytes casts it back to the input's dtype, which after a float32 norm
        stores the activation in float32, twice the bytes); without autocast, the input's dtype."""
        import bitsandbytes as bnb

        dtype = x.dtype
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        out = bnb.matmul_4bit(x.to(self.compute_dtype), self.weight, quant_state=self.quant_state(), bias=bias)
        return out if torch.is_autocast_enabled(x.device.type) else out.to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4, compute {self.compute_dtype}"


_DYNAMIC_CODE: list[torch.Tensor] = []


def dynamic_code(device) -> torch.Tensor:
    """bitsandbytes' 8-bit dynamic code (`create_dynamic_map()`, what `quantize_blockwise` uses by default) on
    `device`; computed once, on the CPU."""
    if not _DYNAMIC_CODE:
        from bitsandbytes.functional import create_dynamic_map

        _DYNAMIC_CODE.append(create_dynamic_map())
    return _DYNAMIC_CODE[0].to(device)


def quantize_linears(model: torch.nn.Module, compute_dtype: torch.dtype, device=None) -> int:
    """Replace every `torch.nn.Linear` of `model` (in place, one at a time, so at most one layer's full weight is
    on `device` beside the codes) by an :class:`NF4Linear` on `device`. Returns how many were replaced."""
    done = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and not isinstance(child, NF4Linear):
                setattr(module, child_name, NF4Linear.from_linear(child, compute_dtype, device))
                done += 1
    return done


def parameter_count(model: torch.nn.Module) -> int:
    """Parameters of `model` as the unquantized model has them: an :class:`NF4Linear` counts its out x in weights
    (its codes hold two per byte) and its bias."""
    total = 0
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            total += module.in_features * module.out_features if isinstance(module, NF4Linear) and name == "weight" \
                else p.numel()
    return total
