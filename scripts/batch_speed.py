"""Batched generation speed: the same prompts at several batch sizes, for one strategy per run of
this script (the shared options choose it), greedy; total output tokens/s, and whether every
prompt's output equals its batch-1 output. Then, with --exactness, what exact batching costs: a
batched verify's linears over more than EXACT_ROWS rows through the kernels' fixed-order row
tiles (one pass over the weights) against one BLAS call (which would not be row-invariant). With
--transformers ROWS, transformers `generate` on the same prompts in left-padded batches of ROWS
(eager, and its static cache under torch.compile); with --long_cache N, a step near position 128
with caches of N positions against 256 (a step reads the caches only up to the longest live row).
With --compare R, a speculative strategy's table against plain batched decoding and its own
`--num_speculations auto` (the same draft), the three in turn R times at each row count in this one
process (a shared machine's drift hits them alike), the median of each: where speculation stops
paying, and whether `auto` keeps up with the better of the two.

    python scripts/batch_speed.py --compile --batch_sizes 1,2,4,8 --num_prompts 16
    python scripts/batch_speed.py --compile --quantize int8 --generation_strategy self_speculative \\
        --draft_quantize int8 --num_speculations 4 --plot batch_speed.png
    python scripts/batch_speed.py --compile --batch_sizes 1,8,16 --transformers 8 --long_cache 4096
    python scripts/batch_speed.py --compile --max_new_tokens 128 --generation_strategy self_speculative \\
        --draft_quantize int8 --num_speculations 4 --compare 3
"""
import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cli  # noqa: E402

cli.start(__name__)

import torch  # noqa: E402

import harness  # noqa: E402
import timing  # noqa: E402
import cpu_kernels  # noqa: E402
from checkpoint import is_random  # noqa: E402
from decoding import Strategy, peak_memory_gb  # noqa: E402
from engine import cache_size, device_name, load_engine  # noqa: E402
import options  # noqa: E402


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch_sizes", default="1,2,4,8", help="comma-separated rows at once")
    p.add_argument("--num_prompts", type=int, default=16)
    p.add_argument("--prompts", default="mixed", choices=harness.PROMPT_SETS)
    p.add_argument("--exactness", action="store_true", help="also time the linears of a batched verify: the kernels' "
                   "row tiles against one BLAS call")
    p.add_argument("--transformers", type=int, default=None, metavar="ROWS", help="also time transformers generate "
                   "on the same prompts in left-padded batches of ROWS (one of --batch_sizes), eager and static "
                   "cache + compile")
    p.add_argument("--transformers_eager_only", action="store_true", help="with --transformers, leave out its "
                   "static cache + compile variant (compiling it takes a minute or more)")
    p.add_argument("--long_cache", type=int, default=None, metavar="N", help="also time a step near position 128 "
                   "with caches of N positions against 256")
    p.add_argument("--compare", type=int, default=0, metavar="R", help="with a speculative strategy: also plain "
                   "batched decoding and --num_speculations auto, the three in turn R times at each row count "
                   "(medians)")
    p.add_argument("--results", type=Path, default=None, help="append this run's rows to this JSON-lines file")
    p.add_argument("--plot", type=Path, default=None, help="draw decode tokens/s against rows at once to this PNG: "
                   "every run in --results (one line each), else this run")
    options.add_options(p)
    p.set_defaults(max_new_tokens=64)
    a = p.parse_args(argv)
    config = options.check_options(p, a)
    try:
        batch_sizes = sorted({int(b) for b in a.batch_sizes.split(",")})
    except ValueError:
        p.error(f"--batch_sizes takes comma-separated integers, got {a.batch_sizes!r}")
    if batch_sizes[0] < 1:
        p.error("--batch_sizes must be >= 1")
    if a.num_prompts < 1:
        p.error("--num_prompts must be >= 1")
    if a.compare < 0:
        p.error("--compare must be >= 0")
    if a.compare and (a.transformers is not None or a.long_cache or a.exactness or a.results):
        p.error("--compare runs its comparison only: leave out --transformers, --long_cache, --exactness and --results")
    if a.compare and (config.strategy.name == "autoregressive" or not config.strategy.model_drafts
                      or config.strategy.adaptive):
        p.error("--compare needs a speculative strategy with a fixed --num_speculations that drafts from a model "
                "(it adds plain decoding and --num_speculations auto)")
    if a.long_cache is not None and a.long_cache < 256:
        p.error(f"--long_cache must be at least 256 (it is compared with 256), got {a.long_cache}")
    if a.transformers is not None:
        if is_random(config.checkpoint):
            p.error("--transformers needs a real checkpoint (random weights have no Hugging Face folder)")
        if a.transformers not in batch_sizes:
            p.error(f"--transformers {a.transformers} must be one of --batch_sizes {a.batch_sizes}")
    elif a.transformers_eager_only:
        p.error("--transformers_eager_only needs --transformers ROWS")
    for path, what in ((a.plot, "--plot"), (a.results, "--results")):
        if path is not None:
            cli.check_output_file(path, what)
    return a, config, batch_sizes


def run_batch(engine, prompts, rows: int, max_new_tokens: int, cache: int, strategy=None):
    engine.setup_caches(cache, rows)
    return engine.run_many(prompts, max_new_tokens, stop_ids=(), strategy=strategy)


def compared(strategy) -> dict:
    """{label: strategy}: plain decoding, the strategy, and its --num_speculations auto."""
    auto = dataclasses.replace(strategy, num_speculations=options.AUTO_MAX_SPECULATIONS, auto_k=True)
    return {"plain": Strategy(), f"k={strategy.num_speculations}": strategy, "auto": auto}


def compare_rows(engine, prompts, batch_sizes, max_new_tokens: int, repeats: int) -> tuple[list, list[dict]]:
    """compared()'s strategies at each row count: an untimed warm-up of each, then the three in
    turn `repeats` times; their labels, and per row count the median decode tokens/s of each and
    whether every output equals the plain 1-row output."""
    strategies = compared(engine.strategy)
    n, out, reference = max_new_tokens, [], None
    cache = max(cache_size(max(len(p) for p in prompts), n, s, engine.model.args.max_position_embeddings)
                for s in strategies.values())
    for rows in batch_sizes:
        engine.setup_caches(cache, rows)
        for s in strategies.values():
            engine.warm_up(prompts, n, strategy=s, many=True)
        rates, same = {label: [] for label in strategies}, True
        for r in range(repeats):
            chosen = ""
            for label, s in strategies.items():
                seqs, stats = run_batch(engine, prompts, rows, n, cache, s)
                reference = reference or [q.tokens for q in seqs]
                same = same and [q.tokens for q in seqs] == reference
                rates[label].append(stats.decode_tokens_per_s)
                chosen = stats.chosen or chosen
            print(f"  {rows} rows, pass {r + 1}: " + ", ".join(f"{label} {v[-1]:.1f}" for label, v in rates.items())
                  + (f" (auto's rounds: {chosen})" if chosen else ""), file=sys.stderr)
        out.append({"rows": rows, "same": same, **{label: statistics.median(v) for label, v in rates.items()}})
    return list(strategies), out


def print_compare(rows: list[dict], labels: list, repeats: int):
    plain, fixed, auto = labels
    print(f"\nDecode tokens/s in all, the median of {repeats} passes taking turns:\n")
    print(f"| rows at once | {plain} | {fixed} | {fixed} vs plain | {auto} | {auto} vs the better | outputs = plain "
          "1 row's |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        better = max(r[plain], r[fixed])
        print(f"| {r['rows']} | {r[plain]:.1f} | {r[fixed]:.1f} | {r[fixed] / r[plain]:.2f}x | {r[auto]:.1f} | "
              f"{r[auto] / better:.2f}x | {'yes' if r['same'] else '**no**'} |")


def exactness_rows(engine, rows_list=(16, 32, 64, 128)) -> list[dict]:
    """ms for one pass of every linear of the model over `rows` rows of a batched step: the kernels'
    row tiles (what a batched verify runs) against one F.linear call each."""
    out = []
    linears = [m for m in engine.model.modules() if isinstance(m, torch.nn.Linear)]
    for rows in rows_list:
        x_by_width = {w: torch.randn(rows // 4, 4, w) for w in {m.in_features for m in linears}}

        def tiles():
            for m in linears:
                m(x_by_width[m.in_features])

        plain = [cpu_kernels.unpack_float(m.weight) if m.weight.dim() == 3 else m.weight for m in linears]

        def blas():
            for m, w in zip(linears, plain):
                torch.nn.functional.linear(x_by_width[m.in_features], w)
        with torch.no_grad():
            t_tiles = timing.time_call(tiles, engine.device, repeats=5)
            t_blas = timing.time_call(blas, engine.device, repeats=5)
        out.append({"rows": rows, "tiles_ms": t_tiles * 1e3, "blas_ms": t_blas * 1e3})
    return out


def kv_bytes_per_row(engine) -> int:
    """Bytes of KV cache one row holds, over every model the engine decodes with (a draft model's
    caches included; a quantized self-draft's are the model's own, counted once)."""
    models = (engine.model, engine.draft_model, *engine.drafts.values())
    caches = {b.data_ptr(): b for m in models if m is not None
              for name, b in m.named_buffers() if name.endswith(("k_cache", "v_cache"))}
    return sum(b.numel() * b.element_size() // b.shape[0] for b in caches.values())


def transformers_rows(a, prompts, rows: int, reference) -> list[dict]:
    """transformers generate over the same prompts, `rows` at a time (left-padded), after one
    untimed batch (the compiled variant's compilation): tokens/s with prefills, and how many
    prompts' greedy text equals ours."""
    from hf_peer import hf_generate_batch, hf_model
    out = []
    n = a.max_new_tokens
    width = max(len(p) for p in prompts)  # every batch padded alike: one shape for the compiled variant
    for compiled in (False,) if a.transformers_eager_only else (False, True):
        hf = hf_model(a.checkpoint_path, torch.float32, compiled)
        t0 = time.perf_counter()
        hf_generate_batch(hf, prompts[:rows], n, width)
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        texts = [t for i in range(0, len(prompts), rows) for t in hf_generate_batch(hf, prompts[i:i + rows], n, width)]
        wall = time.perf_counter() - t0
        same = sum(t == r for t, r in zip(texts, reference))
        out.append({"config": "static cache + compile" if compiled else "eager", "rows": rows,
                    "tokens_per_s": len(prompts) * n / wall, "same": same, "warm_s": warm})
        print(f"  transformers {out[-1]['config']}, {rows} rows: {out[-1]['tokens_per_s']:.1f} tokens/s", file=sys.stderr)
        del hf
        torch._dynamo.reset()
    return out


def long_cache_rows(engine, rows_list, long: int, repeats: int = 3) -> list[dict]:
    """ms per step of the same generation (prompts of 128 tokens, 64 more each) with caches of 256
    and of `long` positions, the two sizes in turn `repeats` times (the median of each): a step
    reads the caches only up to the longest live row, so the two should match."""
    prompts = [p.tolist() for p in harness.prompts_for(engine, max(rows_list), length=128)]
    out = []
    for rows in rows_list:
        ms = {256: [], long: []}
        for size in ms:
            run_batch(engine, prompts[:rows], rows, 4, size)  # compiles this size's graphs
        for _ in range(repeats):
            for size in ms:
                _, stats = run_batch(engine, prompts[:rows], rows, 64, size)
                ms[size].append(stats.ms_per_step)
        out.append({"rows": rows, "short_ms": statistics.median(ms[256]), "long_ms": statistics.median(ms[long])})
    return out


def plot(runs: list[dict], path: Path, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        ax.plot([r["rows"] for r in run["rows"]], [r["decode"] for r in run["rows"]], marker="o", label=run["config"])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rows at once (batch size)")
    ax.set_ylabel("decode tokens/s in all")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"Plot written to {path}", file=sys.stderr)


def main(argv=None):
    a, config, batch_sizes = parse_args(argv)
    engine = load_engine(config)
    prompts = [p.tolist() for p in harness.prompts_for(engine, a.num_prompts, a.prompts)]
    print(f"{a.checkpoint_path} on {engine.device} ({device_name(engine.device)}), "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; {engine.strategy.describe()}, "
          f"{a.quantize or 'no'} quantization, {len(prompts)} prompts ({a.prompts}) x {a.max_new_tokens} tokens",
          file=sys.stderr)
    if a.compare:
        labels, rows = compare_rows(engine, prompts, batch_sizes, a.max_new_tokens, a.compare)
        print(f"\n{engine.strategy.describe()} against plain and auto, {a.quantize or 'float'} weights, "
              f"{device_name(engine.device)}, {torch.get_num_threads()} threads")
        print_compare(rows, labels, a.compare)
        if a.plot is not None:
            plot([{"config": label, "rows": [{"rows": r["rows"], "decode": r[label]} for r in rows]} for label in labels],
                 a.plot, f"SmolLM2 decode, {device_name(engine.device)}, {torch.get_num_threads()} threads")
        if not all(r["same"] for r in rows):
            raise SystemExit("some batched outputs differ from the plain 1-row outputs")
        return
    results, reference = [], None
    n = a.max_new_tokens
    # one size: the graphs stay
    cache = cache_size(max(len(p) for p in prompts), n, engine.strategy, engine.model.args.max_position_embeddings)
    for rows in batch_sizes:
        t0 = time.perf_counter()
        engine.setup_caches(cache, rows)
        engine.warm_up(prompts, n, many=True)  # this row count's graphs and those of fewer rows
        warm = time.perf_counter() - t0
        seqs, stats = run_batch(engine, prompts, rows, n, cache)
        outputs = [s.tokens for s in seqs]
        reference = reference or outputs
        results.append({"rows": rows, "tokens_per_s": stats.tokens_per_s, "decode": stats.decode_tokens_per_s,
                        "prefill_s": stats.prefill_s, "steps": stats.steps,
                        "ms_per_step": stats.ms_per_step,
                        "acceptance": stats.acceptance_rate, "same": outputs == reference, "warm_s": warm})
        print(f"  {rows} rows: {stats.tokens_per_s:.1f} tokens/s, decode {stats.decode_tokens_per_s:.1f}",
              file=sys.stderr)
    # before any other table: the peak resident memory of this engine's runs alone
    peak_gb = peak_memory_gb(engine.device)
    kv_row = kv_bytes_per_row(engine)
    hf = transformers_rows(a, prompts, a.transformers, reference) if a.transformers else []
    long = long_cache_rows(engine, sorted({1, batch_sizes[-1]}), a.long_cache) if a.long_cache else []
    base = results[0]["decode"]
    print(f"\n{engine.strategy.describe()}, {a.quantize or 'float'} weights, {device_name(engine.device)}, "
          f"{torch.get_num_threads()} threads\n")
    print("| rows at once | decode tokens/s in all | vs 1 row | with prefills tokens/s | prefills s | steps | "
          "ms per step | acceptance | outputs = 1 row's | first run s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        acc = f"{r['acceptance']:.1%}" if r["acceptance"] == r["acceptance"] else "-"
        print(f"| {r['rows']} | {r['decode']:.1f} | {r['decode'] / base:.2f}x | {r['tokens_per_s']:.1f} | "
              f"{r['prefill_s']:.1f} | {r['steps']} | {r['ms_per_step']:.1f} | {acc} | "
              f"{'yes' if r['same'] else '**no**'} | {r['warm_s']:.1f} |")
    print(f"\nKV cache: {kv_row / 1e6:.1f} MB per row ({cache} positions); peak resident memory after "
          f"{batch_sizes[-1]} rows: {peak_gb:.2f} GB")
    if hf:
        mine = next(r for r in results if r["rows"] == a.transformers)
        ours = mine["tokens_per_s"]
        print(f"\n| {a.transformers} rows at once, with prefills | tokens/s | ours vs it | same greedy text as ours "
              "| first batch s |")
        print("|---|---|---|---|---|")
        print(f"| this engine | {ours:.1f} | 1.00x | - | {mine['warm_s']:.1f} |")
        for r in hf:
            print(f"| transformers {r['config']} | {r['tokens_per_s']:.1f} | {ours / r['tokens_per_s']:.2f}x | "
                  f"{r['same']} of {len(prompts)} | {r['warm_s']:.1f} |")
    if long:
        print(f"\n| rows at once | ms per step, cache 256 | cache {a.long_cache} | ratio |")
        print("|---|---|---|---|")
        for r in long:
            print(f"| {r['rows']} | {r['short_ms']:.2f} | {r['long_ms']:.2f} | {r['long_ms'] / r['short_ms']:.2f}x |")
    if a.exactness and engine.device.type == "cpu" and cpu_kernels.load(quiet=True):
        print("\n| rows of a batched step | kernel row tiles ms | one BLAS call ms | cost of exactness |")
        print("|---|---|---|---|")
        for r in exactness_rows(engine):
            print(f"| {r['rows']} | {r['tiles_ms']:.2f} | {r['blas_ms']:.2f} | {r['tiles_ms'] / r['blas_ms']:.2f}x |")
    run = {"config": f"{a.quantize or 'float32'} {engine.strategy.describe()}", "rows": results}
    runs = [run]
    if a.results is not None:
        with open(a.results, "a") as f:
            f.write(json.dumps(run) + "\n")
        runs = [json.loads(line) for line in a.results.read_text().splitlines() if line.strip()]
    if a.plot is not None:
        plot(runs, a.plot, f"SmolLM2 decode, {device_name(engine.device)}, {torch.get_num_threads()} threads")
    if not all(r["same"] for r in results):
        raise SystemExit("some batched outputs differ from the batch-1 outputs")


if __name__ == "__main__":
    cli.run(main)
