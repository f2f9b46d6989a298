"""What every command shares: one-line refusals, Ctrl-C, --debug, and output paths checked before work.

A refusal is one line on stderr that says what is wrong and how to fix it, with exit status 1
(2 for a malformed command line, 130 for Ctrl-C). `--debug` or LAYERSKIP_DEBUG=1 shows the full
traceback instead, for bug reports.

Ctrl-C: every command calls `cli.start(__name__)` as its first statement, before its heavy imports
(torch takes seconds), and runs its main through `run`. From then on a Ctrl-C at any moment ends it
with the one line `interrupted` on stderr (a rank label under torchrun) and exit status 130, never a
traceback:
- while nothing can be half-done (the imports; and once main has returned: at-exit handlers,
  compile-worker and process-group shutdown), it writes the line and exits at once (os._exit).
  Even without a Ctrl-C, a command's process ends after its at-exit handlers, with run's exit
  status, and not in the interpreter's teardown (seconds, after torch), where Python has put Ctrl-C
  back to its default; so run is a command's last statement;
- while main works, it raises KeyboardInterrupt, so that `finally` blocks remove temporary files
  (writes are atomic: checkpoint.save_checkpoint); an error that follows it (a library that wraps
  or swallows the interrupt, a collective whose peer has gone) still ends as `interrupted`, and a
  second Ctrl-C exits at once, even while the main thread is stuck in native code (a watchdog thread
  is woken by the signal itself, through signal.set_wakeup_fd);
- once interrupted, what fails as a consequence stays quiet: log records, exceptions in threads
  and in at-exit handlers. (Inductor's compile workers ignore Ctrl-C and write to /dev/null; they
  are shut down at exit.)
A command started with SIGINT ignored (`nohup`, a background job of a script) keeps ignoring it.
"""
import argparse
import atexit
import os
import signal
import sys
import tempfile
import threading
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


# --- Ctrl-C (see the module's docstring) ---------------------------------------------------------
_started = False      # start() installed the handler: this process is a command
_ran = False          # run was entered: start-up is over
_working = False      # run's main is running: a first Ctrl-C raises KeyboardInterrupt
_interrupted = False  # a Ctrl-C arrived
_said = False         # `interrupted` is written: one line per process
_saying = threading.RLock()  # the thread that writes it holds this; another waits, not to exit first
_label = lambda: ""  # noqa: E731 -- run's label, for the line written by the handler
_status = None        # the exit status run ends the command with


def _rank_label() -> str:
    """" (rank R)" under torchrun, read from its environment (before the process group is joined)."""
    return f" (rank {os.environ.get('RANK', '?')})" if os.environ.get("WORLD_SIZE", "1") not in ("", "0", "1") else ""


def _say_interrupted() -> None:
    global _said
    if threading.current_thread() is threading.main_thread():
        try:  # what is buffered comes first (the watchdog does not wait for a lock the main thread may hold)
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 -- a reentrant flush (Ctrl-C inside a write) fails, harmlessly
            pass
    held = _saying.acquire(timeout=2)  # reentrant: the handler may run inside this, in the main thread
    try:
        if not _said:
            try:
                text = f"interrupted{_label() or _rank_label()}\n"
            except Exception:  # noqa: BLE001 -- the line must come out whatever the label does
                text = "interrupted\n"
            try:
                _said = os.write(2, text.encode()) > 0  # set when written: a handler run inside writes it
            except OSError:
                _said = True
    finally:
        if held:
            _saying.release()


def _quiet() -> None:
    """After a Ctrl-C, failures it causes (a thread, an at-exit handler, a log record) print nothing."""
    threading.excepthook = lambda args: None
    sys.unraisablehook = lambda unraisable: None
    if "logging" in sys.modules:
        sys.modules["logging"].disable()


def _exit_interrupted() -> None:
    """The line, then exit 130 at once: no at-exit handler runs, so none can print a traceback."""
    _say_interrupted()
    os._exit(130)


def _on_sigint(signum, frame):
    """The SIGINT handler: KeyboardInterrupt for a first Ctrl-C while main works, else exit at once."""
    global _interrupted
    first = not _interrupted
    _interrupted = True
    _quiet()
    if _working and first:
        raise KeyboardInterrupt
    _exit_interrupted()


def _watch(fd: int) -> None:
    """The watchdog: signal.set_wakeup_fd writes a byte per signal, from the C-level handler, so this
    thread sees a Ctrl-C even while the main thread is stuck in native code (a long kernel, a
    collective waiting on a rank that is gone), where the Python-level handler cannot run yet. It
    acts on a first Ctrl-C during start-up only: later the handler takes the first (a race with it
    could cut short the clean-up of a KeyboardInterrupt) and this thread the second."""
    count = 0
    while True:
        try:
            data = os.read(fd, 64)
        except OSError:
            return
        if not data:
            return
        count += data.count(signal.SIGINT)
        if count and (not _ran or count >= 2):
            _exit_interrupted()


def _end() -> None:
    """The last at-exit handler (start registers it first): the process ends here, with run's exit
    status. The interpreter's own teardown (seconds of garbage collection after torch) runs with
    Ctrl-C back at its default: one there would kill the process without the line (status -2)."""
    if _status is None:  # main did not end through run
        return
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:  # noqa: BLE001 -- a closed pipe: nothing more can be said
        pass
    try:  # and what native code left in C's stdio buffers
        import ctypes
        ctypes.CDLL(None).fflush(None)
    except Exception:  # noqa: BLE001
        pass
    os._exit(_status)


def _forget_watchdog_in_child():
    """A forked child has no watchdog; its signals must not reach its parent's through the shared pipe."""
    try:
        signal.set_wakeup_fd(-1)
    except (ValueError, OSError):
        pass


def start(name: str) -> None:
    """`cli.start(__name__)`, a command's first statement, before its heavy imports: a Ctrl-C from
    here on is `interrupted` and exit status 130 (the module's docstring says how). Nothing happens
    unless name is "__main__" (the module imported by a test or another program is no command), nor
    with --debug / LAYERSKIP_DEBUG=1, where Python's KeyboardInterrupt and its traceback are wanted,
    nor where SIGINT came ignored (`nohup`, a background job of a script): Ctrl-C is not for us then."""
    global _started
    if name != "__main__" or _started or debugging(sys.argv[1:]) \
            or threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        return
    signal.signal(signal.SIGINT, _on_sigint)
    try:
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        os.register_at_fork(after_in_child=_forget_watchdog_in_child)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    except (AttributeError, OSError, ValueError):  # not on this platform: the handler alone
        pass
    else:
        threading.Thread(target=_watch, args=(read_fd,), name="ctrl-c watchdog", daemon=True).start()
    atexit.register(_end)
    _started = True


def run(main, argv=None, label=lambda: ""):
    """Runs main(argv) as a command: any error becomes one line on stderr and exit status 1, Ctrl-C
    exits 130. label() is added after "error" (e.g. " (rank 1)" under tensor parallelism)."""
    global _ran, _working, _label, _status
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = debugging(argv)
    _label, _ran = label, True
    try:
        _working = True
        try:
            result = main(argv)
        finally:
            _working = False
        if _interrupted:  # swallowed by a library: what main did may be incomplete
            raise KeyboardInterrupt
        _status = 0
        return result
    except SystemExit as e:  # argparse's usage error (2) or --help, or main's own exit
        _status = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
        raise
    except KeyboardInterrupt:
        if debug:
            raise
        message = None
    except Exception as e:  # noqa: BLE001 -- the point: no traceback for a user, the reason in one line
        if debug:
            raise
        message = None if _interrupted else describe(e)  # after a Ctrl-C: its consequence
    # Out of the except clause, the exception and main's frames are gone: a progress bar has closed
    # and said its last before the one line below.
    if message is None:
        if _started:
            _quiet()
            _say_interrupted()  # once: a Ctrl-C from now on exits at once, silently
        else:
            sys.__stderr__.write(f"interrupted{label()}\n")
        _status = 130
        sys.exit(130)
    sys.__stderr__.write(f"error{label()}: {message}\n")
    _status = 1
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
