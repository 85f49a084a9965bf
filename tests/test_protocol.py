"""The control plane's schema: valid messages round-trip, anything else is a
ProtocolError (never another exception, never a half-checked message)."""
import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from kevlarflow.deploy import protocol
from kevlarflow.deploy.protocol import TO_CONTROLLER, TO_WORKER, ProtocolError, decode, encode

STEP = dict(step=3, group="pipe0", generation=0, seqs=[[2, 0, [5]], [1, 7, [1, 2]]], token_ids=[4, 5, 6],
            sample=[None, dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=None,
                               index=0, logprobs=2)],
            replicate=[[5, 17, 0, 16], [1, 18, 3, 4]], priority=False)


def test_valid_messages_round_trip():
    assert decode(TO_WORKER, encode(TO_WORKER, "step", **STEP)) == {"type": "step", **STEP}
    result = dict(step=1, tokens=[3], logprobs=[[-0.5, [[3, -0.5], [9, -1.0]]]])
    assert decode(TO_CONTROLLER, encode(TO_CONTROLLER, "result", **result))["tokens"] == [3]
    # A seed up to 2**64 - 1 (what SamplingParams accepts) travels.
    big = dict(STEP, sample=[None, dict(STEP["sample"][1], seed=2**64 - 1)])
    assert decode(TO_WORKER, encode(TO_WORKER, "step", **big))["sample"][1]["seed"] == 2**64 - 1


@pytest.mark.parametrize("message,error", [
    ([1, 2], "is a map"),
    ({"type": "nope"}, "unknown message type"),
    ({"type": "shutdown", "extra": 1}, "unexpected fields"),
    ({"type": "step", **{k: v for k, v in STEP.items() if k != "group"}}, "missing fields"),
    ({"type": "step", **dict(STEP, step=True)}, "expected int"),
    ({"type": "step", **dict(STEP, step="3")}, "expected int"),
    ({"type": "step", **dict(STEP, seqs=[[2, 0]])}, "list of 3"),
    ({"type": "step", **dict(STEP, seqs=[[2, 0, [1.5]]])}, "expected int"),
    ({"type": "step", **dict(STEP, sample=[{"temperature": 1.0}])}, "missing fields"),
    ({"type": "step", **dict(STEP, replicate=[[5, 17]])}, "list of 4"),
    ({"type": "step", **dict(STEP, priority=None)}, "expected bool"),
    ({"type": "register", "pid": 1, "host": "h", "instance": "0", "stage": None}, "expected int"),
])
def test_wrong_schema_is_rejected(message, error):
    schema = TO_CONTROLLER if message.__class__ is dict and message.get("type") == "register" \
        else TO_WORKER
    with pytest.raises(ProtocolError, match=error):
        decode(schema, msgpack.packb(message))


def test_a_message_for_the_other_direction_is_rejected():
    with pytest.raises(ProtocolError, match="unknown message type"):
        decode(TO_CONTROLLER, encode(TO_WORKER, "shutdown"))


def test_oversized_and_non_bytes_input():
    with pytest.raises(ProtocolError, match="exceeds"):
        decode(TO_WORKER, b"\x00" * (protocol.MAX_MESSAGE_BYTES + 1))
    with pytest.raises(ProtocolError, match="expected bytes"):
        decode(TO_WORKER, "text")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_only_ever_raise_protocol_error(data):
    for schema in (TO_WORKER, TO_CONTROLLER):
        try:
            decode(schema, data)
        except ProtocolError:
            pass


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["type", "step", "group", "seqs", "token_ids", "sample",
                                        "tokens", "logprobs", "pid"]), msgpack_values),
       st.sampled_from(sorted(TO_WORKER) + sorted(TO_CONTROLLER)))
def test_random_maps_only_ever_raise_protocol_error(fields, type_):
    fields.setdefault("type", type_)
    for schema in (TO_WORKER, TO_CONTROLLER):
        try:
            decode(schema, msgpack.packb(fields))
        except ProtocolError:
            pass
