"""Is self-speculation lossless here? Greedy autoregressive vs greedy self-speculative on a dataset.

    python scripts/correctness.py --dataset human_eval --num_samples 20 --exit_layer 20 --num_speculations 3

For every sample both strategies generate --max_new_tokens greedily (stop tokens honoured); the JSON
output holds the share of samples whose token sequences differ and, for each difference, the first
diverging position and both continuations from there. Equality is expected in float32; in low
precision on a GPU, the verify pass (k+1 tokens at once) may round a near tie differently from the
one-token step: such a difference is reported, never hidden.
"""
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from benchmark import add_common_args, check_common_args, check_exit_layers, load_engine, setup_caches_for  # noqa: E402
import cli  # noqa: E402 (benchmark put the repository on the path)
from tasks import load_samples  # noqa: E402


def first_difference(a: list, b: list) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__)
    add_common_args(p, strategy=False)
    p.add_argument("--exit_layer", type=int, required=True)
    p.add_argument("--num_speculations", type=int, default=3)
    p.add_argument("--output", type=Path, default=None)
    a = p.parse_args(argv)
    check_common_args(p, a, strategy=False)
    if a.output:
        cli.check_output_file(a.output)
    if a.temperature != 0:
        p.error("correctness compares greedy outputs: use --temperature 0")
    if a.exit_layer < 1 or a.num_speculations < 1:
        p.error("--exit_layer and --num_speculations must be >= 1")
    try:
        samples = load_samples(a.dataset, a.data_path, a.num_samples, a.n_shot, a.template, a.seed, a.shuffle)
    except ValueError as e:
        p.error(str(e))
    import torch
    from tqdm import tqdm

    from decoding import generate, speculative_generate
    check_exit_layers(p, a.checkpoint_path, [a.exit_layer])
    model, tokenizer, steps, device = load_engine(a)
    setup_caches_for(model, tokenizer, samples, a, a.num_speculations)
    differences = []
    for i, s in enumerate(tqdm(samples, desc="comparing", file=sys.stderr)):
        ids = torch.tensor(tokenizer.encode(s.prompt), device=device)
        ar, _ = generate(model, ids, a.max_new_tokens, a.sampling, stop_ids=tokenizer.stop_ids, steps=steps)
        ss, _ = speculative_generate(model, ids, a.max_new_tokens, a.sampling, a.num_speculations,
                                     exit_layer=a.exit_layer, stop_ids=tokenizer.stop_ids, steps=steps)
        ar, ss = ar[0, len(ids):].tolist(), ss[0, len(ids):].tolist()
        pos = first_difference(ar, ss)
        if pos is not None:
            differences.append({"index": i, "first_difference": pos, "prompt": s.prompt,
                                "common": tokenizer.decode(ar[:pos]),
                                "autoregressive": tokenizer.decode(ar[pos:]), "self_speculative": tokenizer.decode(ss[pos:]),
                                "autoregressive_ids": ar[pos:], "self_speculative_ids": ss[pos:]})
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if k != "sampling"}
    doc = {"config": config, "num_samples": len(samples), "num_different": len(differences),
           "share_different": len(differences) / len(samples), "differences": differences}
    text = json.dumps(doc, indent=2)
    if a.output:
        a.output.write_text(text)
    else:
        print(text)
    print(f"{len(differences)} of {len(samples)} samples differ", file=sys.stderr)


if __name__ == "__main__":
    cli.run(main)
