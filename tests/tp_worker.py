"""Run under torchrun by tests/test_tp.py: every rank generates and writes what it saw.

    torchrun --standalone --nproc_per_node=N tests/tp_worker.py CHECKPOINT OUT_DIR JOBS_JSON

JOBS_JSON: a list of {"name", "prompt": [ids], "n", "strategy": "autoregressive" | "self_speculative",
"exit_layer", "k", "quantize": null | "int8" | "int4-gG", "compile": bool, "cache": size}.
Each rank writes OUT_DIR/rank{R}.logits.json ({name: last-position logits of the prompt}) first, then
OUT_DIR/rank{R}.json: {name: tokens} and its shard and cache sizes. With
TP_WORKER_FAIL_RANK=r, rank r raises after its first generation (the rank-failure test).
"""
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import tp  # noqa: E402
from checkpoint import load_model  # noqa: E402
from decoding import generate, speculative_generate  # noqa: E402
from steps import Steps, compile_steps  # noqa: E402
from quantized import pack_model, quantize_model  # noqa: E402
from sampling import SamplingParams  # noqa: E402


def tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def main():
    ckpt, out_dir, jobs = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    rank, world_size, _ = tp.init_from_env("cpu", timeout_s=60)
    fail_rank = int(os.environ.get("TP_WORKER_FAIL_RANK", "-1"))
    results, logits = {}, {}
    try:
        models = {}
        for job in jobs:
            q = job.get("quantize")
            if q not in models:
                if q is None:
                    m = load_model(ckpt, prepare=lambda m: tp.shard_model(m, rank, world_size))
                else:  # quantize the full model exactly as single-process code does, then shard
                    mode, g = (q, 32) if q == "int8" else ("int4", int(q.split("-g")[1]))
                    m = load_model(ckpt)
                    quantize_model(m, mode, g, pack=False)
                    pack_model(tp.shard_model(m, rank, world_size))
                models[q] = m
            # The numbers themselves first, written at once: a wrong shard or all-reduce shows here
            # even if the generations below then diverge between ranks and break their collectives.
            model = models[q]
            model.setup_caches(1, job["cache"])
            prompt = torch.tensor(job["prompt"])
            with torch.no_grad():
                logits[job["name"]] = model(prompt[None], torch.arange(len(prompt)))[0, -1].tolist()
        (out_dir / f"rank{rank}.logits.json").write_text(json.dumps(logits))
        for job in jobs:
            model = models[job.get("quantize")]
            model.setup_caches(1, job["cache"])
            steps = compile_steps(torch.device("cpu")) if job.get("compile") else Steps()
            prompt = torch.tensor(job["prompt"])
            params = SamplingParams(job.get("temperature", 0.0), job.get("top_k"), job.get("top_p"))
            torch.manual_seed(job.get("seed", 0))
            if job["strategy"] == "autoregressive":
                out, _ = generate(model, prompt, job["n"], params, steps=steps, exit_layer=job.get("exit_layer"))
            else:
                out, _ = speculative_generate(model, prompt, job["n"], params, job["k"],
                                              exit_layer=job["exit_layer"], steps=steps)
            results[job["name"]] = out[0].tolist()
            if rank == fail_rank:
                raise RuntimeError(f"rank {rank} failed on purpose")
        model = models[jobs[0].get("quantize")]
        # the blocks' weights and KV caches are what sharding splits (embedding, norms, head are replicated)
        weights = tensor_bytes([t for n, t in [*model.named_parameters(), *model.named_buffers()]
                                if n.startswith("layers.") and "cache" not in n])
        cache = tensor_bytes([b for n, b in model.named_buffers() if "cache" in n])
        (out_dir / f"rank{rank}.json").write_text(json.dumps({"results": results, "weight_bytes": weights,
                                                              "cache_bytes": cache}))
    finally:
        tp.shutdown()


if __name__ == "__main__":
    main()
