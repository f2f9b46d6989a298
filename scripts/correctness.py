"""Is self-speculation lossless here? Greedy autoregressive vs greedy self-speculative on a dataset.

    python scripts/correctness.py --dataset human_eval --num_samples 20 --exit_layer 20 --num_speculations 3
    torchrun scripts/correctness.py --model facebook/layerskip-llama2-7B --dataset human_eval \\
        --generation_strategy self_speculative --num_speculations 6 --exit_layer 4 --num_samples 10 \\
        --sample False --output_dir ./logs

For every sample both strategies generate --max_new_tokens greedily (stop tokens honoured); the JSON
(OUTPUT_DIR/correctness.json, or stdout) holds the share of samples whose token sequences differ
and, for each difference, the first diverging position and both continuations from there. Equality
is expected in float32; in low precision on a GPU, the verify pass (k+1 tokens at once) may round a
near tie differently from the one-token step: such a difference is reported, never hidden.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the engine's modules
import cli  # noqa: E402

cli.start(__name__)  # first: a Ctrl-C during the imports below is `interrupted` too (cli.py)

import evaluation  # noqa: E402
import output  # noqa: E402
from decoding import Strategy  # noqa: E402


def first_difference(a: list, b: list) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def parse_args(argv=None):
    p = evaluation.evaluation_parser(__doc__, ("self_speculative", "speculative"))

    def greedy_only(config):
        if not config.sampling.greedy:
            p.error("correctness compares greedy outputs: use --temperature 0 (or --sample False)")
    return evaluation.parse_evaluation_args(p, argv, greedy_only)


def outputs(engine, strategy, samples, a) -> list[list[int]]:
    """Each sample's generated ids under strategy: one at a time, or --batch_size at once."""
    from tqdm import tqdm
    if a.batch_size > 1:
        seqs, _ = engine.run_many([engine.tokenizer.encode(s.prompt) for s in samples], a.max_new_tokens,
                                  strategy=strategy)
        return [seq.tokens for seq in seqs]
    return [evaluation.generate_text(engine, s.prompt, a.max_new_tokens, strategy)[2]
            for s in tqdm(samples, desc=strategy.describe(), file=sys.stderr)]


def main(argv=None):
    a, config = parse_args(argv)
    out, samples, engine = evaluation.start_evaluation(a, config, "correctness.json")
    speculative, tok = engine.strategy, engine.tokenizer
    differences = []
    both = zip(outputs(engine, Strategy(), samples, a), outputs(engine, speculative, samples, a))
    for i, (s, (ar, ss)) in enumerate(zip(samples, both)):
        pos = first_difference(ar, ss)
        if pos is not None:
            differences.append({"index": i, "first_difference": pos, "prompt": s.prompt, "common": tok.decode(ar[:pos]),
                                "autoregressive": tok.decode(ar[pos:]), speculative.name: tok.decode(ss[pos:]),
                                "autoregressive_ids": ar[pos:], f"{speculative.name}_ids": ss[pos:]})
    text = output.write_json(out, {"config": output.config_of(a), "num_samples": len(samples),
                                   "num_different": len(differences),
                                   "share_different": len(differences) / len(samples), "differences": differences})
    if out is None:
        print(text)
    print(f"{len(differences)} of {len(samples)} samples differ" + (f"; wrote {out}" if out else ""), file=sys.stderr)


if __name__ == "__main__":
    cli.run(main)
