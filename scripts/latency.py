"""Latency microbenchmark of one configuration: the script a GPU check runs.

    python scripts/latency.py                                           # SmolLM2, fp32, CPU
    python scripts/latency.py --model llama2-7b-random --device cuda --dtype bfloat16 --compile
    python scripts/latency.py --quantize int4-g128 --dtype bfloat16 --compile \\
        --generation_strategy self_speculative --exit_layer 20 --num_speculations 3

Reports, as one JSON line and a table: compile time (the first, untimed generation), prefill
latency, per-token decode latency p50/p90 (self-speculation: each round's time spread over the
tokens it produced), tokens/s, weight bytes read per token and the bandwidth this achieves next to
the device's measured copy bandwidth, and peak memory. Per-token times come from the streaming
callback, which synchronises with the device once per step (self-speculation: once per round).
"""
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import cli  # noqa: E402
import torch  # noqa: E402

from benchmark_decode import DTYPES, RANDOM_MODELS, copy_bandwidth_gbs, random_model  # noqa: E402
from benchmark_quantize import parse_config  # noqa: E402
from checkpoint import load_model  # noqa: E402
from decoding import (Steps, compile_steps, generate, peak_memory_gb, speculative_generate,  # noqa: E402
                      synchronize, weight_bytes_per_token)
from quantize import quantize_model  # noqa: E402
from sampling import SamplingParams  # noqa: E402

DEFAULT_MODEL = REPO / "checkpoints" / "SmolLM2-135M-Instruct"


def percentile(values, q):
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def measure(model, prompt, n, strategy, exit_layer, k, steps, device):
    """(prefill seconds, per-token seconds list, total seconds, new tokens)."""
    stamps = []

    def on_tokens(ids):
        synchronize(device)
        stamps.append((time.perf_counter(), len(ids)))
    synchronize(device)
    t0 = time.perf_counter()
    if strategy == "self_speculative":
        _, stats = speculative_generate(model, prompt, n, SamplingParams(), k, exit_layer=exit_layer, steps=steps,
                                        on_tokens=on_tokens)
    else:
        _, stats = generate(model, prompt, n, SamplingParams(), steps=steps, exit_layer=exit_layer,
                            on_token=lambda t: on_tokens([int(t)]))
    synchronize(device)
    total = time.perf_counter() - t0
    per_token, prev = [], stamps[0][0]
    for t, count in stamps[1:]:
        per_token += [(t - prev) / count] * count
        prev = t
    return stats.prefill_s, per_token, total, stats.new_tokens


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=str(DEFAULT_MODEL), help=f"checkpoint dir, or one of {', '.join(RANDOM_MODELS)}")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--quantize", default=None, help="int8, int4-g32, int4-g128, ... (in memory, like quantize.py)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--generation_strategy", default="autoregressive", choices=["autoregressive", "self_speculative"])
    p.add_argument("--exit_layer", type=int, default=None)
    p.add_argument("--num_speculations", type=int, default=3)
    p.add_argument("--prompt_length", type=int, default=128)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda requested but CUDA is not available")
    if a.model not in RANDOM_MODELS and not (Path(a.model) / "checkpoint.safetensors").is_file():
        p.error(f"{a.model} has no checkpoint.safetensors")
    if a.generation_strategy == "self_speculative" and a.exit_layer is None:
        p.error("self_speculative needs --exit_layer")
    mode = group = None
    if a.quantize:
        try:
            _, mode, group, _ = parse_config(a.quantize)
        except ValueError as e:
            p.error(str(e))
        if mode is None:
            p.error(f"--quantize takes int8 or int4-gN, got {a.quantize!r}")
    dtype = DTYPES[a.dtype]
    model = random_model(a.model, device, dtype) if a.model in RANDOM_MODELS else load_model(a.model, device, dtype)
    if a.exit_layer is not None and not 1 <= a.exit_layer < model.args.n_layers:
        p.error(f"--exit_layer must be in [1, {model.args.n_layers - 1}]")
    if mode:
        quantize_model(model, mode, group or 128)
    k = a.num_speculations if a.generation_strategy == "self_speculative" else 0
    bw = copy_bandwidth_gbs(device)
    prompt = torch.randint(100, 1000, (a.prompt_length,), generator=torch.Generator().manual_seed(0)).to(device)
    model.setup_caches(1, a.prompt_length + a.max_new_tokens + k)
    steps = compile_steps(device) if a.compile else Steps()
    t = time.perf_counter()
    measure(model, prompt, a.max_new_tokens, a.generation_strategy, a.exit_layer, k, steps, device)
    first_s = time.perf_counter() - t
    prefills, per_token, tps = [], [], []
    for _ in range(a.repeats):
        pre, toks, total, n = measure(model, prompt, a.max_new_tokens, a.generation_strategy, a.exit_layer, k,
                                      steps, device)
        prefills.append(pre)
        per_token += toks
        tps.append(n / total)
    nbytes = weight_bytes_per_token(model)
    p50 = percentile(per_token, 0.5)
    r = {"model": a.model, "device": str(device), "dtype": a.dtype, "quantize": a.quantize, "compile": a.compile,
         "strategy": a.generation_strategy, "exit_layer": a.exit_layer, "k": k or None,
         "compile_s" if a.compile else "warmup_s": first_s, "prefill_ms": 1000 * statistics.median(prefills),
         "prompt_length": a.prompt_length, "decode_ms_p50": 1000 * p50, "decode_ms_p90": 1000 * percentile(per_token, 0.9),
         "tokens_per_s": statistics.median(tps), "decode_tokens_per_s": 1 / p50,
         "weight_bytes_per_token": nbytes, "bandwidth_gbs": nbytes / p50 / 1e9, "copy_bandwidth_gbs": bw,
         "bandwidth_share": nbytes / p50 / 1e9 / bw, "peak_memory_gb": peak_memory_gb(device),
         "torch": torch.__version__}
    print(json.dumps(r))
    print("| compile s | prefill ms | decode ms p50 | p90 | tokens/s | weight GB/s | copy GB/s | share | peak GB |",
          file=sys.stderr)
    print("|---|---|---|---|---|---|---|---|---|", file=sys.stderr)
    print(f"| {first_s:.1f} | {r['prefill_ms']:.1f} | {r['decode_ms_p50']:.2f} | {r['decode_ms_p90']:.2f} | "
          f"{r['tokens_per_s']:.1f} | {r['bandwidth_gbs']:.1f} | {bw:.1f} | {r['bandwidth_share']:.0%} | "
          f"{r['peak_memory_gb']:.2f} |", file=sys.stderr)


if __name__ == "__main__":
    cli.run(main)
