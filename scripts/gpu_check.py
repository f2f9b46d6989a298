"""Everything a short GPU loan should measure and check, in one command, within a time budget.

    python scripts/gpu_check.py --output_dir gpu_check_out          # a GPU machine: at most 8 minutes
    python scripts/gpu_check.py --device cpu --output_dir /tmp/gc    # every stage on tiny shapes (CI runs it)

Stages, most important first; each is timed, and one that would not fit in what is left of
--budget_s (from its estimate) is skipped and reported as skipped. A stage that fails is reported
with its error and the next one runs. After every stage the table so far is printed and
OUTPUT_DIR/gpu_check.json rewritten, so a run cut short still leaves its results; the whole
table is printed at the end.

1. environment: torch / CUDA versions, device name, measured copy bandwidth (a large device-to-device
   copy, bytes read + written), bfloat16 matmul TFLOP/s.
2. exactness, on a small random Llama (4 layers, GQA, untied and tied head) in float32: greedy
   self-speculative (several (E, k), eager and compiled) and two-model speculative output equal
   greedy autoregressive output token for token; the compiled steps do not recompile for a second
   prompt of another length; logits on the device equal CPU logits (1e-4 relative); int8 and int4
   greedy self-speculation equal their own greedy decoding.
3. decode: Llama-2-7B shape (32 layers, dim 4096, MLP 11008, vocab 32000), bfloat16, random
   weights, compiled: tokens/s, ms/token, weight bandwidth and its share of the copy bandwidth
   (target >= 85%; gpt-fast: 59% on an H100), compile time (target < 60 s; gpt-fast: 131 s), peak memory.
4. batched, same model: B = 1, 4, 16, 64 rows decoding at once (batching.generate_many, compiled,
   greedy): total decode tokens/s, its ratio to one row, and the weights' bandwidth (each step
   reads every weight once, whatever B) as a share of the copy bandwidth.
5. speculation, same model: draft step (E=8) and verify pass (k=6) as fractions of a decode step,
   the ideal speed-up they predict at LayerSkip's published acceptance for Llama2-7B (79.5%), and
   the loop's measured speed-up against the ideal for the acceptance it measured (target >= 95%).
6. quantization, same shape with --quant_layers layers (compile time): int8 and int4 (group 128)
   compiled decode tokens/s against bfloat16 (targets 1.8x and 3x; gpt-fast on A100: 1.48x, 1.88x).
7. tensor_parallel: torchrun --nproc_per_node=1 (NCCL on CUDA, gloo on CPU) runs the small model
   with its all-reduces in place, compiled; its greedy tokens equal the single-process ones.

With --device cpu (the dry run CI does) the "7B" stages use a small shape and only the decode
stage compiles; everything else runs the same code eagerly, in well under a minute.
"""
import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the engine's modules
import cli  # noqa: E402

cli.start(__name__)  # first: a Ctrl-C during the imports below is `interrupted` too (cli.py)

import harness  # noqa: E402
import timing  # noqa: E402
import torch  # noqa: E402

from checkpoint import RANDOM_SHAPES  # noqa: E402
from engine import weight_bytes  # noqa: E402
from decoding import generate, speculative_generate  # noqa: E402
from steps import Steps, compile_steps, synchronize  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402
from quantized import quantize_model  # noqa: E402
from sampling import SamplingParams  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
GREEDY = SamplingParams()
SMALL = dict(RANDOM_SHAPES["small"], n_layers=4)
LAYERSKIP_ACCEPTANCE = 0.795  # Llama2-7B, E=8, k=6 (LayerSkip paper, CNN/DM)
# Seconds each stage is expected to take (compiles included), for the budget.
ESTIMATES = {"cuda": {"environment": 15, "exactness": 100, "decode": 150, "batched": 120, "speculation": 150,
                      "quantization": 150, "tensor_parallel": 60},
             "cpu": {"environment": 5, "exactness": 60, "decode": 30, "batched": 20, "speculation": 40,
                     "quantization": 40, "tensor_parallel": 60}}
BATCH_SIZES = {"cuda": (1, 4, 16, 64), "cpu": (1, 4)}


# --- models ---

def small_model(device, tied=False, n_layers=4, seed=0) -> Transformer:
    """A small random Llama whose greedy output varies (weights of std 1.2/sqrt(dim)) and whose
    early exits agree with the last layer part of the time (residual branches shrinking with
    depth), in float32."""
    torch.manual_seed(seed)  # drawn on the CPU, so every device gets the same weights
    model = Transformer(ModelArgs(**dict(SMALL, n_layers=n_layers, tie_word_embeddings=tied)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 1.2 / math.sqrt(SMALL["dim"]))
        for i, layer in enumerate(model.layers):
            layer.attention.wo.weight.mul_(0.5 ** i)
            layer.feed_forward.w2.weight.mul_(0.5 ** i)
    return model.to(device).eval()


def random_prompts(n, length, vocab, device):
    return [torch.randint(3, vocab, (length + 5 * i,), generator=torch.Generator().manual_seed(i)).to(device)
            for i in range(n)]


# --- stages: each returns (results dict, table rows (check, value, target, ok: bool | None)) ---

def stage_environment(ctx):
    device = ctx["device"]
    res = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        res.update(name=props.name, memory_gb=props.total_memory / 1e9, capability=f"{props.major}.{props.minor}")
    else:
        res.update(name=f"CPU ({torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} threads")
    res["copy_bandwidth_gbs"] = ctx["copy_bw"] = timing.copy_bandwidth_gbs(device)
    n = 8192 if device.type == "cuda" else 512
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    synchronize(device)
    t, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ b
    synchronize(device)
    res["bf16_matmul_tflops"] = 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e12
    return res, [("device", res["name"], "", None), ("torch / CUDA", f"{res['torch']} / {res['cuda']}", "", None),
                 ("copy bandwidth", f"{res['copy_bandwidth_gbs']:.0f} GB/s", "", None),
                 ("bf16 matmul", f"{res['bf16_matmul_tflops']:.1f} TFLOP/s", "", None)]


def stage_exactness(ctx):
    device, res, rows = ctx["device"], {}, []

    def check(name, ok, detail=""):
        res[name] = {"ok": bool(ok), "detail": detail}
        rows.append((name, detail or ("equal" if ok else "DIFFERENT"), "equal", bool(ok)))

    n = 24
    for tied in (False, True):
        tag = "tied" if tied else "untied"
        model = small_model(device, tied)
        draft = small_model(device, tied, n_layers=2, seed=1)
        for m in (model, draft):
            m.setup_caches(1, 128)
        prompts = random_prompts(2, 7, SMALL["vocab_size"], device)
        refs = [generate(model, p, n, GREEDY)[0] for p in prompts]
        distinct = min(len(set(r[0, len(p):].tolist())) for r, p in zip(refs, prompts))
        res[f"{tag}: distinct tokens in {n}"] = distinct  # output that repeats one token would prove little
        for E, k in [(1, 2), (2, 4), (3, 1)]:
            same = all(speculative_generate(model, p, n, GREEDY, k, exit_layer=E)[0].equal(r)
                       for p, r in zip(prompts, refs))
            check(f"{tag}: self-speculative E={E} k={k} eager == autoregressive", same)
        same = all(speculative_generate(model, p, n, GREEDY, 3, draft_model=draft)[0].equal(r)
                   for p, r in zip(prompts, refs))
        check(f"{tag}: two-model speculative eager == autoregressive", same)
        if not ctx["compile_all"]:
            continue
        what = f"{tag}: compiled autoregressive, self-speculative (E=2 k=4), two-model == eager; no recompile"
        steps = compile_steps(device)
        try:
            for i, (p, r) in enumerate(zip(prompts, refs)):  # the second prompt (another length) must reuse the graphs
                with torch._dynamo.config.patch(error_on_recompile=i > 0):
                    outs = [generate(model, p, n, GREEDY, steps=steps)[0],
                            speculative_generate(model, p, n, GREEDY, 4, exit_layer=2, steps=steps)[0],
                            speculative_generate(model, p, n, GREEDY, 3, draft_model=draft, steps=steps)[0]]
                if not all(o.equal(r) for o in outs):
                    raise AssertionError(f"prompt {i}: compiled output differs from eager autoregressive")
            check(what, True)
        except Exception as e:  # noqa: BLE001 -- a recompile or a difference is the finding
            check(what, False, cli.describe(e)[:200])
    # the device's float32 logits against the CPU's
    model, cpu_model = small_model(device), small_model("cpu")
    ids = random_prompts(1, 12, SMALL["vocab_size"], "cpu")[0][None]
    with torch.no_grad():
        a, b = model(ids.to(device)).float().cpu(), cpu_model(ids)
    rel = ((a - b).abs().max() / b.abs().max()).item()
    res["logits vs CPU (max rel err)"] = rel
    rows.append((f"{device.type} float32 logits vs CPU", f"{rel:.1e}", "< 1e-4", rel < 1e-4))
    # quantized models: greedy self-speculation equals their own greedy decoding
    for mode, g in (("int8", None), ("int4", 128 if device.type == "cuda" else 32)):
        model = quantize_model(small_model(device), mode, g or 128)
        model.setup_caches(1, 128)
        variants = [("eager", None)] + ([("compiled", compile_steps(device))] if ctx["compile_all"] else [])
        for how, steps in variants:
            kw = {"steps": steps} if steps else {}
            same = all(speculative_generate(model, p, n, GREEDY, 3, exit_layer=2, **kw)[0].equal(
                generate(model, p, n, GREEDY, **kw)[0]) for p in random_prompts(2, 7, SMALL["vocab_size"], device))
            check(f"{mode}{f'-g{g}' if g else ''}: self-speculative E=2 k=3 {how} == its autoregressive", same)
    return res, rows


def preset_rows(ctx) -> list[dict]:
    """The harness's `gpu` preset (scripts/speed.py --preset gpu): bfloat16 autoregressive and
    self-speculative (E=8, k=6), int8 and int4-g128. The CPU dry run compiles only the first."""
    rows = harness.expand(harness.PRESETS["gpu"]["grids"], {})
    if ctx["device"].type == "cpu":
        rows = [dict(c, exit_layer="1" if c["exit_layer"] else "", num_speculations="2",
                     compile="true" if i == 0 else "false") for i, c in enumerate(rows)]
    return rows


def harness_args(ctx, n_layers=None):
    """The harness's options for these stages: the preset's model, or a small stand-in on CPU."""
    cuda = ctx["device"].type == "cuda"
    shape = "random:llama2-7b" if cuda else "random:small"
    return harness.Harness(shape + (f":{n_layers}" if n_layers else ""), str(ctx["device"]),
                          max_new_tokens=128 if cuda else 16, repeats=3, num_samples=2, prompt_length=16)


def measured(ctx, h, c, engine=None) -> tuple[dict, object]:
    engine = engine or harness.load_row_engine(h, c)
    prompts = harness.prompts_for(engine, h.num_samples, h.prompts, h.prompt_length)
    r = harness.bench_row(engine, c, prompts, h, harness.row_config(h, c).strategy)
    return harness.finish_rows([r], ctx.get("copy_bw"))[0], engine


def stage_decode(ctx):
    device, h = ctx["device"], harness_args(ctx)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    r, ctx["engine"] = measured(ctx, h, preset_rows(ctx)[0])
    tps, ms, share = r["tokens_per_s"], r["ms_per_token_p50"], r.get("copy_share") or float("nan")
    name = "Llama-2-7B shape" if device.type == "cuda" else "small shape (CPU)"
    on_gpu = device.type == "cuda"
    return r, [(f"decode tokens/s ({name}, bf16, compiled)", f"{tps:.1f} ({ms:.2f} ms/token)", "", None),
               ("weight bandwidth / copy bandwidth", f"{r['gbs']:.0f} GB/s = {share:.0%}", ">= 85% (gpt-fast 59%)",
                share >= 0.85 if on_gpu else None),
               ("decode graph compile (+ one generation)", f"{r['compile_s']:.0f} s", "< 60 s (gpt-fast 131 s)",
                r["compile_s"] < 60 if on_gpu else None),
               ("peak memory", f"{r['peak_memory_gb']:.1f} GB", "", None)]


def stage_batched(ctx):
    device, engine = ctx["device"], ctx.get("engine")
    if engine is None:
        raise RuntimeError("needs the decode stage's model, which did not run")
    if not ctx["compile_all"]:  # the CPU dry run: the same loop, eagerly
        engine.steps = Steps()
    h = harness_args(ctx)
    sizes = BATCH_SIZES[device.type]
    prompts = [p.tolist() for p in harness.prompts_for(engine, max(sizes), length=h.prompt_length)]
    n = h.max_new_tokens
    step_bytes = weight_bytes(engine.model, per_token=True)
    res, rows, base = {}, [], None
    for b in sizes:
        engine.setup_caches(h.prompt_length + n + 8, b)
        engine.run_many(prompts[:b], 4, stop_ids=())  # this bucket's graphs compile here, untimed
        _, stats = engine.run_many(prompts[:b], n, stop_ids=())
        tps = stats.decode_tokens_per_s
        base = base or tps
        gbs = step_bytes * stats.steps / stats.decode_s / 1e9
        share = gbs / ctx["copy_bw"] if ctx.get("copy_bw") else float("nan")
        res[b] = {"decode_tokens_per_s": tps, "vs_1_row": tps / base, "weight_gbs": gbs, "copy_share": share,
                  "ms_per_step": stats.ms_per_step}
        rows.append((f"{b} rows at once: decode tokens/s in all", f"{tps:.1f} = {tps / base:.2f}x 1 row "
                     f"({res[b]['ms_per_step']:.1f} ms/step)", "", None))
        rows.append((f"{b} rows: weight bandwidth / copy bandwidth", f"{gbs:.0f} GB/s = {share:.0%}", "", None))
    engine.setup_caches(h.prompt_length + n + 8, 1)  # the next stage times one row again
    return res, rows


def stage_speculation(ctx):
    device, engine = ctx["device"], ctx.get("engine")
    if engine is None:
        raise RuntimeError("needs the decode stage's model, which did not run")
    h, (ar_row, spec_row) = harness_args(ctx), preset_rows(ctx)[:2]
    spec_row = dict(spec_row, compile=ar_row["compile"])  # the decode stage's model and steps
    if not ctx["compile_all"]:
        engine.steps = Steps()
        ar_row = dict(ar_row, compile="false")
    ar, _ = measured(ctx, h, ar_row, engine)
    r, _ = measured(ctx, h, spec_row, engine)
    E, k = engine.strategy.exit_layer, engine.strategy.num_speculations
    draft, verify = r["draft_cost"], r["verify_cost"]
    a = LAYERSKIP_ACCEPTANCE
    predicted = (1 - a ** (k + 1)) / (1 - a) / (k * draft + verify)
    efficiency = r["tokens_per_s"] / ar["tokens_per_s"] / r["ideal_speedup"]
    res = {"exit_layer": E, "k": k, "draft_cost": draft, "verify_cost": verify,
           "predicted_speedup_at_0.795": predicted, "ar_tokens_per_s": ar["tokens_per_s"],
           "spec_tokens_per_s": r["tokens_per_s"], "tokens_per_round": r["tokens_per_round"],
           "ideal_speedup": r["ideal_speedup"], "efficiency": efficiency}
    on_gpu = device.type == "cuda"
    return res, [(f"draft step E={E} / decode step", f"{draft:.2f}", "~E/L + LM head", None),
                 (f"verify pass k={k} / decode step", f"{verify:.2f}", "~1 on a GPU", None),
                 (f"predicted speed-up at acceptance {a:.1%}", f"{predicted:.2f}x", "", None),
                 ("loop: measured / ideal speed-up",
                  f"{efficiency:.0%} (tokens/round {r['tokens_per_round']:.2f}, random weights)",
                  ">= 95%", efficiency >= 0.95 if on_gpu else None)]


def stage_quantization(ctx):
    device = ctx["device"]
    ctx.pop("engine", None)  # free the full model first
    if device.type == "cuda":
        torch.cuda.empty_cache()
    h = harness_args(ctx, ctx["quant_layers"] if device.type == "cuda" else None)
    base_row, quant_rows = preset_rows(ctx)[0], preset_rows(ctx)[2:]
    res, rows, base = {"layers": h.checkpoint}, [], None
    for c in [dict(base_row, compile=quant_rows[0]["compile"]), *quant_rows]:
        r, _ = measured(ctx, h, c)
        torch._dynamo.reset()
        tps = r["tokens_per_s"]
        base = base or tps
        name = c["quantize"] if c["quantize"] != "none" else c["dtype"]
        res[name] = {"tokens_per_s": tps, "compile_s": r["compile_s"], "ratio": tps / base}
        target = {"int8": 1.8, "int4-g128": 3.0}.get(name)
        rows.append((f"{name} decode ({h.checkpoint})", f"{tps:.1f} tokens/s = {tps / base:.2f}x",
                     f">= {target}x" if target else "", (tps / base >= target) if target and device.type == "cuda"
                     else None))
    return res, rows


def stage_tensor_parallel(ctx):
    device, out = ctx["device"], ctx["output_dir"] / "tp_tokens.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", __file__,
           "--tp_worker", "--device", device.type, "--output_dir", str(ctx["output_dir"])]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    if r.returncode != 0:
        raise RuntimeError(f"torchrun failed: {' '.join(r.stderr.strip().splitlines()[-3:])}")
    got = json.loads(out.read_text())
    model = small_model(device)
    model.setup_caches(1, 128)
    refs = [generate(model, p, 24, GREEDY)[0].tolist() for p in random_prompts(2, 7, SMALL["vocab_size"], device)]
    same = got == {"autoregressive": refs[0], "self_speculative": refs[1]}
    backend = "NCCL" if device.type == "cuda" else "gloo"
    how = "compiled" if device.type == "cuda" else "eager"
    return {"backend": backend, "equal": same}, [
        (f"torchrun 1 rank ({backend}), {how}, all-reduces in place == single process",
         "equal" if same else "DIFFERENT", "equal", same)]


def tp_worker(device_type: str, output_dir: Path):
    """Run under torchrun by stage_tensor_parallel."""
    import tp
    rank, world_size, device_name = tp.init_from_env(device_type)
    try:
        device = torch.device(device_name)
        model = tp.shard_model(small_model(device), rank, world_size)  # AllReduce wrappers even for one rank
        model.setup_caches(1, 128)
        steps = compile_steps(device) if device.type == "cuda" else Steps()  # as ctx["compile_all"]
        prompts = random_prompts(2, 7, SMALL["vocab_size"], device)
        out = {"autoregressive": generate(model, prompts[0], 24, GREEDY, steps=steps)[0].tolist(),
               "self_speculative": speculative_generate(model, prompts[1], 24, GREEDY, 3, exit_layer=2,
                                                        steps=steps)[0].tolist()}
        if rank == 0:
            (output_dir / "tp_tokens.json").write_text(json.dumps(out))
    finally:
        tp.shutdown()


STAGES = [("environment", stage_environment), ("exactness", stage_exactness), ("decode", stage_decode),
          ("batched", stage_batched), ("speculation", stage_speculation), ("quantization", stage_quantization),
          ("tensor_parallel", stage_tensor_parallel)]


def print_table(report, only=None):
    print("\n| stage | check | value | target | verdict |\n|---|---|---|---|---|")
    for name, stage in report["stages"].items():
        if only and name != only:
            continue
        if stage["status"] != "ok":
            print(f"| {name} | {stage['status']} ({stage['seconds']:.0f} s) | {stage.get('reason', '')} | | "
                  f"{stage['status'].upper()} |")
        for check, value, target, ok in stage.get("rows", []):
            verdict = "" if ok is None else ("ok" if ok else "MISSED")
            print(f"| {name} | {check} | {value} | {target} | {verdict} |")
    print(flush=True)


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (tiny shapes, for CI)")
    p.add_argument("--output_dir", type=Path, default=Path("gpu_check_out"))
    p.add_argument("--budget_s", type=float, default=480, help="wall-time budget for all stages (default 8 min)")
    p.add_argument("--quant_layers", type=int, default=8, help="layers of the quantization stage's model")
    p.add_argument("--stages", default=",".join(s for s, _ in STAGES), help="comma-separated subset to run")
    p.add_argument("--tp_worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type not in ("cuda", "cpu"):
        p.error("--device is cuda or cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available on this machine (use --device cpu for the dry run)")
    wanted = a.stages.split(",")
    unknown = sorted(set(wanted) - {s for s, _ in STAGES})
    if unknown:
        p.error(f"unknown stages {unknown}; choose from {', '.join(s for s, _ in STAGES)}")
    cli.check_output_dir(a.output_dir)
    a.output_dir.mkdir(parents=True, exist_ok=True)
    if a.tp_worker:
        return tp_worker(device.type, a.output_dir)

    start = time.perf_counter()
    # The CPU dry run compiles only the decode stage's graph and runs the rest of the same code
    # eagerly: it keeps the script from rotting in a minute; the suite's own tests compile on CPU.
    ctx = {"device": device, "output_dir": a.output_dir, "quant_layers": a.quant_layers,
           "compile_all": device.type == "cuda"}
    report = {"command": " ".join(["python", "scripts/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
              "date": time.strftime("%Y-%m-%d %H:%M"), "budget_s": a.budget_s, "stages": {}}
    json_path = a.output_dir / "gpu_check.json"
    for name, fn in STAGES:
        if name not in wanted:
            continue
        left, estimate = a.budget_s - (time.perf_counter() - start), ESTIMATES[device.type][name]
        t = time.perf_counter()
        if estimate > left:
            stage = {"status": "skipped", "reason": f"budget: needs ~{estimate} s, {left:.0f} s left"}
        else:
            print(f"== {name} (about {estimate} s; {left:.0f} s of the budget left)", file=sys.stderr, flush=True)
            try:
                results, rows = fn(ctx)
                stage = {"status": "ok", "results": results, "rows": rows}
            except Exception as e:  # noqa: BLE001 -- a failing stage is a result; the next stages still run
                stage = {"status": "failed", "reason": cli.describe(e)}
        stage["seconds"] = time.perf_counter() - t
        report["stages"][name] = stage
        report["total_s"] = time.perf_counter() - start
        json_path.write_text(json.dumps(report, indent=2, default=str))
        print_table(report, only=name)
    print_table(report)
    print(f"{report.get('total_s', 0):.0f} s in all; {json_path}")


if __name__ == "__main__":
    if "--tp_worker" in sys.argv:  # errors of the worker reach its parent through torchrun's stderr
        main()
    else:
        cli.run(main)
