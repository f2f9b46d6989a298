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

WANTED = ["*.json", "*.safetensors", "*.bin", "tokenizer.model"]
SKIPPED = ["original/*", "*.pth", "*.gguf", "*.msgpack", "*.h5", "*.onnx", "*.ot"]


def weight_patterns(files: list[str]) -> tuple[list[str], list[str]]:
    """Patterns to fetch and to skip: pytorch_model*.bin only when the repo has no safetensors."""
    skip = list(SKIPPED)
    if any(f.endswith(".safetensors") and "/" not in f for f in files):
        skip.append("*.bin")
    return WANTED, skip


def download(repo_id: str, output_dir: Path, token: str | None = None) -> Path:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        files = HfApi(token=token).list_repo_files(repo_id)
        allow, ignore = weight_patterns(files)
        snapshot_download(repo_id, local_dir=output_dir, token=token, allow_patterns=allow, ignore_patterns=ignore)
    except GatedRepoError as e:
        raise PermissionError(
            f"{repo_id} is gated: accept its license at https://huggingface.co/{repo_id}, then pass "
            f"--hf_token, set HF_TOKEN or run `hf auth login` ({e.__class__.__name__})") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"{repo_id} was not found on the Hugging Face hub (misspelled, or private and no token with "
            "access was given)") from None
    except LocalEntryNotFoundError as e:
        raise ConnectionError(f"could not reach the Hugging Face hub to download {repo_id}: {e}") from None
    return output_dir


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--repo_id", required=True, help="e.g. meta-llama/Llama-2-7b-hf")
    p.add_argument("--hf_token", default=None, help="access token (default: HF_TOKEN or the saved login)")
    p.add_argument("--output_dir", type=Path, default=None, help="default: checkpoints/<repo_id>")
    p.add_argument("--no_convert", action="store_true", help="download only")
    a = p.parse_args(argv)
    out = cli.check_output_dir(a.output_dir or REPO / "checkpoints" / a.repo_id)
    try:
        download(a.repo_id, out, a.hf_token)
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
