"""llama.cpp's own `llama-server`, the serving peer: built from the llama.cpp sources vendored in
the llama-cpp-python sdist on PyPI (no other network), cached outside the repository.

    python scripts/llama_server.py --build          # once (about 12 minutes on 2 cores); prints the binary
    python scripts/llama_server.py --port 8081 --parallel 8    # serves the default model's Q4_1 GGUF

The build is CMake's Release build of the `llama-server` target with the CPU's own instruction sets
(GGML_NATIVE), without libcurl (no downloads). On a CPU with AMX, ggml's AMX path is left out (the
AVX-512 sets are named instead of native): with it, llama-server segfaults in ggml_backend_amx_mul_mat
at its first decode on this project's Xeon. scripts/load.py drives it with
the same client as serve.py.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import cli  # noqa: E402

cli.start(__name__)

import hub  # noqa: E402

SDIST = "llama-cpp-python==0.3.36"


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "layerskip" / "llama-server"


def has_amx() -> bool:
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def build(root: Path | None = None, jobs: int | None = None) -> Path:
    """The llama-server binary, built on first use; its path."""
    root = root or cache_dir()
    out = root / ("build-no-amx" if has_amx() else "build")
    binary = out / "bin" / "llama-server"
    if binary.is_file():
        return binary
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise FileNotFoundError(f"building llama-server needs {tool} on the PATH")
    src = root / "src"
    if not (src / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        root.mkdir(parents=True, exist_ok=True)
        print(f"downloading the {SDIST} sdist (llama.cpp's sources) ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", SDIST,
                        "-d", str(root)], check=True)
        archive = next(root.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(archive) as t:
            t.extractall(root, filter="data")
        shutil.rmtree(src, ignore_errors=True)
        next(p for p in root.glob("llama_cpp_python-*") if p.is_dir()).rename(src)
    flags = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TESTS=OFF",
             "-DLLAMA_BUILD_EXAMPLES=OFF", "-DBUILD_SHARED_LIBS=OFF"]
    if has_amx():  # GGML_NATIVE would turn AMX on (-march=native): the AVX-512 instruction sets one by one instead
        flags += ["-DGGML_NATIVE=OFF", *(f"-DGGML_{x}=ON" for x in ("AVX", "AVX2", "FMA", "F16C", "AVX512",
                                                                  "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16"))]
    else:
        flags += ["-DGGML_NATIVE=ON"]
    print(f"building llama-server into {out} (about 12 minutes on 2 cores) ...", file=sys.stderr, flush=True)
    subprocess.run(["cmake", "-S", str(src / "vendor" / "llama.cpp"), "-B", str(out), *flags], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(out), "--target", "llama-server", "-j", str(jobs or os.cpu_count())],
                   check=True)
    if not binary.is_file():
        raise FileNotFoundError(f"the build finished without {binary}")
    return binary


def default_gguf() -> Path:
    """The default model's Q4_1 GGUF, from the wheel the default model is prepared from."""
    work = cache_dir() / "gguf"
    found = sorted(work.glob("**/*.gguf"))
    if found:
        return found[0]
    work.mkdir(parents=True, exist_ok=True)
    return hub.download_gguf(work)


def command(binary: Path, gguf: Path, port: int, parallel: int, ctx_per_slot: int, threads: int, extra=()) -> list:
    """llama-server on localhost with `parallel` slots of ctx_per_slot positions (its continuous
    batching is on by default)."""
    return [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "--parallel", str(parallel),
            "-c", str(parallel * ctx_per_slot), "-t", str(threads), "--no-webui", *extra]


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--build", action="store_true", help="build (if needed) and print the binary's path")
    p.add_argument("--gguf", type=Path, default=None, help="the model (default: the default model's Q4_1 GGUF)")
    p.add_argument("--port", type=int, default=8081)
    p.add_argument("--parallel", type=int, default=8, help="slots (llama-server's rows)")
    p.add_argument("--ctx_per_slot", type=int, default=2048)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("extra", nargs=argparse.REMAINDER, help="more llama-server flags, after --")
    a = p.parse_args(argv)
    extra = a.extra[1:] if a.extra[:1] == ["--"] else a.extra
    binary = build()
    if a.build:
        print(binary)
        return
    gguf = a.gguf or default_gguf()
    if not gguf.is_file():
        raise FileNotFoundError(f"--gguf {gguf} does not exist")
    os.execv(str(binary), command(binary, gguf, a.port, a.parallel, a.ctx_per_slot, a.threads, extra))


if __name__ == "__main__":
    cli.run(main)
