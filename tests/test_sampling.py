"""sampling.py: the filters against transformers' warpers, and the draws against the distribution."""
import pytest
import torch

from sampling import SamplingParams, logits_to_probs, sample


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.7), SamplingParams(temperature=1.3, top_k=5),
    SamplingParams(temperature=1.0, top_p=0.8), SamplingParams(temperature=0.6, top_k=20, top_p=0.5),
])
def test_filters_match_transformers_warpers(params):
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
    warpers = LogitsProcessorList([TemperatureLogitsWarper(params.temperature)])
    if params.top_k:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p:
        warpers.append(TopPLogitsWarper(params.top_p))
    torch.manual_seed(0)
    logits = torch.randn(4, 100) * 3
    ref = warpers(None, logits.clone()).softmax(-1)
    torch.testing.assert_close(logits_to_probs(logits, params), ref)


def test_sampling_draws_from_the_filtered_distribution():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    params = SamplingParams(temperature=1.0, top_k=3)
    draws = torch.cat([sample(logits, params) for _ in range(20000)]).flatten()
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    torch.testing.assert_close(freq, logits_to_probs(logits, params)[0], atol=0.015, rtol=0)
    assert freq[3:].sum() == 0
