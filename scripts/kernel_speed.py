"""Speed of the CPU linear kernels (cpu_kernels.cpp) on SmolLM2's shapes: float32 weights, and
quantized ones with float32 against int8 activations, as a table of microseconds per call and GB/s
of weights.

    python scripts/kernel_speed.py                       # all shapes, rows 1 2 4 8 16, every kind
    python scripts/kernel_speed.py --rows 1 --shapes head --rounds 9

Kinds: float32 weights (float_linear; the default model's linears) in the lanes layout the model
packs them into (cpu_kernels.pack_float), float32-rows in the [N, K] layout before it; int8 and int4 (groups of 32
and 128) weights, each with float32 activations (the ops
int8_linear / int4_linear) and with int8 activations (int8_linear_q8 / int4_linear_q8), in the
layouts the model packs them into; int8-rows and int4-gN-rows keep the rows' layout where the build
would put channels in the vector lanes (cpu_kernels.pack_int8, pack_int4). Every
kind of a shape is timed in turn, round after round, and the median round is reported, so a
neighbour's load or the machine's drift hits every kind alike. Each call reads a different copy of
the weights, cycling through --cycle_mb of them (several times the last-level cache), so the
weights come from memory as in a decode step, not from cache. Bytes per call count the weights,
scales and biases once. The read bandwidth (a sum over 256 MiB) and the copy bandwidth (read +
write) are measured in the same run; the "step" table sums one SmolLM2 decode step's linears
(30 x wqkv, wo, w13, w2, and the head) and gives its share of the read bandwidth.
Times include the Python call of the op (about 3 us; compiled graphs with the C++ wrapper call it
directly), not the rest of a decode step. Threads: torch.get_num_threads().
"""
import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the engine's modules

import torch  # noqa: E402

import cpu_kernels  # noqa: E402
import timing  # noqa: E402

# name: (N, K) of SmolLM2-135M's linears, and how many a decode step calls
SHAPES = {"wqkv": (960, 576), "wo": (576, 576), "w13": (3072, 576), "w2": (576, 1536), "head": (49152, 576)}
PER_STEP = {"wqkv": 30, "wo": 30, "w13": 30, "w2": 30, "head": 1}
KINDS = ("float32/float", "int8/float", "int8/int8", "int4-g32/float", "int4-g32/int8", "int4-g128/float",
         "int4-g128/int8")
# float32 and int4 in the rows' layout where the build would put channels in the lanes (the layouts before it)
ROWS_KINDS = ("float32-rows/float", "int8-rows/int8", "int4-g32-rows/float", "int4-g32-rows/int8", "int4-g128-rows/float",
              "int4-g128-rows/int8")


def make_weights(kind: str, n: int, k: int):
    """(args after x for the op, bytes read per call, op, K of x) with random contents: speed only."""
    weights, acts = kind.split("/")
    ops = torch.ops.layerskip_cpu
    if weights.startswith("float32"):
        w = torch.randn(n, k)
        if weights == "float32" and cpu_kernels.float_lanes():
            w = cpu_kernels.pack_float(w)
        return (w,), 4 * w.numel(), ops.float_linear, k
    if weights.startswith("int8"):
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        w = cpu_kernels.pack_int8(w, lanes=weights == "int8" and acts == "int8")  # as Int8Linear.pack
        s = torch.rand(n) / 100
        return (w, s), w.numel() + 4 * n, ops.int8_linear_q8 if acts == "int8" else ops.int8_linear, k
    g = int(weights.split("-g")[1].removesuffix("-rows"))
    k = math.ceil(k / g) * g  # Int4Linear pads K to the group size (SmolLM2's 576 -> 640 for g128)
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    w, s, b = cpu_kernels.pack_int4(codes, torch.rand(n, k // g) / 100, torch.randn(n, k // g) / 100,
                                    lanes=not weights.endswith("-rows"))
    op = ops.int4_linear_q8 if acts == "int8" else ops.int4_linear
    return (w, s, b, g), w.numel() + 8 * s.numel(), op, k


def read_bandwidth_gbs() -> float:
    x = torch.randn(1 << 26)  # 256 MiB
    x.sum()
    best = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def time_calls(op, copies, x, sample_s: float) -> float:
    """Seconds per call, each call on the next copy of the weights, for at least sample_s."""
    calls, start = 0, time.perf_counter()
    while True:
        for args in copies:
            op(x, *args)
        calls += len(copies)
        elapsed = time.perf_counter() - start
        if elapsed >= sample_s:
            return elapsed / calls


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--rows", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS + ROWS_KINDS))
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (the median is reported)")
    p.add_argument("--sample_s", type=float, default=0.05, help="seconds per timed sample")
    p.add_argument("--cycle_mb", type=float, default=128, help="weight copies per kind, in MB")
    args = p.parse_args(argv)
    assert cpu_kernels.load(), cpu_kernels.reason()
    torch.manual_seed(0)
    read_bw, copy_bw = read_bandwidth_gbs(), timing.copy_bandwidth_gbs(torch.device("cpu"))
    print(f"kernels: {cpu_kernels.isa()}, threads {torch.get_num_threads()}, default activations "
          f"{cpu_kernels.ACTIVATIONS}; read bandwidth {read_bw:.1f} GB/s, copy bandwidth {copy_bw:.1f} GB/s\n")
    results = {}  # (shape, rows, kind) -> (seconds per call, bytes per call)
    for shape in args.shapes:
        n, k = SHAPES[shape]
        sets = {}
        for kind in args.kinds:
            w_args, nbytes, op, kk = make_weights(kind, n, k)
            copies = [w_args] + [tuple(a.clone() if torch.is_tensor(a) else a for a in w_args)
                                 for _ in range(max(1, math.ceil(args.cycle_mb * 1e6 / nbytes)) - 1)]
            sets[kind] = (op, copies, nbytes, kk)
        times = {(r, kind): [] for r in args.rows for kind in args.kinds}
        for r in args.rows:
            for kind, (op, copies, _, kk) in sets.items():  # warm-up: page faults, thread start
                time_calls(op, copies, torch.randn(r, kk), 0)
        for _ in range(args.rounds):
            for r in args.rows:
                for kind, (op, copies, _, kk) in sets.items():
                    times[r, kind].append(time_calls(op, copies, torch.randn(r, kk), args.sample_s))
        for (r, kind), ts in times.items():
            results[shape, r, kind] = (statistics.median(ts), sets[kind][2])
        del sets

    def cell(t, nbytes):
        return f"{t * 1e6:.1f} us, {nbytes / t / 1e9:.1f} GB/s"

    for shape in args.shapes:
        n, k = SHAPES[shape]
        print(f"{shape} {k} -> {n}:\n")
        print("| rows | " + " | ".join(args.kinds) + " |")
        print("|---" * (len(args.kinds) + 1) + "|")
        for r in args.rows:
            print(f"| {r} | " + " | ".join(cell(*results[shape, r, kind]) for kind in args.kinds) + " |")
        print()
    if set(args.shapes) == set(SHAPES):
        print(f"one SmolLM2 decode step's linears ({', '.join(f'{PER_STEP[s]} x {s}' for s in SHAPES)}): "
              f"ms per step, GB/s of weights, share of the read bandwidth ({read_bw:.1f} GB/s):\n")
        print("| rows | " + " | ".join(args.kinds) + " |")
        print("|---" * (len(args.kinds) + 1) + "|")
        for r in args.rows:
            cells = []
            for kind in args.kinds:
                t = sum(PER_STEP[s] * results[s, r, kind][0] for s in SHAPES)
                b = sum(PER_STEP[s] * results[s, r, kind][1] for s in SHAPES)
                cells.append(f"{t * 1e3:.2f} ms, {b / t / 1e9:.1f} GB/s, {b / t / 1e9 / read_bw:.0%}")
            print(f"| {r} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
