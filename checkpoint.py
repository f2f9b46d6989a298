"""Our checkpoint format: one safetensors file that describes itself.

The file's metadata carries the format name and version, the model's Hugging Face config and the
weight scheme, so a checkpoint never depends on its file name or on a stray config next to it.
Tensor names are those of `model.Transformer`'s state dict; a tied LM head is stored once.

A checkpoint spelled `random:<shape>[:<layers>]` (RANDOM_SHAPES) is random weights of a real
shape, read and loaded like a file, for speed measurements without a download.
"""
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import cpu_kernels
from model import ModelArgs, Transformer
from quantized import SchemeError, apply_scheme, pack_model, validate_scheme

FORMAT = "layerskip-llama"
FORMAT_VERSION = "1"
DEFAULT_NAME = "checkpoint.safetensors"


RANDOM_SHAPES = {
    "llama2-7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, intermediate_size=11008,
                      max_position_embeddings=4096),
    "smollm2-135m": dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, intermediate_size=1536,
                         max_position_embeddings=8192, tie_word_embeddings=True, rope_theta=100000.0),
    "small": dict(vocab_size=512, dim=256, n_layers=2, n_heads=8, n_kv_heads=2, intermediate_size=512,
                  max_position_embeddings=1024),
}


class CheckpointError(ValueError):
    pass


def is_random(path) -> bool:
    return str(path).startswith("random:")


def random_args(spec) -> ModelArgs:
    """The shape `random:<shape>[:<layers>]` names."""
    _, shape, *layers = str(spec).split(":")
    if shape not in RANDOM_SHAPES or len(layers) > 1 or (layers and not layers[0].isdigit()):
        raise ValueError(f"unknown random shape in {spec}; use random:<shape>[:<layers>] with shape in "
                         f"{', '.join(RANDOM_SHAPES)}")
    return ModelArgs(**dict(RANDOM_SHAPES[shape], **({"n_layers": int(layers[0])} if layers else {})))


def random_model(spec, device, dtype) -> Transformer:
    """Random weights (std 0.02, as Llama's init) of `random:<shape>[:<layers>]`, drawn on the device."""
    torch.manual_seed(0)
    # Built on meta and materialised in `dtype`: a 7B shape built in float32 first needs 27 GB.
    with torch.device("meta"):
        model = Transformer(random_args(spec)).to(dtype or torch.float32)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


def expected_shapes(args: ModelArgs, scheme: dict | None = None) -> dict:
    """Tensor name -> shape that a checkpoint for `args` must hold (a tied LM head is not stored
    unless it is quantized, which gives it its own copy)."""
    with torch.device("meta"):
        model = apply_scheme(Transformer(args), scheme or {"mode": "none"})
        shapes = {k: v.shape for k, v in model.state_dict().items()}
    if args.tie_word_embeddings and (scheme or {}).get("mode", "none") == "none":
        shapes.pop("output.weight")
    return shapes


def resolve_checkpoint_path(path) -> Path:
    """A checkpoint file, or a directory holding DEFAULT_NAME (or random weights' spelling, as is)."""
    path = Path(path)
    if is_random(path):
        return path
    if path.is_dir():
        path = path / DEFAULT_NAME
    if not path.is_file():
        hint = (" Convert a Hugging Face checkpoint with `python convert_hf_checkpoint.py --checkpoint_dir DIR`"
                " or prepare the default model with `python scripts/prepare_smollm2.py`.")
        raise FileNotFoundError(f"checkpoint not found: {path}.{hint}")
    return path


def save_checkpoint(state_dict: dict, hf_config: dict, path, scheme: dict | None = None):
    """Writes atomically: a temporary file in the same folder, renamed when complete."""
    path = Path(path)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": json.dumps(hf_config, sort_keys=True),
        "scheme": json.dumps(scheme or {"mode": "none"}, sort_keys=True),
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_metadata(path) -> dict:
    """The checkpoint's config, weight scheme and model arguments ("config", "scheme", "args"),
    read and checked without loading a weight."""
    path = resolve_checkpoint_path(path)
    if is_random(path):
        return {"config": None, "scheme": {"mode": "none"}, "args": random_args(path)}
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} checkpoint (metadata format={meta.get('format')!r}); "
                              "convert it with convert_hf_checkpoint.py first")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {meta.get('format_version')!r}; "
                              f"this code reads version {FORMAT_VERSION}")
    out = {}
    for key, default in (("config", None), ("scheme", '{"mode": "none"}')):
        raw = meta.get(key, default)
        try:
            value = json.loads(raw) if raw is not None else None
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: metadata key {key!r} is not valid JSON ({e}); re-convert the "
                                  "checkpoint") from None
        if not isinstance(value, dict):
            what = "lacks the" if raw is None else "has a non-object"
            raise CheckpointError(f"{path}: its metadata {what} {key!r} key; re-convert the checkpoint")
        out[key] = value
    try:
        out["args"] = ModelArgs.from_hf_config(out["config"])
        validate_scheme(out["scheme"])
    except (ValueError, TypeError, SchemeError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    return out


def load_model(path, device="cpu", dtype: torch.dtype | None = None, prepare=None,
               trainable: bool = False) -> Transformer:
    """Builds the model described by the checkpoint and loads its weights onto `device`.

    dtype=None keeps the stored dtype. prepare(model), if given, transforms the loaded model before
    its weights are packed for their kernels (tensor-parallel sharding: tp.shard_model).
    trainable: float32 weights keep their [N, K] layout, which gradients need (pack_model)."""
    path = resolve_checkpoint_path(path)
    if is_random(path):
        model = random_model(path, device, dtype)
        return pack_model(prepare(model) if prepare is not None else model, lanes=not trainable).eval()
    meta = read_metadata(path)
    scheme, args = meta["scheme"], meta["args"]
    quantized = scheme.get("mode", "none") != "none"
    expected = expected_shapes(args, scheme)
    # float32 weights packed for the CPU kernels (pack_model) are new memory: the tensors are read into
    # memory of their own, not left as views of the file's mapping, which any one tensor left (a
    # norm) would keep mapped, the packed-over pages included (SmolLM2: peak 1.4 GB, not 1.05)
    own = not quantized and not trainable and dtype in (None, torch.float32) and torch.device(device).type == "cpu" \
        and cpu_kernels.float_lanes() > 0
    state = {}
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            keys = set(f.keys())
            missing, unexpected = sorted(expected.keys() - keys), sorted(keys - expected.keys())
            if missing or unexpected:
                raise CheckpointError(f"{path} does not match its config: missing {missing[:5]}, "
                                      f"unexpected {unexpected[:5]}")
            for k in expected:
                if own:  # the file opened per tensor, so that the mapping of the pages read goes at once
                    with safe_open(str(path), framework="pt", device=str(device)) as g:
                        t = g.get_tensor(k).clone()
                else:
                    t = f.get_tensor(k)
                if t.shape != expected[k]:
                    raise CheckpointError(f"{path}: {k} has shape {tuple(t.shape)}, config implies "
                                          f"{tuple(expected[k])}")
                # quantized integer tensors keep their type; scales follow the model's dtype
                state[k] = t if dtype is None or not t.is_floating_point() else t.to(dtype)
    except SafetensorError as e:
        raise CheckpointError(f"{path} could not be read (truncated or corrupt?): {e}") from e
    tied = args.tie_word_embeddings and not quantized
    if tied:
        state["output.weight"] = state["tok_embeddings.weight"]
    with torch.device("meta"):
        model = apply_scheme(Transformer(args), scheme)
    model.load_state_dict(state, assign=True)
    state.clear()  # the model holds the tensors now; packing replaces some, which may then be freed
    if tied:  # assign=True replaced the shared Parameter; share it again
        model.output.weight = model.tok_embeddings.weight
    if prepare is not None:
        model = prepare(model)
    return pack_model(model, lanes=not trainable).eval()
