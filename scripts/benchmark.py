"""Generation over a dataset with any strategy: the task metric and the speed, as one JSON document.

    python scripts/benchmark.py --dataset human_eval --num_samples 20 \\
        --generation_strategy self_speculative --exit_layer 20 --num_speculations 3 --compile
    python scripts/benchmark.py --dataset custom_jsonl --data_path my.jsonl --output result.json

Per sample: the generated text, ROUGE-1/2/L F1 against the reference (`rouge-score`), exact match
(after stripping whitespace), tokens/s, time per token, acceptance rate and mean tokens per round.
The aggregate averages the metrics over samples and computes speed over all tokens. Generation stops
at the model's stop tokens, at --max_new_tokens, or at the first --stop string (the text is cut
there). Datasets: see scripts/tasks.py.
"""
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import cli  # noqa: E402
from tasks import DATASETS, check_dataset_args, load_samples  # noqa: E402

STRATEGIES = ("autoregressive", "self_speculative")


def add_common_args(p, strategy=True):
    """Flags shared by benchmark, sweep and correctness."""
    p.add_argument("--checkpoint_path", type=Path, default=REPO / "checkpoints" / "SmolLM2-135M-Instruct")
    p.add_argument("--dataset", default="human_eval", help=", ".join(DATASETS))
    p.add_argument("--data_path", type=Path, default=None, help="JSONL for custom_jsonl (fields prompt, response)")
    p.add_argument("--num_samples", type=int, default=None, help="first N samples (after shuffling)")
    p.add_argument("--n_shot", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shuffle", action="store_true")
    p.add_argument("--template", default="{prompt}", help="prompt template; fields {prompt} and {shots}")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--compile", action="store_true")
    if strategy:
        p.add_argument("--generation_strategy", default="autoregressive", choices=STRATEGIES)
        p.add_argument("--exit_layer", type=int, default=None)
        p.add_argument("--num_speculations", type=int, default=3)


def check_common_args(p, a, strategy=True):
    """Errors for bad arguments, before any model is loaded."""
    error = check_dataset_args(a.dataset, a.data_path)
    if error:
        p.error(error)
    if a.num_samples is not None and a.num_samples < 1:
        p.error("--num_samples must be >= 1")
    if a.max_new_tokens < 1:
        p.error("--max_new_tokens must be >= 1")
    if not (Path(a.checkpoint_path) / "checkpoint.safetensors").is_file() and not Path(a.checkpoint_path).is_file():
        p.error(f"no checkpoint at {a.checkpoint_path} (prepare the default with scripts/prepare_smollm2.py)")
    if strategy and a.generation_strategy == "self_speculative":
        if a.exit_layer is None:
            p.error("--generation_strategy self_speculative needs --exit_layer")
        if a.num_speculations < 1:
            p.error("--num_speculations must be >= 1")
    if strategy and a.exit_layer is not None and a.exit_layer < 1:
        p.error(f"--exit_layer must be >= 1, got {a.exit_layer}")
    try:
        from sampling import SamplingParams
        a.sampling = SamplingParams(a.temperature, a.top_k, a.top_p)
    except ValueError as e:
        p.error(str(e))


def check_exit_layers(p, checkpoint_path, exit_layers):
    """Exit layers against the checkpoint's layer count, read from its metadata (no weights loaded)."""
    from checkpoint import CheckpointError, read_metadata
    try:
        n = read_metadata(checkpoint_path)["config"]["num_hidden_layers"]
    except (CheckpointError, FileNotFoundError) as e:
        p.error(str(e))
    bad = [e for e in exit_layers if e is not None and not 1 <= e < n]
    if bad:
        p.error(f"exit layer(s) {bad} out of range [1, {n - 1}] for this {n}-layer model")


def load_engine(a):
    import torch

    from checkpoint import load_model, resolve_checkpoint_path
    from decoding import Steps, compile_steps
    from tokenizer import load_tokenizer
    path = resolve_checkpoint_path(a.checkpoint_path)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda requested but CUDA is not available")
    model = load_model(path, device, getattr(torch, a.dtype))
    steps = compile_steps(device) if a.compile else Steps()
    return model, load_tokenizer(path.parent), steps, device


def rouge(prediction: str, reference: str) -> dict:
    from rouge_score import rouge_scorer
    scores = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True).score(reference, prediction)
    return {k: v.fmeasure for k, v in scores.items()}


def cut_at_stop(text: str, stops) -> tuple[str, bool]:
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def run_sample(model, tokenizer, steps, device, prompt_text, a, strategy, exit_layer, k):
    """Generates for one prompt; returns (text, stats)."""
    import torch

    from decoding import generate, speculative_generate
    ids = torch.tensor(tokenizer.encode(prompt_text), device=device)
    n = min(a.max_new_tokens, model.max_seq_length - len(ids) - k)
    if n < 1:
        raise ValueError(f"a prompt of {len(ids)} tokens does not fit the cache of {model.max_seq_length}")
    stop_ids = tokenizer.stop_ids
    if strategy == "autoregressive":
        out, stats = generate(model, ids, n, a.sampling, stop_ids=stop_ids, steps=steps, exit_layer=exit_layer)
    else:
        out, stats = speculative_generate(model, ids, n, a.sampling, k, exit_layer=exit_layer, stop_ids=stop_ids,
                                          steps=steps)
    gen = [t for t in out[0, len(ids):].tolist() if t not in stop_ids]
    return tokenizer.decode(gen), stats


def evaluate(model, tokenizer, steps, device, samples, a, strategy, exit_layer, k, progress=True):
    """Per-sample records and the aggregate, for one strategy / (exit_layer, k)."""
    import torch
    from tqdm import tqdm
    records = []
    total_tokens, total_s, rounds, accepted, drafted = 0, 0.0, 0, 0, 0
    for i, s in enumerate(tqdm(samples, desc=f"{strategy} E={exit_layer} k={k}", disable=not progress,
                               file=sys.stderr)):
        torch.manual_seed(a.seed + i)
        text, stats = run_sample(model, tokenizer, steps, device, s.prompt, a, strategy, exit_layer, k)
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
    agg = {m: statistics.mean(r[m] for r in records) for m in ("rouge1", "rouge2", "rougeL", "exact_match")}
    agg.update(num_samples=len(records), new_tokens=total_tokens, seconds=total_s,
               tokens_per_s=total_tokens / total_s, time_per_token_s=total_s / max(total_tokens, 1),
               acceptance_rate=accepted / drafted if drafted else None,
               tokens_per_round=(accepted + rounds) / rounds if rounds else None)
    return records, agg


def setup_caches_for(model, tokenizer, samples, a, max_k: int):
    """One cache size for the whole run (a compiled graph is specialised to it)."""
    longest = max(len(tokenizer.encode(s.prompt)) for s in samples)
    size = longest + a.max_new_tokens + max_k
    if size > model.args.max_position_embeddings:
        raise ValueError(f"the longest prompt ({longest} tokens) + --max_new_tokens + k exceeds the model's "
                         f"{model.args.max_position_embeddings} positions")
    model.setup_caches(1, size)


def warm_up(model, tokenizer, steps, device, samples, a, strategy, exit_layer, k):
    """One untimed generation: compiles the graphs before anything is measured."""
    if a.compile:
        run_sample(model, tokenizer, steps, device, samples[0].prompt, a, strategy, exit_layer, k)


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__)
    add_common_args(p)
    p.add_argument("--output", type=Path, default=None, help="write the JSON here (default: stdout)")
    a = p.parse_args(argv)
    check_common_args(p, a)
    if a.output:
        cli.check_output_file(a.output)
    try:
        samples = load_samples(a.dataset, a.data_path, a.num_samples, a.n_shot, a.template, a.seed, a.shuffle)
    except ValueError as e:
        p.error(str(e))
    check_exit_layers(p, a.checkpoint_path, [a.exit_layer])
    model, tokenizer, steps, device = load_engine(a)
    k = a.num_speculations if a.generation_strategy == "self_speculative" else 0
    setup_caches_for(model, tokenizer, samples, a, k)
    t = time.perf_counter()
    warm_up(model, tokenizer, steps, device, samples, a, a.generation_strategy, a.exit_layer, k)
    compile_s = time.perf_counter() - t if a.compile else None
    records, agg = evaluate(model, tokenizer, steps, device, samples, a, a.generation_strategy, a.exit_layer, k)
    config = {k2: (str(v) if isinstance(v, Path) else v) for k2, v in vars(a).items() if k2 != "sampling"}
    doc = json.dumps({"config": config, "compile_s": compile_s, "aggregate": agg, "samples": records}, indent=2)
    if a.output:
        a.output.write_text(doc)
        print(json.dumps(agg), file=sys.stderr)
    else:
        print(doc)


if __name__ == "__main__":
    cli.run(main)
