"""transformers as the speed peer (speed.py, batch_speed.py): its model on the checkpoint's own
Hugging Face files, eager or with its static cache under torch.compile, always generating exactly the
tokens asked for (as our timed rows do), one prompt or a left-padded batch."""
from pathlib import Path

import torch


def hf_model(checkpoint, dtype, compiled: bool):
    from transformers import AutoModelForCausalLM
    folder = Path(checkpoint)
    hf = AutoModelForCausalLM.from_pretrained(folder if folder.is_dir() else folder.parent, dtype=dtype).eval()
    hf.generation_config.eos_token_id = None  # always max_new_tokens tokens, like our rows
    hf.config.eos_token_id = None
    if compiled:
        hf.generation_config.cache_implementation = "static"
        hf.forward = torch.compile(hf.forward, fullgraph=True)
    return hf


def hf_weight_bytes(hf) -> int:
    """Counted as ours (engine.weight_bytes, per_token): every weight once, a tied head once, an
    untied embedding not at all (a step reads one of its rows)."""
    params = {p.data_ptr(): p for p in hf.parameters()}.values()
    total = sum(p.numel() * p.element_size() for p in params)
    emb = hf.get_input_embeddings().weight
    tied = hf.get_output_embeddings().weight.data_ptr() == emb.data_ptr()
    return total if tied else total - emb.numel() * emb.element_size()


def hf_generate_batch(hf, prompts: list[list[int]], n: int, width: int | None = None) -> list[list[int]]:
    """Greedy, n new tokens for each prompt, all prompts in one call: left-padded (transformers'
    way for a batch of decoder-only prompts) to `width` (default the longest), the padding masked out."""
    width = width or max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.no_grad():
        out = hf.generate(ids.to(hf.device), attention_mask=mask.to(hf.device), max_new_tokens=n,
                          min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[:, width:].tolist()
