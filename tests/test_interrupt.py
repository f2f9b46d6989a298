"""Ctrl-C as a user presses it: a real SIGINT to a real command process, while it starts (imports),
while it works (quantizing, writing its file), while it compiles, while it is stuck in native code
and while it exits. Every time: exit status 130, `interrupted` as the last line of stderr and no traceback, no
file or temporary file left behind, no process left running (cli.py's docstring says how)."""
import ast
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import cli
from conftest import REPO, tiny_hf_config

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc to know what the process is doing")


def _sigint_default():
    """In the child before exec: Ctrl-C at its default, as a shell gives a foreground job. An ignored
    SIGINT is inherited through exec (a suite worker had it ignored at times: the --debug test then
    saw no KeyboardInterrupt), and an ignored SIGINT stays ignored (cli.start, Python itself)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Command:
    """A command in its own session (as a terminal starts a job), stdout and stderr read as they come."""

    def __init__(self, args, env=None, cwd=REPO):
        self.proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=cwd, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True,
                                     env={**os.environ, **(env or {})}, preexec_fn=_sigint_default)
        self.out, self.err, self.seen = [], [], set()
        self.readers = [threading.Thread(target=self._read, args=(s, lines), daemon=True)
                        for s, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self.readers:
            t.start()

    def _read(self, stream, lines):
        for line in stream:
            lines.append(line)

    def descendants(self) -> set[int]:
        found, todo = set(), [self.proc.pid]
        while todo:
            pid = todo.pop()
            try:
                kids = [int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
            except OSError:
                continue
            found.update(kids)
            todo += kids
        self.seen |= found
        return found

    def wait_until(self, what: str, ready, timeout=120):
        """Polls ready() until true; the command must still be running then (else the test is wrong)."""
        deadline = time.monotonic() + timeout
        while not ready():
            assert self.proc.poll() is None, f"exited ({self.proc.returncode}) before {what}: {''.join(self.err)[-2000:]}"
            assert time.monotonic() < deadline, f"no {what} in {timeout} s"
            time.sleep(0.005)
        assert self.proc.poll() is None, f"exited before {what}"

    def ctrl_c(self, group=False):
        """SIGINT to the command (group=True: to its whole process group, as a terminal's Ctrl-C)."""
        try:
            os.killpg(self.proc.pid, signal.SIGINT) if group else self.proc.send_signal(signal.SIGINT)
        except ProcessLookupError:
            pass

    def finish(self, timeout=60) -> tuple[int, str]:
        try:
            rc = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
        for t in self.readers:
            t.join(5)
        return rc, "".join(self.err)


def importing(cmd: Command) -> bool:
    """torch's shared library is loaded: the command is past cli.start (its first statement) and still
    in its imports (the rest of torch's alone takes a second or more)."""
    return "libtorch" in Path(f"/proc/{cmd.proc.pid}/maps").read_text()


def assert_interrupted(rc: int, err: str):
    assert rc == 130, (rc, err[-3000:])
    assert err.splitlines()[-1] == "interrupted", err[-3000:]
    assert "Traceback" not in err and err.count("interrupted") == 1, err[-3000:]


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A small random checkpoint of our format (written directly, without transformers)."""
    from checkpoint import save_checkpoint
    from model import ModelArgs, Transformer
    cfg = tiny_hf_config()
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("interrupt") / "checkpoint.safetensors"
    save_checkpoint(Transformer(ModelArgs.from_hf_config(cfg)).state_dict(), cfg, path)
    return path


# --- start-up ---------------------------------------------------------------------------------------

def test_every_command_calls_cli_start_before_its_heavy_imports():
    """What the subprocess tests below show for a few commands, read from every command's source."""
    commands = [p for p in [*REPO.glob("*.py"), *(REPO / "scripts").glob("*.py")] if "cli.run(" in p.read_text()]
    assert len(commands) >= 12, commands
    for path in commands:
        body = ast.parse(path.read_text()).body
        starts = [i for i, node in enumerate(body) if ast.unparse(node) == "cli.start(__name__)"]
        assert starts, f"{path.name} does not call cli.start(__name__)"
        for node in body[:starts[0]]:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                assert all(n.split(".")[0] in sys.stdlib_module_names or n == "cli" for n in names), \
                    f"{path.name} imports {names} before cli.start"


@pytest.mark.parametrize("command", [["generate.py", "--checkpoint_path", "{missing}"],
                                     ["quantize.py", "--checkpoint_path", "{missing}", "--quantize", "int8"],
                                     ["scripts/benchmark.py", "--checkpoint_path", "{missing}"]],
                         ids=lambda c: c[0])
def test_ctrl_c_during_start_up(command, tmp_path):
    # Were the signal late, the missing checkpoint would be refused (exit status 1) and the test fail.
    cmd = Command([a.format(missing=tmp_path / "missing") for a in command])
    cmd.wait_until("torch being imported", lambda: importing(cmd))
    cmd.ctrl_c()
    rc, err = cmd.finish()
    assert_interrupted(rc, err)
    assert not cmd.out


def test_an_ignored_ctrl_c_stays_ignored(tmp_path):
    """`nohup` and a script's background jobs start with SIGINT ignored, so that a Ctrl-C meant for
    the terminal's foreground job leaves them running: the command must not take it back."""
    cmd = Command(["-c", "import signal, subprocess, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                   "sys.exit(subprocess.call([sys.executable, *sys.argv[1:]]))",
                   "quantize.py", "--checkpoint_path", tmp_path, "--quantize", "int8"])
    cmd.wait_until("torch being imported", lambda: any(
        "libtorch" in Path(f"/proc/{pid}/maps").read_text() for pid in cmd.descendants()))
    cmd.ctrl_c(group=True)
    rc, err = cmd.finish()
    assert rc == 1 and err.startswith("error: checkpoint not found"), (rc, err[-3000:])


def test_debug_keeps_the_traceback_of_a_ctrl_c_during_start_up(tmp_path):
    cmd = Command(["quantize.py", "--checkpoint_path", tmp_path, "--quantize", "int8"], env={cli.DEBUG_ENV: "1"})
    cmd.wait_until("torch being imported", lambda: importing(cmd))
    cmd.ctrl_c()
    rc, err = cmd.finish()
    assert "KeyboardInterrupt" in err and "Traceback" in err, err[-3000:]


# --- at work ----------------------------------------------------------------------------------------

# quantize.py as its __main__ runs it, with one of its steps made to block where the test says so.
QUANTIZE_BLOCKED = r"""
import runpy, sys, time
sys.path.insert(0, {repo!r})
import checkpoint, quantized

def block():
    print("working", flush=True)
    time.sleep(120)

if {moment!r} == "quantizing":
    real_quantize = quantized.quantize_tensors
    def quantize_tensors(get_tensor, *args, **kwargs):
        return real_quantize(lambda name: block() or get_tensor(name), *args, **kwargs)
    quantized.quantize_tensors = quantize_tensors
else:  # the temporary file is written in full, the rename into place comes next
    real_save = checkpoint.save_file
    def save_file(tensors, filename, **kwargs):
        real_save(tensors, filename, **kwargs)
        block()
    checkpoint.save_file = save_file
sys.argv = ["quantize.py", *{argv!r}]
runpy.run_path({script!r}, run_name="__main__")
"""


@pytest.mark.parametrize("moment", ["quantizing", "writing"])
def test_ctrl_c_while_quantize_works_leaves_no_file(moment, tiny, tmp_path):
    folder = tmp_path / "ck"
    folder.mkdir()
    src = folder / "checkpoint.safetensors"
    src.write_bytes(tiny.read_bytes())
    before = listing(folder)
    argv = ["--checkpoint_path", str(src), "--quantize", "int4-g32", "--output", str(folder / "q.safetensors")]
    cmd = Command(["-c", QUANTIZE_BLOCKED.format(repo=str(REPO), moment=moment, argv=argv,
                                                 script=str(REPO / "quantize.py"))])
    cmd.wait_until(moment, lambda: cmd.out == ["working\n"])
    if moment == "writing":
        assert [p.name for p in folder.glob(".q.safetensors.tmp-*")], listing(folder)  # the cleanup is tested
    cmd.ctrl_c()
    rc, err = cmd.finish()
    assert_interrupted(rc, err)
    assert listing(folder) == before


# A command stuck in native code: rank 0 of two waits (in C++, deaf to signals) for a rank that never comes.
WAITS_FOR_A_PEER = r"""
import sys
sys.path.insert(0, {repo!r})
import cli

cli.start(__name__)

import datetime
import torch.distributed as dist

def main(argv):
    print("working", flush=True)
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=0, world_size=2,
                            timeout=datetime.timedelta(seconds=100))

cli.run(main)
"""


def test_a_second_ctrl_c_exits_at_once_even_in_native_code():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = Command(["-c", WAITS_FOR_A_PEER.format(repo=str(REPO), port=port)])
    cmd.wait_until("the wait", lambda: cmd.out == ["working\n"])
    time.sleep(0.5)  # inside the wait
    cmd.ctrl_c()
    time.sleep(0.5)
    t = time.monotonic()
    cmd.ctrl_c()
    rc, err = cmd.finish()
    assert time.monotonic() - t < 10  # not the 100 s of the wait
    assert_interrupted(rc, err)


# A command whose at-exit handlers take their time (as compile-worker and process-group shutdown may).
SLOW_TO_EXIT = r"""
import atexit, sys, time
sys.path.insert(0, {repo!r})
import cli

cli.start(__name__)

def main(argv):
    atexit.register(lambda: print("exiting", flush=True) or time.sleep(120))
    print("done", flush=True)

cli.run(main)
"""


def test_ctrl_c_while_a_command_exits():
    cmd = Command(["-c", SLOW_TO_EXIT.format(repo=str(REPO))])
    cmd.wait_until("its exit", lambda: cmd.out == ["done\n", "exiting\n"])
    cmd.ctrl_c()
    rc, err = cmd.finish()
    assert_interrupted(rc, err)


def test_an_error_that_follows_a_ctrl_c_is_the_interrupt(monkeypatch, capfd):
    """A library that wraps the KeyboardInterrupt, or swallows it and returns: still `interrupted`, 130."""
    monkeypatch.setattr(cli, "_interrupted", True)  # what the handler sets

    def wrapped(argv):
        raise RuntimeError("compilation failed")  # e.g. a compiler subprocess killed by the same Ctrl-C
    for main in (wrapped, lambda argv: None):
        with pytest.raises(SystemExit) as e:
            cli.run(main, [])
        assert e.value.code == 130
        assert capfd.readouterr().err == "interrupted\n"


# --- compiling --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_ctrl_c_while_compiling(smollm2_dir, tmp_path):
    """generate.py --compile with a cold inductor cache, Ctrl-C to the process group (as a terminal sends
    it) while a compiler runs; a second Ctrl-C while it exits. No compiler or worker is left running."""
    import shutil
    from checkpoint import save_checkpoint
    from convert_hf_checkpoint import TOKENIZER_FILES
    from model import ModelArgs, Transformer
    cfg = tiny_hf_config(vocab_size=49152, num_hidden_layers=2, tie_word_embeddings=True, max_position_embeddings=512)
    torch.manual_seed(0)
    state = {k: v for k, v in Transformer(ModelArgs.from_hf_config(cfg)).state_dict().items() if k != "output.weight"}
    save_checkpoint(state, cfg, tmp_path / "checkpoint.safetensors")
    for name in TOKENIZER_FILES:
        if (smollm2_dir / name).is_file():
            shutil.copyfile(smollm2_dir / name, tmp_path / name)
    cmd = Command(["generate.py", "--checkpoint_path", tmp_path, "--compile", "--prompt", "Hi", "--max_new_tokens", "4"],
                  env={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "TORCHINDUCTOR_COMPILE_THREADS": "2"})

    def compiling():
        for pid in cmd.descendants():
            try:
                if "cc1plus" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"):
                    return True
            except OSError:
                pass
        return False
    cmd.wait_until("a compiler", compiling, timeout=300)
    cmd.ctrl_c(group=True)
    deadline = time.monotonic() + 30
    while cmd.proc.poll() is None and not any("interrupted" in line for line in cmd.err) and time.monotonic() < deadline:
        cmd.descendants()
        time.sleep(0.01)
    cmd.ctrl_c(group=True)  # while it exits (at-exit handlers, worker shutdown), if it still is
    rc, err = cmd.finish()
    assert_interrupted(rc, err)
    assert "Compilation time" not in err

    def alive(pid):
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
        except (OSError, IndexError):
            return False
    deadline = time.monotonic() + 15
    while [p for p in cmd.seen if alive(p)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in cmd.seen if alive(p)], "processes left running"
