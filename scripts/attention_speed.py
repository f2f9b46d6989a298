"""Speed of the CPU attention kernel (cpu_kernels.attention) on SmolLM2's attention shape, against
PyTorch's own CPU attention (scaled_dot_product_attention over the cache cut to the positions the
rows see, with the causal mask: the least SDPA can read), as a table of microseconds per call.

    python scripts/attention_speed.py                      # rows 1 5 9 16, positions 400 1000, B 1 4
    python scripts/attention_speed.py --rows 9 --positions 400 --batch 1 --rounds 9

A call attends `rows` query rows per sequence (a decode step: 1; a verify pass of k drafts: k + 1)
at positions p .. p + rows - 1 of a static cache of --cache positions, for every head (9 query
heads over 3 KV heads, head dimension 64). Our kernel and SDPA are timed in turn, round after
round, and the median round is reported, so a neighbour's load hits both alike. Threads:
torch.get_num_threads().
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the engine's modules

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import cpu_kernels  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64  # SmolLM2-135M


def sdpa(q, k, v, pos):
    """PyTorch's attention over the positions up to the last row's, causal per row."""
    n = int(pos[-1]) + 1
    mask = torch.arange(n)[None, :] <= pos[:, None]
    return F.scaled_dot_product_attention(q, k[:, :, :n], v[:, :, :n], attn_mask=mask, enable_gqa=True)


def per_call(fn, args, sample_s: float) -> float:
    calls, start = 0, time.perf_counter()
    while True:
        fn(*args)
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= sample_s:
            return elapsed / calls


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", type=int, default=[1, 5, 9, 16], help="query rows per sequence")
    p.add_argument("--positions", nargs="+", type=int, default=[400, 1000], help="the first row's position")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 4], help="sequences per call")
    p.add_argument("--cache", type=int, default=2048, help="the static cache's positions")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (the median is reported)")
    p.add_argument("--sample_s", type=float, default=0.05, help="seconds per timed sample")
    args = p.parse_args(argv)
    if min(args.rows) < 1 or min(args.batch) < 1 or min(args.positions) < 0 or \
            max(args.positions) + max(args.rows) > args.cache:
        p.error("--rows and --batch must be >= 1, and every position + rows within --cache")
    if not cpu_kernels.load():
        p.error(f"the CPU kernels are not available: {cpu_kernels.reason()}")
    torch.manual_seed(0)
    print(f"kernels: {cpu_kernels.isa()}, threads {torch.get_num_threads()}; {HEADS} heads over {KV_HEADS} KV "
          f"heads of {HEAD_DIM}, cache {args.cache}\n")
    cases = []
    for b in args.batch:
        k, v = torch.randn(b, KV_HEADS, args.cache, HEAD_DIM), torch.randn(b, KV_HEADS, args.cache, HEAD_DIM)
        for start in args.positions:
            for r in args.rows:
                q, pos = torch.randn(b, HEADS, r, HEAD_DIM), torch.arange(start, start + r)
                ours = cpu_kernels.attention(q, k, v, pos)
                assert (ours - sdpa(q, k, v, pos)).abs().max() < 1e-4  # the same attention
                cases.append(((b, start, r), (q, k, v, pos)))
    times = {(key, name): [] for key, _ in cases for name in ("ours", "sdpa")}
    fns = {"ours": cpu_kernels.attention, "sdpa": sdpa}
    for _, a in cases:  # warm-up: page faults, thread start
        for fn in fns.values():
            per_call(fn, a, 0)
    for _ in range(args.rounds):
        for key, a in cases:
            for name, fn in fns.items():
                times[key, name].append(per_call(fn, a, args.sample_s))
    print("| batch | position | rows | ours | SDPA | SDPA / ours |")
    print("|---|---|---|---|---|---|")
    for key, _ in cases:
        ours, peer = statistics.median(times[key, "ours"]), statistics.median(times[key, "sdpa"])
        print(f"| {key[0]} | {key[1]} | {key[2]} | {ours * 1e6:.1f} us | {peer * 1e6:.1f} us | {peer / ours:.2f}x |")


if __name__ == "__main__":
    main()
