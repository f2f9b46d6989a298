"""Tensor-parallel decode speed per world size, and what each token costs in communication.

    python scripts/benchmark_tp.py                                   # SmolLM2, CPU (gloo), 1 and 3 ranks
    python scripts/benchmark_tp.py --world_sizes 1,2,4,8 --device cuda --dtype bfloat16 --model DIR

For each world size, launches `torchrun --standalone --nproc_per_node=N` on this script in worker
mode; rank 0 reports tokens/s (median of --repeats greedy generations of --max_new_tokens after a
warm-up, which compiles with --compile). The communication columns are computed from the sharding
in tp.py: every block all-reduces twice per forward (after attention and after the MLP), each time
the full hidden state of every token, so a decoded token costs 2 * n_layers all-reduces of dim
values. On CPU, gloo runs these through the loopback network stack, and CI-class machines have
only a couple of cores: communication and core contention dominate there, which the table shows.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import cli  # noqa: E402

DEFAULT_MODEL = REPO / "checkpoints" / "SmolLM2-135M-Instruct"


def worker(a):
    import torch

    import tp
    from checkpoint import load_model
    from decoding import Steps, compile_steps, generate, synchronize
    from sampling import SamplingParams

    rank, world_size, device = tp.init_from_env(a.device)
    try:
        dtype = getattr(torch, a.dtype)
        prepare = (lambda m: tp.shard_model(m, rank, world_size)) if world_size > 1 else None
        model = load_model(a.model, device, dtype, prepare=prepare)
        prompt = torch.randint(100, 1000, (16,), generator=torch.Generator().manual_seed(0)).to(device)
        model.setup_caches(1, len(prompt) + a.max_new_tokens)
        steps = compile_steps(torch.device(device)) if a.compile else Steps()
        t = time.perf_counter()
        generate(model, prompt, a.max_new_tokens, SamplingParams(), steps=steps)
        warmup = time.perf_counter() - t
        times = []
        for _ in range(a.repeats):
            synchronize(torch.device(device))
            t = time.perf_counter()
            _, stats = generate(model, prompt, a.max_new_tokens, SamplingParams(), steps=steps)
            synchronize(torch.device(device))
            times.append(stats.decode_s / max(stats.new_tokens - 1, 1))
        if rank == 0:
            args = model.args
            print("RESULT " + json.dumps({
                "world_size": world_size, "tokens_per_s": 1 / statistics.median(times),
                "warmup_s": warmup, "allreduces_per_token": 2 * args.n_layers,
                "allreduce_bytes_per_token": 2 * args.n_layers * args.dim * torch.finfo(dtype).bits // 8}),
                flush=True)
    finally:
        tp.shutdown()


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--world_sizes", default="1,3")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker(a)
    try:
        sizes = [int(x) for x in a.world_sizes.split(",") if x]
    except ValueError:
        p.error(f"--world_sizes must be integers, got {a.world_sizes!r}")
    if not sizes or min(sizes) < 1:
        p.error("--world_sizes needs at least one size >= 1")
    if not (Path(a.model) / "checkpoint.safetensors").is_file():
        p.error(f"{a.model} has no checkpoint.safetensors")
    rows = []
    for n in sizes:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", __file__,
               "--worker", "--model", a.model, "--device", a.device, "--dtype", a.dtype,
               "--max_new_tokens", str(a.max_new_tokens), "--repeats", str(a.repeats)] + (["--compile"] if a.compile else [])
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(
            max(1, (os.cpu_count() or 1) // n)) if a.device == "cpu" else os.environ.get("OMP_NUM_THREADS", "1")})
        line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
        if r.returncode or line is None:
            print(f"world size {n} failed:\n{r.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(line[7:]))
        print(json.dumps(rows[-1]), flush=True)
    if not rows:
        sys.exit("no world size ran")
    base = rows[0]["tokens_per_s"]
    print(f"\n| world size | tokens/s | vs {rows[0]['world_size']} rank(s) | all-reduces / token | all-reduce KB / token |")
    print("|---|---|---|---|---|")
    for r in rows:
        comm = r["allreduces_per_token"] if r["world_size"] > 1 else 0
        kb = r["allreduce_bytes_per_token"] / 1024 if r["world_size"] > 1 else 0
        print(f"| {r['world_size']} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base:.2f}x | {comm} | {kb:.1f} |")


if __name__ == "__main__":
    cli.run(main)
