"""The shared options: one spelling per concept in every command, and the LayerSkip reference code's
commands (its README, as written) parsing to the same options as ours. Nothing is loaded or downloaded."""
import pytest

import benchmark
import correctness
import eval as eval_script  # scripts/eval.py
import generate
import options
import speed
import sweep
from decoding import Strategy
from sampling import SamplingParams

MODEL = "facebook/layerskip-llama2-7B"

# (module, the reference README's command line, ours)
REFERENCE_COMMANDS = [
    (generate, f"--model {MODEL} --sample True --max_steps 512",
     f"--checkpoint_path {MODEL} --temperature 0.8 --max_new_tokens 512"),
    (generate, f"--model {MODEL} --sample True --max_steps 512 --generation_strategy self_speculative "
               "--exit_layer 8 --num_speculations 6",
     f"--checkpoint_path {MODEL} --max_new_tokens 512 --generation_strategy self_speculative --exit_layer 8 "
     "--num_speculations 6"),
    (benchmark, f"--model {MODEL} --dataset cnn_dm_summarization --num_samples 100 --generation_strategy "
                "self_speculative --exit_layer 8 --num_speculations 6 --output_dir ./logs",
     f"--checkpoint_path {MODEL} --dataset cnn_dm_summarization --num_samples 100 --generation_strategy "
     "self_speculative --exit_layer 8 --num_speculations 6 --output_dir ./logs --temperature 0"),
    (eval_script, f"--model {MODEL} --tasks gsm8k --limit 10 --generation_strategy self_speculative --exit_layer 8 "
                  "--num_speculations 6 --output_dir ./logs",
     f"--checkpoint_path {MODEL} --tasks gsm8k --limit 10 --generation_strategy self_speculative --exit_layer 8 "
     "--num_speculations 6 --output_dir ./logs"),
    (sweep, f"--model {MODEL} --dataset human_eval --generation_strategy self_speculative --num_samples 150 "
            "--max_steps 256 --output_dir ./logs/ --sample False",
     f"--checkpoint_path {MODEL} --dataset human_eval --num_samples 150 --max_new_tokens 256 --output_dir ./logs/ "
     "--temperature 0"),
    (correctness, f"--model {MODEL} --dataset human_eval --generation_strategy self_speculative --num_speculations 6 "
                  "--exit_layer 4 --num_samples 10 --sample False --output_dir ./logs",
     f"--checkpoint_path {MODEL} --dataset human_eval --exit_layer 4 --num_speculations 6 --num_samples 10 "
     "--output_dir ./logs"),
]


@pytest.mark.parametrize("module, reference, ours", REFERENCE_COMMANDS,
                         ids=[f"{m.__name__}:{i}" for i, (m, _, _) in enumerate(REFERENCE_COMMANDS)])
def test_layerskip_reference_commands_parse_to_our_options(module, reference, ours):
    (theirs, their_config, *their_rest), (mine, my_config, *my_rest) = (module.parse_args(reference.split()),
                                                                        module.parse_args(ours.split()))
    raw = ("sample", "temperature")  # the spellings; what they resolve to is the config's `sampling`
    assert {k: v for k, v in vars(theirs).items() if k not in raw} == {k: v for k, v in vars(mine).items() if k not in raw}
    assert their_config == my_config and their_rest == my_rest
    assert their_config.checkpoint == MODEL
    if "--exit_layer 8" in reference:
        assert their_config.strategy == Strategy("self_speculative", 8, 6)


def test_sample_and_top_k_spellings():
    parse = lambda *argv: generate.parse_args(list(argv))[1].sampling  # noqa: E731
    assert parse() == SamplingParams(0.8, 200)  # generate.py samples by default
    assert parse("--sample", "False") == SamplingParams(0.0, 200)
    assert parse("--sample", "True", "--temperature", "0.6", "--top_k", "0", "--top_p", "0.9") == \
        SamplingParams(0.6, None, 0.9)  # LayerSkip's defaults; top_k 0 = no top-k
    greedy = benchmark.parse_args([])[1].sampling
    assert greedy.greedy and benchmark.parse_args(["--sample", "True"])[1].sampling.temperature == 0.8


def test_every_command_has_the_same_defaults():
    """The shared options mean and default the same in every entry point."""
    parsed = [generate.parse_args([]), benchmark.parse_args([]), correctness.parse_args(["--exit_layer", "4"]),
              sweep.parse_args([]), eval_script.parse_args(["--tasks", "x"])]
    for key in ("checkpoint", "device", "dtype", "quantize_mode", "compile"):
        assert len({str(getattr(config, key)) for _, config, *_ in parsed}) == 1, key
    for key in ("max_new_tokens", "top_k", "seed"):
        assert len({str(vars(a)[key]) for a, *_ in parsed}) == 1, key
    a, config, *_ = parsed[0]
    assert a.max_new_tokens == 200 and config.device == "auto" and config.dtype == "auto"


def test_quantize_option():
    assert generate.parse_args(["--quantize", "int4-g32"])[1].quantize_mode == ("int4", 32)
    assert generate.parse_args([])[1].quantize_mode is None


def test_speed_presets_are_grids_of_shared_options():
    rows = speed.parse_args(["--preset", "speculative"])[2]
    assert rows[0] == {"dtype": "float32", "quantize": "none", "compile": "true", "layers_per_graph": "",
                       "generation_strategy": "autoregressive", "exit_layer": "", "num_speculations": "3",
                       "draft_quantize": "none", "world_size": "1"}
    assert [(r["exit_layer"], r["num_speculations"]) for r in rows[1:]] == [
        (E, k) for E in ("10", "20", "26", "29") for k in ("2", "4")]
    # a flag replaces the preset's value in every grid; lists are cross products
    rows = speed.parse_args(["--preset", "quantize", "--dtype", "bfloat16", "--quantize", "int8,int4-g32"])[2]
    assert [(r["dtype"], r["quantize"]) for r in rows] == [("bfloat16", "int8"), ("bfloat16", "int4-g32")]
    assert speed.parse_args(["--preset", "gpu"])[1].checkpoint == "random:llama2-7b"
    rows = speed.parse_args(["--preset", "quantized_draft"])[2]
    assert [(r["draft_quantize"], r["num_speculations"]) for r in rows[1:]] == [
        (d, k) for d in ("int8", "int4-g32") for k in ("4", "6", "8")]
    rows = speed.parse_args(["--preset", "compile"])[2]
    assert [(r["quantize"], r["layers_per_graph"]) for r in rows] == [(q, n) for q in ("none", "int8") for n in "06"]


@pytest.mark.parametrize("argv, message", [
    (["--quantize", "int3"], "unknown quantization 'int3'"),
    (["--generation_strategy", "self_speculative"], "needs --exit_layer"),
    (["--peers", "vllm"], "unknown peers ['vllm']"),
    (["--checkpoint_path", "random:gpt5", "--peers", ""], "unknown random shape"),
    (["--checkpoint_path", "random:small"], "peers need a real checkpoint"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--dtype", "float8"], "invalid choice: 'float8'"),
    (["--compile", "maybe"], "expected True or False, got 'maybe'"),
    (["--world_size", "two"], "invalid literal for int()"),
    (["--generation_strategy", "self_speculative", "--exit_layer", "2", "--num_speculations", "99"],
     "--num_speculations must be in [1, 15]"),
])
def test_speed_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        speed.parse_args(argv)
    assert message in capsys.readouterr().err


def test_check_options_is_the_one_validation(capsys):
    for module, argv in [(generate, []), (benchmark, []), (correctness, [])]:
        with pytest.raises(SystemExit):
            module.parse_args(argv + ["--exit_layer", "4", "--num_speculations", "65"])
        assert "--num_speculations must be in [1, 15]" in capsys.readouterr().err
    assert options.parse_bool("TRUE") and not options.parse_bool("no")
