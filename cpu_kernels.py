"""The CPU kernels of the linear layers for a few rows (decode, draft and verify steps): float32,
int8 or int4 weights; float32 activations, or for int8/int4 weights int8 activations.

`cpu_kernels.cpp` is compiled on first use with the C++ compiler torch.compile already needs, for
this machine's instruction set (AVX-512, AVX2 or portable C++), and cached per CPU model and torch
version in torch's extension folder (TORCH_EXTENSIONS_DIR if set): the first load takes about 15
seconds, later ones a fraction of a second. It registers `torch.ops.layerskip_cpu.float_linear`,
`int8_linear`, `int4_linear`, `int8_linear_q8`, `int4_linear_q8`, `attention` (few query rows
over the KV cache) and `argmax`, which compiled graphs call as opaque kernels (their shapes come from the fake
implementations below). Where they
cannot be built (no compiler, LAYERSKIP_CPU_KERNELS=0), the quantized layers fall back to
dequantizing the weights in PyTorch: correct, slow, and said once; float32 layers and attention
fall back to PyTorch's own ops, silently.

float32 layouts (`pack_float`): the weight [N, K] as stored, whose rows the op tiles up to
EXACT_ROWS rows (more: BLAS), or, as `model.Linear.pack` puts every float32 layer it can at load,
L output channels in the vector lanes (L = `float_lanes()`: 16 with AVX-512, 8 with AVX2; N % L
== 0): [N / L, K, L], each row's activation broadcast against L channels' weights at once, every
row count through the tiles (prompts included), each output one running sum over k in order.

int8 layouts (`pack_int8`): [N, K] (rows), or with int8 activations L = `int4_lanes()` channels in
the lanes (N % L == 0, K % 32 == 0): [N / L, K / 4, 4L], byte 4c + j of quad o holding channel c's
weight at input 4o + j; one integer dot multiplies L channels by a row's 4 activation codes.

int4 layouts on the CPU (`pack_int4`), w = code * scale + bias per group of `groupsize` input channels:
- rows: weight [N, K / 2], per row each block of 32 input channels is 16 bytes, byte i holding code
  i in its low nibble and code i + 16 in its high nibble (one 16-byte load unpacks into two vectors
  with a mask and a shift); scales and biases [N, groups].
- L channels in the lanes (L = `int4_lanes()`: 16 in AVX-512 VNNI builds, 8 in AVX2 ones; N % L
  == 0; int8 activations): weight [N / L, K / 8, 4L], 4L bytes per L channels and 8 input channels
  k0 .. k0 + 7, byte 4c + j holding channel c's code at k0 + j (low nibble) and k0 + 4 + j (high);
  scales and biases [N / L, groups, L]. One integer dot (VNNI dpbusd; AVX2 maddubs into int16) then
  multiplies L channels by a row's 4 activation codes at once and needs no horizontal sum: far fewer
  instructions per weight than the rows' layout with int8 activations, which is what a step of
  several rows pays for (cpu_kernels.cpp).

Activations of the int8/int4 layers: LAYERSKIP_CPU_ACTIVATIONS=int8 (the default) or float, read
once, here (ACTIVATIONS). int8: the `_q8` ops quantize each row of x inside the op to int8 in
blocks of 32 values (scale absmax / 127 per block, like llama.cpp's Q8_0) and multiply with
integer dot products (AVX2 maddubs; VNNI dpbusd where built for it, with AVX-512 two blocks per
512-bit instruction; plain loops in the portable build): a one-row step's linears 1.2-1.4x faster
than with float32 activations (AVX2 and AVX-512 builds, int8 and int4 weights), and with AVX-512
VNNI an 8-16-row step's int8 linears 1.4x faster than with 256-bit dots, for +0.2-0.4% perplexity
against float activations (BENCHMARKS.md, "Integer-activation CPU kernels", "Two blocks a
512-bit dot"). float: the weights are converted to
float32 in registers (the `int8_linear` / `int4_linear` ops). Either way the result of a row is
bitwise independent of the rows beside it, and more than EXACT_ROWS rows (prompts) take the same
dequantize + GEMM path with float32 activations.
"""
import hashlib
import os
import platform
import sys

import torch
from torch.utils import cpp_extension

# Up to this many rows the kernels reduce every output in one fixed order (a row's result does not
# depend on the rows beside it); more rows (prompts) go to a dequantize + GEMM path. Where the row
# tiles stop paying off: about 16 rows with AVX2 int4, 40-64 with AVX-512 (BENCHMARKS.md).
EXACT_ROWS = 16
ACTIVATIONS = os.environ.get("LAYERSKIP_CPU_ACTIVATIONS", "int8")  # the module docstring
if ACTIVATIONS not in ("int8", "float"):
    raise ValueError(f"LAYERSKIP_CPU_ACTIVATIONS must be int8 or float, not {ACTIVATIONS!r}")
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_kernels.cpp")
_state: dict = {}


def march() -> str:
    """The instruction set level to build for: LAYERSKIP_CPU_MARCH picks another than this CPU's
    (haswell: AVX2; x86-64: portable C++), e.g. to test those paths, or for a build shared by
    different machines; unset or empty, native."""
    return os.environ.get("LAYERSKIP_CPU_MARCH") or "native"


def _build_name() -> str:
    # -march=native code runs only on CPUs with the builder's instruction set: one build per CPU model
    info = [platform.machine(), torch.__version__, march()]
    try:
        with open("/proc/cpuinfo") as f:
            info += sorted({line.strip() for line in f if line.startswith(("model name", "flags"))})
    except OSError:
        info.append(platform.processor())
    return "layerskip_cpu_" + hashlib.sha1("\n".join(info).encode()).hexdigest()[:12]


def load(quiet: bool = False) -> bool:
    """Builds (the first time on this machine) and loads the kernels. False where they cannot be
    built, said once on stderr unless quiet (float32 layers have a fallback as fast as GEMV, the
    quantized ones dequantize in PyTorch); `reason()` says why."""
    if "ok" not in _state:
        _load()
    if not _state["ok"] and not quiet and not _state.get("said"):
        _state["said"] = True
        print(f"note: the CPU int8/int4 kernels are not available ({reason()}); quantized layers dequantize "
              "their weights on every call instead, which is slow", file=sys.stderr)
    return _state["ok"]


def _load() -> bool:
    _state["ok"], _state["reason"] = False, "disabled by LAYERSKIP_CPU_KERNELS=0"
    if os.environ.get("LAYERSKIP_CPU_KERNELS", "1") == "0":
        return False
    name = _build_name()
    build_dir = os.path.join(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root(), name)
    cflags = ["-O3"]
    if platform.machine() in ("x86_64", "AMD64"):
        cflags.append(f"-march={march()}")
    ldflags = []
    if torch.backends.openmp.is_available():  # at::parallel_for is an OpenMP loop compiled into the kernel
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    try:
        os.makedirs(build_dir, exist_ok=True)
        if not os.path.exists(os.path.join(build_dir, name + ".so")):
            print("building the CPU linear kernels (once per machine, about 15 s) ...", file=sys.stderr)
        cpp_extension.load(name, [SOURCE], extra_cflags=cflags, extra_ldflags=ldflags, build_directory=build_dir,
                           is_python_module=False, verbose=False)
    except Exception as e:  # noqa: BLE001 -- any build failure means: use the fallback, say why
        lines = [line for line in str(e).splitlines() if line.strip()]
        _state["reason"] = f"building {SOURCE} failed: {lines[-1] if lines else type(e).__name__}"
        return False
    torch.library.register_fake("layerskip_cpu::attention")(lambda q, k, v, input_pos: q.new_empty(q.shape))
    torch.library.register_fake("layerskip_cpu::argmax")(lambda x: x.new_empty(x.shape[:-1], dtype=torch.long))
    torch.library.register_fake("layerskip_cpu::float_linear")(
        lambda x, weight: x.new_empty(*x.shape[:-1], weight.shape[0] * (weight.shape[2] if weight.dim() == 3 else 1)))
    torch.library.register_fake("layerskip_cpu::int8_linear")(
        lambda x, weight, scales: x.new_empty(*x.shape[:-1], scales.numel()))
    torch.library.register_fake("layerskip_cpu::int4_linear")(
        lambda x, weight, scales, biases, groupsize: x.new_empty(*x.shape[:-1], _int4_out(weight)))
    torch.library.register_fake("layerskip_cpu::int8_linear_q8")(
        lambda x, weight, scales: x.new_empty(*x.shape[:-1], scales.numel()))
    torch.library.register_fake("layerskip_cpu::int4_linear_q8")(
        lambda x, weight, scales, biases, groupsize: x.new_empty(*x.shape[:-1], _int4_out(weight)))
    _tag_compile_caches()
    _state["ok"], _state["reason"] = True, ""
    return True


def _tag_compile_caches():
    """Adds a hash of these kernels' sources to torch.compile's cache keys: inductor's caches do not
    see a custom op's fake implementation, so a graph compiled against an older one (another output
    shape) would be reused and fail its shape checks."""
    digest = hashlib.sha1()
    for path in (SOURCE, os.path.abspath(__file__)):
        with open(path, "rb") as f:
            digest.update(f.read())
    tag = f"layerskip_cpu_{digest.hexdigest()[:12]}"
    config = getattr(torch.compiler, "config", None)
    if config is not None and hasattr(config, "cache_key_tag") and tag not in config.cache_key_tag:
        config.cache_key_tag += tag


def _int4_out(weight: torch.Tensor) -> int:
    """Output channels of an int4 weight in either layout (pack_int4)."""
    return weight.shape[0] * (weight.shape[2] // 4) if weight.dim() == 3 else weight.shape[0]


def reason() -> str:
    return _state.get("reason", "not loaded yet")


def built_for_this_cpu() -> bool:
    """Whether the kernels are loaded and were built for this machine's own instruction sets
    (-march=native, no LAYERSKIP_CPU_MARCH)."""
    return march() == "native" and load(quiet=True)


def isa() -> str:
    """The instruction set the kernels were built for: avx512, avx2 or portable, with "+vnni" where
    the integer dots of the _q8 ops use VNNI (with AVX-512: two blocks of 32 per dot instruction)."""
    return torch.ops.layerskip_cpu.isa() if load() else "none"


def batched_step(x: torch.Tensor) -> bool:
    """Whether x [B, T, K] is a step of several sequences (decode, draft or verify: each T <=
    EXACT_ROWS rows, B > 1) rather than a prompt: its rows must stay independent of each other
    however many there are in all (exact batching)."""
    return x.dim() == 3 and x.shape[0] > 1 and x.shape[1] <= EXACT_ROWS


def _rows(op, x: torch.Tensor, *args) -> torch.Tensor:
    """op over the rows of x [..., K]. A batched step goes as [B, T, K], which the ops run through
    their row tiles however many rows there are (each reduced in the kernels' fixed order, in one
    pass over the weights: 64 rows in chunks of 16 read them four times); anything else as [M, K],
    more than EXACT_ROWS rows of which (a prompt) take the GEMM."""
    if batched_step(x):
        return op(x, *args)
    return op(x.reshape(-1, x.shape[-1]), *args).reshape(*x.shape[:-1], -1)


def float_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] float32 @ float32 weight.T, the weight [N, K] or in the lanes layout (pack_float).
    [N, K]: through the row tiles, more than EXACT_ROWS rows that are not a batched step through
    BLAS; lanes: every row count through the tiles (the op's choice), each row independent of the
    others."""
    return _rows(torch.ops.layerskip_cpu.float_linear, x, weight)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor,
                activations: str | None = None) -> torch.Tensor:
    """x [..., K] (any float dtype) @ (int8 weight [N, K] * float32 scales [N]).T, in float32, with
    int8 or float32 activations (`activations`, default ACTIVATIONS) for up to EXACT_ROWS rows."""
    ops = torch.ops.layerskip_cpu
    op = ops.int8_linear_q8 if (activations or ACTIVATIONS) == "int8" else ops.int8_linear
    return _rows(op, x.float(), weight, scales).to(x.dtype)


def int4_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor,
                groupsize: int, activations: str | None = None) -> torch.Tensor:
    """x [..., K] @ the int4 weight (module docstring) .T, as int8_linear."""
    ops = torch.ops.layerskip_cpu
    op = ops.int4_linear_q8 if (activations or ACTIVATIONS) == "int8" else ops.int4_linear
    return _rows(op, x.float(), weight, scales, biases, groupsize).to(x.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """Causal attention of q [B, H, L, D] over the cache k, v [B, KV, S, D] (float32): row l attends
    cache positions 0..input_pos[l] only (input_pos [L], or [B, L]: each sequence its own), each
    output reduced in one order whatever L and B."""
    return torch.ops.layerskip_cpu.attention(q, k, v, input_pos)


def argmax(x: torch.Tensor) -> torch.Tensor:
    """torch.argmax(x, -1) of float32 x [..., N] (the first maximum; the first NaN if any),
    vectorized: torch's CPU argmax is a scalar loop, 0.6 ms for a 16-row verify pass's logits."""
    return torch.ops.layerskip_cpu.argmax(x)


def int4_lanes() -> int:
    """Output channels a group of the int4 layout with channels in the vector lanes (16 in the AVX-512
    VNNI builds, 8 in the AVX2 ones), or 0 where the kernels know the rows' layout only (module
    docstring)."""
    if "int4_lanes" not in _state:
        _state["int4_lanes"] = torch.ops.layerskip_cpu.int4_lanes() if load(quiet=True) else 0
    return _state["int4_lanes"]


def float_lanes() -> int:
    """Output channels a group of the float32 layout with channels in the vector lanes (16 in the
    AVX-512 builds, 8 in the AVX2 ones), or 0 where the kernels are the portable build or absent."""
    if "float_lanes" not in _state:
        _state["float_lanes"] = torch.ops.layerskip_cpu.float_lanes() if load(quiet=True) else 0
    return _state["float_lanes"]


def pack_float(weight: torch.Tensor) -> torch.Tensor:
    """A float32 weight [N, K] in the lanes layout [N / L, K, L] (L = float_lanes(), N % L == 0):
    element [v, k, c] is weight[v L + c, k], so one vector load holds L output channels' weights at
    one input channel (cpu_kernels.cpp, float_lanes_tile)."""
    n, k = weight.shape
    width = float_lanes()
    return weight.reshape(n // width, width, k).transpose(1, 2).contiguous()


def unpack_float(packed: torch.Tensor) -> torch.Tensor:
    """The weight [N, K] of pack_float's layout."""
    return packed.transpose(1, 2).reshape(-1, packed.shape[1])


def pack_int4(codes: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, lanes: bool | None = None):
    """uint8 codes [N, K] in [0, 15] (K % 32 == 0) and float32 scales, biases [N, K / groupsize] ->
    (weight, scales, biases) in the kernels' layout (module docstring): L = int4_lanes() channels in
    the lanes where the build has that layout, N % L == 0 and `lanes` (None: where it pays, with
    int8 activations; with float32 ones a step of 4-16 rows took 1.4x as long as in the rows'
    layout), else the rows' layout. Both ops take both layouts."""
    n, k = codes.shape
    if lanes is None:
        lanes = ACTIVATIONS == "int8"
    width = int4_lanes() if lanes else 0
    if width and n % width == 0:
        c = codes.reshape(n // width, width, k // 8, 2, 4).permute(0, 2, 3, 1, 4)  # [v, octet, half, c, j]
        w = (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n // width, k // 8, 4 * width).contiguous()

        def by_lanes(t):
            return t.reshape(n // width, width, -1).transpose(1, 2).contiguous()
        return w, by_lanes(scales), by_lanes(biases)
    c = codes.reshape(n, k // 32, 2, 16)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, k // 2).contiguous(), scales.contiguous(), biases.contiguous()


def pack_int8(weight: torch.Tensor, lanes: bool | None = None) -> torch.Tensor:
    """An int8 weight [N, K] in the kernels' layout: L = int4_lanes() channels in the lanes (the same
    L as int4's), [N / L, K / 4, 4L] with byte 4c + j of quad o holding channel c's weight at input
    4o + j, where the build has it, N % L == 0, K % 32 == 0 and `lanes` (None: with int8
    activations, the layout's only fast path); else the weight as it is."""
    n, k = weight.shape
    width = int4_lanes() if (ACTIVATIONS == "int8" if lanes is None else lanes) else 0
    if not width or n % width or k % 32:
        return weight.contiguous()
    return weight.reshape(n // width, width, k // 4, 4).transpose(1, 2).reshape(n // width, k // 4, 4 * width).contiguous()


def unpack_int8(packed: torch.Tensor) -> torch.Tensor:
    """The weight [N, K] of either int8 layout."""
    if packed.dim() == 2:
        return packed
    v, quads, width = packed.shape[0], packed.shape[1], packed.shape[2] // 4
    return packed.reshape(v, quads, width, 4).transpose(1, 2).reshape(v * width, quads * 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The codes [N, K] of a weight in either layout."""
    if packed.dim() == 3:
        v, octets, lanes = packed.shape[0], packed.shape[1], packed.shape[2] // 4
        p = packed.reshape(v, octets, 1, lanes, 4)
        return torch.cat([p & 15, p >> 4], dim=2).permute(0, 3, 1, 2, 4).reshape(v * lanes, octets * 8)
    n, half = packed.shape
    p = packed.reshape(n, half // 16, 1, 16)
    return torch.cat([p & 15, p >> 4], dim=2).reshape(n, half * 2)


def dequantize_int4(packed, scales, biases, groupsize: int) -> torch.Tensor:
    """The float32 weight [N, K] the int4 kernel multiplies by (the fallback and the tests' reference)."""
    q = unpack_int4(packed).float()
    n, k = q.shape
    if packed.dim() == 3:  # [N / lanes, groups, lanes] -> [N, groups]
        scales, biases = (t.transpose(1, 2).reshape(n, -1) for t in (scales, biases))
    return (q.reshape(n, k // groupsize, groupsize) * scales[..., None] + biases[..., None]).reshape(n, k)
