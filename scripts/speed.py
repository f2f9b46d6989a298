"""The speed harness: every configuration of this engine, and its peers, as rows of one table.

    python scripts/speed.py                                # preset decode: SmolLM2, fp32/bf16, eager/compiled + transformers
    python scripts/speed.py --preset quantize --llama_cpp_python /path/to/python   # fp32/bf16 x int8/int4 + llama.cpp
    python scripts/speed.py --preset speculative           # (E, k) grid + transformers assistant_early_exit
    python scripts/speed.py --preset quantized_draft       # int8/int4 self-drafts over (E, k), float32 verify
    python scripts/speed.py --preset tp                    # world sizes 1 and 3 through torchrun
    python scripts/speed.py --preset gpu                   # Llama-2-7B shape, random weights, bf16, CUDA
    python scripts/speed.py --dtype bfloat16 --quantize none,int8 --compile \\
        --generation_strategy autoregressive,self_speculative --exit_layer 10,20 --num_speculations 2,4

Configurations are data: each preset is a list of grids over dtype x quantize x compile x
generation_strategy x exit_layer x num_speculations x draft_quantize x world_size (comma-separated values; a flag
given here replaces the preset's value), and the rows are their cross product. One timing method
for every row (timing.measure): a warm-up generation, which also compiles, then --repeats passes over
the prompts (greedy, no early stop, --max_new_tokens each); tokens/s is the median pass's decode
rate, per-token latency p50/p90 comes from the streamed tokens. Each row: tokens/s, ms/token,
prefill, compile time, weight bytes per token, GB/s and its share of the device's copy bandwidth
(measured first), peak memory, and for speculative rows the acceptance, tokens per round, draft and
verify step costs relative to a decode step and the speed-up these predict (the cost model,
timing.ideal_speedup: ideal x = tokens_per_round / (k * draft + verify [+ the catch-up of a draft
with its own cache])); the last column is the ratio to the first row. Peers are
rows of the same table: transformers eager and static cache + torch.compile, transformers
`assistant_early_exit` at each exit layer, llama.cpp (llama-cpp-python in --llama_cpp_python, on
the GGUF of the default model or --gguf), measured the same way.
"""
import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the engine's modules
import cli  # noqa: E402

cli.start(__name__)  # first: a Ctrl-C during the imports below is `interrupted` too (cli.py)

import harness  # noqa: E402
import options  # noqa: E402
import output  # noqa: E402
import timing  # noqa: E402
from hf_peer import hf_model, hf_weight_bytes  # noqa: E402
import torch  # noqa: E402
import tp  # noqa: E402
from checkpoint import RANDOM_SHAPES, is_random, random_args  # noqa: E402
from steps import synchronize  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

PEERS = ("transformers", "transformers_compile", "transformers_early_exit", "llama_cpp")

LLAMA_CPP_SERVER = r"""
import json, sys, time
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=2048, n_threads=int(sys.argv[2]), verbose=False, seed=0)
for line in sys.stdin:
    prompt, n = json.loads(line)
    llm.reset()
    t, out = time.perf_counter(), 0
    for _ in llm.generate(prompt, top_k=1, temp=0.0):
        out += 1
        if out == n:
            break
    print(json.dumps([out, time.perf_counter() - t]), flush=True)
"""


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="decode", choices=sorted(harness.PRESETS))
    p.add_argument("--checkpoint_path", "--model", dest="checkpoint_path", default=None,
                   help="as in generate.py, or random:<shape>[:<layers>] with shape in "
                        f"{', '.join(RANDOM_SHAPES)} (default: the preset's, else SmolLM2)")
    p.add_argument("--device", default=None, help="as in generate.py (default: the preset's, else auto)")
    p.add_argument("--hf_token", default=None)
    for key in harness.GRID_KEYS:
        p.add_argument(f"--{key}", default=None, nargs="?" if key == "compile" else None,
                       const="true" if key == "compile" else None, help="comma-separated values")
    p.add_argument("--peers", default=None, help=f"comma-separated subset of {', '.join(PEERS)} (default: the preset's)")
    p.add_argument("--max_new_tokens", "--max_steps", dest="max_new_tokens", type=int, default=None,
                   help="tokens per generation (default: the preset's, else 200)")
    p.add_argument("--num_samples", type=int, default=None, help="prompts: the first N HumanEval problems (default 2)")
    p.add_argument("--prompts", default="human_eval", choices=harness.PROMPT_SETS,
                   help="HumanEval problems, prose requests (chat format) or the two alternating")
    p.add_argument("--prompt_length", type=int, default=None, help="random prompts of this many tokens instead")
    p.add_argument("--repeats", type=int, default=3, help="timed passes over the prompts")
    p.add_argument("--interleave", action="store_true",
                   help="rows that share a loaded model take their timed passes in turn (after each one's warm-up), "
                        "so that a machine whose speed drifts slows them alike")
    p.add_argument("--acceptance", type=float, default=None,
                   help="speculative rows also predict the speed-up at this per-token acceptance rate, from "
                        "expected tokens per round (1 - a^(k+1)) / (1 - a) (LayerSkip's Llama2-7B: 0.795)")
    p.add_argument("--baseline", default=None,
                   help="the row the last column compares with: the first whose 'engine configuration' contains "
                        "this text, e.g. 'transformers float32 eager' (default: the first row)")
    p.add_argument("--freezing", action="store_true",
                   help="compile with inductor's freezing (weights as graph constants), to compare")
    p.add_argument("--llama_cpp_python", default=None, help="a Python with llama-cpp-python, for the llama_cpp peer")
    p.add_argument("--gguf", type=Path, default=None, help="GGUF for llama_cpp (default: the default model's)")
    output.add_output_option(p, None, file_option=False)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one row under torchrun
    a = p.parse_args(argv)
    preset = harness.PRESETS[a.preset]
    peers = [x for x in (a.peers if a.peers is not None else preset["peers"]).split(",") if x]
    bad = sorted(set(peers) - set(PEERS))
    if bad:
        p.error(f"unknown peers {bad}; choose from {', '.join(PEERS)}")
    if "llama_cpp" in peers and not a.llama_cpp_python:
        peers.remove("llama_cpp")  # a preset's optional peer: only when an interpreter is given
    h = harness.Harness(a.checkpoint_path or preset.get("checkpoint_path") or str(options.hub.DEFAULT_CHECKPOINT),
                       a.device or preset.get("device", "auto"), a.hf_token,
                       a.max_new_tokens or preset.get("max_new_tokens", 200), a.repeats, a.num_samples or 2,
                       a.prompts, a.prompt_length or preset.get("prompt_length"), a.acceptance, tuple(peers))
    for name, value in (("max_new_tokens", h.max_new_tokens), ("repeats", h.repeats),
                        ("num_samples", h.num_samples), ("prompt_length", h.prompt_length or 1)):
        if value < 1:
            p.error(f"--{name} must be >= 1")
    if h.acceptance is not None and not 0 <= h.acceptance < 1:
        p.error("--acceptance must be in [0, 1)")
    rows = harness.expand(preset["grids"], {k: vars(a)[k] for k in harness.GRID_KEYS})
    for c in rows:  # every row's options checked before anything runs
        try:
            harness.row_config(h, c)
            if int(c["world_size"]) < 1:
                raise ValueError(f"--world_size must be >= 1, got {c['world_size']}")
        except ValueError as e:
            p.error(f"the row {', '.join(f'{k}={v}' for k, v in c.items() if v)}: {e}")
    if is_random(h.checkpoint):
        try:
            random_args(h.checkpoint)
        except ValueError as e:
            p.error(str(e))
    if is_random(h.checkpoint) and h.peers:
        p.error("peers need a real checkpoint (random weights have no Hugging Face folder); pass --peers ''")
    return a, h, rows


def peer_rows(a, h, dtypes, exit_layers, prompts, device) -> list[dict]:
    import time
    n, rows = h.max_new_tokens, []

    def row(name, config, generate_fn, model=None):
        try:
            r = timing.measure(generate_fn, prompts, h.repeats, device)
        except Exception as e:  # noqa: BLE001 -- a peer that fails is a row that says why; ours are kept
            reason = " ".join(f"{type(e).__name__}: {e}".split())
            r = {"tokens_per_s": None, "failed": reason}
            config = f"{config}: FAILED ({reason[:120]})"
        r.update(engine=name, config=config)
        if model is not None:
            r["bytes_per_token"] = hf_weight_bytes(model)
        rows.append(r)
        print(json.dumps(r, default=str), file=sys.stderr, flush=True)

    def hf_fn(hf, **extra):
        def fn(prompt, on_tokens):
            t = time.perf_counter()
            with torch.no_grad():
                out = hf.generate(prompt[None].to(hf.device), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  pad_token_id=0, **extra)
            synchronize(device)
            return out.shape[1] - len(prompt), time.perf_counter() - t
        return fn
    for dname in dtypes:
        dtype = options.pick_dtype(dname, device)
        if "transformers" in h.peers or "transformers_early_exit" in h.peers:
            hf = hf_model(h.checkpoint, dtype, False).to(device)
            if "transformers" in h.peers:
                row("transformers", f"{dname} eager", hf_fn(hf), hf)
            for E in exit_layers if "transformers_early_exit" in h.peers else []:
                row("transformers", f"{dname} assistant_early_exit={E}", hf_fn(hf, assistant_early_exit=E))
        if "transformers_compile" in h.peers:
            hf = hf_model(h.checkpoint, dtype, True).to(device)
            row("transformers", f"{dname} static cache + compile", hf_fn(hf), hf)
            torch._dynamo.reset()
    if "llama_cpp" in h.peers:
        gguf = a.gguf or next(iter(sorted(Path(REPO, "checkpoints").glob("**/*.gguf"))), None)
        if gguf is None:
            raise FileNotFoundError("no GGUF for the llama_cpp peer; pass --gguf")
        server = subprocess.Popen([a.llama_cpp_python, "-c", LLAMA_CPP_SERVER, str(gguf), str(torch.get_num_threads())],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

        def cpp(prompt, on_tokens):
            try:
                server.stdin.write(json.dumps([prompt.tolist(), n]) + "\n")
                server.stdin.flush()
                line = server.stdout.readline()
            except BrokenPipeError:  # it exited before reading
                line = ""
            if not line:
                raise RuntimeError(f"llama-cpp-python exited with status {server.wait()}; run the "
                                   "--llama_cpp_python interpreter by hand to see why")
            return tuple(json.loads(line))
        try:
            row("llama.cpp", gguf.name, cpp)
            rows[-1]["bytes_per_token"] = gguf.stat().st_size  # every tensor once per token (embedding excepted)
        finally:
            if server.poll() is None:
                server.stdin.close()
                server.wait()
    return rows


def tp_row(a, h, c: dict) -> dict:
    """A row over world_size > 1 ranks: this script in worker mode under torchrun; rank 0 reports."""
    n = int(c["world_size"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", __file__,
           "--worker", json.dumps(c), "--checkpoint_path", h.checkpoint, "--device", h.device,
           "--max_new_tokens", str(h.max_new_tokens), "--repeats", str(h.repeats), "--peers", "",
           *(["--hf_token", h.hf_token] if h.hf_token else []),
           *(["--acceptance", str(h.acceptance)] if h.acceptance is not None else []),
           *(["--freezing"] if a.freezing else []),
           "--num_samples", str(h.num_samples), "--prompts", h.prompts,
           *(["--prompt_length", str(h.prompt_length)] if h.prompt_length else [])]
    threads = str(max(1, (os.cpu_count() or 1) // n)) if "cuda" not in h.device else "1"
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": threads})
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    if r.returncode or line is None:  # a rank's one-line refusal (cli.run) says why, else torchrun's last words
        said = [x for x in r.stderr.splitlines() if x.startswith("error")] or r.stderr.strip().splitlines()[-3:]
        reason = " ".join(said[0].split()) if said else f"exit status {r.returncode}"
        return {"engine": "ours", "config": f"{harness.describe_row(c)}: FAILED ({reason[:160]})", "tokens_per_s": None,
                "failed": reason, **c}
    return json.loads(line[len("RESULT "):])


def worker(a, h):
    c = json.loads(a.worker)
    if a.freezing:
        from torch._inductor import config as inductor_config
        inductor_config.freezing = True
    rank, world_size, device = tp.init_from_env(h.device)
    h = dataclasses.replace(h, device=device)
    try:
        engine = harness.load_row_engine(h, c, rank, world_size)
        r = harness.bench_row(engine, c, harness.prompts_for(engine, h.num_samples, h.prompts, h.prompt_length), h)
        if rank == 0:
            print("RESULT " + json.dumps(r, default=str), flush=True)
    finally:
        tp.shutdown()


def main(argv=None):
    a, h, grid_rows = parse_args(argv)
    if a.worker:
        return worker(a, h)
    out = output.check_output(a, "speed.json")
    if a.freezing:
        from torch._inductor import config as inductor_config
        inductor_config.freezing = True
    device = options.pick_device(h.device)
    copy_bw = timing.copy_bandwidth_gbs(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({torch.backends.cpu.get_cpu_capability()})"
    header = (f"{h.checkpoint} on {device} ({name}), {torch.get_num_threads()} threads, copy bandwidth "
              f"{copy_bw:.1f} GB/s, torch {torch.__version__}; {len(grid_rows)} rows + peers {list(h.peers) or 'none'}")
    print(header, file=sys.stderr, flush=True)
    rows, prompts, loaded, done = [], None, (None, None), []
    for c in grid_rows:
        if int(c["world_size"]) > 1:
            rows.append(tp_row(a, h, c))
        else:
            key = (c["dtype"], c["quantize"], c["compile"], c["layers_per_graph"])
            if loaded[0] != key:  # one model per (dtype, quantization, compile, graphs); strategies share it
                loaded = (None, None)
                torch._dynamo.reset()
                schemes = list(dict.fromkeys(r["draft_quantize"] for r in grid_rows if r["draft_quantize"] != "none"
                                             and (r["dtype"], r["quantize"], r["compile"], r["layers_per_graph"]) == key))
                loaded = (key, harness.load_row_engine(h, c, draft_schemes=schemes))
            engine = loaded[1]
            prompts = prompts or harness.prompts_for(engine, h.num_samples, h.prompts, h.prompt_length)
            if a.interleave:  # every row this engine runs, measured together
                if c in done:
                    continue
                group = [r for r in grid_rows if (r["dtype"], r["quantize"], r["compile"], r["layers_per_graph"]) == key
                         and int(r["world_size"]) == 1]
                done.extend(group)
                rows += harness.bench_rows(engine, [(r, harness.row_config(h, r).strategy) for r in group], prompts, h)
            else:
                rows.append(harness.bench_row(engine, c, prompts, h, harness.row_config(h, c).strategy))
        print(json.dumps(rows[-1], default=str), file=sys.stderr, flush=True)
    if h.peers:
        loaded = (None, None)
        torch._dynamo.reset()
        dtypes = list(dict.fromkeys(c["dtype"] for c in grid_rows))
        exit_layers = list(dict.fromkeys(int(c["exit_layer"]) for c in grid_rows if c["exit_layer"].isdigit()))
        rows += peer_rows(a, h, dtypes, exit_layers, prompts, device)
    harness.finish_rows(rows, copy_bw, a.baseline)
    print(f"\n{header}\n\n{harness.table(rows)}")
    command = "python scripts/speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    output.write_json(out, {"command": command, "device": str(device), "device_name": name,
                            "copy_bandwidth_gbs": copy_bw, "torch": torch.__version__, "rows": rows})


if __name__ == "__main__":
    cli.run(main)
