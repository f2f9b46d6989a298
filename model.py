"""A Llama-family decoder in plain PyTorch, with a static KV cache.

The forward pass is split into three public pieces so that early exit and self-speculation are
just different ways of calling them:

    h = model.embed(tokens)                                  # token ids -> hidden states
    h = model.run_layers(h, input_pos, start=a, end=b)       # layers [a, b) only
    logits = model.head(h)                                   # final norm + LM head

`model(tokens, input_pos)` is the full model: head(run_layers(embed(tokens), input_pos)).
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

import cpu_kernels

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    head_dim: int = 0  # 0 means dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # {"rope_type": "linear", "factor": f} or {"rope_type": "llama3", "factor", "low_freq_factor",
    # "high_freq_factor", "original_max_position_embeddings"}; None for plain rope.
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", "default")
            if kind not in SUPPORTED_ROPE_TYPES:
                raise ValueError(f"unsupported rope_type {kind!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        """Builds the arguments from a Hugging Face Llama `config.json` (older `rope_theta`/`rope_scaling`
        keys or the newer `rope_parameters`)."""
        archs = cfg.get("architectures") or []
        if cfg.get("model_type") != "llama" and "LlamaForCausalLM" not in archs:
            raise ValueError(
                f"unsupported architecture: model_type={cfg.get('model_type')!r}, architectures={archs}; "
                "only Llama-family checkpoints (LlamaForCausalLM) are supported")
        for key in ("attention_bias", "mlp_bias"):
            if cfg.get(key):
                raise ValueError(f"config sets {key}=true; biased Llama variants are not supported")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {cfg['hidden_act']!r}; Llama uses silu")
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                               "intermediate_size") if k not in cfg]
        if missing:
            raise ValueError(f"the model config (config.json) lacks required keys: {', '.join(missing)}")
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                    "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = cfg.get(key)
            if value is not None and (type(value) is not int or value < 1):
                raise ValueError(f"the model config (config.json) has {key}={value!r}; expected a positive integer")

        # Newer configs fold theta and scaling into one `rope_parameters` dict; older ones keep
        # `rope_theta` beside a `rope_scaling` dict whose kind is under "rope_type" or "type".
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", None) or cfg.get("rope_theta") or 10000.0
        kind = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
        rope.pop("type", None)
        scaling = None if kind == "default" else {"rope_type": kind, **rope}

        n_heads = cfg["num_attention_heads"]
        return cls(
            vocab_size=cfg["vocab_size"],
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            intermediate_size=cfg["intermediate_size"],
            head_dim=cfg.get("head_dim") or 0,
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Per-pair rotation frequencies, including `linear` and Llama 3.1 `llama3` scaling."""
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = args.rope_scaling
    if s is None:
        return inv_freq
    if s["rope_type"] == "linear":
        return inv_freq / s["factor"]
    # llama3: long wavelengths are slowed down by `factor`, short ones kept, and the band between
    # the two cut-offs interpolated smoothly so nearby positions stay distinguishable.
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(in_band, blended, scaled)


def rope_cos_sin(args: ModelArgs, positions: torch.Tensor):
    """cos/sin tables of shape [len(positions), head_dim] in float32 (rotate-half layout, as in HF)."""
    freqs = torch.outer(positions.float(), rope_inv_freq(args).to(positions.device))
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, H, T, D]; cos/sin: [T, D]. Rotated in float32 so bf16 models keep position accuracy.
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos + rotated * sin).type_as(x)


class Linear(nn.Linear):
    """A bias-free linear layer with CPU paths for a few rows, where reading the weight is the cost.

    float32 weights, once `pack` found the kernels: the weight goes into the kernels' lanes layout
    (cpu_kernels.pack_float: [N / L, K, L], L output channels a vector) and every call goes to
    `cpu_kernels.float_linear`, which streams the weight once for all rows at close to memory
    bandwidth and reduces every output in one order whatever the number of rows: a verify pass
    over k + 1 rows gives bitwise the products of k + 1 one-row steps, and a prompt those of its
    tokens one at a time. pack(lanes=False) (training: gradients need the plain weight) or a width
    that is not a multiple of L keep the [N, K] weight: then up to cpu_kernels.EXACT_ROWS rows (and
    a batched step's rows) go to the same kernel's row tiles, also row-invariant, and prompts and
    gradients to F.linear. Without the kernels, under torch.compile one row is written as a
    multiply and a sum, which inductor turns into one streaming loop.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)
        self.use_cpu_kernel = False

    def pack(self, lanes: bool = True):
        """Called once the weight is in place (checkpoint.load_model, after any sharding)."""
        if self.weight.device.type == "cpu" and self.weight.dtype == torch.float32:
            self.use_cpu_kernel = cpu_kernels.load(quiet=True)
            width = cpu_kernels.float_lanes()
            if lanes and self.use_cpu_kernel and width and self.weight.dim() == 2 and self.out_features % width == 0:
                self.weight = nn.Parameter(cpu_kernels.pack_float(self.weight.detach()), requires_grad=False)

    def forward(self, x):
        if self.weight.dim() == 3:  # packed into the lanes layout: the kernel takes every row count
            return cpu_kernels.float_linear(x, self.weight)
        rows = x.numel() // x.shape[-1]
        if x.device.type == "cpu" and not torch.is_grad_enabled():
            few = rows <= cpu_kernels.EXACT_ROWS or cpu_kernels.batched_step(x)
            if self.use_cpu_kernel and few and x.dtype == torch.float32:
                return cpu_kernels.float_linear(x, self.weight)
            if rows == 1 and torch.compiler.is_compiling():
                y = (self.weight.float() * x.reshape(1, -1).float()).sum(-1)
                return y.reshape(*x.shape[:-1], -1).to(x.dtype)
        return F.linear(x, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.type_as(x)


class KVCache(nn.Module):
    """Preallocated keys/values for every row (sequence) and position up to max_seq_length, written
    in place. `rows` (Transformer.cache_rows) is the slice of rows a pass reads and writes: all of
    them for a batched step, one sequence's row for its prefill."""

    def __init__(self, batch_size, n_kv_heads, max_seq_length, head_dim, dtype, device=None):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_length, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.use_rows(None)

    def use_rows(self, rows: slice | None):
        """The rows passes read and write from now on (Transformer.cache_rows): all (None) or a slice.
        The slices are views taken here, outside any compiled graph, which then takes them as its
        inputs: a graph that sliced the cache itself and wrote into the slice would copy the whole
        cache back at every call (8 ms a 1-row SmolLM2 step in an 8 x 2048 cache)."""
        self.rows = rows
        self.k_rows, self.v_rows = (None, None) if rows is None else (self.k_cache[rows], self.v_cache[rows])

    def update(self, input_pos, k, v):
        """input_pos [T] (the same positions for every row) or [B, T] (each row its own)."""
        k_cache, v_cache = (self.k_cache, self.v_cache) if self.k_rows is None else (self.k_rows, self.v_rows)
        k, v = k.to(k_cache.dtype), v.to(v_cache.dtype)  # a 16-bit cache of a float32 model (--kv_cache_dtype)
        if input_pos.dim() == 1:
            k_cache.index_copy_(2, input_pos, k)
            v_cache.index_copy_(2, input_pos, v)
        else:  # row b, position input_pos[b, t] <- k[b, :, t]; an index_put, which inductor writes in place
            # (a scatter_ it compiled into a copy of the whole cache: 30 ms a 16-row SmolLM2 step)
            rows = torch.arange(k.shape[0], device=k.device)[:, None]
            k_cache[rows, :, input_pos] = k.transpose(1, 2)
            v_cache[rows, :, input_pos] = v.transpose(1, 2)
        return k_cache, v_cache


# = cpu_kernels.EXACT_ROWS: up to this many query rows, CPU attention reduces each output in one order
# whatever the number of rows (cpu_kernels.attention; without the kernels, compiled: the function below).
FIXED_ORDER_ROWS = 16


def fixed_order_attention(q, k, v, mask):
    """Attention over the cache written as multiply + sum, so inductor emits one reduction loop per
    output whose order does not depend on the number of query rows (SDPA's does: a 5-token pass
    differed from 5 one-token passes by ~2e-5). With the row-invariant CPU int8/int4 kernels, a
    compiled verify pass then computes bitwise the logits of one-token decode steps, and greedy
    self-speculation on a quantized model equals its greedy decoding by construction. As fast as
    SDPA for SmolLM2 at cache lengths 256 and 2048 (BENCHMARKS.md). q [b, h, L, d], k and v
    [b, kv_heads, S, d], mask [1 or b, 1, L, S] (True = attend)."""
    b, h, L, d = q.shape
    kv_heads = k.shape[1]
    g = h // kv_heads  # query head i reads kv head i // g, as SDPA's enable_gqa
    scores = (q.reshape(b, kv_heads, g * L, 1, d) * k.unsqueeze(2)).sum(-1) * d ** -0.5
    scores = scores.view(b, kv_heads, g, L, -1).masked_fill(~mask.view(mask.shape[0], 1, 1, L, -1), float("-inf"))
    p = torch.softmax(scores.float(), dim=-1).to(q.dtype).view(b, kv_heads, g * L, -1, 1)
    return (p * v.unsqueeze(2)).sum(-2).view(b, h, L, d)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        q_size, kv_size = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        # One fused projection: a single matmul is faster than three small ones when decoding.
        self.wqkv = Linear(args.dim, q_size + 2 * kv_size)
        self.wo = Linear(q_size, args.dim)
        self.kv_cache: KVCache | None = None
        self.use_cpu_kernel = False  # set by quantized.pack_model where the CPU kernels load

    def forward(self, x, cos, sin, mask, input_pos):
        bsz, seqlen, _ = x.shape
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(bsz, seqlen, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(bsz, seqlen, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(bsz, seqlen, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
        few_rows = input_pos is not None and seqlen <= FIXED_ORDER_ROWS and x.device.type == "cpu"
        if few_rows and self.use_cpu_kernel and q.dtype == torch.float32:
            # reads only the cached positions up to each row's own, in a fixed order (a bfloat16
            # cache widened as it is read)
            y = cpu_kernels.attention(q, k, v, input_pos)
        elif few_rows and torch.compiler.is_compiling():  # a cache of another dtype: in the model's
            y = fixed_order_attention(q, k.to(q.dtype), v.to(q.dtype), mask)
        else:
            if mask is not None and mask.shape[-1] < k.shape[2]:  # run_layers: only the live positions
                k, v = k[:, :, :mask.shape[-1]], v[:, :, :mask.shape[-1]]
            y = F.scaled_dot_product_attention(
                q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, is_causal=mask is None,
                enable_gqa=self.n_heads != self.n_kv_heads)
        return self.wo(y.transpose(1, 2).reshape(bsz, seqlen, q_size))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w13 = Linear(args.dim, 2 * args.intermediate_size)  # gate and up, fused
        self.w2 = Linear(args.intermediate_size, args.dim)

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, mask, input_pos):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))


def run_blocks(layers: tuple, h, cos, sin, mask, input_pos):
    """The blocks of `layers` in turn: what regional compilation compiles. The weights are the
    graph's inputs, not constants, so one graph serves every run of that many layers with these
    shapes (the layers of one model are alike): compile time no longer grows with depth."""
    for layer in layers:
        h = layer(h, cos, sin, mask, input_pos)
    return h


def layer_runs(n: int, size: int) -> list[int]:
    """How regional compilation splits n consecutive layers. Each distinct (run length, rows) is one
    compiled graph, so n is cut into equal runs where one of at most `size` layers divides it in at
    most two calls more than the fewest: an exit at 20 of 30 layers drafts in runs of 5 and
    verifies in runs of 5 (2 graphs), where runs of 6 and the rest (6 + 6 + 6 + 2, 6 + 4) made 4.
    Otherwise runs of `size`, then the rest."""
    fewest = -(-n // size)
    for d in range(min(size, n), 0, -1):
        if n % d == 0 and n // d <= fewest + 2:
            return [d] * (n // d)
    return [size] * (n // size) + ([n % size] if n % size else [])


# (compiled run_blocks, layers per call) while a regionally compiled step runs (layer_graph), else None
_layer_graph = [None]


class layer_graph:
    """Within this context, run_layers goes through fn (compiled run_blocks) `size` layers a call."""

    def __init__(self, fn, size: int):
        self.group = (fn, size)

    def __enter__(self):
        self.saved, _layer_graph[0] = _layer_graph[0], self.group

    def __exit__(self, *exc):
        _layer_graph[0] = self.saved


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = Linear(args.dim, args.vocab_size)
        if args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.max_batch_size = 0
        self.max_seq_length = 0
        self.kv_cache_dtype: torch.dtype | None = None  # the caches' element type; None: the model's dtype
        self.borrows_caches = False  # whether its KV caches are another model's (share_caches)

    def setup_caches(self, max_batch_size: int, max_seq_length: int):
        """Allocates the KV cache of every layer, and the rope and mask tables, for this size."""
        if max_seq_length > self.args.max_position_embeddings:
            raise ValueError(f"max_seq_length={max_seq_length} exceeds the model's "
                             f"max_position_embeddings={self.args.max_position_embeddings}")
        a = self.args
        dtype, device = self.kv_cache_dtype or self.norm.weight.dtype, self.norm.weight.device
        cache = self.layers[0].attention.kv_cache
        if (max_batch_size, max_seq_length) == (self.max_batch_size, self.max_seq_length) and cache is not None \
                and cache.k_cache.dtype == dtype and not self.borrows_caches:
            return
        self.borrows_caches = False
        for layer in self.layers:  # the layer's own head count: a tensor-parallel rank holds its share
            layer.attention.kv_cache = KVCache(max_batch_size, layer.attention.n_kv_heads, max_seq_length,
                                               a.head_dim, dtype, device)
        cos, sin = rope_cos_sin(a, torch.arange(max_seq_length, device=device))
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        mask = torch.ones(max_seq_length, max_seq_length, dtype=torch.bool, device=device).tril()
        self.register_buffer("causal_mask", mask, persistent=False)
        self.max_batch_size, self.max_seq_length = max_batch_size, max_seq_length

    def share_caches(self, owner: "Transformer"):
        """From now on reads and writes owner's KV caches (and rope and mask tables) instead of
        caches of its own: the quantized self-draft (engine.make_draft), a copy of owner's layers
        [0, E), drafts into the model's own cache. The verify pass rewrites every position the
        drafts wrote with the full model's keys and values, so the draft never falls behind (no
        catch-up passes, no prefill of its own) and the copy costs no cache memory; its drafts
        attend over the full model's keys and values, not its own. setup_caches on this model
        would give it its own again: call this after each owner.setup_caches."""
        for mine, theirs in zip(self.layers, owner.layers):
            mine.attention.kv_cache = theirs.attention.kv_cache
        for name in ("rope_cos", "rope_sin", "causal_mask"):
            self.register_buffer(name, getattr(owner, name), persistent=False)
        self.max_batch_size, self.max_seq_length = owner.max_batch_size, owner.max_seq_length
        self.kv_cache_dtype = owner.kv_cache_dtype
        self.borrows_caches = True

    def shares_caches_with(self, other: "Transformer | None") -> bool:
        """Whether this model reads and writes other's KV caches (share_caches)."""
        cache = self.layers[0].attention.kv_cache
        return other is not None and cache is not None and cache is other.layers[0].attention.kv_cache

    def cache_rows(self, start: int, stop: int):
        """Within this context, passes read and write only the cache rows [start, stop): a
        sequence's prefill into its own row of a batch's cache."""
        return _CacheRows(self, slice(start, stop))

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        w = self.tok_embeddings.weight
        if w.dim() == 3:  # the tied LM head's lanes layout (Linear.pack): token t's row is w[t // L, :, t % L]
            return w[idx // w.shape[2], :, idx % w.shape[2]]
        return self.tok_embeddings(idx)

    def run_layers(self, h: torch.Tensor, input_pos: torch.Tensor | None = None,
                   start: int = 0, end: int | None = None) -> torch.Tensor:
        """Runs layers [start, end) on hidden states h [B, T, dim] at positions input_pos: [T], the
        same for every row, or [B, T], each row (sequence) at its own.

        With input_pos, each layer writes its keys/values for those positions into its cache and
        each row attends to its own cached positions up to its own. Without it (training, scoring),
        the layers attend causally within h and the cache is neither read nor written.
        """
        end = self.args.n_layers if end is None else end
        if input_pos is None:
            cos, sin = rope_cos_sin(self.args, torch.arange(h.shape[1], device=h.device))
            mask = None
        else:
            if self.max_seq_length == 0:
                raise RuntimeError("call setup_caches(max_batch_size, max_seq_length) before decoding")
            cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
            mask = self.causal_mask[input_pos]
            if input_pos.dim() == 1:  # [T, D] and [1, 1, T, S]: broadcast over the rows
                mask = mask[None, None]
                if h.shape[1] > FIXED_ORDER_ROWS and not torch.compiler.is_compiling():
                    # an eager prefill attends (SDPA) over the mask's width: only the positions
                    # written so far, not all of max_seq_length (a 128-token prompt in a cache of
                    # 4096: 23 instead of 330 ms of SmolLM2's attention)
                    mask = mask[..., :int(input_pos[-1]) + 1]
            else:  # per row: [B, 1, T, D] and [B, 1, T, S], broadcast over the heads
                cos, sin, mask = cos[:, None], sin[:, None], mask[:, None]
        if torch.compiler.is_compiling():  # a whole-step graph: its layers are traced once
            return run_blocks(tuple(self.layers)[start:end], h, cos, sin, mask, input_pos)
        layers = self.layer_tuple()[start:end]
        group = _layer_graph[0]
        if group is None or input_pos is None:
            return run_blocks(layers, h, cos, sin, mask, input_pos)
        fn, size = group
        i = 0
        for n in layer_runs(len(layers), size):
            h = fn(layers[i:i + n], h, cos, sin, mask, input_pos)
            i += n
        return h

    def layer_tuple(self) -> tuple:
        """The layers as a tuple, kept while self.layers is the same list of the same length: slicing
        a ModuleList builds a new one (about 50 us for 30 layers, then again for each run of layers
        of a regional step), a tuple slice costs next to nothing."""
        key = (id(self.layers), len(self.layers))
        cached = self.__dict__.get("_layer_tuple")
        if cached is None or cached[0] != key:
            cached = (key, tuple(self.layers))
            self.__dict__["_layer_tuple"] = cached
        return cached[1]

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: logits for every position of h."""
        return self.output(self.norm(h))

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.run_layers(self.embed(idx), input_pos))


class _CacheRows:
    def __init__(self, model: Transformer, rows: slice):
        self.caches = [layer.attention.kv_cache for layer in model.layers]
        if any(c is None for c in self.caches):
            raise RuntimeError("call setup_caches(max_batch_size, max_seq_length) before decoding")
        if not 0 <= rows.start < rows.stop <= model.max_batch_size:
            raise ValueError(f"cache rows [{rows.start}, {rows.stop}) outside the cache's {model.max_batch_size}")
        self.rows = rows

    def __enter__(self):
        for c in self.caches:
            c.use_rows(self.rows)

    def __exit__(self, *exc):
        for c in self.caches:
            c.use_rows(None)
