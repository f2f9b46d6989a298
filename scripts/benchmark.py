"""Generation over a dataset with any strategy: the task metric and the speed, as one JSON document.

    python scripts/benchmark.py --dataset human_eval --num_samples 20 \\
        --generation_strategy self_speculative --exit_layer 20 --num_speculations 3 --compile --output_dir logs
    torchrun scripts/benchmark.py --model facebook/layerskip-llama2-7B --dataset cnn_dm_summarization \\
        --num_samples 100 --generation_strategy self_speculative --exit_layer 8 --num_speculations 6 --output_dir logs

Per sample: the generated text, ROUGE-1/2/L F1 against the reference (`rouge-score`), exact match
(after stripping whitespace), tokens/s, time per token, acceptance rate and mean tokens per round.
The aggregate averages the metrics over samples and computes speed over all tokens. Generation stops
at the model's stop tokens, at --max_new_tokens, or at the first --stop string (the text is cut
there). Writes OUTPUT_DIR/benchmark.json (without --output_dir: the JSON goes to stdout).
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the engine's modules
import cli  # noqa: E402

cli.start(__name__)  # first: a Ctrl-C during the imports below is `interrupted` too (cli.py)

import evaluation  # noqa: E402
import output  # noqa: E402


def parse_args(argv=None):
    p = evaluation.evaluation_parser(__doc__, ("autoregressive", "self_speculative", "speculative"))
    return evaluation.parse_evaluation_args(p, argv)


def main(argv=None):
    a, config = parse_args(argv)
    out, samples, engine = evaluation.start_evaluation(a, config, "benchmark.json")
    compile_s = evaluation.warm_up(engine, samples, a, rows=a.batch_size)
    records, agg = evaluation.evaluate(engine, samples, a, rows=a.batch_size)
    text = output.write_json(out, {"config": output.config_of(a), "compile_s": compile_s, "aggregate": agg,
                                   "samples": records})
    if out is None:
        print(text)
    else:
        print(f"{json.dumps(agg)}\nwrote {out}", file=sys.stderr)


if __name__ == "__main__":
    cli.run(main)
