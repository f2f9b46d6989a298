"""Grid search over exit_layer x num_speculations for self-speculative decoding on a dataset.

    python scripts/sweep.py --dataset human_eval --num_samples 10 --compile \\
        --exit_layer_first 4 --exit_layer_last 28 --exit_layer_step 4 \\
        --num_speculations_first 1 --num_speculations_last 6 --output_dir sweep_out
    torchrun scripts/sweep.py --model facebook/layerskip-llama2-7B --dataset human_eval \\
        --generation_strategy self_speculative --num_samples 150 --max_steps 256 --output_dir ./logs/ --sample False

First the autoregressive baseline, then every (E, k) on the same samples in the same process. Each
row goes to OUTPUT_DIR/sweep.csv as soon as it is measured (an interrupted sweep keeps every
finished row): exit_layer, num_speculations, acceptance_rate, tokens_per_second, time_per_token,
speedup (tokens_per_second / the baseline's, measured in this run), rouge1/2/L. At the end, or on
Ctrl-C, it draws OUTPUT_DIR/sweep_heatmap.png (speed-up per cell) and prints the best pair.
"""
import csv
import json
import sys
from pathlib import Path

import common
import cli
import options
from decoding import Strategy

COLUMNS = ["exit_layer", "num_speculations", "acceptance_rate", "tokens_per_second", "time_per_token", "speedup",
           "rouge1", "rouge2", "rougeL"]


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
    es = sorted({r["exit_layer"] for r in rows})
    ks = sorted({r["num_speculations"] for r in rows})
    values = [[float("nan")] * len(ks) for _ in es]
    for r in rows:
        values[es.index(r["exit_layer"])][ks.index(r["num_speculations"])] = r["speedup"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(ks), 1.2 + 0.5 * len(es)))
    im = ax.imshow(values, cmap="RdYlGn", vmin=min(0.5, *[r["speedup"] for r in rows]),
                   vmax=max(1.5, *[r["speedup"] for r in rows]), aspect="auto")
    ax.set_xticks(range(len(ks)), [str(k) for k in ks])
    ax.set_yticks(range(len(es)), [str(e) for e in es])
    ax.set_xlabel("num_speculations (k)")
    ax.set_ylabel("exit_layer (E)")
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            if v == v:
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="speed-up over autoregressive")
    ax.set_title("self-speculative speed-up")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__)
    options.add_model_options(p)
    options.add_decoding_options(p, strategies=None)
    options.add_sampling_options(p)
    p.add_argument("--generation_strategy", choices=["self_speculative"], default="self_speculative",
                   help="the strategy swept (accepted for the LayerSkip reference's command line)")
    common.add_dataset_options(p)
    p.add_argument("--exit_layer_first", type=int, default=4)
    p.add_argument("--exit_layer_last", type=int, default=28)
    p.add_argument("--exit_layer_step", type=int, default=4)
    p.add_argument("--num_speculations_first", type=int, default=1)
    p.add_argument("--num_speculations_last", type=int, default=6)
    p.add_argument("--num_speculations_step", type=int, default=1)
    common.add_output_option(p, "sweep_out", file_option=False)
    a = p.parse_args(argv)
    options.check_options(p, a)
    try:
        exit_layers = grid(a.exit_layer_first, a.exit_layer_last, a.exit_layer_step, "exit_layer")
        ks = grid(a.num_speculations_first, a.num_speculations_last, a.num_speculations_step, "num_speculations")
    except ValueError as e:
        p.error(str(e))
    if min(exit_layers) < 1 or min(ks) < 1:
        p.error("exit layers and num_speculations must be >= 1")
    common.check_dataset_options(p, a)
    a.exit_layers, a.ks = exit_layers, ks
    return a


def main(argv=None):
    a = parse_args(argv)
    exit_layers, ks = a.exit_layers, a.ks
    common.check_output(a, "sweep.csv")
    samples = common.dataset_samples(a)

    def check(meta, tokenizer):
        n = meta["args"].n_layers
        bad = [e for e in exit_layers if not 1 <= e < n]
        if bad:
            raise ValueError(f"exit layer(s) {bad} out of range [1, {n - 1}] for this {n}-layer model")
    engine = options.load_engine(a, *options.init_distributed(a), check=check)
    common.setup_caches_for(engine, samples, a.max_new_tokens, max_k=max(ks))

    a.output_dir.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = a.output_dir / "sweep.csv", a.output_dir / "sweep_heatmap.png"
    common.warm_up(engine, samples, a)
    _, base = common.evaluate(engine, samples, a)
    print(json.dumps({"autoregressive": base}), file=sys.stderr)
    rows = []
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        f.flush()
        try:
            for E in exit_layers:
                for k in ks:
                    engine.strategy = Strategy("self_speculative", E, k)
                    common.warm_up(engine, samples, a)
                    _, agg = common.evaluate(engine, samples, a)
                    row = {"exit_layer": E, "num_speculations": k, "acceptance_rate": agg["acceptance_rate"],
                           "tokens_per_second": agg["tokens_per_s"], "time_per_token": agg["time_per_token_s"],
                           "speedup": agg["tokens_per_s"] / base["tokens_per_s"],
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
    print(f"autoregressive: {base['tokens_per_s']:.2f} tokens/s; best: exit_layer={best['exit_layer']} "
          f"num_speculations={best['num_speculations']}: {best['tokens_per_second']:.2f} tokens/s, "
          f"speed-up {best['speedup']:.2f}x, acceptance {best['acceptance_rate']:.1%}  ({csv_path}, {png_path})")


if __name__ == "__main__":
    cli.run(main)
