"""Converts a Hugging Face Llama checkpoint directory into our checkpoint format.

    python convert_hf_checkpoint.py --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf

Reads one or sharded `*.safetensors` (with their index) or `pytorch_model*.bin`, one shard at a time,
and writes `checkpoint.safetensors` next to them (or into --output_dir, with the config and tokenizer
files copied along). The output appears only once it is complete.
"""
import json
import os
import re
import shutil
from pathlib import Path

import cli

cli.start(__name__)  # first: a Ctrl-C during the imports below is `interrupted` too (cli.py)

import torch  # noqa: E402
from safetensors import SafetensorError, safe_open  # noqa: E402
from tqdm import tqdm  # noqa: E402

from checkpoint import DEFAULT_NAME, expected_shapes, save_checkpoint  # noqa: E402
from model import ModelArgs  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# HF name -> (our name, slot). Tensors sharing our name are fused in slot order (q,k,v and gate,up).
_LAYER_MAP = {
    "self_attn.q_proj.weight": ("attention.wqkv.weight", 0),
    "self_attn.k_proj.weight": ("attention.wqkv.weight", 1),
    "self_attn.v_proj.weight": ("attention.wqkv.weight", 2),
    "self_attn.o_proj.weight": ("attention.wo.weight", 0),
    "mlp.gate_proj.weight": ("feed_forward.w13.weight", 0),
    "mlp.up_proj.weight": ("feed_forward.w13.weight", 1),
    "mlp.down_proj.weight": ("feed_forward.w2.weight", 0),
    "input_layernorm.weight": ("attention_norm.weight", 0),
    "post_attention_layernorm.weight": ("ffn_norm.weight", 0),
}
_TOP_MAP = {
    "model.embed_tokens.weight": ("tok_embeddings.weight", 0),
    "model.norm.weight": ("norm.weight", 0),
    "lm_head.weight": ("output.weight", 0),
}
_N_SLOTS = {"attention.wqkv.weight": 3, "feed_forward.w13.weight": 2}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")


def map_name(hf_name: str):
    """Our (name, slot) for a HF tensor name; None for tensors we recompute (rotary inv_freq)."""
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None
    if hf_name in _TOP_MAP:
        return _TOP_MAP[hf_name]
    m = _LAYER_RE.fullmatch(hf_name)
    if m and m.group(2) in _LAYER_MAP:
        name, slot = _LAYER_MAP[m.group(2)]
        return f"layers.{m.group(1)}.{name}", slot
    raise ValueError(f"unexpected tensor {hf_name!r} in a Llama checkpoint")


def find_weight_files(checkpoint_dir: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = checkpoint_dir / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = sorted(set(weight_map.values()))
            except json.JSONDecodeError as e:
                raise ValueError(f"{index} is not valid JSON ({e}); re-download it") from None
            except (KeyError, TypeError, AttributeError):
                raise ValueError(f"{index} has no 'weight_map' object mapping tensor names to shard files; "
                                 "re-download it") from None
            missing = [f for f in files if not (checkpoint_dir / f).is_file()]
            if missing:
                raise FileNotFoundError(f"{index} lists shards that are missing: {', '.join(missing)}")
            return [checkpoint_dir / f for f in files]
    for pattern in ("model.safetensors", "model-*-of-*.safetensors", "pytorch_model.bin",
                    "pytorch_model-*-of-*.bin"):
        files = sorted(checkpoint_dir.glob(pattern))
        if files:
            return files
    raise FileNotFoundError(f"no weights in {checkpoint_dir}: expected model.safetensors, sharded "
                            "model-*.safetensors with an index, or pytorch_model*.bin")


def iter_tensors(path: Path):
    """(name, tensor) pairs of one shard. .bin files are read with weights_only=True, never unpickled freely."""
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                for k in f.keys():
                    yield k, f.get_tensor(k)
        except SafetensorError as e:
            raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e
    else:
        try:
            state = load_bin(path)
        except Exception as e:
            # torch's message is a page; the unpickler's reason names the culprit
            found = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(Check the documentation|$)", str(e), re.S)
            reason = found.group(1) if found else (str(e).splitlines() or [type(e).__name__])[0]
            raise ValueError(f"{path} could not be loaded as a weights-only PyTorch file (it holds more than "
                             f"tensors, or is corrupt): {reason}") from e
        yield from state.items()


def load_bin(path: Path) -> dict:
    """torch.load with weights_only=True: memory-mapped for the zip format; the legacy (pre-1.6,
    non-zip) format cannot be mapped and is read whole."""
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
    return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)


def load_hf_config(checkpoint_dir: Path) -> dict:
    path = checkpoint_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a Hugging Face checkpoint directory needs its config.json")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} holds a JSON {type(cfg).__name__}, not the object of a model config")
    return cfg


def convert(checkpoint_dir, output_dir=None, dtype: str | None = None) -> Path:
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"{checkpoint_dir} is not a folder: give the Hugging Face checkpoint's directory")
    output_dir = Path(output_dir) if output_dir else checkpoint_dir
    cli.check_output_dir(output_dir)
    hf_config = load_hf_config(checkpoint_dir)
    args = ModelArgs.from_hf_config(hf_config)  # refuses non-Llama configs before any weight is read
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    files = find_weight_files(checkpoint_dir)

    state, pending = {}, {}
    for path in tqdm(files, desc="converting shards", unit="shard", disable=len(files) < 2):
        for hf_name, tensor in iter_tensors(path):
            mapped = map_name(hf_name)
            if mapped is None:
                continue
            name, slot = mapped
            if dtype is not None:
                tensor = tensor.to(DTYPES[dtype])
            n = _N_SLOTS.get(name.split(".", 2)[-1], 1)
            if n == 1:
                state[name] = tensor
                continue
            parts = pending.setdefault(name, [None] * n)
            parts[slot] = tensor
            if all(p is not None for p in parts):
                state[name] = torch.cat(parts, dim=0)
                del pending[name]

    if pending:
        raise ValueError(f"incomplete checkpoint: parts of {sorted(pending)[:3]} are missing")
    if args.tie_word_embeddings:
        state.pop("output.weight", None)
    _check_shapes(state, args, checkpoint_dir)

    created = output_dir.resolve()  # the outermost folder this call creates, removed again on failure
    while not created.parent.exists():
        created = created.parent
    created = None if created.exists() else created
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        out = output_dir / DEFAULT_NAME
        save_checkpoint(state, normalize_config(hf_config), out)
        if output_dir.resolve() != checkpoint_dir.resolve():
            for name in ("config.json",) + TOKENIZER_FILES:
                if (checkpoint_dir / name).is_file():
                    _copy_atomically(checkpoint_dir / name, output_dir / name)
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    return out


def _copy_atomically(src: Path, dst: Path):
    """A copy that is whole or absent (into an existing folder, an interrupted copy is not removed with it)."""
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def normalize_config(cfg: dict) -> dict:
    """The HF config with rope settings in one shape (rope_theta + rope_scaling), the rest kept."""
    args = ModelArgs.from_hf_config(cfg)
    cfg = {k: v for k, v in cfg.items() if k != "rope_parameters"}
    cfg["rope_theta"] = args.rope_theta
    cfg["rope_scaling"] = args.rope_scaling
    return cfg


def _check_shapes(state: dict, args: ModelArgs, source: Path):
    expected = expected_shapes(args)
    missing = sorted(expected.keys() - state.keys())
    if missing:
        raise ValueError(f"{source}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    for k, shape in expected.items():
        if state[k].shape != shape:
            raise ValueError(f"{source}: {k} has shape {tuple(state[k].shape)} but config.json implies {tuple(shape)}")


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint_dir", type=Path, required=True, help="Hugging Face checkpoint directory")
    p.add_argument("--output_dir", type=Path, default=None, help="where to write (default: --checkpoint_dir)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast weights (default: keep)")
    a = p.parse_args(argv)
    print(f"wrote {convert(a.checkpoint_dir, a.output_dir, a.dtype)}")


if __name__ == "__main__":
    cli.run(main)
