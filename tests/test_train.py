"""The LayerSkip training recipe: schedules, the effect on early-exit agreement, resume, the CLI."""
import copy
import json
import sysconfig
from pathlib import Path

import pytest
import torch

from checkpoint import load_model
from model import ModelArgs, Transformer
from train_layerskip import (active_exits, build_parser, evaluate, exit_weights, layer_dropout_probs, main,
                             stdlib_files, train)


def test_layer_dropout_rises_with_depth_and_time():
    p = layer_dropout_probs(8, 100, 100, 0.2, "constant")
    assert p[0] == 0 and p[-1] == pytest.approx(0.2) and all(a < b for a, b in zip(p, p[1:]))
    assert layer_dropout_probs(8, 0, 100, 0.2, "exponential") == [0.0] * 8  # S(0) = 0
    mid, end = layer_dropout_probs(8, 50, 100, 0.2, "exponential"), layer_dropout_probs(8, 100, 100, 0.2, "exponential")
    assert mid[-1] == pytest.approx(0.2 * (2 ** 0.5 - 1)) and end == pytest.approx(p)


def test_exit_curriculum_and_weights():
    assert active_exits(8, 0, "all", 4) == list(range(8))
    assert active_exits(8, 0, "rotational", 4) == [0, 4, 7]
    assert active_exits(8, 1, "rotational", 4) == [3, 7]  # shifted by one per step; the last layer always
    assert active_exits(8, 5, "none", 4) == [7]
    w = exit_weights(8, list(range(8)), 1.0)
    assert sum(w.values()) == pytest.approx(1) and all(w[a] < w[b] for a, b in zip(range(7), range(1, 8)))
    assert w[3] / w[1] == pytest.approx(6 / 1)  # sum_{i<=l} i: 6 vs 1
    assert exit_weights(8, [7], 0.0) == {7: 1.0}


def corpus_tokens(vocab: int, n_tokens: int, offset: int = 0) -> torch.Tensor:
    """Printable bytes of the Python standard library's source, folded into the tiny vocabulary."""
    data = bytearray()
    for f in stdlib_files()[offset:]:
        data += f.read_bytes()
        if len(data) > n_tokens * 2:
            break
    ids = [b - 32 for b in data if 32 <= b < 32 + vocab]
    return torch.tensor(ids[:n_tokens])


def args(**kw):
    a = build_parser().parse_args(["--output_dir", "unused"])
    a.__dict__.update(dict(steps=40, batch_size=8, seq_len=64, lr=3e-3, warmup=5, layer_dropout=0.0,
                           exit_curriculum="none", distill_weight=0.0, save_every=0), **kw)
    return a


@pytest.fixture(scope="module")
def pretrained():
    """A tiny model trained with the plain last-layer loss: the 'checkpoint' the recipe starts from."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(vocab_size=96, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, intermediate_size=128,
                                  max_position_embeddings=256))
    train_tokens, held = corpus_tokens(96, 60_000), corpus_tokens(96, 8_000, offset=400)
    train(model, train_tokens, args(steps=80), progress=False)
    return model, train_tokens, held


def test_recipe_raises_early_exit_agreement(pretrained):
    model, train_tokens, held = pretrained
    E = 2
    before = evaluate(model, held, E, 64)
    plain, skip = copy.deepcopy(model), copy.deepcopy(model)
    train(plain, train_tokens, args(seed=1), progress=False)
    train(skip, train_tokens, args(seed=1, exit_curriculum="all", distill_weight=1.0, layer_dropout=0.1,
                                   dropout_curriculum="constant"), progress=False)
    p, s = evaluate(plain, held, E, 64), evaluate(skip, held, E, 64)
    print(f"agreement at E={E}: before {before['agreement']:.3f}, plain {p['agreement']:.3f}, "
          f"layerskip {s['agreement']:.3f}; last-layer loss plain {p['last_loss']:.3f}, layerskip {s['last_loss']:.3f}")
    # measured: before 0.65, plain 0.72, layerskip 0.81; last-layer loss 2.379 vs 2.384
    assert s["agreement"] > p["agreement"] + 0.05 and s["agreement"] > before["agreement"] + 0.10
    assert s["exit_loss"] < p["exit_loss"] - 0.1
    # the price at the last layer: at most 0.1 nats/token over the same steps of plain training
    assert s["last_loss"] < p["last_loss"] + 0.1


def test_resume_equals_an_uninterrupted_run(pretrained, tmp_path):
    model, train_tokens, _ = pretrained
    a = args(steps=8, exit_curriculum="rotational", rotation=2, layer_dropout=0.2, distill_weight=0.5, seed=3)
    straight = copy.deepcopy(model)
    train(straight, train_tokens, a, progress=False)
    resumed = copy.deepcopy(model)
    state = tmp_path / "state.pt"
    train(resumed, train_tokens, a, progress=False, state_path=state, stop_after=3)
    resumed = copy.deepcopy(model)  # a fresh process: only the saved state carries over
    train(resumed, train_tokens, a, progress=False, state_path=state, resume=True)
    for (k, v), (_, w) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(v, w), k


def test_cli_writes_a_loadable_checkpoint(tiny_smol_dir, tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text((Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text() * 2)
    out = tmp_path / "trained"
    main(["--checkpoint_path", str(tiny_smol_dir), "--output_dir", str(out), "--data", str(text), "--steps", "3",
          "--batch_size", "2", "--seq_len", "32", "--eval_exit_layer", "1", "--heldout_share", "0"])
    report = json.loads((out / "train_report.json").read_text())
    assert set(report["before"]) == {"last_loss", "exit_loss", "agreement", "last_ppl"} and report["steps"] == 3
    trained = load_model(out)
    original = load_model(tiny_smol_dir)
    assert trained.args == original.args
    assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), original.state_dict().values()))
    assert (out / "tokenizer.json").is_file()


def test_cli_refuses_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--output_dir", str(tmp_path), "--data", str(tmp_path / "missing.txt")])
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--output_dir", str(tmp_path), "--layer_dropout", "1.5"])
    assert "--layer_dropout" in capsys.readouterr().err
