"""Downloads a Hugging Face Llama checkpoint and converts it to our format.

    python scripts/download.py --repo_id facebook/layerskip-llama2-7B
    python scripts/download.py --repo_id meta-llama/Llama-3.2-1B-Instruct --hf_token hf_...

Files land in checkpoints/<repo_id>/ (weights, config and tokenizer only: Meta's `original/`
consolidated copies are skipped). A gated repo needs its license accepted on the hub and a token,
from --hf_token, the HF_TOKEN variable or `hf auth login`.
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
    p.add_argument("--repo_id", required=True, help="e.g. meta-llama/Llama-2-7b-hf")
    p.add_argument("--hf_token", default=None, help="access token (default: HF_TOKEN or the saved login)")
    p.add_argument("--output_dir", type=Path, default=None, help="default: checkpoints/<repo_id>")
    p.add_argument("--no_convert", action="store_true", help="download only")
    a = p.parse_args(argv)
    out = cli.check_output_dir(a.output_dir or hub.CHECKPOINTS / a.repo_id)
    try:
        hub.download(a.repo_id, out, a.hf_token)
        print(f"downloaded {a.repo_id} to {out}")
        if not a.no_convert:
            from convert_hf_checkpoint import convert
            print(f"wrote {convert(out)}")
    except (PermissionError, FileNotFoundError, ConnectionError, ValueError) as e:
        sys.exit(f"error: {e}")
    except Exception as e:  # network failures surface as several library-specific types
        sys.exit(f"error: downloading {a.repo_id} failed: {e.__class__.__name__}: {e}")


if __name__ == "__main__":
    cli.run(main)
