"""Drafts from the text (--draft_source) on prompts a user would give, against our compiled
autoregressive decoding and the peers: transformers' prompt lookup and llama.cpp's n-gram
speculation (llama-server's --spec-type modes, on the default model's Q4_1 GGUF).

    python scripts/ngram_speed.py --compile                         # ours: every workload, SmolLM2
    python scripts/ngram_speed.py --compile --transformers --llama_server ngram-simple ngram-map-k ngram-mod

Workloads (chat prompts unless said; all offline):
- summary: a topic of the Python documentation shipped in the standard library (pydoc_data), to summarize;
- code_edit: a HumanEval canonical solution, to rewrite with type hints and a docstring;
- completion: a HumanEval prompt, completed as text (no chat template);
- chat: prose requests.
Rows (greedy, each generation until a stop token or --max_new_tokens): ours autoregressive (the
baseline; compiled with --compile, as are all our rows), --draft_source ngram, the model's own draft (--draft_quantize, a quantized self-draft),
and --draft_source auto over both; transformers generate(prompt_lookup_num_tokens=--ngram_tokens)
on the checkpoint's float32 weights; llama-server with each --spec-type given (and without).
Each workload's prompts run every row of ours (and transformers') in turn, prompt by prompt, after
untimed warm-ups of every row (compilation); llama-server's rows server by server; the batched
rows in turn, workload by workload, after an untimed run of each on the workload's prompts (rows
that end at different times leave a batch of fewer rows: those shapes compile there). tokens/s:
decode tokens (after the first) per second of decoding, over the workload's prompts; with
--batch_size B, batched rows against batched autoregressive decoding.
"same": prompts whose text equals our autoregressive text (one at a time). --output_dir writes
ngram_speed.json and ngram_speed.png.
"""
import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import cli  # noqa: E402

cli.start(__name__)

import torch  # noqa: E402

import options  # noqa: E402
from decoding import Strategy  # noqa: E402
from engine import load_engine  # noqa: E402
from harness import PROSE_REQUESTS  # noqa: E402
from output import add_output_option, check_output, write_json  # noqa: E402
from samples import load_samples  # noqa: E402
from servers import free_port, stop, wait_ready  # noqa: E402

WORKLOADS = ("summary", "code_edit", "completion", "chat")
TOPICS = ("for", "dict", "exceptions", "augassign", "class", "subscriptions")  # pydoc_data topics of 1.8-3 kB


def workload_prompts(tokenizer, name: str, n: int) -> list[list[int]]:
    def chat(text):
        return tokenizer.encode_chat([{"role": "user", "content": text}])
    if name == "summary":
        from pydoc_data.topics import topics
        return [chat("Summarize the following documentation in a few sentences.\n\n" + topics[t].strip())
                for t in TOPICS[:n]]
    problems = load_samples("human_eval", num_samples=n)
    if name == "code_edit":
        return [chat("Rewrite this Python function with type hints on its arguments and return value, keeping "
                     "its docstring and logic. Reply with the code only.\n\n```python\n" + (s.prompt + s.reference)
                     .strip() + "\n```") for s in problems]
    if name == "completion":
        return [tokenizer.encode(s.prompt) for s in problems]
    return [chat(t) for t in PROSE_REQUESTS[:n]]


def ours(engine, strategy):
    def run(prompt, n):
        tokens, stats = engine.run(torch.tensor(prompt), n, strategy=strategy)
        return tokens[0, len(prompt):].tolist(), stats.new_tokens - 1, stats.decode_s, stats.acceptance_rate
    return run


def transformers_lookup(checkpoint, k: int, stop_ids):
    from hf_peer import hf_model
    hf = hf_model(checkpoint, torch.float32, compiled=False)

    def generate(prompt, n, **kw):
        with torch.no_grad():
            return hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=sorted(stop_ids),
                               pad_token_id=0, **kw)[0, len(prompt):].tolist()

    def run(prompt, n):
        t0 = time.perf_counter()
        generate(prompt, 1)  # its prefill, to subtract
        t1 = time.perf_counter()
        ids = generate(prompt, n, prompt_lookup_num_tokens=k)
        t2 = time.perf_counter()
        return ids, len(ids) - 1, (t2 - t1) - (t1 - t0), float("nan")
    return run


class LlamaServer:
    """llama-server with one slot and --spec-type `mode` ("" for none), driven over /completion with
    our token ids (the GGUF has the same vocabulary); its own timings give the decode rate."""

    def __init__(self, mode: str, ctx: int):
        self.port = free_port()
        extra = ["--spec-type", mode] if mode else []
        cmd = [sys.executable, str(REPO / "scripts" / "llama_server.py"), "--port", str(self.port), "--parallel", "1",
               "--ctx_per_slot", str(ctx), "--threads", str(os.cpu_count()), "--", *extra]  # it execs llama-server
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"
        wait_ready(self.proc, self.url, timeout=1200)  # the first use builds it (about 12 minutes on 2 cores)

    def __call__(self, prompt, n):
        body = json.dumps({"prompt": prompt, "n_predict": n, "temperature": 0, "top_k": 1, "cache_prompt": False,
                           "return_tokens": True}).encode()
        req = urllib.request.Request(self.url + "/completion", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            doc = json.loads(r.read())
        t = doc["timings"]
        drafted = t.get("draft_n") or 0
        rate = t.get("draft_n_accepted", 0) / drafted if drafted else float("nan")
        return doc.get("tokens") or [], t["predicted_n"] - 1, t["predicted_ms"] / 1e3, rate

    def close(self):
        stop(self.proc)


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add_model_options(p)
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    p.add_argument("--prompts", type=int, default=3, help="prompts per workload")
    p.add_argument("--max_new_tokens", type=int, default=192)
    p.add_argument("--ngram_tokens", type=int, default=Strategy.ngram_tokens)
    p.add_argument("--draft_quantize", default="int8", help="the model's own draft: its quantized self-draft")
    p.add_argument("--num_speculations", type=int, default=4, help="k of the model's own draft")
    p.add_argument("--compile", action="store_true", help="compile our steps (as every command's --compile)")
    p.add_argument("--batch_size", type=int, default=0, metavar="B",
                   help="also run each workload's prompts B rows at once: batched autoregressive, ngram and auto")
    p.add_argument("--transformers", action="store_true", help="add transformers' prompt lookup")
    p.add_argument("--llama_server", nargs="*", default=None, metavar="MODE",
                   help="add llama-server without speculation and with each --spec-type MODE (scripts/llama_server.py "
                        "builds it)")
    add_output_option(p, None)
    a = p.parse_args(argv)
    if a.prompts < 1 or a.max_new_tokens < 2 or a.batch_size < 0:
        p.error("--prompts must be >= 1, --max_new_tokens >= 2 and --batch_size >= 0")
    out = check_output(a, "ngram_speed.json")
    model_draft = Strategy("self_speculative", None, a.num_speculations, a.draft_quantize)
    config = options.EngineConfig(a.checkpoint_path, a.hf_token, a.device, a.dtype, a.quantize, model_draft,
                                  compile=a.compile, kv_cache_dtype=a.kv_cache_dtype)
    engine = load_engine(config)
    tok = engine.tokenizer
    prompts = {w: workload_prompts(tok, w, a.prompts) for w in a.workloads}
    rows_strategies = {"ngram": Strategy("self_speculative", draft_source="ngram", ngram_tokens=a.ngram_tokens),
                       "auto": Strategy("self_speculative", None, a.num_speculations, a.draft_quantize,
                                        draft_source="auto", ngram_tokens=a.ngram_tokens)}
    rows = {"autoregressive": ours(engine, Strategy()),
            "ngram": ours(engine, rows_strategies["ngram"]),
            f"{a.draft_quantize} self-draft k={a.num_speculations}": ours(engine, model_draft),
            "auto (n-gram or self-draft)": ours(engine, rows_strategies["auto"])}
    everything = [p for ps in prompts.values() for p in ps]
    engine.setup_caches_for([len(p) for p in everything] + [64], a.max_new_tokens,
                            strategies=[Strategy("self_speculative", None, max(a.num_speculations, a.ngram_tokens),
                                                 a.draft_quantize)])
    if a.transformers:
        rows[f"transformers prompt lookup ({a.ngram_tokens})"] = transformers_lookup(engine.path, a.ngram_tokens,
                                                                                   tok.stop_ids)
    results = {}  # (workload, row) -> [ids per prompt], tokens, seconds, acceptance per prompt

    # a span repeated: proposals of every padded length (1, 2, 4, 8 drafts) as the budget runs out,
    # so that every verify graph compiles before the timed runs
    repeated = (list(range(100, 124)) * 3)[:64]

    def forget_acceptance():
        """The choosers keep the warm-ups' timings, not their acceptance (the repeated span copies
        perfectly)."""
        for key, chooser in engine.policies.items():
            if key[0] == "chooser":
                chooser.hits.clear()

    def record(w, label, run, prompt):
        ids, n, secs, acc = run(prompt, a.max_new_tokens)
        r = results.setdefault((w, label), {"ids": [], "tokens": 0, "seconds": 0.0, "acceptance": []})
        r["ids"].append(ids)
        r["tokens"] += n
        r["seconds"] += secs
        r["acceptance"].append(acc)

    def measure(runs: dict):
        """Every row on each prompt in turn (a machine's drift or a neighbour's load hits the rows
        alike), after untimed warm-ups that compile what each row meets."""
        for run in runs.values():
            run(repeated, 2 * a.ngram_tokens + 2)  # compiles (the engine compiles the n-gram verify shapes first)
        forget_acceptance()
        for w in a.workloads:
            print(f"  {w}: {', '.join(runs)} ...", file=sys.stderr, flush=True)
            for run in runs.values():
                run(prompts[w][0], a.max_new_tokens)  # warm-up: compiles what it meets
            for prompt in prompts[w]:
                for label, run in runs.items():
                    record(w, label, run, prompt)

    print("ours and transformers, prompt by prompt ...", file=sys.stderr)
    measure(rows)
    for mode in ([""] + a.llama_server) if a.llama_server is not None else []:
        label = f"llama-server {mode or 'plain'} (Q4_1)"
        server = LlamaServer(mode, max(len(p) for p in everything) + a.max_new_tokens + 16)
        try:  # one server at a time: its rows are measured server by server
            measure({label: server})
        finally:
            server.close()
    if a.batch_size > 1:
        engine.setup_caches_for([len(p) for p in everything] + [64], a.max_new_tokens, rows=a.batch_size,
                                strategies=[Strategy("self_speculative", None, max(a.num_speculations, a.ngram_tokens),
                                                     a.draft_quantize)])
        batched = {f"batched B={a.batch_size} {label}": strategy for label, strategy in
                   [("autoregressive", Strategy()), ("ngram", rows_strategies["ngram"]),
                    ("auto", rows_strategies["auto"])]}
        for label, strategy in batched.items():
            engine.run_many([repeated] * a.batch_size, 2 * a.ngram_tokens + 2, strategy=strategy)  # compiles
        forget_acceptance()
        for w in a.workloads:  # the batched rows in turn, a workload's prompts at once
            print(f"  {w}: {', '.join(batched)} ...", file=sys.stderr, flush=True)
            for strategy in batched.values():  # warm-up: the batch sizes its rows leave at (4, 2, 1) compile
                engine.run_many(prompts[w], a.max_new_tokens, strategy=strategy)
            forget_acceptance()
            for label, strategy in batched.items():
                seqs, stats = engine.run_many(prompts[w], a.max_new_tokens, strategy=strategy)
                results[(w, label)] = {"ids": [s.tokens for s in seqs], "tokens": stats.new_tokens - stats.sequences,
                                       "seconds": stats.decode_s, "acceptance": [stats.acceptance_rate]}
    table = []
    for w in a.workloads:
        base = results[(w, "autoregressive")]
        for (ww, label), r in results.items():
            if ww != w:
                continue
            # batched rows against batched autoregressive decoding, the rest against ours one at a time
            peer = results[(w, f"batched B={a.batch_size} autoregressive")] if label.startswith("batched") else base
            base_rate = peer["tokens"] / peer["seconds"]
            rate = r["tokens"] / r["seconds"]
            accs = [x for x in r["acceptance"] if x == x]
            same = sum(i == j for i, j in zip(r["ids"], base["ids"]))
            table.append({"workload": w, "row": label, "tokens_per_s": rate, "vs_autoregressive": rate / base_rate,
                          "acceptance": sum(accs) / len(accs) if accs else None, "same": same,
                          "prompts": len(r["ids"]), "new_tokens": r["tokens"] + len(r["ids"])})
    print(f"\n{'workload':<11} {'row':<40} {'tokens/s':>9} {'vs AR':>7} {'accept':>7} {'same':>5}")
    for t in table:
        acc = f"{t['acceptance']:.0%}" if t["acceptance"] is not None else "-"
        print(f"{t['workload']:<11} {t['row'][:40]:<40} {t['tokens_per_s']:>9.1f} {t['vs_autoregressive']:>6.2f}x "
              f"{acc:>7} {t['same']:>2}/{t['prompts']}")
    write_json(out, {"max_new_tokens": a.max_new_tokens, "prompts_per_workload": a.prompts,
                     "ngram_tokens": a.ngram_tokens, "rows": table})
    if out is not None:
        plot(table, out.with_suffix(".png"), a)
        print(f"wrote {out} and {out.with_suffix('.png')}", file=sys.stderr)


def plot(table, path: Path, a):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = list(dict.fromkeys(t["row"] for t in table))
    workloads = list(dict.fromkeys(t["workload"] for t in table))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        values = [next((t["tokens_per_s"] for t in table if t["row"] == label and t["workload"] == w), 0)
                  for w in workloads]
        # tab20: up to 20 rows in distinct colours (the default cycle repeats after 10)
        ax.bar([x + i * width for x in range(len(workloads))], values, width, label=label,
               color=plt.get_cmap("tab20")(i % 20))
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(workloads))], workloads)
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"Drafts from the text: SmolLM2-135M, greedy, up to {a.max_new_tokens} tokens, "
                 f"{a.prompts} prompts per workload")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    cli.run(main)
