"""Where the scripts write their results: --output_dir (or the deprecated --output FILE), checked
before any work, and the JSON written there."""
import json
import sys
from pathlib import Path

import torch

import cli
import tp


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
