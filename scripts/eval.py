"""An EleutherAI lm-evaluation-harness model backed by this engine, and the command that runs it.

    pip install lm-eval
    python scripts/eval.py --tasks hellaswag,humaneval --generation_strategy self_speculative --exit_layer 20 \\
        --num_speculations 3 --limit 50 --output_dir logs
    torchrun scripts/eval.py --model facebook/layerskip-llama2-7B --tasks gsm8k --limit 10 \\
        --generation_strategy self_speculative --exit_layer 8 --num_speculations 6 --output_dir ./logs

or from Python: `lm_eval.simple_evaluate(model=LayerSkipLM(engine), tasks=[...])`, or through the
harness's own command line as `--model layerskip --model_args checkpoint_path=...,exit_layer=8`.
`generate_until` runs the chosen strategy (greedy or sampled, stop sequences honoured: generation
is cut at the first one); `loglikelihood` and `loglikelihood_rolling` score with the full model
(every layer), in windows of the model's context for long documents. The harness is optional:
without it, the class still works with any object that has `.args` (a tuple, like the harness's
`Instance`), which is how the tests run it.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the engine's modules
import cli  # noqa: E402

cli.start(__name__)  # first: a Ctrl-C during the imports below is `interrupted` too (cli.py)

import output  # noqa: E402
from engine import Engine, init_distributed, load_engine  # noqa: E402
import options  # noqa: E402
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
    def __init__(self, engine: Engine | None = None, max_length=2048, batch_size=1, **kwargs):
        """engine: a loaded engine; or, from the harness's --model_args, the shared options as
        keywords (checkpoint_path=..., generation_strategy=..., exit_layer=..., compile=True, ...).
        batch_size: generate_until's requests run that many at once."""
        if _Base is not object:
            super().__init__()
        self.engine = engine or load_from_keywords(kwargs)
        self.model, self.tokenizer, self.device = self.engine.model, self.engine.tokenizer, self.engine.device
        self.max_length = min(int(max_length), self.model.args.max_position_embeddings)
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.engine.setup_caches(self.max_length, self.batch_size)

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
        """Each request's text, cut at its first `until` string. Requests with the same sampling
        settings and token budget run batch_size at a time (engine.run_many)."""
        from sampling import SamplingParams
        jobs = []  # (sampling, budget, prompt ids, stop strings) per request
        for req in requests:
            context, kw = req.args[0], dict(req.args[1] or {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(kw.get("temperature", 0.0) or 0.0)
            if kw.get("do_sample") is False:
                temperature = 0.0
            params = SamplingParams(temperature, kw.get("top_k"), kw.get("top_p"))
            ids = self.tokenizer.encode(context)
            max_new = int(kw.get("max_gen_toks", 256))
            k = self.engine.strategy.lookahead(max_new)  # keep the context's end that fits with the budget
            ids = ids[-(self.max_length - max_new - k):] if len(ids) + max_new + k > self.max_length else ids
            jobs.append((params, self.engine.budget(len(ids), max_new), ids, until))
        generated = [None] * len(jobs)
        for params, n in dict.fromkeys((params, n) for params, n, _, _ in jobs):
            group = [i for i, job in enumerate(jobs) if job[:2] == (params, n)]
            if self.batch_size > 1:
                seqs, _ = self.engine.run_many([jobs[i][2] for i in group], n, sampling=params)
                for i, seq in zip(group, seqs):
                    generated[i] = seq.tokens
            else:
                for i in group:
                    ids = jobs[i][2]
                    tokens, _ = self.engine.run(torch.tensor(ids, device=self.device), n, sampling=params)
                    generated[i] = tokens[0, len(ids):].tolist()
        out = []
        for (_, _, _, until), gen in zip(jobs, generated):
            text = self.tokenizer.decode([t for t in gen if t not in self.tokenizer.stop_ids])
            cut = min((text.find(s) for s in until if s and s in text), default=-1)
            out.append(text[:cut] if cut >= 0 else text)
        return out


def load_from_keywords(kwargs: dict) -> Engine:
    p = argparse.ArgumentParser()
    options.add_options(p, strategies=("autoregressive", "self_speculative", "speculative"))
    argv = []
    for key, value in kwargs.items():
        if key in ("compile", "compile_prefill"):
            argv += [f"--{key}"] if str(value).lower() in ("1", "true") else []
        elif value not in (None, "None"):
            argv += [f"--{key}", str(value)]
    return load_engine(options.check_options(p, p.parse_args(argv)))


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--tasks", required=True, help="comma-separated lm-evaluation-harness tasks")
    p.add_argument("--limit", type=int, default=None, help="samples per task")
    p.add_argument("--num_fewshot", "--n_shot", dest="num_fewshot", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=1, help="generation requests run at once (greedy: the same "
                   "texts as one at a time)")
    options.add_options(p, strategies=("autoregressive", "self_speculative", "speculative"))
    output.add_output_option(p, None)
    a = p.parse_args(argv)
    config = options.check_options(p, a)
    if a.batch_size < 1:
        p.error(f"--batch_size must be >= 1, got {a.batch_size}")
    return a, config


def main(argv=None):
    a, config = parse_args(argv)
    out = output.check_output(a, "eval.json")
    try:
        import lm_eval
    except ImportError:
        raise ValueError("this needs the harness: pip install lm-eval") from None
    rank, world_size, config = init_distributed(config)
    lm = LayerSkipLM(load_engine(config, rank, world_size), batch_size=a.batch_size)
    results = lm_eval.simple_evaluate(model=lm, tasks=a.tasks.split(","), limit=a.limit, num_fewshot=a.num_fewshot)
    print(lm_eval.utils.make_table(results))
    output.write_json(out, {"config": output.config_of(a), "results": results.get("results")})


if __name__ == "__main__":
    cli.run(main)
