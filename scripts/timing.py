"""The one timing method of the speed measurements (measure), its derivatives (per-call medians,
step costs inside rounds, the cost model) and the device's copy bandwidth."""
import statistics
import time

import torch

from adaptive import round_timer
from decoding import GenerationStats, has_own_cache, peak_memory_gb
from steps import synchronize


def copy_bandwidth_gbs(device: torch.device) -> float:
    """Bytes read plus bytes written per second by a large tensor copy (the usual 'copy bandwidth')."""
    n = (1 << 30 if device.type == "cuda" else 1 << 28) // 4
    src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
    for _ in range(3):
        dst.copy_(src)
    synchronize(device)
    best = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best / 1e9


def percentile(values, q):
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def measure(generate_fn, prompts, repeats: int, device) -> dict:
    """The one timing method: a warm-up generation (it compiles, when compiled), then `repeats`
    passes over the prompts. generate_fn(prompt, on_tokens) -> our GenerationStats, or a peer's
    (new tokens, seconds) (peers do not stream: their per-token latency is the pass's mean). Returns tokens/s (median over passes,
    decode only), per-token latency p50/p90, prefill, warm-up seconds and the speculative totals."""
    return measure_interleaved([generate_fn], prompts, repeats, device)[0]


def measure_interleaved(generate_fns, prompts, repeats: int, device) -> list[dict]:
    """measure() for several configurations at once: each one's warm-up, then `repeats` rounds in
    which every configuration makes its pass over the prompts in turn, so that a machine whose
    speed drifts during the run (a shared host) slows each of them alike."""
    warmups = []
    for generate_fn in generate_fns:
        t = time.perf_counter()
        generate_fn(prompts[0], None)
        synchronize(device)
        warmups.append(time.perf_counter() - t)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = [{"passes": [], "latencies": [], "prefills": [], "stats": []} for _ in generate_fns]
    for _ in range(repeats):
        for generate_fn, run in zip(generate_fns, runs):
            tokens, secs = 0, 0.0
            for prompt in prompts:
                stamps = []

                def on_tokens(ids):
                    synchronize(device)
                    stamps.append((time.perf_counter(), len(ids)))
                synchronize(device)
                stats = generate_fn(prompt, on_tokens)
                synchronize(device)
                if isinstance(stats, tuple):  # a peer: (new tokens, seconds)
                    tokens, secs = tokens + stats[0], secs + stats[1]
                    continue
                # ours: decode time after the first token, whose time is the prefill's
                run["stats"].append(stats)
                run["prefills"].append(stats.prefill_s)
                tokens, secs = tokens + stats.new_tokens - 1, secs + stats.decode_s
                for (t0, _), (t1, n) in zip(stamps, stamps[1:]):
                    run["latencies"] += [(t1 - t0) / n] * n
            run["passes"].append(tokens / secs)
    return [summarize(run, warmup_s, device) for run, warmup_s in zip(runs, warmups)]


def summarize(run: dict, warmup_s: float, device) -> dict:
    passes, latencies, prefills, all_stats = run["passes"], run["latencies"], run["prefills"], run["stats"]
    if not latencies:  # peers: the mean over the pass
        latencies = [1 / x for x in passes]
    row = {"tokens_per_s": statistics.median(passes), "ms_per_token_p50": 1000 * percentile(latencies, 0.5),
           "ms_per_token_p90": 1000 * percentile(latencies, 0.9),
           "prefill_ms": 1000 * statistics.median(prefills) if prefills else None, "warmup_s": warmup_s,
           "peak_memory_gb": peak_memory_gb(device)}
    rounds = sum(s.rounds for s in all_stats)
    if rounds:
        accepted, drafted = sum(sum(s.accepted_per_round) for s in all_stats), sum(s.drafted for s in all_stats)
        # an adaptive row may draft nothing (every round plain, where no exit pays)
        row.update(acceptance_rate=accepted / drafted if drafted else None, tokens_per_round=accepted / rounds + 1,
                   catch_up_rate=sum(s.catch_ups for s in all_stats) / rounds,
                   draft_share=sum(s.draft_s for s in all_stats) / sum(s.draft_s + s.verify_s for s in all_stats))
    if any(s.adaptive for s in all_stats):
        merged = GenerationStats(0, 0, 0.0, 0.0, trace=[t for s in all_stats for t in s.trace])
        row["chosen"] = merged.chosen
    return row


def time_call(fn, device, repeats=20) -> float:
    """Median seconds per call, after 3 untimed calls."""
    for _ in range(3):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def step_costs(model, steps, exit_layer: int | None, k: int, device, pos=None, draft_model=None, repeats=10) -> dict:
    """Seconds of a full decode step (called repeatedly, as autoregressive decoding does) and of a
    draft step (layers [0, E) + head of the model, or of draft_model), a verify pass over k+1
    positions and, for a draft model with its own cache, a catch-up draft step over 2 positions,
    timed inside rounds as the loop runs them (adaptive.round_timer). The caches are as set up for
    the generation runs (another cache shape would compile every graph again). At position pos
    (default: two thirds into the cache, where a generation sized to it spends its middle:
    attention reads the positions up to the row's own)."""
    from sampling import SamplingParams
    greedy = SamplingParams()
    pos = min(model.max_seq_length * 2 // 3 if pos is None else pos, model.max_seq_length - k - 1)
    x = torch.tensor([[5]], device=device)
    at = torch.tensor([pos], device=device)
    plain_round = round_timer(model, steps, exit_layer, k, pos, draft_model)

    with torch.no_grad():  # as in generation: a graph compiled with grad enabled would be compiled again
        costs = {"full": time_call(lambda: steps.decode(model, x, at, greedy, None), device)}
        for _ in range(2):
            plain_round()
        plain = [plain_round() for _ in range(repeats)]
        costs["draft"] = statistics.median(d for d, _ in plain) / k
        costs["verify"] = statistics.median(v for _, v in plain)
        if has_own_cache(model, draft_model):  # a draft with its own cache catches up
            catch_up_round = round_timer(model, steps, exit_layer, k, pos, draft_model, catch_up=True)
            catch_up_round()
            first = statistics.median(d for d, _ in (catch_up_round() for _ in range(repeats))) - (k - 1) * costs["draft"]
            costs["catch_up"] = first
    return costs


def ideal_speedup(tokens_per_round: float, k: int, costs: dict, catch_up_rate: float = 0.0) -> float:
    """The cost model: tokens a round yields over what the round costs, in full decode steps: k
    draft steps, the verify pass, and in the rounds after a fully accepted one (catch_up_rate of
    them) a first draft step over 2 positions instead of 1."""
    extra = catch_up_rate * (costs["catch_up"] - costs["draft"]) if "catch_up" in costs else 0.0
    return tokens_per_round / ((k * costs["draft"] + costs["verify"] + extra) / costs["full"])
