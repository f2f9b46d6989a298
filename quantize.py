"""Writes a weight-only int8 or int4 copy of a converted checkpoint.

    python quantize.py --checkpoint_path checkpoints/SmolLM2-135M-Instruct --quantize int8
    python quantize.py --checkpoint_path checkpoints/SmolLM2-135M-Instruct --quantize int4-g32
    python quantize.py --checkpoint_path ... --mode int4 --groupsize 32     # gpt-fast's spelling

writes `checkpoint.int8.safetensors` / `checkpoint.int4-g32.safetensors` next to the original. The
names are only for people: the scheme (mode, group size, packing, padding) is in the file's
metadata, and `checkpoint.load_model` builds the matching modules from it. The formats are
described in quantized.py.
"""
import sys
from pathlib import Path

import cli

cli.start(__name__)  # first: a Ctrl-C during the imports below is `interrupted` too (cli.py)

from safetensors import safe_open  # noqa: E402

from checkpoint import read_metadata, resolve_checkpoint_path, save_checkpoint  # noqa: E402
from quantized import GROUPSIZES, MODES, SchemeError, parse_quantize, quantize_tensors, scheme_name  # noqa: E402


def default_output_path(checkpoint_path: Path, spec: str) -> Path:
    return checkpoint_path.with_name(f"{checkpoint_path.stem}.{spec}.safetensors")


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint_path", type=Path, required=True, help="checkpoint file or its directory")
    p.add_argument("--quantize", default=None, help="int8, int4 (group size 128) or int4-g<N>, N in "
                   f"{GROUPSIZES}")
    p.add_argument("--mode", choices=MODES, default=None, help="gpt-fast's spelling: --mode int4 --groupsize 32")
    p.add_argument("--groupsize", type=int, default=None, choices=GROUPSIZES, help="with --mode int4 (ignored for int8, as in gpt-fast)")
    p.add_argument("--output", type=Path, default=None, help="default: next to the checkpoint")
    a = p.parse_args(argv)
    if (a.quantize is None) == (a.mode is None):
        p.error("give --quantize int8|int4-g<N> (or gpt-fast's --mode int8|int4 [--groupsize N])")
    try:
        mode, groupsize = parse_quantize(a.quantize) if a.quantize else (a.mode, a.groupsize or 128)
    except SchemeError as e:
        p.error(str(e))
    src = resolve_checkpoint_path(a.checkpoint_path)
    meta = read_metadata(src)
    if meta["scheme"].get("mode", "none") != "none":
        raise ValueError(f"{src} is already quantized ({meta['scheme']['mode']}); quantize the original checkpoint")
    out = cli.check_output_file(a.output or default_output_path(src, scheme_name(mode, groupsize)))
    if out.resolve() == src.resolve():
        raise ValueError(f"--output {out} is the checkpoint being quantized; write to another file")
    cfg = meta["config"]
    # one stored tensor at a time: peak host memory is the quantized output plus one float layer
    with safe_open(str(src), framework="pt") as f:
        state, scheme, padded = quantize_tensors(f.get_tensor, f.keys(), bool(cfg.get("tie_word_embeddings")),
                                                 mode, groupsize)
    if padded:
        print(f"{len(padded)} layers have an input width not divisible by {groupsize}: zero-padded "
              f"(e.g. {padded[0]}); their extra columns meet zero inputs and change nothing", file=sys.stderr)
    save_checkpoint(state, cfg, out, scheme)
    size = out.stat().st_size / 2**20
    print(f"wrote {out} ({size:.1f} MiB; scheme {scheme})")


if __name__ == "__main__":
    cli.run(main)
