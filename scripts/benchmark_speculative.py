"""Self-speculative decoding: step costs, end-to-end speed over an (exit layer, k) grid, and the
ideal speed-up those costs predict; transformers' `assistant_early_exit` on the same prompts.

    python scripts/benchmark_speculative.py                         # SmolLM2 on CPU, compiled
    python scripts/benchmark_speculative.py --model llama2-7b-random --device cuda --dtype bfloat16 \\
        --exit_layers 8 --num_speculations 6 --no_hf --acceptance 0.795

Everything runs in one process on the same prompts (greedy, --max_new_tokens each):
1. step costs, relative to one full decode step: a draft step (1 token, layers [0, E)) at each E and
   a verify pass (k+1 tokens, layers [E, L) plus the newest draft through [0, E)) at each (E, k);
2. for each (E, k): tokens/s of self-speculation and of our own autoregressive decoding, the
   acceptance rate, tokens per round, and the speed-up the step costs predict for the measured
   tokens per round: ideal = tokens_per_round * c_full / (k * c_draft + c_verify). The ratio
   measured / ideal is the loop's efficiency (what the Python loop, the one host sync per round
   and the acceptance logic cost);
3. transformers `generate(assistant_early_exit=E)` (eager; it drafts with the first E layers but
   shares no cache with the verifier) and its plain greedy `generate`.
With --acceptance a, the table also predicts the speed-up at that per-token acceptance rate,
using expected tokens per round (1 - a^(k+1)) / (1 - a) (e.g. LayerSkip's published 79.5% for
Llama2-7B at E=8, k=6 on CNN/DM).
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

from benchmark_decode import DTYPES, RANDOM_MODELS, check_model_and_device, random_model  # noqa: E402
from checkpoint import load_model  # noqa: E402
from decoding import Steps, compile_steps, generate, speculative_generate, synchronize  # noqa: E402
from sampling import SamplingParams  # noqa: E402

DEFAULT_MODEL = REPO / "checkpoints" / "SmolLM2-135M-Instruct"
GREEDY = SamplingParams()
PROMPTS = [
    "def is_prime(n):\n    \"\"\"Return True if n is a prime number.\"\"\"\n",
    "from typing import List\n\n\ndef mean(numbers: List[float]) -> float:\n",
    "The history of the printing press begins",
    "<|im_start|>user\nExplain what a hash table is.<|im_end|>\n<|im_start|>assistant\n",
]


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def time_call(fn, device, repeats=20) -> float:
    """Median seconds per call."""
    for _ in range(3):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def step_costs(model, steps, exit_layers, ks, device, pos=16):
    """Seconds of a full decode step, of a draft step per E and of a verify pass per (E, k).

    Uses the caches as set up for the generation runs: a different cache shape would compile
    every graph a second time."""
    x = torch.tensor([[5]], device=device)
    pos = torch.tensor([pos], device=device)
    costs = {"full": time_call(lambda: steps.decode(model, x, pos, GREEDY, None), device)}
    dim = model.args.dim
    dtype = model.norm.weight.dtype
    for E in exit_layers:
        costs[("draft", E)] = time_call(lambda: steps.draft(model, x, pos, GREEDY, E), device)
        for k in ks:
            tokens = torch.full((1, k + 1), 5, device=device)
            states = torch.zeros(1, k, dim, device=device, dtype=dtype)
            positions = torch.arange(pos.item(), pos.item() + k + 1, device=device)
            limit = torch.tensor(k, device=device)
            costs[("verify", E, k)] = time_call(
                lambda: steps.verify(model, tokens, states, None, positions, limit, GREEDY, E), device)
    return costs


def run_prompts(fn, prompts, device):
    """(total new tokens, seconds, list of stats) over the prompts."""
    n, secs, all_stats = 0, 0.0, []
    for p in prompts:
        synchronize(device)
        t = time.perf_counter()
        _, stats = fn(p)
        synchronize(device)
        secs += time.perf_counter() - t
        n += stats.new_tokens
        all_stats.append(stats)
    return n, secs, all_stats


def bench_hf(model_dir, prompts, n, exit_layers, dtype):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    hf.generation_config.eos_token_id = None
    hf.config.eos_token_id = None
    rows = {}
    for E in [None, *exit_layers]:
        total, secs = 0, 0.0
        for p in prompts:
            extra = {} if E is None else {"assistant_early_exit": E}
            t = time.perf_counter()
            with torch.no_grad():
                out = hf.generate(p[None].cpu(), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  pad_token_id=0, **extra)
            secs += time.perf_counter() - t
            total += out.shape[1] - len(p)
        rows[E] = total / secs
        print(json.dumps({"transformers": "greedy" if E is None else f"assistant_early_exit={E}",
                          "tokens_per_s": rows[E]}), flush=True)
    return rows


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=str(DEFAULT_MODEL), help=f"checkpoint dir, or one of {', '.join(RANDOM_MODELS)}")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--exit_layers", type=ints, default=ints("10,20,26,29"))
    p.add_argument("--num_speculations", type=ints, default=ints("2,4"))
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--eager", action="store_true", help="do not compile (slow; for debugging)")
    p.add_argument("--no_hf", action="store_true", help="skip the transformers rows")
    p.add_argument("--hf_exit_layers", type=ints, default=None,
                   help="exit layers for transformers' assistant_early_exit (default: --exit_layers)")
    p.add_argument("--acceptance", type=float, default=None, help="also predict the speed-up at this acceptance rate")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    device, is_random = check_model_and_device(p, a.model, a.device)
    if not a.exit_layers or not a.num_speculations or min(a.num_speculations) < 1:
        p.error("need at least one exit layer and num_speculations >= 1")
    if a.acceptance is not None and not 0 <= a.acceptance < 1:
        p.error("--acceptance must be in [0, 1)")

    dtype = DTYPES[a.dtype]
    model = random_model(a.model, device, dtype) if is_random else load_model(a.model, device, dtype)
    L = model.args.n_layers
    bad = [E for E in a.exit_layers if not 1 <= E < L]
    if bad:
        p.error(f"exit layers {bad} outside [1, {L - 1}]")
    if is_random:
        prompts = [torch.randint(100, 1000, (24,), generator=torch.Generator().manual_seed(i)).to(device)
                   for i in range(len(PROMPTS))]
    else:
        from tokenizer import load_tokenizer
        tok = load_tokenizer(a.model)
        prompts = [torch.tensor(tok.encode(t), device=device) for t in PROMPTS]
    steps = Steps() if a.eager else compile_steps(device)
    print(f"{a.model} on {device} ({a.dtype}, {'eager' if a.eager else 'compiled'}), {L} layers, "
          f"torch {torch.__version__}", flush=True)

    model.setup_caches(1, max(len(x) for x in prompts) + a.max_new_tokens + max(a.num_speculations) + 1)
    t0 = time.perf_counter()
    with torch.no_grad():  # as in generation: a graph compiled with grad enabled would be compiled again
        costs = step_costs(model, steps, a.exit_layers, a.num_speculations, device)
    print(f"step costs measured (compilation included) in {time.perf_counter() - t0:.0f} s", flush=True)
    n = a.max_new_tokens
    ar = lambda x: generate(model, x, n, GREEDY, steps=steps)  # noqa: E731
    run_prompts(ar, prompts[:1], device)  # warm-up, like every speculative row
    ar_tokens, ar_s, _ = run_prompts(ar, prompts, device)
    ar_tps = ar_tokens / ar_s
    rows = []
    for E in a.exit_layers:
        for k in a.num_speculations:
            spec = lambda x: speculative_generate(model, x, n, GREEDY, k, exit_layer=E, steps=steps)  # noqa: E731
            run_prompts(spec, prompts[:1], device)  # warm-up (compiled already by step_costs)
            tokens, secs, stats = run_prompts(spec, prompts, device)
            rounds = sum(s.rounds for s in stats)
            accepted = sum(sum(s.accepted_per_round) for s in stats)
            tpr = accepted / rounds + 1
            round_cost = k * costs[("draft", E)] + costs[("verify", E, k)]
            ideal = tpr * costs["full"] / round_cost
            measured = tokens / secs / ar_tps
            drafted = sum(s.drafted for s in stats)
            r = {"exit_layer": E, "k": k, "acceptance_rate": accepted / drafted, "tokens_per_round": tpr,
                 "tokens_per_s": tokens / secs, "ar_tokens_per_s": ar_tps, "speedup": measured,
                 "ideal_speedup": ideal, "efficiency": measured / ideal,
                 "draft_cost": costs[("draft", E)] / costs["full"],
                 "verify_cost": costs[("verify", E, k)] / costs["full"],
                 "draft_share": sum(s.draft_s for s in stats) / sum(s.draft_s + s.verify_s for s in stats)}
            if a.acceptance is not None:
                al = a.acceptance
                r["predicted_speedup_at_acceptance"] = (1 - al ** (k + 1)) / (1 - al) * costs["full"] / round_cost
            rows.append(r)
            print(json.dumps(r), flush=True)

    hf_rows = {}
    if not a.no_hf and not is_random:
        hf_rows = bench_hf(a.model, [x.cpu() for x in prompts], n, a.hf_exit_layers or a.exit_layers, dtype)

    full_ms = costs["full"] * 1000
    print(f"\nStep costs (full decode step = {full_ms:.1f} ms):")
    print("| E | draft step / full | " + " | ".join(f"verify k={k} / full" for k in a.num_speculations) + " |")
    print("|---|---|" + "---|" * len(a.num_speculations))
    for E in a.exit_layers:
        cells = " | ".join(f"{costs[('verify', E, k)] / costs['full']:.2f}" for k in a.num_speculations)
        print(f"| {E} | {costs[('draft', E)] / costs['full']:.2f} | {cells} |")
    extra_h = " predicted at acceptance |" if a.acceptance is not None else ""
    print(f"\nAutoregressive (ours, same run): {ar_tps:.1f} tokens/s")
    print(f"| E | k | acceptance | tokens/round | tokens/s | speed-up | ideal speed-up | measured / ideal | "
          f"draft share |{extra_h}")
    print("|---|---|---|---|---|---|---|---|---|" + ("---|" if extra_h else ""))
    for r in rows:
        extra = f" {r['predicted_speedup_at_acceptance']:.2f}x |" if extra_h else ""
        print(f"| {r['exit_layer']} | {r['k']} | {r['acceptance_rate']:.1%} | {r['tokens_per_round']:.2f} | "
              f"{r['tokens_per_s']:.1f} | {r['speedup']:.2f}x | {r['ideal_speedup']:.2f}x | {r['efficiency']:.0%} | "
              f"{r['draft_share']:.0%} |{extra}")
    if hf_rows:
        print("\n| transformers | tokens/s | vs our self-speculation at that E (best k) |")
        print("|---|---|---|")
        for E, tps in hf_rows.items():
            ours = max((r["tokens_per_s"] for r in rows if r["exit_layer"] == E), default=None)
            name = "greedy generate" if E is None else f"assistant_early_exit={E}"
            ratio = f"{ours / tps:.1f}x" if ours and E is not None else "-"
            print(f"| {name} | {tps:.1f} | {ratio} |")
    if a.json:
        a.json.write_text(json.dumps({"costs": {str(k): v for k, v in costs.items()}, "ar_tokens_per_s": ar_tps,
                                      "rows": rows, "transformers": {str(k): v for k, v in hf_rows.items()}},
                                     indent=2))


if __name__ == "__main__":
    cli.run(main)
