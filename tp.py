"""Tensor parallelism: shards a loaded model over the ranks of a torch.distributed process group.

    torchrun --standalone --nproc_per_node=2 generate.py --compile ...      # NCCL on CUDA, gloo on CPU

Megatron-style sharding of each block, so every block costs two all-reduces per forward:
- attention: the fused q/k/v projection is split by heads (column-parallel), each rank keeps the
  keys/values of its own heads in its own KV cache, and the output projection is split by its input
  (row-parallel) and summed across ranks;
- MLP: gate/up split column-wise, down row-wise, summed across ranks.
With fewer KV heads than ranks, a KV head is replicated on the ranks whose query heads use it.
The embedding, the norms and the LM head are replicated: every rank then holds the full residual
stream and the full logits, so the exit hidden states of self-speculation are full width and every
rank takes the same accept/reject decisions from the same logits and the same seed, with no extra
collective. (A vocabulary-parallel head would split the LM head's bytes but add an all-gather of
the logits per step; for the models here the head is a modest share of the weights.)

Quantized weights shard with their scales (int8: per output channel) or their groups (int4: the
local input width of a row-parallel layer must be a whole number of groups), before int4 packing.
The model code knows nothing of processes: row-parallel layers are wrapped in `AllReduce`, which
uses functional collectives that torch.compile traces without graph breaks.
"""
import contextlib
import datetime
import os

import torch
import torch.distributed as dist
import torch.nn as nn

from model import Linear, ModelArgs, Transformer
from quantized import Int4Linear, Int8Linear


class ShardingError(ValueError):
    pass


_joined = (0, 1)  # (rank, world size) of the group this process joined, kept after shutdown


def error_label() -> str:
    """" (rank R)" for messages of a process that ran tensor-parallel, "" otherwise."""
    return f" (rank {_joined[0]})" if _joined[1] > 1 else ""


def world() -> tuple[int, int]:
    """(rank, world size) of the current process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device_name: str = "auto", timeout_s: float = 300) -> tuple[int, int, str]:
    """Joins the process group torchrun describes in the environment (no-op without WORLD_SIZE > 1).

    Returns (rank, world size, device name). NCCL with one GPU per rank on CUDA, gloo on CPU.
    A rank that dies makes the collectives of the others fail after timeout_s instead of hanging."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, device_name
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was requested but CUDA is not available on this machine")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"local rank {local_rank} has no GPU: {torch.cuda.device_count()} visible")
        torch.cuda.set_device(local_rank)
        device_name = f"cuda:{local_rank}"
    else:
        device_name = "cpu"
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    global _joined
    _joined = dist.get_rank(), dist.get_world_size()
    return *_joined, device_name


def shutdown():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def command_scope():
    """A command's work under torchrun: a collective that fails says why, and the process group is
    left at the end, whatever happened."""
    try:
        yield
    except dist.DistError as e:
        raise ConnectionError(f"a collective failed, most likely because another rank exited or timed out: "
                              f"{e}") from e
    finally:
        shutdown()


def check_shardable(args: ModelArgs, world_size: int, int4_groupsize: int | None = None):
    """Raises ShardingError saying why a model of `args` (int4 with this group size, if given)
    cannot be split over world_size ranks. Needs only the checkpoint's metadata."""
    a = args
    problems = []
    if a.n_heads % world_size:
        problems.append(f"{a.n_heads} attention heads")
    if a.n_kv_heads % world_size and world_size % a.n_kv_heads:
        problems.append(f"{a.n_kv_heads} KV heads (neither divisible by the world size nor dividing it)")
    if a.intermediate_size % world_size:
        problems.append(f"MLP width {a.intermediate_size}")
    if int4_groupsize:  # the row-parallel layers' local input width must be whole groups
        for name, width in (("attention output", a.n_heads * a.head_dim), ("MLP down", a.intermediate_size)):
            if width % world_size or width // world_size % int4_groupsize:
                problems.append(f"int4 {name} input width {width} / {world_size} ranks is not a multiple of the "
                                f"group size {int4_groupsize}")
    if problems:
        raise ShardingError(f"cannot shard this model over {world_size} ranks: " + "; ".join(problems)
                            + ". Use a world size that divides them.")


class AllReduce(nn.Module):
    """A row-parallel layer: each rank's partial product, summed over the group."""

    def __init__(self, inner: nn.Module, group):
        super().__init__()
        self.inner, self.group = inner, group

    def forward(self, x):
        from torch.distributed import _functional_collectives as funcol
        return funcol.all_reduce(self.inner(x), "sum", self.group)


def _rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return t.index_select(0, index.to(t.device)).contiguous()


def _shard_linear(lin: nn.Module, out_rows: torch.Tensor | None = None, in_range: tuple[int, int] | None = None):
    """Keeps output rows `out_rows` (column-parallel) or input columns [lo, hi) (row-parallel)."""
    if isinstance(lin, Linear):
        w = lin.weight.data
        w = _rows(w, out_rows) if out_rows is not None else w[:, in_range[0]:in_range[1]].contiguous()
        new = Linear(w.shape[1], w.shape[0]).to(device=w.device, dtype=w.dtype)
        new.weight = nn.Parameter(w, requires_grad=False)
        return new
    if isinstance(lin, Int8Linear):  # per-output-channel scales travel with their rows
        if lin.weight.shape[1] != lin.in_features:
            raise ShardingError("int8 weights must be sharded before they are padded for the CPU kernel")
        new = Int8Linear(lin.in_features, lin.out_features, lin.scales.dtype, lin.weight.device)
        if out_rows is not None:
            new.weight, new.scales = _rows(lin.weight, out_rows), _rows(lin.scales, out_rows)
        else:
            new.weight, new.scales = lin.weight[:, in_range[0]:in_range[1]].contiguous(), lin.scales
        new.out_features, new.in_features = new.weight.shape
        return new
    if isinstance(lin, Int4Linear):  # nibbles and (scale, zero) groups, before packing
        if lin.packed_for is not None:
            raise ShardingError("int4 weights must be sharded before they are packed (load_model(..., shard=...))")
        g = lin.groupsize
        if out_rows is not None:
            w, sz = _rows(lin.weight, out_rows), lin.scales_and_zeros.index_select(1, out_rows.to(lin.weight.device))
            new = Int4Linear(lin.in_features, len(out_rows), g, w.device)
        else:
            lo, hi = in_range
            w, sz = lin.weight[:, lo // 2:hi // 2], lin.scales_and_zeros[lo // g:hi // g]
            new = Int4Linear(hi - lo, lin.out_features, g, w.device)
        new.weight, new.scales_and_zeros = w.contiguous(), sz.contiguous()
        return new
    raise ShardingError(f"cannot shard a {type(lin).__name__}")


def shard_model(model: Transformer, rank: int, world_size: int, group=None) -> Transformer:
    """Keeps this rank's share of every block, in place; call before setup_caches (and int4 packing)."""
    w2 = model.layers[0].feed_forward.w2
    check_shardable(model.args, world_size, w2.groupsize if isinstance(w2, Int4Linear) else None)
    if world_size == 1 and group is None and not dist.is_initialized():
        return model  # no process group: nothing to reduce over (with one, a single rank runs the all-reduces)
    group = group if group is not None else dist.group.WORLD
    a = model.args
    hd, hq = a.head_dim, a.n_heads // world_size
    q_heads = torch.arange(rank * hq, (rank + 1) * hq)
    if a.n_kv_heads % world_size == 0:
        hkv = a.n_kv_heads // world_size
        kv_heads = torch.arange(rank * hkv, (rank + 1) * hkv)
    else:  # fewer KV heads than ranks: the one KV head this rank's query heads share, replicated
        kv_heads = torch.tensor([rank * hq // (a.n_heads // a.n_kv_heads)])

    def head_rows(heads, offset):
        return (offset + heads[:, None] * hd + torch.arange(hd)).reshape(-1)

    q_size, kv_size = a.n_heads * hd, a.n_kv_heads * hd
    qkv_rows = torch.cat([head_rows(q_heads, 0), head_rows(kv_heads, q_size), head_rows(kv_heads, q_size + kv_size)])
    f = a.intermediate_size // world_size
    mlp_rows = torch.cat([torch.arange(rank * f, (rank + 1) * f), a.intermediate_size + torch.arange(rank * f, (rank + 1) * f)])
    for layer in model.layers:
        att, ff = layer.attention, layer.feed_forward
        att.wqkv = _shard_linear(att.wqkv, out_rows=qkv_rows)
        att.wo = AllReduce(_shard_linear(att.wo, in_range=(rank * hq * hd, (rank + 1) * hq * hd)), group)
        att.n_heads, att.n_kv_heads = hq, len(kv_heads)
        att.kv_cache = None
        ff.w13 = _shard_linear(ff.w13, out_rows=mlp_rows)
        ff.w2 = AllReduce(_shard_linear(ff.w2, in_range=(rank * f, (rank + 1) * f)), group)
    model.max_batch_size = model.max_seq_length = 0  # caches must be re-made at the local head count
    model.tp = (rank, world_size)
    return model
