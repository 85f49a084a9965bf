"""SamplingParams: every bad field is refused with a message naming it."""
import math

import pytest

from kevlarflow.engine.params import SamplingParams

BAD_VALUES = [
    ("max_tokens", 0), ("max_tokens", -3), ("max_tokens", 2.0), ("max_tokens", True), ("max_tokens", None),
    ("temperature", -0.1), ("temperature", math.inf), ("temperature", math.nan), ("temperature", "1"),
    ("temperature", False),
    ("top_k", -2), ("top_k", 1.5), ("top_k", None),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", -0.5), ("top_p", math.nan), ("top_p", None),
    ("min_p", -0.01), ("min_p", 1.5), ("min_p", math.nan),
    ("seed", 1.0), ("seed", "7"), ("seed", 2**64), ("seed", -(2**63) - 1), ("seed", True),
    ("stop", ""), ("stop", [""]), ("stop", ["ok", 3]), ("stop", 5), ("stop", {"a"}),
    ("stop_token_ids", [-1]), ("stop_token_ids", [1.0]), ("stop_token_ids", 3), ("stop_token_ids", [True]),
    ("ignore_eos", 1), ("ignore_eos", None),
    ("logprobs", -1), ("logprobs", 21), ("logprobs", 2.0), ("logprobs", True),
    ("skip_special_tokens", "yes"),
    ("include_stop_str_in_output", 0),
]


@pytest.mark.parametrize("field,value", BAD_VALUES)
def test_bad_field_is_refused_with_its_name(field, value):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field} must be"):
        SamplingParams(**{field: value})


def test_defaults_are_valid_and_sample():
    params = SamplingParams()
    assert params.max_tokens == 16 and not params.greedy
    assert params.stop == [] and params.stop_token_ids == []


def test_edges_of_the_ranges_are_allowed():
    SamplingParams(max_tokens=1, temperature=0, top_k=-1, top_p=1, min_p=1, logprobs=20,
                   seed=2**64 - 1, stop_token_ids=[0])
    SamplingParams(top_p=1e-9, min_p=0, logprobs=0, seed=-(2**63))


def test_stop_is_normalized_to_a_new_list():
    assert SamplingParams(stop="###").stop == ["###"]
    stops = ["a", "b"]
    params = SamplingParams(stop=stops, stop_token_ids=(3, 4))
    assert params.stop == stops and params.stop is not stops
    assert params.stop_token_ids == [3, 4]


def test_numbers_are_stored_as_floats():
    params = SamplingParams(temperature=1, top_p=1, min_p=0)
    assert type(params.temperature) is float and type(params.top_p) is float and type(params.min_p) is float


@pytest.mark.parametrize("kwargs,greedy", [
    ({"temperature": 0}, True), ({"temperature": 1e-7}, True), ({"top_k": 1}, True),
    ({"temperature": 0.01}, False), ({"top_k": 2}, False), ({"top_k": -1}, False),
])
def test_greedy(kwargs, greedy):
    assert SamplingParams(**kwargs).greedy is greedy
