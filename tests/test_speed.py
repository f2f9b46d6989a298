"""scripts/speed.py, the speed harness, end to end on small models (eager, few tokens): the rows of
a grid, the derived columns, the JSON, and the peers and torchrun rows."""
import json

import pytest

import harness
import timing
import speed


def run(tmp_path, *argv):
    speed.main([*argv, "--max_new_tokens", "6", "--repeats", "2", "--output_dir", str(tmp_path)])
    return json.loads((tmp_path / "speed.json").read_text())


def test_grid_rows_table_and_json(tmp_path, capsys):
    doc = run(tmp_path, "--checkpoint_path", "random:small", "--peers", "", "--num_samples", "2", "--prompt_length",
              "5", "--quantize", "none,int8", "--generation_strategy", "autoregressive,self_speculative",
              "--exit_layer", "1", "--num_speculations", "2", "--dtype", "float32", "--compile", "false")
    rows = doc["rows"]
    assert [r["config"] for r in rows] == ["float32 eager", "float32 eager self_speculative E=1 k=2",
                                           "float32 int8 eager", "float32 int8 eager self_speculative E=1 k=2"]
    assert doc["copy_bandwidth_gbs"] > 0 and doc["command"].startswith("python scripts/speed.py --checkpoint_path")
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["ms_per_token_p50"] <= r["ms_per_token_p90"] and r["prefill_ms"] > 0
        assert r["vs_baseline"] == pytest.approx(r["tokens_per_s"] / rows[0]["tokens_per_s"])
        if r["generation_strategy"] == "autoregressive":
            assert r["gbs"] == pytest.approx(r["bytes_per_token"] * r["tokens_per_s"] / 1e9)
            assert r["copy_share"] == pytest.approx(r["gbs"] / doc["copy_bandwidth_gbs"])
        else:
            assert 0 <= r["acceptance_rate"] <= 1 and 1 <= r["tokens_per_round"] <= 3
            assert r["ideal_speedup"] == pytest.approx(r["tokens_per_round"] / (2 * r["draft_cost"] + r["verify_cost"]))
    assert rows[2]["bytes_per_token"] < 0.5 * rows[0]["bytes_per_token"]  # int8 reads a quarter of float32's
    table = capsys.readouterr().out
    assert "| engine | configuration | tokens/s |" in table and "| ideal x |" in table and table.count("| ours |") == 4


def test_quantized_draft_rows_have_no_catch_up_in_the_cost_model(tmp_path, capsys):
    """The quantized self-drafts draft into the model's cache (Transformer.share_caches): no round
    starts with a catch-up, and the cost model counts k draft steps and the verify pass."""
    rows = run(tmp_path, "--checkpoint_path", "random:small", "--peers", "", "--num_samples", "1", "--prompt_length",
               "5", "--generation_strategy", "autoregressive,self_speculative", "--exit_layer", "1",
               "--num_speculations", "2", "--draft_quantize", "none,int8,int4-g32", "--dtype", "float32",
               "--compile", "false")["rows"]
    assert [r["config"] for r in rows] == ["float32 eager", "float32 eager self_speculative E=1 k=2",
                                           "float32 eager self_speculative int8 draft E=1 k=2",
                                           "float32 eager self_speculative int4-g32 draft E=1 k=2"]
    for r in rows[1:]:
        assert "catch_up_cost" not in r and r["catch_up_rate"] == 0
        assert r["ideal_speedup"] == pytest.approx(r["tokens_per_round"] / (2 * r["draft_cost"] + r["verify_cost"]))
    assert "| catch-up/step |" not in capsys.readouterr().out


def test_compiled_rows_report_compile_time(tmp_path):
    rows = run(tmp_path, "--checkpoint_path", "random:small", "--peers", "", "--num_samples", "1", "--prompt_length",
               "5", "--compile", "false,true")["rows"]
    assert rows[0]["compile_s"] is None and rows[1]["compile_s"] > 0


def test_the_baseline_row(capsys):
    rows = [{"engine": "ours", "config": "float32 eager", "tokens_per_s": 10.0},
            {"engine": "transformers", "config": "float32 eager", "tokens_per_s": 5.0}]
    assert [r["vs_baseline"] for r in harness.finish_rows(rows, None)] == [1.0, 0.5]
    assert [r["vs_baseline"] for r in harness.finish_rows(rows, None, "transformers float32")] == [2.0, 1.0]
    assert [r["vs_baseline"] for r in harness.finish_rows(rows, None, "llama.cpp")] == [1.0, 0.5]
    assert "--baseline 'llama.cpp' matches no row" in capsys.readouterr().err


def test_the_timing_method():
    """measure(): tokens/s is the median pass's rate; peers report (tokens, seconds)."""
    import torch
    r = timing.measure(lambda prompt, on_tokens: (10, 0.5), [1, 2], repeats=3, device=torch.device("cpu"))
    assert r["tokens_per_s"] == pytest.approx(20) and r["ms_per_token_p50"] == pytest.approx(50)
    assert timing.percentile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 0.9) == 9


def test_interleaved_passes_take_turns():
    """measure_interleaved: each configuration warms up first, then the passes alternate."""
    import torch
    calls = []

    def fn(name):
        return lambda prompt, on_tokens: calls.append((name, prompt)) or (10, 0.5 if name == "a" else 0.25)
    rows = timing.measure_interleaved([fn("a"), fn("b")], [1, 2], repeats=2, device=torch.device("cpu"))
    assert [r["tokens_per_s"] for r in rows] == pytest.approx([20, 40])
    assert [c[0] for c in calls] == ["a", "b"] + ["a", "a", "b", "b"] * 2


def test_adaptive_rows_interleaved_report_their_choices(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERSKIP_CACHE", str(tmp_path / "cache"))
    rows = run(tmp_path, "--checkpoint_path", "random:small", "--peers", "", "--num_samples", "2", "--prompt_length",
               "5", "--generation_strategy", "autoregressive,self_speculative", "--exit_layer", "auto",
               "--num_speculations", "auto,2", "--dtype", "float32", "--compile", "false", "--interleave")["rows"]
    assert [r["config"] for r in rows] == ["float32 eager", "float32 eager self_speculative E=auto k=auto",
                                           "float32 eager self_speculative E=auto k=2"]
    for r in rows[1:]:
        assert r["chosen"] and r["calibration_s"] >= 0 and "ideal_speedup" not in r


@pytest.mark.slow
def test_real_model_against_transformers(tmp_path):
    rows = run(tmp_path, "--dtype", "float32", "--compile", "false", "--num_samples", "1", "--peers",
               "transformers")["rows"]
    assert [(r["engine"], r["config"]) for r in rows] == [("ours", "float32 eager"), ("transformers", "float32 eager")]
    assert rows[0]["mb_per_token"] == pytest.approx(538, rel=0.01)  # SmolLM2-135M in float32, head tied
    assert rows[1]["mb_per_token"] == pytest.approx(rows[0]["mb_per_token"], rel=0.001)  # counted alike


@pytest.mark.slow
def test_tensor_parallel_rows_run_under_torchrun(tmp_path):
    rows = run(tmp_path, "--checkpoint_path", "random:small", "--peers", "", "--num_samples", "1", "--prompt_length",
               "5", "--world_size", "1,2,3", "--dtype", "float32", "--compile", "false")["rows"]
    assert [r["config"] for r in rows[:2]] == ["float32 eager", "float32 eager tp=2"]
    assert rows[1]["tokens_per_s"] > 0 and rows[1]["allreduce_kb"] == pytest.approx(2 * 2 * 256 * 4 / 1024)
    # 8 heads do not shard over 3 ranks: that row says so, the others stay
    assert rows[2]["tokens_per_s"] is None and "cannot shard this model over 3 ranks" in rows[2]["failed"]


@pytest.mark.slow
def test_a_failing_peer_is_a_row_that_says_why(tmp_path, capsys):
    """/bin/false stands in for a llama-cpp-python interpreter that crashes: our rows are kept."""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    rows = run(tmp_path, "--dtype", "float32", "--compile", "false", "--num_samples", "1", "--peers", "llama_cpp",
               "--llama_cpp_python", "/bin/false", "--gguf", str(gguf))["rows"]
    assert rows[0]["tokens_per_s"] > 0 and rows[1]["engine"] == "llama.cpp" and rows[1]["tokens_per_s"] is None
    assert "llama-cpp-python exited with status 1" in rows[1]["failed"]
    assert "FAILED (RuntimeError: llama-cpp-python exited with status 1" in capsys.readouterr().out


def test_compile_time_reads_each_run_and_refuses_unknown_rows():
    """scripts/compile_time.py: what it reads from a generate.py run's stderr, and its one-line refusal
    (its real runs compile SmolLM2 cold and warm: BENCHMARKS.md, "Compile time")."""
    import subprocess
    import sys

    import compile_time
    said = ("compiling the graph of 6 layers x 1 row ...\\n  ... compiled in 3.1 s\\n"
            "step costs measured in 12.5 s\\nCompilation time: 20.25 s")
    got = compile_time.run_once([sys.executable, "-c", f"import sys; print({said!r}, file=sys.stderr)"],
                                env=None, timeout=60)
    assert (got["compile"], got["calibration"], got["graphs"]) == (20.25, 12.5, 1) and got["wall"] > 0
    with pytest.raises(SystemExit) as e:
        compile_time.main(["--rows", "autoregressive,no such row"])
    assert e.value.code == 2
    r = subprocess.run([sys.executable, str(compile_time.ROOT / "scripts" / "compile_time.py"), "--rows", "nope"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown rows ['nope']" in r.stderr.strip().splitlines()[-1]
