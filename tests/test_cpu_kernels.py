"""The CPU linear kernels (cpu_kernels.cpp): float32 weights against the float64 product, int8/int4
against the product with their dequantized weights, and with int8 activations (the *_q8 ops)
against the product of the dequantized activations and weights."""
import os
import platform
import subprocess
import sys

import pytest
import torch

import cpu_kernels
import quantized
from conftest import REPO, dequantized_activations
from quantized import Int4Linear, Int8Linear, pack_nibbles, quantize_int4, quantize_int8


@pytest.fixture(autouse=True, scope="module")
def kernels():
    assert cpu_kernels.load(), cpu_kernels.reason()


def int8_weights(n, k, seed=0):
    torch.manual_seed(seed)
    q, s = quantize_int8(torch.randn(n, k))
    return q, s, q.double() * s.double()[:, None]


def int4_weights(n, k, g, seed=0, lanes=True):
    """Random int4 weights in the kernels' layout: with `lanes`, channels in the lanes wherever the
    build has that layout and N allows it (N % 16 == 0 with AVX-512 VNNI, N % 8 == 0 with AVX2)."""
    torch.manual_seed(seed)
    q, sz = quantize_int4(torch.randn(n, k), g)
    scales = sz[..., 0].t()
    packed, scales, biases = cpu_kernels.pack_int4(q, scales, sz[..., 1].t() - 8 * scales, lanes=lanes)
    return packed, scales, biases, cpu_kernels.dequantize_int4(packed, scales, biases, g).double()


def assert_float32_accurate(y, x, w):
    """Within float32 accumulation of the exact product: K * eps32 * sum_k |x_k w_k|."""
    ref = x.double() @ w.T
    bound = x.shape[-1] * torch.finfo(torch.float32).eps * (x.double().abs() @ w.abs().T) + 1e-6
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert ((y.double() - ref).abs() <= bound).all(), ((y.double() - ref).abs() / bound).max()


def test_the_kernels_are_built_for_this_machine():
    if platform.machine() in ("x86_64", "AMD64"):
        assert cpu_kernels.isa().split("+")[0] in ("avx512", "avx2")  # the CI machines have AVX2 at least


# rows: one (decode), verify passes (row tiles of 4 and their remainders, up to EXACT_ROWS) and
# prompts (dequantize + GEMM). Shapes: K not a multiple of the vector
# width, N not a multiple of the tile, SmolLM2's sizes.
ROWS = [1, 2, 3, 4, 5, 9, 16, 17, 65, 130]


@pytest.mark.parametrize("n,k", [(1, 1), (7, 17), (13, 40), (96, 576), (33, 1000)])
def test_int8_kernel_matches_the_dequantized_product(n, k):
    q, s, w = int8_weights(n, k)
    for rows in ROWS:
        x = torch.randn(rows, k)
        assert_float32_accurate(torch.ops.layerskip_cpu.int8_linear(x, q, s), x, w)


@pytest.mark.parametrize("n,k", [(1, 1), (7, 17), (13, 40), (96, 576), (33, 1000)])
def test_float_kernel_matches_the_exact_product(n, k):
    torch.manual_seed(0)
    w = torch.randn(n, k)
    for rows in ROWS:
        x = torch.randn(rows, k)
        assert_float32_accurate(torch.ops.layerskip_cpu.float_linear(x, w), x, w.double())


@pytest.mark.parametrize("n,k", [(16, 1), (48, 17), (96, 576), (208, 1000)])
def test_float_lanes_kernel_matches_the_exact_product_for_any_rows(n, k):
    """The lanes layout (pack_float) takes every row count through its tiles, prompts included (300
    rows: row blocks of the activations; N = 208: a partial tile of lane groups)."""
    if not cpu_kernels.float_lanes():
        pytest.skip("this build has the rows' layout only")
    torch.manual_seed(0)
    w = torch.randn(n, k)
    packed = cpu_kernels.pack_float(w)
    assert torch.equal(cpu_kernels.unpack_float(packed), w)
    for rows in (*ROWS, 40, 300):
        x = torch.randn(rows, k)
        assert_float32_accurate(cpu_kernels.float_linear(x, packed), x, w.double())


def test_float_layers_use_the_kernel_for_a_few_rows_without_gradients():
    from model import Linear
    torch.manual_seed(0)
    lin = Linear(64, 24)  # 24 output channels: no whole lane group of 16, so the rows' layout
    lin.pack()
    assert lin.use_cpu_kernel and lin.weight.shape == (24, 64)
    x = torch.randn(1, 5, 64)
    with torch.no_grad():
        y = lin(x)
        assert torch.equal(y[0], torch.ops.layerskip_cpu.float_linear(x[0], lin.weight))
        assert torch.equal(y[0, 2:3], lin(x[:, 2:3])[0])  # row-invariant as a layer too
    y = lin(x)  # training: autograd's F.linear
    assert y.requires_grad and torch.allclose(y, x @ lin.weight.T, atol=1e-5)
    half = Linear(64, 24).to(torch.bfloat16)
    half.pack()
    assert not half.use_cpu_kernel  # float32 weights only


def test_float_layers_pack_into_lanes_unless_trained():
    """pack() puts a float32 weight into the lanes layout where the build has it and N allows; every
    row count then takes the kernel, row-invariant (a 40-row prompt too). pack(lanes=False), for
    training, keeps [N, K] and the gradients."""
    from model import Linear
    torch.manual_seed(0)
    lin, plain = Linear(64, 32), Linear(64, 32)
    plain.weight.data.copy_(lin.weight.data)
    w = lin.weight.detach().clone()
    lin.pack()
    plain.pack(lanes=False)
    assert plain.weight.shape == (32, 64) and plain.weight.requires_grad
    if not cpu_kernels.float_lanes():
        assert lin.weight.shape == (32, 64)
        return
    assert lin.weight.dim() == 3 and torch.equal(cpu_kernels.unpack_float(lin.weight), w)
    x = torch.randn(2, 20, 64)
    y = lin(x)
    assert torch.allclose(y, x @ w.T, atol=1e-5)
    assert torch.equal(y[1, 7:8], lin(x[1:2, 7:8])[0])
    assert plain(x).requires_grad


# N % 16 == 0: channels in the lanes where the build has that layout (16 with AVX-512 VNNI, 8 with
# AVX2), with one and two lane groups a tile
@pytest.mark.parametrize("n,k,g", [(1, 32, 32), (7, 96, 32), (13, 128, 64), (96, 576, 32), (37, 1024, 128),
                                   (16, 128, 64), (48, 1024, 128)])
def test_int4_kernel_matches_the_dequantized_product(n, k, g):
    packed, scales, biases, w = int4_weights(n, k, g)
    for rows in ROWS:
        x = torch.randn(rows, k)
        assert_float32_accurate(torch.ops.layerskip_cpu.int4_linear(x, packed, scales, biases, g), x, w)


# --- int8 activations: int8_linear_q8, int4_linear_q8 ---

Q8_ROWS = list(range(1, cpu_kernels.EXACT_ROWS + 1)) + [17, 40]  # 17, 40: dequantize + GEMM, float activations


def q8_activations(rows, k, seed=0):
    """Normal values with a few outliers 30x larger (as LLM activations have), a block of zeros and
    one of tiny values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g) * (1 + 29 * (torch.rand(rows, k, generator=g) < 0.01))
    x[0, :min(k, 32)] = 0
    if rows > 1:
        x[1, :min(k, 32)] *= 1e-30
    return x


def assert_q8_accurate(y, x, w, magnitude=None):
    """Up to EXACT_ROWS rows, within float32 rounding of the float64 product of the dequantized
    activations and the dequantized weights w (the block dots are exact integers; float32 rounds
    the scaling and the sums). `magnitude` bounds each weight's terms (int4: |q * scale| + |bias|,
    computed apart). More rows: the float-activation bound."""
    if x.shape[0] > cpu_kernels.EXACT_ROWS:
        return assert_float32_accurate(y, x, w)
    xr = dequantized_activations(x)
    ref = xr @ w.T
    bound = x.shape[1] * torch.finfo(torch.float32).eps * (xr.abs() @ (w.abs() if magnitude is None else magnitude).T) + 1e-6
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert ((y.double() - ref).abs() <= bound).all(), ((y.double() - ref).abs() / bound).max()


def int4_magnitude(packed, scales, biases, g):
    """|q * scale| + |bias| per weight (codes q >= 0)."""
    return cpu_kernels.dequantize_int4(packed, scales.abs(), biases.abs(), g).double()


def test_the_reference_quantizer_rounds_blocks_of_32():
    x = torch.tensor([[1.0, -2.0, 0.5, 127.0] + [0.0] * 28 + [3.0, 0.0]])  # 34 values: a padded second block
    xr = dequantized_activations(x)
    assert xr.shape == (1, 34) and torch.equal(xr[0, :4], torch.tensor([1.0, -2.0, 0.0, 127.0], dtype=torch.float64))
    assert xr[0, 32] == 127 * (torch.tensor(3.0) / 127).double()  # the second block's own scale: 3 / 127 in float32
    x = torch.randn(4, 96)
    d = x.reshape(4, 3, 32).abs().amax(-1, keepdim=True).double() / 127  # each value within half a step
    assert ((dequantized_activations(x) - x.double()).reshape(4, 3, 32).abs() <= d / 2 + 1e-12).all()


@pytest.mark.parametrize("k", [32, 96, 576, 1536, 17, 1000])
def test_int8_q8_kernel_matches_the_dequantized_product(k):
    for n in (1, 3, 5, 17, 960):
        q, s, w = int8_weights(n, k, seed=n)
        for rows in Q8_ROWS:
            x = q8_activations(rows, k, seed=rows)
            assert_q8_accurate(torch.ops.layerskip_cpu.int8_linear_q8(x, q, s), x, w)


@pytest.mark.parametrize("k", [32, 96, 576, 1536])
def test_the_int8_lanes_layout_matches_the_dequantized_product(k):
    """int8 weights with channels in the lanes (cpu_kernels.pack_int8; N = 208: a lane group alone
    in the last tile), int8 activations up to 16 rows, the float path beyond (a prompt) and with
    float activations; the layout holds the same weights."""
    if not cpu_kernels.int4_lanes():
        pytest.skip("this build has the rows' layout only")
    for n in (16, 48, 208):
        q, s, w = int8_weights(n, k, seed=n)
        packed = cpu_kernels.pack_int8(q, lanes=True)
        assert packed.dim() == 3 and torch.equal(cpu_kernels.unpack_int8(packed), q)
        for rows in Q8_ROWS:
            x = q8_activations(rows, k, seed=rows)
            assert_q8_accurate(torch.ops.layerskip_cpu.int8_linear_q8(x, packed, s), x, w)
            assert_float32_accurate(torch.ops.layerskip_cpu.int8_linear(x, packed, s), x, w)


@pytest.mark.parametrize("k,g", [(32, 32), (96, 32), (576, 32), (1536, 32), (128, 64), (1024, 128), (512, 256)])
def test_int4_q8_kernel_matches_the_dequantized_product(k, g):
    for n in (1, 3, 5, 17, 48, 960):
        packed, scales, biases, w = int4_weights(n, k, g, seed=n)
        magnitude = int4_magnitude(packed, scales, biases, g)
        for rows in Q8_ROWS:
            x = q8_activations(rows, k, seed=rows)
            assert_q8_accurate(torch.ops.layerskip_cpu.int4_linear_q8(x, packed, scales, biases, g), x, w, magnitude)


def test_q8_kernels_take_the_float_path_beyond_the_row_tiles():
    q, s, _ = int8_weights(40, 100)
    packed, scales, biases, _ = int4_weights(40, 128, 64)
    for rows in (17, 33):
        x = torch.randn(rows, 128)
        assert torch.equal(torch.ops.layerskip_cpu.int8_linear_q8(x[:, :100], q, s),
                           torch.ops.layerskip_cpu.int8_linear(x[:, :100], q, s))
        assert torch.equal(torch.ops.layerskip_cpu.int4_linear_q8(x, packed, scales, biases, 64),
                           torch.ops.layerskip_cpu.int4_linear(x, packed, scales, biases, 64))


def test_q8_kernels_keep_a_rows_result_whatever_rows_are_beside_it():
    """Row r of an M-row call is bitwise the 1-row call of that row, for every M up to EXACT_ROWS and
    rows drawn at random (K = 577: the int8 tail block; N = 203: partial channel tiles; int4 N = 208:
    the lanes layout where built, its last tile one lane group)."""
    q, s, _ = int8_weights(203, 577)
    fs = [lambda x: torch.ops.layerskip_cpu.int8_linear_q8(x, q, s)]
    for n4 in (203, 208):
        packed, scales, biases, _ = int4_weights(n4, 576, 32)
        fs.append(lambda x, w4=(packed, scales, biases): torch.ops.layerskip_cpu.int4_linear_q8(x[:, :576].contiguous(), *w4, 32))
    n = cpu_kernels.EXACT_ROWS
    x = q8_activations(n, 577) * torch.rand(n, 1) * 4
    g = torch.Generator().manual_seed(1)
    for f in fs:
        alone = torch.cat([f(x[i:i + 1]) for i in range(n)])
        for rows in range(1, n + 1):
            pick = torch.randperm(n, generator=g)[:rows]
            assert torch.equal(f(x[pick]), alone[pick]), rows


def test_the_activations_setting_picks_the_op(monkeypatch):
    q, s, _ = int8_weights(40, 96)
    packed, scales, biases, _ = int4_weights(40, 96, 32)
    m8 = Int8Linear(96, 40)
    m8.weight, m8.scales = q, s
    m8.pack()
    x = torch.randn(3, 96)
    ops = torch.ops.layerskip_cpu
    for acts, op8, op4 in [("int8", ops.int8_linear_q8, ops.int4_linear_q8), ("float", ops.int8_linear, ops.int4_linear)]:
        monkeypatch.setattr(cpu_kernels, "ACTIVATIONS", acts)
        assert torch.equal(cpu_kernels.int8_linear(x, q, s), op8(x, q, s))
        assert torch.equal(m8(x), op8(x, q, s))
        assert torch.equal(cpu_kernels.int4_linear(x, packed, scales, biases, 32), op4(x, packed, scales, biases, 32))
        other = "float" if acts == "int8" else "int8"  # an explicit argument wins
        assert not torch.equal(cpu_kernels.int8_linear(x, q, s, activations=other), op8(x, q, s))


def test_the_activations_come_from_the_environment():
    def activations(value):
        env = {**os.environ, "LAYERSKIP_CPU_ACTIVATIONS": value}
        return subprocess.run([sys.executable, "-c", "import cpu_kernels; print(cpu_kernels.ACTIVATIONS)"], cwd=REPO,
                              env=env, capture_output=True, text=True)
    assert activations("float").stdout.strip() == "float"
    assert activations("int8").stdout.strip() == "int8"
    bad = activations("int4")
    assert bad.returncode != 0 and "LAYERSKIP_CPU_ACTIVATIONS must be int8 or float, not 'int4'" in bad.stderr


def test_compiled_q8_layers_equal_eager_and_do_not_recompile(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "ACTIVATIONS", "int8")
    torch.manual_seed(0)
    m8 = Int8Linear(96, 40)
    m8.weight, m8.scales = quantize_int8(torch.randn(40, 96))
    m8.pack()
    q4, sz = quantize_int4(torch.randn(24, 96), 32)
    m4 = Int4Linear(96, 24, 32)
    m4.weight, m4.scales_and_zeros = pack_nibbles(q4), sz
    m4.pack()

    def f(x):
        return m8(x), m4(torch.relu(x) * 2)

    compiled = torch.compile(f, fullgraph=True, dynamic=False, options={"cpp_wrapper": True})
    with torch.no_grad():
        x = q8_activations(5, 96)
        for got, want in zip(compiled(x), f(x)):
            assert torch.equal(got, want)
        with torch._dynamo.config.patch(error_on_recompile=True):
            x = q8_activations(5, 96, seed=3)
            for got, want in zip(compiled(x), f(x)):
                assert torch.equal(got, want)


def test_argmax_kernel_is_torchs_argmax():
    """The first maximum, as torch.argmax: ties, NaN (the first NaN wins), infinities, rows of
    -inf, lengths that are not a whole number of vectors, leading dimensions."""
    torch.manual_seed(0)
    for n in (1, 3, 15, 16, 17, 33, 1000, 49153):
        for case in range(7):
            x = torch.randn(3, n)
            if case == 1:
                x = torch.randint(0, 3, (3, n)).float()
            elif case == 2:
                x[:, n // 2] = float("nan")
                x[:, -1] = float("nan")
            elif case == 3:
                x[:, n // 3] = float("inf")
                x[:, -1] = float("inf")
            elif case == 4:
                x[:] = float("-inf")
            elif case == 5:
                x = -x.abs() - 1e30
            elif case == 6:
                x[:, -1] = 100.0
            got = cpu_kernels.argmax(x)
            assert got.dtype == torch.long and torch.equal(got, x.argmax(-1)), (n, case)
    x = torch.randn(2, 3, 50)
    assert torch.equal(cpu_kernels.argmax(x), x.argmax(-1)) and cpu_kernels.argmax(x[0, 0]).dim() == 0


def check_q8_kernels():
    """The checks of the q8 ops that the portable and AVX2 builds repeat in their own processes (N = 16
    and 24: the AVX2 build's int4 lanes layout; 17 rows: its dequantize + GEMM path), and argmax's."""
    test_argmax_kernel_is_torchs_argmax()
    for k, g in ((96, 32), (1000, 0), (256, 128)):
        for n in (1, 5, 16, 17, 24):
            for rows in (1, 2, 5, 16, 17):
                x = q8_activations(rows, k, seed=rows)
                if g:
                    packed, scales, biases, w = int4_weights(n, k, g, seed=n)
                    y = torch.ops.layerskip_cpu.int4_linear_q8(x, packed, scales, biases, g)
                    assert_q8_accurate(y, x, w, int4_magnitude(packed, scales, biases, g))
                else:
                    q, s, w = int8_weights(n, k, seed=n)
                    assert_q8_accurate(torch.ops.layerskip_cpu.int8_linear_q8(x, q, s), x, w)
    test_q8_kernels_keep_a_rows_result_whatever_rows_are_beside_it()
    for n, k, g in ((16, 128, 64), (48, 1024, 128)):  # the float32-activation op on that layout too
        test_int4_kernel_matches_the_dequantized_product(n, k, g)
    test_a_rows_result_does_not_depend_on_the_rows_beside_it("int4-lanes")
    if cpu_kernels.int4_lanes():  # the int8 lanes layout (AVX2: the sign trick, 8 channels a vector)
        test_the_int8_lanes_layout_matches_the_dequantized_product(576)
        test_a_rows_result_does_not_depend_on_the_rows_beside_it("int8-lanes")
    if cpu_kernels.float_lanes():  # the float32 lanes layout (the AVX2 build's 8 lanes, 4 x 2 tiles)
        test_float_lanes_kernel_matches_the_exact_product_for_any_rows(208, 1000)
        test_a_rows_result_does_not_depend_on_the_rows_beside_it("float32-lanes")


@pytest.mark.slow
@pytest.mark.parametrize("march,isa", [("x86-64", "portable"), ("haswell", "avx2")])
def test_the_builds_for_other_cpus_compute_the_q8_ops_too(tmp_path, march, isa):
    """LAYERSKIP_CPU_MARCH builds the kernels for another CPU: x86-64 the portable C++ (no AVX2),
    where the integer ops are plain loops; haswell AVX2 without VNNI (maddubs and the sign trick,
    the CI-class EPYC's path), whatever this machine has. Each is correct and row-invariant (the
    builds are cached per machine)."""
    if cpu_kernels.isa() == isa:  # this machine's own build is that path: the tests above ran it
        pytest.skip(f"the native build is already {isa}")
    env = {**os.environ, "LAYERSKIP_CPU_MARCH": march, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}
    code = ("import cpu_kernels, test_cpu_kernels as t; assert cpu_kernels.load(), cpu_kernels.reason(); "
            f"assert cpu_kernels.isa() == {isa!r}, cpu_kernels.isa(); t.check_q8_kernels(); print('ok')")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_dequantized_int4_weight_is_the_quantizers_formula():
    torch.manual_seed(0)
    w = torch.randn(24, 96)
    q, sz = quantize_int4(w, 32)
    packed, scales, biases, w_kernel = int4_weights(24, 96, 32, lanes=False)  # the rows' layout
    assert torch.allclose(w_kernel.float(), quantized.dequantize_int4(q, sz, 32), atol=1e-6)
    assert torch.equal(cpu_kernels.unpack_int4(packed), q)
    # byte i of a 32-code block: code i in the low nibble, code i + 16 in the high one
    assert packed[0, 3] == q[0, 3] | (q[0, 19] << 4)


def test_the_int4_lanes_layout_holds_the_same_codes():
    """Where the build multiplies L channels at once (AVX-512 VNNI: 16, AVX2: 8), N % L == 0 weights
    take that layout: byte 4c + j of 8 input channels' 4L bytes holds channel c's codes at k0 + j and
    k0 + 4 + j."""
    torch.manual_seed(0)
    q, sz = quantize_int4(torch.randn(32, 128), 64)
    scales = sz[..., 0].t()
    packed, s, b = cpu_kernels.pack_int4(q, scales, sz[..., 1].t() - 8 * scales, lanes=True)
    if not cpu_kernels.int4_lanes():
        assert packed.shape == (32, 64) and s.shape == (32, 2)
        pytest.skip(f"the {cpu_kernels.isa()} build has the rows' layout only")
    lanes = cpu_kernels.int4_lanes()
    assert packed.shape == (32 // lanes, 16, 4 * lanes) and s.shape == (32 // lanes, 2, lanes)
    assert torch.equal(cpu_kernels.unpack_int4(packed), q)
    v, c, o, j = 1, 5, 3, 2  # channel lanes + 5, input channels 24 + 2 and 28 + 2
    assert packed[v, o, 4 * c + j] == q[lanes * v + c, 8 * o + j] | (q[lanes * v + c, 8 * o + 4 + j] << 4)
    assert s[v, 1, c] == scales[lanes * v + c, 1]
    assert torch.allclose(cpu_kernels.dequantize_int4(packed, s, b, 64), quantized.dequantize_int4(q, sz, 64), atol=1e-6)
    rows = cpu_kernels.pack_int4(q, scales, sz[..., 1].t() - 8 * scales, lanes=False)
    assert rows[0].shape == (32, 64) and torch.equal(cpu_kernels.unpack_int4(rows[0]), q)
    # the float-activation setting packs in the rows' layout (where it is the faster one)
    saved, cpu_kernels.ACTIVATIONS = cpu_kernels.ACTIVATIONS, "float"
    try:
        assert cpu_kernels.pack_int4(q, scales, sz[..., 1].t() - 8 * scales)[0].dim() == 2
    finally:
        cpu_kernels.ACTIVATIONS = saved


@pytest.mark.parametrize("kind", ["float32", "float32-lanes", "int8", "int8-lanes", "int4", "int4-lanes"])
def test_a_rows_result_does_not_depend_on_the_rows_beside_it(kind):
    """Up to EXACT_ROWS rows, and a batched step's rows however many, every output is reduced in one
    fixed order: a verify pass over k + 1 rows gives bitwise what k + 1 one-row steps give, so greedy
    self-speculation cannot flip a near tie.
    (A full tile sums its outputs' lanes together, a partial one each alone; K = 583 has a tail past
    the vectors, N = 203 partial channel tiles.)"""
    k = 576 if kind.startswith("int4") or kind == "int8-lanes" else 583
    if kind == "float32":
        w = torch.randn(203, k)
        f = lambda x: torch.ops.layerskip_cpu.float_linear(x, w)  # noqa: E731
    elif kind == "float32-lanes":  # N = 208: 13 lane groups of 16 (26 of 8), a partial tile of them
        if not cpu_kernels.float_lanes():
            pytest.skip("this build has the rows' layout only")
        w = cpu_kernels.pack_float(torch.randn(208, k))
        f = lambda x: torch.ops.layerskip_cpu.float_linear(x, w)  # noqa: E731
        x = torch.randn(37, k)  # and a prompt's rows too, however many
        assert torch.equal(f(x), torch.cat([f(x[i:i + 1]) for i in range(37)]))
    elif kind.startswith("int8"):  # int8-lanes: N = 208 (13 lane groups of 16, 26 of 8), K % 32 == 0
        q, s, _ = int8_weights(203 if kind == "int8" else 208, k)
        if kind == "int8-lanes":
            if not cpu_kernels.int4_lanes():
                pytest.skip("this build has the rows' layout only")
            q = cpu_kernels.pack_int8(q, lanes=True)
        f = lambda x: torch.ops.layerskip_cpu.int8_linear(x, q, s)  # noqa: E731
    else:  # N = 208: the 16-lane layout where built (int4_lanes)
        packed, scales, biases, _ = int4_weights(203 if kind == "int4" else 208, k, 32)
        f = lambda x: torch.ops.layerskip_cpu.int4_linear(x, packed, scales, biases, 32)  # noqa: E731
    n = cpu_kernels.EXACT_ROWS
    x = torch.randn(n, k)
    alone = torch.cat([f(x[i:i + 1]) for i in range(n)])
    for rows in range(2, n + 1):
        assert torch.equal(f(x[:rows]), alone[:rows]), rows
    # a batched step [B, T, K] takes the tiles however many rows (here 3 x 16 = 48) in one call
    xb = torch.randn(3, n, k)
    assert torch.equal(f(xb), torch.stack([torch.cat([f(xb[b, i:i + 1]) for i in range(n)]) for b in range(3)]))
    if not kind.startswith("float32"):  # and with int8 activations
        q8 = torch.ops.layerskip_cpu.int8_linear_q8 if kind.startswith("int8") else torch.ops.layerskip_cpu.int4_linear_q8
        args = (q, s) if kind.startswith("int8") else (packed, scales, biases, 32)
        assert torch.equal(q8(xb, *args), torch.stack([q8(xb[b], *args) for b in range(3)]))
        assert torch.equal(q8(xb[0], *args), torch.cat([q8(xb[0, i:i + 1], *args) for i in range(n)]))


def test_compiled_graphs_call_the_same_kernels():
    q, s, _ = int8_weights(40, 72)
    packed, scales, biases, _ = int4_weights(40, 64, 32)

    def f(x, x4):
        return cpu_kernels.int8_linear(torch.relu(x), q, s), cpu_kernels.int4_linear(x4 * 2, packed, scales, biases, 32)

    x, x4 = torch.randn(3, 72), torch.randn(3, 64)
    compiled = torch.compile(f, fullgraph=True)
    for got, want in zip(compiled(x, x4), f(x, x4)):
        assert torch.equal(got, want)


def test_other_input_dtypes_are_computed_in_float32():
    q, s, w = int8_weights(16, 64)
    x = torch.randn(2, 64).bfloat16()
    y = cpu_kernels.int8_linear(x, q, s)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, cpu_kernels.int8_linear(x.float(), q, s).bfloat16())


@pytest.mark.parametrize("op", ["int8_linear", "int8_linear_q8"])
@pytest.mark.parametrize("args,message", [
    (lambda q, s: (torch.randn(2, 64).double(), q, s), "x must be a float32 tensor \\[M, K\\] or \\[B, T, K\\]"),
    (lambda q, s: (torch.randn(2, 63), q, s), "x has 63 columns, the weight 64"),
    (lambda q, s: (torch.randn(2, 64), q.float(), s), "weight must be (a 2-D|an) int8 tensor"),
    (lambda q, s: (torch.randn(2, 64), q, s[:3]), "scales must be float32"),
])
def test_wrong_inputs_are_refused_with_a_reason(args, message, op):
    q, s, _ = int8_weights(16, 64)
    with pytest.raises(RuntimeError, match=message):
        getattr(torch.ops.layerskip_cpu, op)(*args(q, s))


def test_without_the_kernels_the_layers_dequantize_and_say_so(monkeypatch, capsys):
    q, s, w = int8_weights(16, 64)
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setenv("LAYERSKIP_CPU_KERNELS", "0")
    m = Int8Linear(64, 16)
    m.weight, m.scales = q, s
    m.pack()
    assert "not available (disabled by LAYERSKIP_CPU_KERNELS=0)" in capsys.readouterr().err
    x = torch.randn(3, 64)
    assert_float32_accurate(m(x), x, w)
    m.pack()
    assert capsys.readouterr().err == ""  # said once
    torch.manual_seed(1)
    q4, sz = quantize_int4(torch.randn(16, 64), 32)
    m4 = Int4Linear(64, 16, 32)
    m4.weight, m4.scales_and_zeros = pack_nibbles(q4), sz
    m4.pack()
    assert not m4.use_cpu_kernel
    assert_float32_accurate(m4(x), x, quantized.dequantize_int4(q4, sz, 32).double())


def test_a_failed_build_gives_the_compilers_reason(monkeypatch, tmp_path):
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setattr(cpu_kernels, "SOURCE", str(broken))
    monkeypatch.setattr(cpu_kernels, "_build_name", lambda: "layerskip_cpu_broken_test")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    assert cpu_kernels.load() is False
    assert cpu_kernels.reason().startswith(f"building {broken} failed")
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setenv("LAYERSKIP_CPU_KERNELS", "0")
    assert cpu_kernels.load() is False and "LAYERSKIP_CPU_KERNELS=0" in cpu_kernels.reason()


@pytest.mark.parametrize("heads,kv_heads,d", [(4, 2, 16), (9, 3, 64), (2, 2, 20)])
def test_attention_kernel_reads_only_each_rows_positions(heads, kv_heads, d):
    import model
    torch.manual_seed(0)
    S = 40
    k, v = torch.randn(1, kv_heads, S, d), torch.randn(1, kv_heads, S, d)
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    for L, start in [(1, 0), (1, 30), (5, 12), (16, 24)]:
        q = torch.randn(1, heads, L, d)
        pos = torch.arange(start, start + L)
        y = cpu_kernels.attention(q, k, v, pos)
        ref = model.fixed_order_attention(q.double(), k.double(), v.double(), causal[pos][None, None])
        assert (y.double() - ref).abs().max() < 1e-5
        alone = torch.cat([cpu_kernels.attention(q[:, :, i:i + 1], k, v, pos[i:i + 1]) for i in range(L)], dim=2)
        assert torch.equal(alone, y)  # row-invariant
    # positions past a row's own are never read: garbage there changes nothing
    q, pos = torch.randn(1, heads, 3, d), torch.tensor([10, 11, 12])
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 13:], v2[:, :, 13:] = float("nan"), 1e30
    assert torch.equal(cpu_kernels.attention(q, k2, v2, pos), cpu_kernels.attention(q, k, v, pos))
    q2 = q.clone()
    q2[0, 0, 1, 0] = float("nan")  # a model gone NaN says so (a clamped exp would hide it)
    out = cpu_kernels.attention(q2, k, v, pos)
    assert out[0, 0, 1].isnan().all() and not out[0, 0, [0, 2]].isnan().any()
    with pytest.raises(RuntimeError, match="input_pos out of the cache's range"):
        cpu_kernels.attention(q, k, v, torch.tensor([10, 11, S]))


@pytest.mark.parametrize("heads,kv_heads,d", [(9, 3, 64), (4, 1, 20)])
def test_attention_kernel_batched_rows_and_threads_change_nothing(heads, kv_heads, d):
    # rows go in tiles by KV head, sized by the row and thread count: a row's output must not move
    import model
    torch.manual_seed(1)
    B, S, L = 3, 150, 9  # keys past one 64-key block of values, and past several W-key blocks
    k, v = torch.randn(B, kv_heads, S, d), torch.randn(B, kv_heads, S, d)
    q = torch.randn(B, heads, L, d)
    pos = torch.stack([torch.arange(s, s + L) for s in (0, 63, 140)])  # each sequence its own
    y = cpu_kernels.attention(q, k, v, pos)
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    for b in range(B):
        ref = model.fixed_order_attention(q[b:b + 1].double(), k[b:b + 1].double(), v[b:b + 1].double(),
                                          causal[pos[b]][None, None])
        assert (y[b:b + 1].double() - ref).abs().max() < 1e-5
        for i in range(L):
            one = cpu_kernels.attention(q[b:b + 1, :, i:i + 1], k[b:b + 1], v[b:b + 1], pos[b, i:i + 1])
            assert torch.equal(one, y[b:b + 1, :, i:i + 1])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(cpu_kernels.attention(q, k, v, pos), y)
    finally:
        torch.set_num_threads(threads)


def test_attention_is_fixed_order_for_as_many_rows_as_the_kernels():
    import model
    assert model.FIXED_ORDER_ROWS == cpu_kernels.EXACT_ROWS


def test_the_longest_verify_pass_gives_the_logits_of_one_row_steps():
    """A verify pass of the most drafts a round may make (decoding.MAX_SPECULATIONS, + 1 rows)
    through the packed float32 model: its logits are bitwise those of one-row decode steps at the
    same positions, so no k a user may choose lets greedy self-speculation flip a near tie (one more
    row would take the GEMM and SDPA, whose sums depend on the number of rows)."""
    from decoding import MAX_SPECULATIONS
    from test_decoding import rand_prompt, random_model
    model = quantized.pack_model(random_model(dim=128))
    rows = MAX_SPECULATIONS + 1
    model.setup_caches(1, 64)
    with torch.no_grad():
        model(rand_prompt(8)[None], torch.arange(8))
        tokens = rand_prompt(rows, seed=1)[None]
        steps = torch.cat([model(tokens[:, i:i + 1], torch.tensor([8 + i])) for i in range(rows)], dim=1)
        verify = model(tokens, torch.arange(8, 8 + rows))  # rewrites the same cache positions with the same values
    assert torch.equal(verify, steps)


def test_attention_speed_prints_its_table(capsys):
    import attention_speed
    attention_speed.main(["--rows", "1", "3", "--positions", "5", "--batch", "2", "--cache", "32",
                          "--rounds", "1", "--sample_s", "0"])
    out = capsys.readouterr().out
    assert "| batch | position | rows | ours | SDPA | SDPA / ours |" in out
    assert out.count("\n| 2 | 5 | ") == 2
    with pytest.raises(SystemExit):
        attention_speed.main(["--positions", "2040", "--rows", "16"])
    assert "within --cache" in capsys.readouterr().err


def test_inductor_trusts_the_cpus_instruction_sets_where_our_kernels_are_built_for_them(monkeypatch):
    """Our kernels built with -march=native show the compiler handles this CPU's instruction sets,
    so inductor skips building a probe for each (steps.configure_inductor); built for another level
    (LAYERSKIP_CPU_MARCH), inductor probes as usual."""
    import torch._inductor.config as cfg
    from steps import configure_inductor
    monkeypatch.setattr(cfg.cpp, "vec_isa_ok", None)
    configure_inductor(torch.device("cpu"))
    assert cfg.cpp.vec_isa_ok is True
    monkeypatch.setattr(cfg.cpp, "vec_isa_ok", None)
    monkeypatch.setenv("LAYERSKIP_CPU_MARCH", "")  # set but empty: native, not a build that fails on "-march="
    assert cpu_kernels.march() == "native"
    configure_inductor(torch.device("cpu"))
    assert cfg.cpp.vec_isa_ok is True
    monkeypatch.setattr(cfg.cpp, "vec_isa_ok", None)
    monkeypatch.setenv("LAYERSKIP_CPU_MARCH", "haswell")
    configure_inductor(torch.device("cpu"))
    assert cfg.cpp.vec_isa_ok is None


def test_attention_kernel_reads_a_bfloat16_cache_as_its_exact_float32_values():
    """A bfloat16 cache (--kv_cache_dtype) gives bitwise the output of the float32 cache holding the
    same (rounded) values, for every row count and head shape, so exactness carries over."""
    torch.manual_seed(0)
    for heads, kv_heads, d in ((9, 3, 64), (4, 2, 20), (2, 1, 128)):
        k, v = torch.randn(2, kv_heads, 200, d).bfloat16(), torch.randn(2, kv_heads, 200, d).bfloat16()
        for rows in (1, 5, 16):
            q = torch.randn(2, heads, rows, d)
            pos = torch.stack([torch.arange(150, 150 + rows), torch.arange(3, 3 + rows)])
            got = cpu_kernels.attention(q, k, v, pos)
            assert torch.equal(got, cpu_kernels.attention(q, k.float(), v.float(), pos)), (heads, d, rows)
    with pytest.raises(RuntimeError, match="both float32 or both bfloat16"):
        cpu_kernels.attention(q, k, v.float(), pos)
