"""Our server against llama.cpp's llama-server, one after the other on the same machine, with the
same client, prompts and load (scripts/load.py: HumanEval chat prompts, greedy, streaming).

    python scripts/serve_speed.py --ours "--quantize int8 --compile" --ours "--quantize int4 --compile" \\
        --llama_server "" --llama_server "--spec-type ngram-simple" --concurrency 1 4 8 16

Each --ours is one serve.py command line (flags after serve.py; --max_batch_size is added), each
--llama_server one llama-server configuration on the default model's Q4_1 GGUF
(scripts/llama_server.py builds it), with as many slots as our rows and its defaults otherwise (its
prompt cache on: the load sends each level prompts new to the server, so it reuses only what
prompts share). Every response is compared with the same server's answer to the prompt alone
(same as solo). Prints every row, then each of ours against the first llama-server configuration
at each concurrency (output tokens/s and p99 time to first token, as ratios); --output_dir writes
serve_speed.json and serve_speed.png.
"""
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import cli  # noqa: E402

cli.start(__name__)

from output import add_output_option, check_output, plot_load, print_load_table, write_json  # noqa: E402
from servers import free_port, stop, wait_ready  # noqa: E402

SCRIPTS = REPO / "scripts"  # the commands this one composes: llama_server.py, load.py


def start_ours(flags: str, rows: int, ctx: int):
    port = free_port()
    cmd = [sys.executable, str(REPO / "serve.py"), "--port", str(port), "--max_batch_size", str(rows),
           "--max_seq_length", str(ctx), "--temperature", "0", *shlex.split(flags)]
    return subprocess.Popen(cmd, cwd=REPO), f"http://127.0.0.1:{port}", f"ours {flags}".strip(), None


def start_llama(flags: str, rows: int, ctx: int, gguf: Path | None):
    port = free_port()
    cmd = [sys.executable, str(SCRIPTS / "llama_server.py"), "--port", str(port), "--parallel", str(rows),
           "--ctx_per_slot", str(ctx), "--threads", str(os.cpu_count()), *(["--gguf", str(gguf)] if gguf else []),
           "--", *shlex.split(flags)]  # it execs llama-server: the same process
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), f"http://127.0.0.1:{port}", \
        f"llama-server {flags}".strip(), None


def measure(url: str, label: str, pid: int, extra: dict | None, a) -> list[dict]:
    """load.py's rows for this server (every response checked against its solo answer)."""
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, str(SCRIPTS / "load.py"), "--url", url, "--label", label, "--pid", str(pid), "--check",
               "--concurrency", *map(str, a.concurrency), "--max_tokens", str(a.max_tokens), "--time_limit",
               str(a.time_limit), "--output_dir", d, *(["--requests", str(a.requests)] if a.requests else []),
               *(["--extra_body", json.dumps(extra)] if extra else [])]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        doc = json.loads((Path(d) / "load.json").read_text())
    for r in doc["rows"]:
        r["rss_after_warmup_mb"] = doc["rss_after_warmup_mb"]
    return doc["rows"]


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--ours", action="append", default=None, help="serve.py flags (repeatable)")
    p.add_argument("--llama_server", action="append", default=None, help="llama-server flags (repeatable; \"\" plain)")
    p.add_argument("--gguf", type=Path, default=None, help="llama-server's model (default: the default model's GGUF)")
    p.add_argument("--rows", type=int, default=8, help="our --max_batch_size and llama-server's --parallel")
    p.add_argument("--ctx", type=int, default=1024, help="positions per row / slot")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--requests", type=int, default=None, help="requests per level (default: 2 per client, >= 8)")
    p.add_argument("--max_tokens", type=int, default=128)
    p.add_argument("--time_limit", type=float, default=300, help="seconds per level at most")
    add_output_option(p, None, file_option=False)
    a = p.parse_args(argv)
    ours, theirs = a.ours or ["--quantize int8 --compile"], a.llama_server if a.llama_server is not None else [""]
    if any(c < 1 for c in a.concurrency) or a.rows < 1 or a.max_tokens < 1:
        p.error("--concurrency, --rows and --max_tokens must be positive")
    out = check_output(a, "serve_speed.json")
    if a.gguf is not None and not a.gguf.is_file():
        raise FileNotFoundError(f"--gguf {a.gguf} does not exist")
    if theirs:  # built (once) before anything is timed
        subprocess.run([sys.executable, str(SCRIPTS / "llama_server.py"), "--build"], check=True,
                       stdout=subprocess.DEVNULL)
    gguf = a.gguf
    rows = []
    starts = [lambda f=f: start_llama(f, a.rows, a.ctx, gguf) for f in theirs] + \
             [lambda f=f: start_ours(f, a.rows, a.ctx) for f in ours]
    for start in starts:
        proc, url, label, extra = start()
        try:
            wait_ready(proc, url)
            rows += measure(url, label, proc.pid, extra, a)
        finally:
            stop(proc)
    print_load_table(rows)
    peer = theirs[0] if theirs else None
    if peer is not None:
        base = {r["concurrency"]: r for r in rows if r["server"] == f"llama-server {peer}".strip()}
        print(f"\nours / llama-server {peer or '(plain)'}: output tokens/s and p99 time to first token (lower is better)")
        for r in rows:
            if r["server"].startswith("ours"):
                b = base[r["concurrency"]]
                print(f"{r['server'][:40]:<40} {r['concurrency']:>3} clients: {r['tokens_per_s'] / b['tokens_per_s']:.2f}x "
                      f"tokens/s, TTFT p99 {r['ttft_p99_s']:.2f} s vs {b['ttft_p99_s']:.2f} s")
    write_json(out, {"gguf": str(gguf or "the default model's Q4_1"), "rows_per_server": a.rows, "max_tokens": a.max_tokens, "rows": rows})
    if out is not None:
        plot_load(rows, out.with_suffix(".png"), f"greedy, {a.max_tokens} tokens per request, {a.rows} rows / slots")
        print(f"wrote {out} and {out.with_suffix('.png')}", file=sys.stderr)


if __name__ == "__main__":
    cli.run(main)
