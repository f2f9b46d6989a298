"""Quantized weights: int8 and int4 linear layers, the schemes that describe them in a checkpoint,
and in-memory quantization. (`quantize.py` is the command that writes a quantized checkpoint.)

- int8: symmetric, one scale per output channel: w ~ q * scale, q in [-127, 127].
- int4: asymmetric, one (scale, zero) per group of `groupsize` input channels:
  w ~ (q - 8) * scale + zero, q in [0, 15] -- the formula of PyTorch's packed int4 kernel
  (`_weight_int4pack_mm`, used on CUDA; the CPU has its own kernels, `cpu_kernels.py`).

Every linear layer of the blocks and the LM head is quantized. The embedding is kept in the model's
dtype: decoding reads one of its rows per token, so quantizing it would save memory but no time,
and with tied embeddings the LM head gets its own quantized copy.

The int4 kernels want their weights in a tiled layout that depends on the device and, on CPU, on
the instruction set the kernel was built for, so a file packed on one machine could be silently
wrong on another. The checkpoint therefore stores the plain nibbles (`packing: "u8-nibbles"`,
`packed_for: "any"`: two 4-bit values per byte, even column in the high nibble, the layout the
CUDA packer takes) and the weights are packed for the device when the model is loaded, which takes
well under a second. A checkpoint whose metadata names any other packing is refused.
"""
import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import cpu_kernels
from model import Attention, Linear, Transformer

MODES = ("int8", "int4")
GROUPSIZES = (32, 64, 128, 256)
PACKING = "u8-nibbles"
SCHEME_VERSION = "1"


class SchemeError(ValueError):
    pass


# --- the quantizers (pure functions of a float weight) ---

def quantize_int8(w: torch.Tensor):
    """[out, in] float -> (int8 [out, in], float32 scales [out]), symmetric per output channel."""
    w = w.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-10) / 127
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def quantize_int4(w: torch.Tensor, groupsize: int):
    """[out, in] float, in % groupsize == 0 -> (q uint8 [out, in] in [0, 15],
    scales_and_zeros float32 [in // groupsize, out, 2]) with w ~ (q - 8) * scale + zero."""
    out, k = w.shape
    g = w.float().reshape(out, k // groupsize, groupsize)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scales = ((hi - lo) / 15).clamp(min=1e-10)
    # the kernel's zero is the value of the middle code 8; codes span [lo, hi] exactly
    zeros = lo + 8 * scales
    q = torch.round((g - lo[..., None]) / scales[..., None]).clamp(0, 15).to(torch.uint8)
    return q.reshape(out, k), torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()


def dequantize_int4(q: torch.Tensor, scales_and_zeros: torch.Tensor, groupsize: int) -> torch.Tensor:
    scales = scales_and_zeros[..., 0].t().repeat_interleave(groupsize, dim=1)
    zeros = scales_and_zeros[..., 1].t().repeat_interleave(groupsize, dim=1)
    return (q.float() - 8) * scales + zeros


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in] in [0, 15] -> uint8 [out, in // 2], even columns in the high nibble."""
    return (q[:, ::2] << 4) | q[:, 1::2]


def unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    return torch.stack([p >> 4, p & 15], dim=-1).reshape(p.shape[0], -1)


# --- the modules ---

class Int8Linear(nn.Module):
    """On CPU, `cpu_kernels.int8_linear` (float32 results whatever the model's dtype; up to 16 rows
    with int8 or float32 activations, cpu_kernels.ACTIVATIONS; with int8 ones the weight is packed
    with channels in the vector lanes, cpu_kernels.pack_int8); elsewhere the dequantized product,
    which inductor fuses into the matmul's weight load on CUDA."""

    def __init__(self, in_features: int, out_features: int, dtype=torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))
        self.use_cpu_kernel = False

    def pack(self):
        """Once the weight is final (loaded, sharded): on CPU, the kernels' layout (cpu_kernels.pack_int8)."""
        if self.weight.device.type == "cpu":
            self.use_cpu_kernel = cpu_kernels.load()
            self.register_buffer("scales32", self.scales.float(), persistent=False)
            if self.use_cpu_kernel and self.weight.dim() == 2:
                self.weight = cpu_kernels.pack_int8(self.weight)

    def forward(self, x):
        if x.device.type == "cpu" and self.use_cpu_kernel:
            return cpu_kernels.int8_linear(x, self.weight, self.scales32)
        return F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)


class Int4Linear(nn.Module):
    """Holds the portable nibbles until `pack()` turns them into the kernel's layout for their device
    (CUDA: `_weight_int4pack_mm`'s tiles; CPU: `cpu_kernels.pack_int4`'s layout, multiplied by
    `cpu_kernels.int4_linear`, with activations as for Int8Linear).

    `in_features` is the layer's true width; the stored weight may be zero-padded to a multiple of
    the group size (and at packing time for CUDA, N to a multiple of 16 and K to its tile), and the
    input is padded to match."""

    def __init__(self, in_features: int, out_features: int, groupsize: int, device=None):
        super().__init__()
        self.in_features, self.out_features, self.groupsize = in_features, out_features, groupsize
        k = math.ceil(in_features / groupsize) * groupsize
        self.register_buffer("weight", torch.empty(out_features, k // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales_and_zeros", torch.empty(k // groupsize, out_features, 2, device=device))
        self.packed_for = None  # device type of the kernel layout, once packed

    def pack(self):
        """Converts the nibbles to the int4 kernel layout of the buffers' device."""
        dev = self.weight.device
        q = unpack_nibbles(self.weight)
        sz = self.scales_and_zeros.float()
        if dev.type == "cpu":
            # w = (q - 8) * scale + zero = q * scale + bias
            scales = sz[..., 0].t()
            self.weight, scales, biases = cpu_kernels.pack_int4(q, scales, sz[..., 1].t() - 8 * scales)
            self.register_buffer("scales", scales, persistent=False)
            self.register_buffer("biases", biases, persistent=False)
            del self.scales_and_zeros
            self.use_cpu_kernel = cpu_kernels.load()
        elif dev.type == "cuda":
            n_pad = -self.out_features % 16  # the kernel tiles N by 16
            k_pad = -q.shape[1] % 32  # inner k tiles: 2 x 16 at least
            inner = next(t for t in (8, 4, 2) if (q.shape[1] + k_pad) % (t * 16) == 0)
            q = F.pad(q, (0, k_pad, 0, n_pad), value=8)
            # padded groups dequantize to 0; padded rows are sliced off the output
            extra_groups = (q.shape[1] - sz.shape[0] * self.groupsize) // self.groupsize
            self.scales_and_zeros = F.pad(sz, (0, 0, 0, n_pad, 0, extra_groups)).contiguous()
            self.weight = torch.ops.aten._convert_weight_to_int4pack(pack_nibbles(q.to(torch.uint8)).contiguous(), inner)
        else:
            raise RuntimeError(f"int4 weights are supported on cpu and cuda, not {dev.type}")
        self.k_padded = q.shape[1]  # the input width the packed weight expects
        self.packed_for = dev.type

    def forward(self, x):
        if self.packed_for != x.device.type:
            raise RuntimeError(f"Int4Linear packed for {self.packed_for}, called on {x.device.type}; "
                               "call quantized.pack_model(model) after moving the model")
        if self.k_padded != x.shape[-1]:
            x = F.pad(x, (0, self.k_padded - x.shape[-1]))
        if self.packed_for == "cpu":
            if self.use_cpu_kernel:
                return cpu_kernels.int4_linear(x, self.weight, self.scales, self.biases, self.groupsize)
            w = cpu_kernels.dequantize_int4(self.weight, self.scales, self.biases, self.groupsize)
            return F.linear(x, w.to(x.dtype))
        shape = x.shape
        # the CUDA kernel takes bfloat16 only
        y = torch.ops.aten._weight_int4pack_mm(x.reshape(-1, shape[-1]).to(torch.bfloat16), self.weight,
                                               self.groupsize, self.scales_and_zeros.to(torch.bfloat16))
        return y[:, :self.out_features].reshape(*shape[:-1], self.out_features).to(x.dtype)


# --- whole models ---

def quantized_linears(model: Transformer):
    """(parent module, attribute name, module) for every linear layer that gets quantized."""
    for layer in model.layers:
        for parent, name in ((layer.attention, "wqkv"), (layer.attention, "wo"),
                             (layer.feed_forward, "w13"), (layer.feed_forward, "w2")):
            yield parent, name, getattr(parent, name)
    yield model, "output", model.output


def validate_scheme(scheme: dict) -> dict:
    """Checks a checkpoint's scheme metadata; returns it. Raises SchemeError with the reason."""
    mode = scheme.get("mode", "none")
    if mode == "none":
        return scheme
    if mode not in MODES:
        raise SchemeError(f"unknown weight scheme mode {mode!r}; this build reads none, {', '.join(MODES)}")
    if scheme.get("version") != SCHEME_VERSION:
        raise SchemeError(f"{mode} scheme version {scheme.get('version')!r}; this build reads {SCHEME_VERSION}")
    if mode == "int4":
        if scheme.get("groupsize") not in GROUPSIZES:
            raise SchemeError(f"int4 group size {scheme.get('groupsize')!r} not in {GROUPSIZES}")
        if scheme.get("packing") != PACKING or scheme.get("packed_for") != "any":
            raise SchemeError(
                f"int4 weights packed as {scheme.get('packing')!r} for {scheme.get('packed_for')!r}; this build "
                f"reads the portable {PACKING!r} layout only (kernel layouts differ between devices and CPU "
                "instruction sets); re-run quantize.py on the original checkpoint")
    return scheme


def apply_scheme(model: Transformer, scheme: dict):
    """Replaces the linear layers by empty quantized modules of `scheme` (to be filled by load_state_dict)."""
    mode = validate_scheme(scheme)["mode"]
    if mode == "none":
        return model
    dtype, device = model.norm.weight.dtype, model.norm.weight.device
    for parent, name, lin in quantized_linears(model):
        if mode == "int8":
            new = Int8Linear(lin.in_features, lin.out_features, dtype, device)
        else:
            new = Int4Linear(lin.in_features, lin.out_features, scheme["groupsize"], device)
        setattr(parent, name, new)
    return model


def pack_model(model: Transformer, lanes: bool = True) -> Transformer:
    """Readies every linear layer for its kernel once its weights are final (loaded, sharded), and
    on CPU the attention for the attention kernel. lanes=False keeps float32 weights in their
    [N, K] layout (training; model.Linear)."""
    cpu = model.norm.weight.device.type == "cpu"
    tied = model.tok_embeddings.weight is model.output.weight
    for m in model.modules():
        if isinstance(m, Linear):
            m.pack(lanes)
        elif isinstance(m, (Int4Linear, Int8Linear)):
            m.pack()
        elif isinstance(m, Attention):
            m.use_cpu_kernel = cpu and cpu_kernels.load(quiet=True)
    if tied:
        model.tok_embeddings.weight = model.output.weight  # the one table, in the layout pack chose (Transformer.embed)
    return model


QUANTIZED_SUFFIXES = ("attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2")


def is_quantized_linear(prefix: str) -> bool:
    return prefix == "output" or (prefix.startswith("layers.") and prefix.split(".", 2)[2] in QUANTIZED_SUFFIXES)


def quantize_tensors(get_tensor, keys, tie_word_embeddings: bool, mode: str, groupsize: int = 128,
                     progress=True):
    """Quantizes a state dict one tensor at a time (so a 7B model never sits in memory twice).

    get_tensor(name) returns one stored tensor. Returns (quantized state dict, scheme, names of
    layers whose input width was zero-padded to the group size)."""
    if mode not in MODES:
        raise SchemeError(f"unknown mode {mode!r}; choose from {MODES}")
    if mode == "int4" and groupsize not in GROUPSIZES:
        raise SchemeError(f"int4 group size must be one of {GROUPSIZES}, got {groupsize}")
    keys = list(keys)
    if tie_word_embeddings and "output.weight" not in keys:
        keys.append("output.weight")  # the head gets its own quantized copy of the shared matrix
    state, padded = {}, []
    for key in tqdm(keys, desc=f"quantizing to {mode}", disable=not progress):
        prefix = key.rsplit(".", 1)[0]
        src = "tok_embeddings.weight" if key == "output.weight" and tie_word_embeddings else key
        w = get_tensor(src)
        if not (key.endswith(".weight") and is_quantized_linear(prefix)):
            state[key] = w
        elif mode == "int8":
            q, scales = quantize_int8(w)
            state[key], state[f"{prefix}.scales"] = q, scales.to(w.dtype)
        else:
            k_pad = -w.shape[1] % groupsize
            if k_pad:
                padded.append(prefix)
                w = F.pad(w.float(), (0, k_pad))  # zero columns meet zero-padded inputs
            q, sz = quantize_int4(w, groupsize)
            state[key], state[f"{prefix}.scales_and_zeros"] = pack_nibbles(q), sz
    scheme = {"mode": mode, "version": SCHEME_VERSION, "quantized": "block linears and LM head",
              "embedding": "unquantized"}
    if mode == "int8":
        scheme.update(symmetric=True, granularity="per output channel")
    else:
        scheme.update(groupsize=groupsize, symmetric=False, packing=PACKING, packed_for="any",
                      k_padded_layers=len(padded))
    return state, scheme, padded


def quantize_model(model: Transformer, mode: str, groupsize: int = 128, pack: bool = True) -> Transformer:
    """In-memory quantization of a loaded model (tests, experiments): same result as save + load.
    pack=False leaves int4 weights as nibbles (to be sharded first; then pack_model)."""
    _load_quantized(model, model.state_dict(), mode, groupsize)
    return pack_model(model) if pack else model


def quantized_copy(model: Transformer, mode: str, groupsize: int = 128, n_layers: int | None = None,
                   pack: bool = True) -> Transformer:
    """A quantized copy of the model's layers [0, n_layers) (all by default), final norm and LM
    head: the draft of self-speculation from the model's own weights (`--draft_quantize`). Only the
    quantized linear layers are new memory: the embedding table and the norms are the model's own
    tensors. It gets its own KV cache from setup_caches. pack=False: as in quantize_model."""
    n = model.args.n_layers if n_layers is None else n_layers
    if not 1 <= n <= model.args.n_layers:
        raise ValueError(f"a quantized copy of {n} layers of a {model.args.n_layers}-layer model")
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("layers.") or int(k.split(".")[1]) < n}
    with torch.device("meta"):
        copy = Transformer(dataclasses.replace(model.args, n_layers=n))
    _load_quantized(copy, state, mode, groupsize)
    return pack_model(copy) if pack else copy


def _load_quantized(model: Transformer, state: dict, mode: str, groupsize: int):
    """Quantizes the float state dict `state` into `model` (its linears become quantized modules)."""
    tied = model.args.tie_word_embeddings
    keys = [k for k in state if not (k == "output.weight" and tied)]

    def get(k):  # a float weight packed for the CPU kernel (model.Linear.pack) in its [N, K] layout again
        t = state[k]
        return cpu_kernels.unpack_float(t) if t.dim() == 3 and t.is_floating_point() else t
    quantized, scheme, _ = quantize_tensors(get, keys, tied, mode, groupsize, progress=False)
    apply_scheme(model, scheme)
    if model.tok_embeddings.weight.dim() == 3:  # the table was the packed head's; the state has it as [V, D]
        model.tok_embeddings.weight = nn.Parameter(torch.empty(quantized["tok_embeddings.weight"].shape, device="meta"))
    model.load_state_dict(quantized, strict=True, assign=True)


def parse_quantize(spec: str) -> tuple[str, int]:
    """--quantize's value: int8, int4 (group size 128) or int4-gN -> (mode, groupsize)."""
    if spec == "int8":
        return "int8", 128
    if spec == "int4":
        return "int4", 128
    if spec.startswith("int4-g") and spec[6:].isdigit() and int(spec[6:]) in GROUPSIZES:
        return "int4", int(spec[6:])
    raise SchemeError(f"unknown quantization {spec!r}: int8, int4 or int4-g<N> with N in {GROUPSIZES}")


def scheme_name(mode: str, groupsize: int) -> str:
    return "int8" if mode == "int8" else f"int4-g{groupsize}"
