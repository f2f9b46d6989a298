"""The speed harness's rows (speed.py, gpu_check.py): configurations as data (presets of grids
over the shared options), the engine each row loads, its prompts, its measurement and the table
they make."""
import argparse
import sys
from dataclasses import dataclass

import torch
from torch._inductor import config as inductor_config

import options
import tp
from engine import load_engine, weight_bytes
from samples import load_samples
from timing import ideal_speedup, measure_interleaved, step_costs


# (key, header, format); a column shows only when some row has a value for it
COLUMNS = [("engine", "engine", "{}"), ("config", "configuration", "{}"),
           ("tokens_per_s", "tokens/s", "{:.1f}"), ("ms_per_token_p50", "ms/token p50", "{:.2f}"),
           ("ms_per_token_p90", "p90", "{:.2f}"), ("prefill_ms", "prefill ms", "{:.0f}"),
           ("compile_s", "compile s", "{:.0f}"), ("mb_per_token", "weight MB/token", "{:.0f}"),
           ("gbs", "GB/s", "{:.1f}"), ("copy_share", "% of copy bw", "{:.0%}"),
           ("peak_memory_gb", "peak GB", "{:.2f}"), ("acceptance_rate", "acceptance", "{:.1%}"),
           ("tokens_per_round", "tokens/round", "{:.2f}"), ("draft_cost", "draft/step", "{:.2f}"),
           ("verify_cost", "verify/step", "{:.2f}"), ("catch_up_cost", "catch-up/step", "{:.2f}"),
           ("ideal_speedup", "ideal x", "{:.2f}"), ("chosen", "chosen (share of rounds)", "{}"),
           ("calibration_s", "calibration s", "{:.0f}"),
           ("predicted_speedup", "x at --acceptance", "{:.2f}"), ("allreduce_kb", "all-reduce KB/token", "{:.1f}"),
           ("vs_baseline", "vs baseline", "{:.2f}x")]


def finish_rows(rows, copy_bw: float | None, baseline: str | None = None):
    """Derived columns: bandwidth, its share of the copy bandwidth, and the ratio to the baseline
    row: the first whose "engine configuration" contains `baseline`, or the first row."""
    named = [r for r in rows if baseline and baseline in f"{r['engine']} {r['config']}"]
    if baseline and not named:  # said, not raised: the rows took minutes to measure
        print(f"note: --baseline {baseline!r} matches no row; comparing with the first", file=sys.stderr)
    base = (named or rows or [{}])[0].get("tokens_per_s")
    for r in rows:
        if r["tokens_per_s"] is None:  # a peer that failed
            continue
        if r.get("bytes_per_token"):
            r["mb_per_token"] = r["bytes_per_token"] / 1e6
            r["gbs"] = r["bytes_per_token"] * r["tokens_per_s"] / 1e9
            r["copy_share"] = r["gbs"] / copy_bw if copy_bw else None
        r["vs_baseline"] = r["tokens_per_s"] / base if base else None
    return rows


def table(rows) -> str:
    cols = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join("-" if r.get(k) is None else f.format(r[k]) for k, _, f in cols) + " |")
    return "\n".join(lines)


# Each preset is a list of grids; a grid's rows are the cross product of its values, and a flag
# given on the command line replaces that value in every grid.
GRID_KEYS = ("dtype", "quantize", "compile", "layers_per_graph", "generation_strategy", "draft_quantize", "exit_layer",
             "num_speculations", "world_size")
PRESETS = {
    "decode": {"grids": [dict(dtype="float32,bfloat16", compile="false,true")],
               "peers": "transformers,transformers_compile"},
    "quantize": {"grids": [dict(dtype="float32,bfloat16", quantize="none,int8,int4-g32,int4-g128", compile="true")],
                 "peers": "llama_cpp"},
    "speculative": {"grids": [dict(dtype="float32", compile="true", generation_strategy="autoregressive"),
                              dict(dtype="float32", compile="true", generation_strategy="self_speculative",
                                   exit_layer="10,20,26,29", num_speculations="2,4")],
                    "peers": "transformers,transformers_early_exit", "max_new_tokens": 64},
    "quantized_draft": {"grids": [dict(dtype="float32", compile="true", generation_strategy="autoregressive"),
                                  dict(dtype="float32", compile="true", generation_strategy="self_speculative",
                                       draft_quantize="int8,int4-g32", exit_layer="", num_speculations="4,6,8")],
                        "peers": "", "max_new_tokens": 128},
    # regional compilation (6 layers a graph) against whole-step graphs: compile time and step cost
    "compile": {"grids": [dict(dtype="float32", quantize="none,int8", compile="true", layers_per_graph="0,6")],
                "peers": "", "max_new_tokens": 128},
    "tp": {"grids": [dict(dtype="float32", compile="false", world_size="1,3")], "peers": ""},
    "gpu": {"grids": [dict(dtype="bfloat16", compile="true", generation_strategy="autoregressive,self_speculative",
                           exit_layer="8", num_speculations="6"),
                      dict(dtype="bfloat16", compile="true", quantize="int8,int4-g128")],
            "peers": "", "checkpoint_path": "random:llama2-7b", "device": "cuda", "prompt_length": 16,
            "max_new_tokens": 128},
}
GRID_DEFAULTS = dict(dtype="auto", quantize="none", compile="false", layers_per_graph="", generation_strategy="autoregressive",
                     exit_layer="", num_speculations="3", draft_quantize="none", world_size="1")


def expand(grids: list[dict], overrides: dict) -> list[dict]:
    """The rows of the grids: one dict of single values per row, in order, without repeats
    (autoregressive rows take no exit layer or k)."""
    rows = []
    for grid in grids:
        values = {k: [v.strip() for v in str(overrides.get(k) or grid.get(k, GRID_DEFAULTS[k])).split(",")]
                  for k in GRID_KEYS}
        combos = [{}]
        for k in GRID_KEYS:
            combos = [{**c, k: v} for c in combos for v in values[k]]
        for c in combos:
            if c["generation_strategy"] == "autoregressive":
                c.update(exit_layer="", num_speculations=GRID_DEFAULTS["num_speculations"], draft_quantize="none")
            if c not in rows:
                rows.append(c)
    return rows


def describe_row(c: dict) -> str:
    parts = [c["dtype"], *([c["quantize"]] if c["quantize"] != "none" else []),
             "compiled" if options.parse_bool(c["compile"]) else "eager"]
    if c["layers_per_graph"] and options.parse_bool(c["compile"]):
        parts.append("whole-step graphs" if c["layers_per_graph"] == "0" else f"{c['layers_per_graph']} layers/graph")
    if c["generation_strategy"] != "autoregressive":
        draft = f" {c['draft_quantize']} draft" if c["draft_quantize"] != "none" else ""
        parts.append(f"{c['generation_strategy']}{draft} E={c['exit_layer'] or 'all'} k={c['num_speculations']}")
    if int(c["world_size"]) > 1:
        parts.append(f"tp={c['world_size']}")
    return " ".join(parts)


@dataclass(frozen=True)
class Harness:
    """What every row of the speed harness shares: the model, its device, the prompts and how
    they are measured."""
    checkpoint: str
    device: str = "auto"
    hf_token: str | None = None
    max_new_tokens: int = 200
    repeats: int = 3
    num_samples: int = 2
    prompts: str = "human_eval"  # one of PROMPT_SETS
    prompt_length: int | None = None  # random prompts of this many tokens instead
    acceptance: float | None = None  # also predict the speed-up at this per-token acceptance
    peers: tuple = ()  # speed.py's other engines


class _Refusing(argparse.ArgumentParser):
    def error(self, message):  # the caller names the row
        raise ValueError(message)


def row_config(h: Harness, c: dict):
    """The engine's configuration for one row, as the engine's commands would parse and check
    it; ValueError if they refuse it."""
    p = _Refusing(add_help=False)
    options.add_options(p)
    argv = ["--checkpoint_path", str(h.checkpoint), "--device", str(h.device), "--dtype", c["dtype"],
            "--generation_strategy", c["generation_strategy"], "--num_speculations", c["num_speculations"],
            "--max_new_tokens", str(h.max_new_tokens), "--temperature", "0"]
    argv += ["--hf_token", h.hf_token] if h.hf_token else []
    argv += ["--quantize", c["quantize"]] if c["quantize"] != "none" else []
    argv += ["--exit_layer", c["exit_layer"]] if c["exit_layer"] else []
    argv += ["--draft_quantize", c["draft_quantize"]] if c["draft_quantize"] != "none" else []
    argv += ["--compile"] if options.parse_bool(c["compile"]) else []
    argv += ["--layers_per_graph", c["layers_per_graph"]] if c["layers_per_graph"] and options.parse_bool(c["compile"]) else []
    return options.check_options(p, p.parse_args(argv))


def load_row_engine(h: Harness, c: dict, rank=0, world_size=1, draft_schemes=None):
    """An engine for one row (load_engine; random weights for `random:<shape>[:<layers>]`).
    draft_schemes: quantized self-drafts of every layer to make (rows of several exit layers share
    them), instead of the row's own."""
    return load_engine(row_config(h, c), rank, world_size, draft_schemes=draft_schemes)


# Requests for prose, to mix with HumanEval's code (speed.py --prompts): one fixed (E, k) cannot fit both.
PROSE_REQUESTS = [
    "Write a short letter to a friend describing your first week in a new city.",
    "Explain to a ten-year-old why the sky is blue and sunsets are red.",
    "Describe a busy fish market early in the morning, in one paragraph.",
    "Tell a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are the pros and cons of working from home? Answer in a few sentences.",
    "Summarise the causes of the French Revolution for a history class.",
    "Write a product description for a handmade wooden chess set.",
    "Give advice to someone preparing for their first marathon.",
]
PROMPT_SETS = ("human_eval", "prose", "mixed")


def prompts_for(engine, n: int, kind: str = "human_eval", length: int | None = None) -> list:
    """n prompts of `kind` (HumanEval problems, prose requests in the chat format, or the two
    alternating), or `length` random tokens each (always for random weights)."""
    vocab_size = engine.model.args.vocab_size
    if length or engine.tokenizer is None:
        length = length or 16
        return [torch.randint(100, min(1000, vocab_size), (length,), generator=torch.Generator().manual_seed(i)
                              ).to(engine.device) for i in range(n)]
    tok = engine.tokenizer
    code = [tok.encode(s.prompt) for s in load_samples("human_eval", num_samples=n)]
    prose = [tok.encode_chat([{"role": "user", "content": t}]) if tok.chat_format else tok.encode(t)
             for t in (PROSE_REQUESTS * n)[:n]]
    ids = {"human_eval": code, "prose": prose,
           "mixed": [(code[i // 2] if i % 2 == 0 else prose[i // 2]) for i in range(n)]}[kind]
    return [torch.tensor(p, device=engine.device) for p in ids]


def bench_row(engine, c: dict, prompts, h: Harness, strategy=None) -> dict:
    """One row of ours (strategy, default the engine's): measure() over the prompts, plus step
    costs for speculative rows."""
    return bench_rows(engine, [(c, strategy or engine.strategy)], prompts, h)[0]


def bench_rows(engine, rows, prompts, h: Harness) -> list[dict]:
    """Rows [(grid values, Strategy)] of one loaded engine, measured interleaved
    (measure_interleaved), each with its step costs and cost model where it has them."""
    n = h.max_new_tokens
    engine.setup_caches_for([max(len(p) for p in prompts)], n, strategies=[s for _, s in rows])

    def generate_fn(strategy):
        return lambda p, on_tokens: engine.run(p, n, on_tokens, stop_ids=(), strategy=strategy)[1]
    results = measure_interleaved([generate_fn(s) for _, s in rows], prompts, h.repeats, engine.device)
    for (c, strategy), r in zip(rows, results):
        finish_row(engine, c, r, h, strategy)
    return results


def finish_row(engine, c: dict, r: dict, h: Harness, strategy):
    compiled = options.parse_bool(c["compile"])
    freezing = " +freezing" if compiled and inductor_config.freezing else ""
    r.update(engine="ours", config=describe_row(c) + freezing, compile_s=r["warmup_s"] if compiled else None, **c)
    if strategy.name == "autoregressive":
        r["bytes_per_token"] = weight_bytes(engine.model, per_token=True)
    elif strategy.adaptive:  # no one (E, k) to cost; the trace says what it chose
        r["calibration_s"] = engine.policy_for(strategy).calibration_s
    else:
        k = strategy.num_speculations
        costs = step_costs(engine.model, engine.steps, strategy.exit_layer, k, engine.device,
                           draft_model=engine.draft_for(strategy))
        r.update(draft_cost=costs["draft"] / costs["full"], verify_cost=costs["verify"] / costs["full"])
        if "catch_up" in costs:
            r["catch_up_cost"] = costs["catch_up"] / costs["full"]
        r["ideal_speedup"] = ideal_speedup(r["tokens_per_round"], k, costs, r["catch_up_rate"])
        if h.acceptance is not None:  # expected tokens per round at that per-token acceptance
            al = h.acceptance  # (a fully accepted round, al^k of them, is followed by a catch-up)
            r["predicted_speedup"] = ideal_speedup((1 - al ** (k + 1)) / (1 - al), k, costs, al ** k)
    if tp.world()[1] > 1:
        args = engine.model.args  # every block all-reduces its attention and MLP outputs: 2 per layer and token
        r["allreduce_kb"] = 2 * args.n_layers * args.dim * torch.finfo(engine.dtype).bits / 8 / 1024
