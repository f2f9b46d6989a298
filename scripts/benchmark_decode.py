"""Decode speed of this engine against transformers, in one process, on the same prompt and model.

    python scripts/benchmark_decode.py                                  # SmolLM2, fp32 and bf16, CPU
    python scripts/benchmark_decode.py --model llama2-7b-random --device cuda --dtypes bfloat16 --no_hf

Rows: this engine eager and compiled, transformers `generate` eager and with a static cache +
torch.compile. Each row: median tokens/s over --repeats generations of --max_new_tokens tokens
(greedy, no early stop, prefill included), ms/token, compile time, peak memory, achieved weight
bandwidth and the ratio to transformers eager of the same dtype. The device's copy bandwidth is
measured first, so the bandwidth column can be read against it.
"""
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import cli  # noqa: E402
import torch  # noqa: E402

from checkpoint import load_model  # noqa: E402
from decoding import (Steps, compile_steps, generate, peak_memory_gb, synchronize,  # noqa: E402
                      weight_bytes_per_token)
from model import ModelArgs, Transformer  # noqa: E402
from sampling import SamplingParams  # noqa: E402

DEFAULT_MODEL = REPO / "checkpoints" / "SmolLM2-135M-Instruct"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RANDOM_MODELS = {  # shapes only: random weights, for bandwidth measurements without a download
    "llama2-7b-random": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                             intermediate_size=11008, max_position_embeddings=4096),
}


def copy_bandwidth_gbs(device: torch.device) -> float:
    """Bytes read plus bytes written per second by a large tensor copy (the usual 'copy bandwidth')."""
    n = (1 << 30 if device.type == "cuda" else 1 << 28) // 4
    src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
    for _ in range(3):
        dst.copy_(src)
    synchronize(device)
    best = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best / 1e9


def check_model_and_device(p, model: str, device_name: str):
    """(device, is_random) for --model/--device, or a parser error before anything is loaded."""
    device = torch.device(device_name)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda requested but CUDA is not available")
    is_random = model in RANDOM_MODELS
    if not is_random and not (Path(model) / "checkpoint.safetensors").is_file():
        p.error(f"{model} has no checkpoint.safetensors (prepare it with scripts/prepare_smollm2.py)")
    return device, is_random


def random_model(name: str, device, dtype) -> Transformer:
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(ModelArgs(**RANDOM_MODELS[name])).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.eval()


def timed_runs(run, warmup: bool, repeats: int):
    """(compile or warm-up seconds, list of per-run seconds)."""
    t = time.perf_counter()
    if warmup:
        run()
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return first, times


def bench_ours(model, prompt, n, compiled: bool, repeats: int):
    device = prompt.device
    model.setup_caches(1, len(prompt) + n)
    steps = compile_steps(device) if compiled else Steps()
    greedy = SamplingParams()

    def run():
        generate(model, prompt, n, greedy, steps=steps)
        synchronize(device)
    return timed_runs(run, True, repeats)


def bench_hf(hf_dir, dtype, prompt, n, compiled: bool, repeats: int):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(prompt.device).eval()
    hf.generation_config.eos_token_id = None  # always n tokens, like our runs
    hf.config.eos_token_id = None
    if compiled:
        hf.generation_config.cache_implementation = "static"
        hf.forward = torch.compile(hf.forward, fullgraph=True,
                                   mode="reduce-overhead" if prompt.device.type == "cuda" else None)

    def run():
        with torch.no_grad():
            hf.generate(prompt[None], max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        synchronize(prompt.device)
    return timed_runs(run, True, repeats)


def row(name, dtype, n, first, times, bytes_per_token, device, compiled):
    tps = n / statistics.median(times)
    return {"engine": name, "dtype": dtype, "tokens_per_s": tps, "ms_per_token": 1000 / tps,
            "compile_s": first if compiled else None, "peak_memory_gb": peak_memory_gb(device),
            "bandwidth_gbs": bytes_per_token * tps / 1e9 if bytes_per_token else None}


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=str(DEFAULT_MODEL),
                   help=f"converted checkpoint dir, or one of {', '.join(RANDOM_MODELS)}")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompt_length", type=int, default=16)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no_hf", action="store_true", help="skip the transformers rows")
    p.add_argument("--no_hf_compile", action="store_true", help="skip transformers static cache + compile")
    p.add_argument("--freezing", action="store_true",
                   help="compile our rows with inductor's freezing (weights as graph constants), to compare")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    a = p.parse_args(argv)
    dtypes = a.dtypes.split(",")
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        p.error(f"unknown dtype(s) {bad}; choose from {', '.join(DTYPES)}")
    device, is_random = check_model_and_device(p, a.model, a.device)

    if a.freezing:
        import torch._inductor.config as inductor_config
        inductor_config.freezing = True
    bw = copy_bandwidth_gbs(device)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"{torch.get_num_threads()} threads, copy bandwidth {bw:.1f} GB/s, torch {torch.__version__}", flush=True)
    prompt = torch.randint(100, 1000, (a.prompt_length,), generator=torch.Generator().manual_seed(0)).to(device)
    rows = []
    for dname in dtypes:
        dtype = DTYPES[dname]
        model = random_model(a.model, device, dtype) if is_random else load_model(a.model, device, dtype)
        nbytes = weight_bytes_per_token(model)
        for compiled in (False, True):
            first, times = bench_ours(model, prompt, a.max_new_tokens, compiled, a.repeats)
            name = ("ours compiled" + (" +freezing" if a.freezing else "")) if compiled else "ours eager"
            rows.append(row(name, dname, a.max_new_tokens, first, times,
                            nbytes, device, compiled))
            print(json.dumps(rows[-1]), flush=True)
        del model
        torch._dynamo.reset()
        if a.no_hf or is_random:
            continue
        for compiled in (False,) if a.no_hf_compile else (False, True):
            try:
                first, times = bench_hf(a.model, dtype, prompt, a.max_new_tokens, compiled, a.repeats)
            except Exception as e:  # report, don't hide, a transformers configuration that fails
                print(f"transformers {'static+compile' if compiled else 'eager'} {dname} failed: {e}", flush=True)
                continue
            rows.append(row("transformers static+compile" if compiled else "transformers eager", dname,
                            a.max_new_tokens, first, times, nbytes, device, compiled))
            print(json.dumps(rows[-1]), flush=True)
            torch._dynamo.reset()

    print("\n| engine | dtype | tokens/s | ms/token | compile s | peak mem GB | GB/s | % of copy bw | vs transformers eager |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = next((x["tokens_per_s"] for x in rows if x["engine"] == "transformers eager" and x["dtype"] == r["dtype"]), None)
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        comp = f"{r['compile_s']:.0f}" if r["compile_s"] is not None else "-"
        gbs = r["bandwidth_gbs"]
        print(f"| {r['engine']} | {r['dtype']} | {r['tokens_per_s']:.1f} | {r['ms_per_token']:.1f} | {comp} | "
              f"{r['peak_memory_gb']:.2f} | {gbs:.1f} | {100 * gbs / bw:.0f}% | {ratio} |")
    if a.json:
        a.json.write_text(json.dumps({"copy_bandwidth_gbs": bw, "device": str(device), "rows": rows}, indent=2))


if __name__ == "__main__":
    cli.run(main)
