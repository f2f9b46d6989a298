"""The evaluation loop of benchmark.py, correctness.py and sweep.py: their command line, the
engine with its caches set up for a dataset, generation over its samples (one at a time or
batched) and the metrics (ROUGE, exact match, speed)."""
import statistics
import sys
import time

import torch

import cli
import options
from engine import init_distributed, load_engine
from output import add_output_option, check_output
from samples import add_dataset_options, check_dataset_options, dataset_samples


def evaluation_parser(description: str, strategies):
    """benchmark.py's and correctness.py's command line: the shared options, a dataset, an output folder."""
    p = cli.ArgumentParser(description=description)
    options.add_options(p, strategies=strategies)
    add_dataset_options(p)
    add_output_option(p, None)
    p.add_argument("--batch_size", type=int, default=1,
                   help="samples generated at once (greedy: the same texts as one at a time)")
    return p


def parse_evaluation_args(p, argv, check=None):
    """(flags, EngineConfig); check(config), if given, refuses what the command cannot do."""
    a = p.parse_args(argv)
    config = options.check_options(p, a)
    if a.batch_size < 1:
        p.error(f"--batch_size must be >= 1, got {a.batch_size}")
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


def warm_up(engine, samples, a, strategy=None, rows: int = 1) -> float | None:
    """An untimed start that compiles the graphs before anything is measured (Engine.warm_up: a
    few rounds, of `rows` samples at once where they run so); its seconds."""
    if not a.compile:
        return None
    t = time.perf_counter()
    engine.warm_up([engine.tokenizer.encode(s.prompt) for s in samples[:rows]], a.max_new_tokens, strategy,
                   many=rows > 1)
    return time.perf_counter() - t
