"""What every command shares: one-line refusals, Ctrl-C, --debug, and output paths checked before work.

A refusal is one line on stderr that says what is wrong and how to fix it, with exit status 1
(2 for a malformed command line, 130 for Ctrl-C). `--debug` or LAYERSKIP_DEBUG=1 shows the full
traceback instead, for bug reports.
"""
import argparse
import os
import sys
import tempfile
from pathlib import Path

DEBUG_ENV = "LAYERSKIP_DEBUG"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a --debug flag, whose usage errors are one line (the usage itself is in --help)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true",
                          help=f"show the full traceback of an error (or set {DEBUG_ENV}=1)")

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def debugging(argv) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def describe(e: BaseException) -> str:
    """One line for an exception: a refusal's own message; the type as well for anything unexpected."""
    if isinstance(e, (ValueError, OSError)):
        text = str(e) if str(e) else type(e).__name__
    else:
        text = f"{type(e).__name__}: {e} (unexpected; rerun with --debug for the traceback and report it)"
    return " ".join(text.split())


def run(main, argv=None, label=lambda: ""):
    """Runs main(argv) as a command: any error becomes one line on stderr and exit status 1, Ctrl-C
    exits 130. label() is added after "error" (e.g. " (rank 1)" under tensor parallelism)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = debugging(argv)
    try:
        return main(argv)
    except KeyboardInterrupt:
        if debug:
            raise
        sys.__stderr__.write(f"interrupted{label()}\n")
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 -- the point: no traceback for a user, the reason in one line
        if debug:
            raise
        sys.__stderr__.write(f"error{label()}: {describe(e)}\n")
        sys.exit(1)


def _probe_writable(folder: Path, what: str, path: Path):
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise PermissionError(f"{what} {path}: cannot write in {folder} ({e.strerror or e})") from None


def check_output_file(path, what: str = "--output") -> Path:
    """Refuses, before any work is done, a file that could not be written: a directory, a missing
    or non-writable folder."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a folder; give a file name")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{what} {path}: the folder {path.parent} does not exist")
    _probe_writable(path.parent, what, path)
    return path


def check_output_dir(path, what: str = "--output_dir") -> Path:
    """Refuses, before any work is done, a folder that could not be created or written to."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{what} {path} is a file, not a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"{what} {path}: {existing} is a file, not a folder")
    _probe_writable(existing, what, path)
    return path
