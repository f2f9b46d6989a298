"""Cold and warm `--compile` start-up per decoding strategy: each row runs generate.py twice in fresh
processes, first with empty inductor and step-cost caches (cold), then again
with the caches the first run left (warm), and reads the "Compilation time" each prints (the
first, untimed generation: compiling or loading the graphs, plus one short generation) and, for
adaptive strategies, how long the step-cost calibration took. Prints a markdown table and draws
it (--plot).

    python scripts/compile_time.py                                    # SmolLM2, every strategy
    python scripts/compile_time.py --rows autoregressive,'int8 weights' --plot compile_time.png
    python scripts/compile_time.py --extra "--layers_per_graph 0"     # whole-step graphs
"""
import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name -> generate.py flags (beside --compile and the shared ones)
ROWS = {
    "autoregressive": [],
    "early exit E=20": ["--exit_layer", "20"],
    "self-speculative E=20 k=4": ["--generation_strategy", "self_speculative", "--exit_layer", "20",
                                  "--num_speculations", "4"],
    "int8 weights": ["--quantize", "int8"],
    "int8 self-draft k=6": ["--generation_strategy", "self_speculative", "--draft_quantize", "int8",
                            "--num_speculations", "6"],
    "auto E and k": ["--generation_strategy", "self_speculative", "--exit_layer", "auto", "--num_speculations", "auto"],
}


def run_once(cmd: list[str], env: dict, timeout: float) -> dict:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {shlex.join(cmd)}\n{p.stderr[-2000:]}")
    compile_s = re.search(r"Compilation time: ([\d.]+) s", p.stderr)
    calib = re.search(r"step costs measured in ([\d.]+) s", p.stderr)
    return {"compile": float(compile_s.group(1)) if compile_s else float("nan"),
            "calibration": float(calib.group(1)) if calib else None, "wall": wall,
            "graphs": p.stderr.count("compiling the graph of")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint_path", default=None, help="generate.py's --checkpoint_path (default: its default model)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from: {', '.join(ROWS)}")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--extra", default="", help="more generate.py flags for every row, e.g. '--layers_per_graph 0'")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per generate.py run")
    p.add_argument("--plot", default=None, help="also draw the table to this PNG")
    a = p.parse_args(argv)
    names = [n.strip() for n in a.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    base = [sys.executable, "generate.py", "--compile", "--dtype", a.dtype, "--prompt", "def fib(n):",
            "--temperature", "0", "--max_new_tokens", str(a.max_new_tokens), "--num_samples", "1"]
    base += ["--checkpoint_path", a.checkpoint_path] if a.checkpoint_path else []
    base += shlex.split(a.extra)
    results = []
    for name in names:
        with tempfile.TemporaryDirectory(prefix="compile_time_") as tmp:
            # Fresh inductor and step-cost caches; the CPU kernels stay built (their one-time build is
            # not compilation of the model).
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": f"{tmp}/inductor", "LAYERSKIP_CACHE": f"{tmp}/layerskip",
                   "PYTHONUNBUFFERED": "1"}
            cmd = base + ROWS[name]
            print(f"{name}: cold ...", file=sys.stderr, flush=True)
            cold = run_once(cmd, env, a.timeout)
            print(f"{name}: warm ...", file=sys.stderr, flush=True)
            warm = run_once(cmd, env, a.timeout)
        results.append((name, cold, warm))
        print(f"  cold {cold['compile']:.1f} s, warm {warm['compile']:.1f} s", file=sys.stderr, flush=True)
    print(f"\n`{shlex.join(base[1:])}`, each row cold (empty caches) then warm (a second process)\n")
    print("| strategy | graphs | cold compile s | of which calibration s | warm s | cold process wall s |")
    print("|---|---|---|---|---|---|")
    for name, cold, warm in results:
        calib = f"{cold['calibration']:.1f}" if cold["calibration"] is not None else "-"
        print(f"| {name} | {cold['graphs']} | {cold['compile']:.1f} | {calib} | {warm['compile']:.1f} | {cold['wall']:.0f} |")
    if a.plot:
        plot(results, a.plot)


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [r[0] for r in results]
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(names) + 1.5))
    ys = range(len(names))
    ax.barh([y + 0.2 for y in ys], [r[1]["compile"] for r in results], height=0.4, label="cold")
    ax.barh([y - 0.2 for y in ys], [r[2]["compile"] for r in results], height=0.4, label="warm")
    ax.set_yticks(list(ys), names)
    ax.invert_yaxis()
    ax.set_xlabel("first generation with --compile (s)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot written to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
