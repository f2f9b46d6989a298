"""scripts/gpu_check.py on the CPU (tiny shapes), so the GPU check cannot rot between GPU loans."""
import json

import pytest

import gpu_check


@pytest.mark.slow
def test_every_stage_runs_on_cpu(tmp_path, capsys):
    gpu_check.main(["--device", "cpu", "--output_dir", str(tmp_path)])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(report["stages"]) == [name for name, _ in gpu_check.STAGES]
    for name, stage in report["stages"].items():
        assert stage["status"] == "ok", (name, stage.get("reason"))
        assert stage["rows"], name
    exact = report["stages"]["exactness"]["results"]
    checks = [v for v in exact.values() if isinstance(v, dict)]
    assert len(checks) == 10 and all(c["ok"] for c in checks), exact  # (compiled exactness: on CUDA only)
    assert exact["untied: distinct tokens in 24"] >= 6  # the output is not one token repeated
    assert report["stages"]["tensor_parallel"]["results"] == {"backend": "gloo", "equal": True}
    decode = report["stages"]["decode"]["results"]
    assert decode["tokens_per_s"] > 0 and decode["gbs"] == pytest.approx(
        decode["copy_share"] * report["stages"]["environment"]["results"]["copy_bandwidth_gbs"])
    assert decode["engine"] == "ours" and decode["config"] == "bfloat16 compiled"  # the harness's gpu preset row
    batched = report["stages"]["batched"]["results"]
    assert list(batched) == [str(b) for b in gpu_check.BATCH_SIZES["cpu"]]
    assert batched["1"]["vs_1_row"] == 1 and all(r["decode_tokens_per_s"] > 0 and r["copy_share"] > 0
                                                 for r in batched.values())
    quant = report["stages"]["quantization"]["results"]
    assert quant["bfloat16"]["ratio"] == 1 and quant["int8"]["tokens_per_s"] > 0 and quant["int4-g128"]["tokens_per_s"] > 0
    out = capsys.readouterr().out
    assert out.count("| exactness |") == 2 * 11  # each stage's rows as it ends, and the whole table at the end


def test_stages_that_do_not_fit_the_budget_are_reported_as_skipped(tmp_path, capsys):
    gpu_check.main(["--device", "cpu", "--output_dir", str(tmp_path), "--budget_s", "20",
                    "--stages", "environment,exactness,tensor_parallel"])
    stages = json.loads((tmp_path / "gpu_check.json").read_text())["stages"]
    assert stages["environment"]["status"] == "ok"
    assert stages["exactness"]["status"] == "skipped" and "budget" in stages["exactness"]["reason"]
    assert stages["tensor_parallel"]["status"] == "skipped"
    assert set(stages) == {"environment", "exactness", "tensor_parallel"}
    assert "| exactness | skipped" in capsys.readouterr().out


def test_a_failing_stage_is_reported_and_the_next_one_runs(tmp_path, monkeypatch):
    def broken(ctx):
        raise RuntimeError("kernel fault")

    def fine(ctx):
        return {"checked": True}, [("a check", "equal", "equal", True)]
    monkeypatch.setattr(gpu_check, "STAGES", [("environment", broken), ("exactness", fine)])
    gpu_check.main(["--device", "cpu", "--output_dir", str(tmp_path)])
    stages = json.loads((tmp_path / "gpu_check.json").read_text())["stages"]
    assert stages["environment"]["status"] == "failed" and "kernel fault" in stages["environment"]["reason"]
    assert stages["exactness"] == {**stages["exactness"], "status": "ok", "results": {"checked": True}}
