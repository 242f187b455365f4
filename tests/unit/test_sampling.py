import numpy as np
import pytest

from meshllm.errors import MeshError
from meshllm.model.sampling import Sampler, SamplingParams


def test_greedy_is_argmax():
    logits = np.array([0.1, 3.0, -1.0, 2.9], dtype=np.float32)
    assert Sampler(SamplingParams())(logits) == 1


def test_top_k_one_equals_greedy_at_any_temperature():
    rng = np.random.default_rng(1)
    for _ in range(20):
        logits = rng.normal(size=50).astype(np.float32)
        s = Sampler(SamplingParams(temperature=5.0, top_k=1, seed=3))
        assert s(logits) == int(np.argmax(logits))


def test_same_seed_same_samples_and_top_p_keeps_the_nucleus():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    params = SamplingParams(temperature=1.0, top_p=0.75, seed=42)
    a = [Sampler(params)(logits) for _ in range(1)]
    s1, s2 = Sampler(params), Sampler(params)
    seq1 = [s1(logits) for _ in range(200)]
    seq2 = [s2(logits) for _ in range(200)]
    assert seq1 == seq2 and a[0] == seq1[0]
    # top_p=0.75 keeps tokens 0 and 1 (0.5 + 0.3 >= 0.75) and never samples the tail.
    assert set(seq1) == {0, 1}


def test_sampling_spreads_over_tokens_at_high_temperature():
    logits = np.zeros(4)
    s = Sampler(SamplingParams(temperature=1.0, seed=0))
    assert len({s(logits) for _ in range(200)}) == 4


@pytest.mark.parametrize(
    "kwargs",
    [{"temperature": -1.0}, {"top_k": -2}, {"top_p": 0.0}, {"top_p": 1.5}, {"seed": -1}],
)
def test_bad_sampling_parameters(kwargs):
    with pytest.raises(MeshError):
        SamplingParams(**kwargs)
