"""An EleutherAI lm-evaluation-harness model backed by this engine.

    pip install lm-eval
    python scripts/lm_eval_model.py --tasks hellaswag,humaneval --checkpoint_path DIR \\
        --generation_strategy self_speculative --exit_layer 20 --num_speculations 3 --limit 50

or from Python: `lm_eval.simple_evaluate(model=LayerSkipLM(...), tasks=[...])`.
`generate_until` runs the chosen strategy (greedy or sampled, stop sequences honoured: generation
is cut at the first one); `loglikelihood` and `loglikelihood_rolling` score with the full model
(every layer), in windows of the model's context for long documents. The harness is optional:
without it, the class still works with any object that has `.args` (a tuple, like the harness's
`Instance`), which is how the tests run it.
"""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import cli  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

try:
    from lm_eval.api.model import LM as _Base
    from lm_eval.api.registry import register_model
except ImportError:  # the harness is optional
    _Base = object

    def register_model(*names):
        return lambda cls: cls


@register_model("layerskip")
class LayerSkipLM(_Base):
    def __init__(self, checkpoint_path=str(REPO / "checkpoints" / "SmolLM2-135M-Instruct"), device="cpu",
                 dtype="float32", generation_strategy="autoregressive", exit_layer=None, num_speculations=3,
                 max_length=2048, compile=False, **kwargs):
        if _Base is not object:
            super().__init__()
        from checkpoint import load_model, resolve_checkpoint_path
        from decoding import Steps, compile_steps
        from tokenizer import load_tokenizer
        path = resolve_checkpoint_path(checkpoint_path)
        self.device = torch.device(device)
        self.model = load_model(path, self.device, getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        self.tokenizer = load_tokenizer(path.parent)
        self.strategy = generation_strategy
        self.exit_layer = None if exit_layer in (None, "None") else int(exit_layer)
        self.k = int(num_speculations)
        if self.strategy == "self_speculative" and self.exit_layer is None:
            raise ValueError("generation_strategy=self_speculative needs exit_layer")
        self.max_length = min(int(max_length), self.model.args.max_position_embeddings)
        self.steps = compile_steps(self.device) if str(compile).lower() in ("1", "true") else Steps()
        self.model.setup_caches(1, self.max_length)

    def _start_id(self) -> int:
        """What the first scored token is conditioned on: BOS, or end-of-text for models without one."""
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    # --- scoring: the full model, no cache ---
    def _logprobs(self, ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = self.model(torch.tensor([ids], device=self.device))[0].float()
        return F.log_softmax(logits, dim=-1)

    def _score(self, context: list[int], continuation: list[int]):
        ids = (context + continuation)[-(self.max_length + 1):]
        n = len(continuation)
        lp = self._logprobs(ids[:-1])[-n:]
        target = torch.tensor(ids[-n:], device=lp.device)
        chosen = lp.gather(1, target[:, None])[:, 0]
        return chosen.sum().item(), bool((lp.argmax(-1) == target).all())

    def loglikelihood(self, requests):
        out = []
        for req in requests:
            context, continuation = req.args[0], req.args[1]
            ctx = self.tokenizer.encode(context) if context else []
            whole = self.tokenizer.encode(context + continuation)
            # tokenize the pair jointly, as the harness's HF model does: merges across the boundary stay
            cont = whole[len(ctx):] if whole[:len(ctx)] == ctx else self.tokenizer.encode(continuation)
            ctx = ctx or [self._start_id()]
            out.append(self._score(ctx, cont))
        return out

    def loglikelihood_rolling(self, requests):
        out = []
        for req in requests:
            ids = self.tokenizer.encode(req.args[0])
            total, start = 0.0, 0
            while start < len(ids):  # disjoint windows, each scored with up to max_length tokens of context
                end = min(start + self.max_length, len(ids))
                ctx = ids[max(0, end - self.max_length - 1):start] or [self._start_id()]
                total += self._score(ctx, ids[start:end])[0]
                start = end
            out.append(total)
        return out

    # --- generation: the chosen strategy ---
    def generate_until(self, requests):
        from decoding import generate, speculative_generate
        from sampling import SamplingParams
        out = []
        for req in requests:
            context, kw = req.args[0], dict(req.args[1] or {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(kw.get("temperature", 0.0) or 0.0)
            if kw.get("do_sample") is False:
                temperature = 0.0
            params = SamplingParams(temperature, kw.get("top_k"), kw.get("top_p"))
            ids = self.tokenizer.encode(context)
            k = self.k if self.strategy == "self_speculative" else 0
            max_new = int(kw.get("max_gen_toks", 256))
            ids = ids[-(self.max_length - max_new - k):] if len(ids) + max_new + k > self.max_length else ids
            prompt = torch.tensor(ids, device=self.device)
            n = min(max_new, self.max_length - len(ids) - k)
            if self.strategy == "self_speculative":
                tokens, _ = speculative_generate(self.model, prompt, n, params, self.k, exit_layer=self.exit_layer,
                                                 stop_ids=self.tokenizer.stop_ids, steps=self.steps)
            else:
                tokens, _ = generate(self.model, prompt, n, params, stop_ids=self.tokenizer.stop_ids,
                                     steps=self.steps, exit_layer=self.exit_layer)
            gen = [t for t in tokens[0, len(ids):].tolist() if t not in self.tokenizer.stop_ids]
            text = self.tokenizer.decode(gen)
            cut = min((text.find(s) for s in until if s and s in text), default=-1)
            out.append(text[:cut] if cut >= 0 else text)
        return out


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--tasks", required=True)
    p.add_argument("--checkpoint_path", default=str(REPO / "checkpoints" / "SmolLM2-135M-Instruct"))
    p.add_argument("--generation_strategy", default="autoregressive", choices=["autoregressive", "self_speculative"])
    p.add_argument("--exit_layer", type=int, default=None)
    p.add_argument("--num_speculations", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--compile", action="store_true")
    a = p.parse_args(argv)
    try:
        import lm_eval
    except ImportError:
        p.error("this needs the harness: pip install lm-eval")
    lm = LayerSkipLM(a.checkpoint_path, a.device, a.dtype, a.generation_strategy, a.exit_layer, a.num_speculations,
                     compile=a.compile)
    results = lm_eval.simple_evaluate(model=lm, tasks=a.tasks.split(","), limit=a.limit)
    print(lm_eval.utils.make_table(results))


if __name__ == "__main__":
    cli.run(main)
