"""Grid search over exit_layer x num_speculations for self-speculative decoding on a dataset.

    python scripts/sweep.py --dataset human_eval --num_samples 10 --compile \\
        --exit_layer_first 4 --exit_layer_last 28 --exit_layer_step 4 \\
        --num_speculations_first 1 --num_speculations_last 6 --output_dir sweep_out
    torchrun scripts/sweep.py --model facebook/layerskip-llama2-7B --dataset human_eval \\
        --generation_strategy self_speculative --num_samples 150 --max_steps 256 --output_dir ./logs/ --sample False

First the autoregressive baseline, then every (precision, E, k) on the same samples in the same
process. --draft_quantize lists the draft precisions: none (LayerSkip: the model's own layers
[0, E), one shared KV cache; E < layers) and quantized copies (int8, int4, int4-g<N>: E up to every
layer), made once at load. Each row goes to OUTPUT_DIR/sweep.csv as soon as it is measured (an
interrupted sweep keeps every finished row): draft_quantize, exit_layer, num_speculations,
acceptance_rate, tokens_per_round, tokens_per_second, time_per_token, speedup (tokens_per_second /
the baseline's, measured in this run), decode_speedup (the same for decoding alone, prefill left
out), the step costs (draft, verify, catch-up, in full decode steps) and predicted_speedup (the cost
model, timing.ideal_speedup, on the measured tokens per round), rouge1/2/L. At the end, or on
Ctrl-C, it draws OUTPUT_DIR/sweep_heatmap.png (speed-up per cell, one panel per precision) and
prints the best cell.
"""
import csv
import json
import sys
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the engine's modules
import cli  # noqa: E402

cli.start(__name__)  # first: a Ctrl-C during the imports below is `interrupted` too (cli.py)

import evaluation  # noqa: E402
import output  # noqa: E402
from samples import add_dataset_options, check_dataset_options, dataset_samples  # noqa: E402
import timing  # noqa: E402
from engine import init_distributed, load_engine  # noqa: E402
import options  # noqa: E402
from decoding import Strategy  # noqa: E402

COLUMNS = ["draft_quantize", "exit_layer", "num_speculations", "acceptance_rate", "tokens_per_round",
           "tokens_per_second", "time_per_token", "speedup", "decode_speedup", "draft_cost", "verify_cost",
           "catch_up_cost", "predicted_speedup", "rouge1", "rouge2", "rougeL"]


class Grid(NamedTuple):
    """The cells swept: draft precisions ("none": the model's own layers) x exit layers x ks."""
    precisions: list
    exit_layers: list
    ks: list


def grid(first, last, step, what):
    if step < 1:
        raise ValueError(f"--{what}_step must be >= 1")
    values = list(range(first, last + 1, step))
    if not values:
        raise ValueError(f"empty {what} grid: first {first} > last {last}")
    return values


def draw_heatmap(rows, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    precisions = list(dict.fromkeys(r["draft_quantize"] for r in rows))
    es = sorted({r["exit_layer"] for r in rows})
    ks = sorted({r["num_speculations"] for r in rows})
    speedups = [r["speedup"] for r in rows]
    fig, axes = plt.subplots(1, len(precisions), squeeze=False,
                             figsize=(1.2 + (0.9 * len(ks) + 0.6) * len(precisions), 1.4 + 0.5 * len(es)))
    for ax, precision in zip(axes[0], precisions):
        values = [[float("nan")] * len(ks) for _ in es]
        for r in rows:
            if r["draft_quantize"] == precision:
                values[es.index(r["exit_layer"])][ks.index(r["num_speculations"])] = r["speedup"]
        im = ax.imshow(values, cmap="RdYlGn", vmin=min(0.5, *speedups), vmax=max(1.5, *speedups), aspect="auto")
        ax.set_xticks(range(len(ks)), [str(k) for k in ks])
        ax.set_yticks(range(len(es)), [str(e) for e in es])
        ax.set_xlabel("num_speculations (k)")
        if ax is axes[0][0]:
            ax.set_ylabel("exit_layer (E)")
        ax.set_title("draft: layers [0, E)" if precision == "none" else f"draft: {precision} copy of [0, E)",
                     fontsize=9)
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                if v == v:
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=list(axes[0]), label="speed-up over autoregressive")
    fig.suptitle("self-speculative speed-up", fontsize=10, y=1.04)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__)
    options.add_model_options(p)
    options.add_decoding_options(p, strategies=None)
    options.add_sampling_options(p)
    p.add_argument("--generation_strategy", dest="swept_strategy", choices=["self_speculative"],
                   default="self_speculative",
                   help="the strategy swept (accepted for the LayerSkip reference's command line)")
    add_dataset_options(p)
    p.add_argument("--exit_layer_first", type=int, default=4)
    p.add_argument("--exit_layer_last", type=int, default=28)
    p.add_argument("--exit_layer_step", type=int, default=4)
    p.add_argument("--num_speculations_first", type=int, default=1)
    p.add_argument("--num_speculations_last", type=int, default=6)
    p.add_argument("--num_speculations_step", type=int, default=1)
    p.add_argument("--draft_quantize", dest="draft_precisions", default="none",
                   help="comma-separated draft precisions: none (the model's own early layers, E < layers) and/or "
                        "int8, int4, int4-g<N> (a quantized copy of layers [0, E), E up to every layer)")
    output.add_output_option(p, "sweep_out", file_option=False)
    a = p.parse_args(argv)
    config = options.check_options(p, a)
    try:
        exit_layers = grid(a.exit_layer_first, a.exit_layer_last, a.exit_layer_step, "exit_layer")
        ks = grid(a.num_speculations_first, a.num_speculations_last, a.num_speculations_step, "num_speculations")
    except ValueError as e:
        p.error(str(e))
    if min(exit_layers) < 1 or min(ks) < 1:
        p.error("exit layers and num_speculations must be >= 1")
    precisions = list(dict.fromkeys(x.strip() for x in a.draft_precisions.split(",")))
    try:
        for scheme in precisions:
            if scheme != "none":
                options.parse_quantize(scheme)
    except ValueError as e:
        p.error(f"--draft_quantize: {e}")
    check_dataset_options(p, a)
    return a, config, Grid(precisions, exit_layers, ks)


def main(argv=None):
    a, config, (precisions, exit_layers, ks) = parse_args(argv)
    output.check_output(a, "sweep.csv")
    samples = dataset_samples(a)

    def check(meta, tokenizer):
        n = meta["args"].n_layers
        top = n if schemes else n - 1  # only a quantized draft may run every layer
        bad = [e for e in exit_layers if not 1 <= e <= top]
        if bad:
            raise ValueError(f"exit layer(s) {bad} out of range [1, {top}] for this {n}-layer model")
    # the quantized drafts, each of every layer: each E drafts from the first E of one copy
    schemes = [x for x in precisions if x != "none"]
    rank, world_size, config = init_distributed(config)
    engine = load_engine(config, rank, world_size, check=check, draft_schemes=schemes)
    # every cell, in order; LayerSkip self-speculation (no quantized draft) needs layers left to verify
    cells = [(precision, Strategy("self_speculative", E, k, None if precision == "none" else precision))
             for precision in precisions for E in exit_layers for k in ks
             if precision != "none" or E < engine.model.args.n_layers]
    evaluation.setup_caches_for(engine, samples, a.max_new_tokens, strategies=[engine.strategy] + [s for _, s in cells])

    a.output_dir.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = a.output_dir / "sweep.csv", a.output_dir / "sweep_heatmap.png"
    evaluation.warm_up(engine, samples, a)
    _, base = evaluation.evaluate(engine, samples, a)
    print(json.dumps({"autoregressive": base}), file=sys.stderr)
    rows = []
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        f.flush()
        try:
            for precision, strategy in cells:
                E, k = strategy.exit_layer, strategy.num_speculations
                evaluation.warm_up(engine, samples, a, strategy)
                _, agg = evaluation.evaluate(engine, samples, a, strategy=strategy)
                costs = timing.step_costs(engine.model, engine.steps, E, k, engine.device,
                                          draft_model=engine.draft_for(strategy))
                row = {"draft_quantize": precision, "exit_layer": E, "num_speculations": k,
                       "acceptance_rate": agg["acceptance_rate"], "tokens_per_round": agg["tokens_per_round"],
                       "tokens_per_second": agg["tokens_per_s"], "time_per_token": agg["time_per_token_s"],
                       "speedup": agg["tokens_per_s"] / base["tokens_per_s"],
                       "decode_speedup": agg["decode_tokens_per_s"] / base["decode_tokens_per_s"],
                       "draft_cost": costs["draft"] / costs["full"],
                       "verify_cost": costs["verify"] / costs["full"],
                       "catch_up_cost": costs["catch_up"] / costs["full"] if "catch_up" in costs else None,
                       "predicted_speedup": timing.ideal_speedup(agg["tokens_per_round"], k, costs,
                                                                  agg["catch_up_rate"]),
                       "rouge1": agg["rouge1"], "rouge2": agg["rouge2"], "rougeL": agg["rougeL"]}
                writer.writerow(row)
                f.flush()
                rows.append(row)
        except KeyboardInterrupt:
            print(f"interrupted: {len(rows)} finished rows kept in {csv_path}", file=sys.stderr)
    if not rows:
        sys.exit("no grid point finished")
    draw_heatmap(rows, png_path)
    best = max(rows, key=lambda r: r["speedup"])
    print(f"autoregressive: {base['tokens_per_s']:.2f} tokens/s; best: draft_quantize={best['draft_quantize']} "
          f"exit_layer={best['exit_layer']} num_speculations={best['num_speculations']}: "
          f"{best['tokens_per_second']:.2f} tokens/s, "
          f"speed-up {best['speedup']:.2f}x, acceptance {best['acceptance_rate']:.1%}  ({csv_path}, {png_path})")


if __name__ == "__main__":
    cli.run(main)
