"""Where the scripts write their results: --output_dir (or the deprecated --output FILE), checked
before any work, and the JSON written there."""
import json
import sys
from pathlib import Path

import torch

import cli
import tp


def add_output_option(p, default: str | None, file_option: bool = True):
    p.add_argument("--output_dir", type=Path, default=Path(default) if default else None,
                   help="folder for the results" + (f" (default: {default})" if default else ""))
    if file_option:  # the spelling of earlier versions, kept for users' scripts
        p.add_argument("--output", type=Path, default=None, help="deprecated: the JSON file (use --output_dir)")
    else:
        p.set_defaults(output=None)


def check_output(a, name: str) -> Path | None:
    """The JSON file to write (OUTPUT_DIR/name, or the deprecated --output FILE), checked before any work."""
    if a.output is not None:
        print(f"note: --output is deprecated; use --output_dir (writes {name} there)", file=sys.stderr)
        return cli.check_output_file(a.output)
    if a.output_dir is None:
        return None
    cli.check_output_dir(a.output_dir)
    return a.output_dir / name


def write_json(path: Path | None, doc) -> str:
    """Writes doc to path (rank 0 only: every rank computes the same) and returns its text."""
    text = json.dumps(doc, indent=2, default=str)
    if path is not None and tp.world()[0] == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return text


def config_of(a) -> dict:
    """The flags as given, for the results' JSON."""
    return {k: (str(v) if isinstance(v, (Path, torch.dtype)) else v) for k, v in vars(a).items()}


def print_load_table(rows: list[dict]):
    """scripts/load.py's rows (one per server and concurrency level) as one table; the same-as-solo
    and RSS columns where the rows have them."""
    check, pid = "same_as_solo" in rows[0], rows[0]["rss_mb"] is not None
    print(f"\n{'server':<44} {'clients':>7} {'reqs':>5} {'fail':>4} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'TPOT p50':>9} {'TPOT p99':>9} {'ITL p50':>8} {'ITL p99':>8}" + (" same as solo" if check else "")
          + ("  RSS MB" if pid else ""))

    def fmt(v, unit=""):
        return f"{v:.{0 if unit == 'ms' else 2}f}{unit}" if v is not None else "-"
    for r in rows:
        print(f"{r['server'][:44]:<44} {r['concurrency']:>7} {r['requests']:>5} {r['failed']:>4} "
              f"{r['tokens_per_s']:>8.1f} {fmt(r['ttft_p50_s'], 's'):>9} {fmt(r['ttft_p99_s'], 's'):>9} "
              f"{fmt(r['tpot_p50_ms'], 'ms'):>9} {fmt(r['tpot_p99_ms'], 'ms'):>9} {fmt(r['itl_p50_ms'], 'ms'):>8} "
              f"{fmt(r['itl_p99_ms'], 'ms'):>8}" + (f" {r['same_as_solo']:>5} of {r['requests']}" if check else "")
              + (f"  {r['rss_mb']:.0f}" if pid else ""))


def plot_load(rows: list[dict], path: Path, title: str):
    """Output tokens/s against concurrent clients, a line per server, as a PNG at path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in dict.fromkeys(r["server"] for r in rows):
        mine = [r for r in rows if r["server"] == label]
        ax.plot([r["concurrency"] for r in mine], [r["tokens_per_s"] for r in mine], "o-", label=label)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("output tokens/s (all clients)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
