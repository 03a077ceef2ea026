"""fastpath.py answers exactly as marshmallow would, key order included, or leaves the case to it."""
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from marshmallow import Schema, ValidationError

from bus_containers_provider import fastpath
from bus_containers_provider.schemas import run_answer_schema, run_request_schema, run_result_schema
from fuzzing import examples

REFUSED = object()
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                    max_leaves=6)
def mostly(values, others):
    """Nine in ten from `values`: most examples are then plain enough for the fast path."""
    return st.integers(0, 9).flatmap(lambda n: others if n == 9 else values)


def maybe(values):
    return mostly(values, JSON)


TEXT = mostly(st.text(min_size=1, max_size=8), st.sampled_from(["", "p" * 256, "p" * 257, "i" * 1025, "\ud800"]))
STRINGS = mostly(st.lists(st.text(max_size=4), max_size=4),
                 st.sampled_from([["x"] * 1024, ["x"] * 1025, ["y" * 65536] * 2, ["y" * 65536] * 3]))
NUMBER = mostly(st.integers(min_value=0, max_value=10**20), st.sampled_from([-1, 30.0, 1.5, True, False]))
PLAIN_REQUEST = st.fixed_dictionaries({}, optional={
    "profile": maybe(TEXT), "image": maybe(TEXT), "command": maybe(STRINGS), "args": maybe(STRINGS),
    "timeout_seconds": maybe(NUMBER)})
REQUEST = mostly(PLAIN_REQUEST, st.tuples(PLAIN_REQUEST, st.sampled_from(["env", "stdin", "x"]), JSON).map(
    lambda t: {**t[0], t[1]: t[2]}))
RUNTIME = st.fixed_dictionaries({"state": maybe(TEXT), "provider": maybe(TEXT)}, optional={"extra": JSON})
RESULT_FIELDS = {"run_id": maybe(TEXT), "owner_account_id": maybe(TEXT), "runner_name": maybe(TEXT),
                 "image": maybe(TEXT), "args": maybe(STRINGS), "exit_code": maybe(NUMBER), "stdout": maybe(TEXT),
                 "stderr": maybe(TEXT), "duration_ms": maybe(NUMBER), "runtime": maybe(RUNTIME)}
FLAGS = {"status": maybe(st.sampled_from(["succeeded", "failed", "odd"])), "timed_out": maybe(st.booleans()),
         "stdout_truncated": maybe(st.booleans()), "stderr_truncated": maybe(st.booleans())}
RESULT = st.fixed_dictionaries(RESULT_FIELDS, optional={**FLAGS, "owner_identity_id": TEXT, "unknown": JSON})
REPLY = mostly(RESULT | RESULT.map(lambda r: {k: v for k, v in r.items() if k != "owner_account_id"}), JSON)
SETTLED = st.fixed_dictionaries({**RESULT_FIELDS, **{k: v for k, v in FLAGS.items() if k != "timed_out"}},
                                optional={"unknown": JSON})


def marshmallow(call, *args):
    try:
        return call(*args)
    except (ValidationError, TypeError, ValueError):  # a dump of ill-typed values fails with a TypeError
        return REFUSED


def assert_same(fast, slow):
    event("fast" if fast is not None else "marshmallow")
    if fast is not None:
        assert slow is not REFUSED, "the fast path took what marshmallow refuses"
        assert list(fast.items()) == list(slow.items())


@settings(max_examples=examples(400), deadline=None)
@given(REQUEST)
def test_a_request_loads_as_marshmallow_loads_it(body):
    assert_same(fastpath.run_request(body), marshmallow(Schema.load, run_request_schema, body))


@settings(max_examples=examples(400), deadline=None)
@given(REPLY)
def test_a_reply_loads_as_marshmallow_loads_it(reply):
    assert_same(fastpath.run_result(reply), marshmallow(Schema.load, run_result_schema, reply))


@settings(max_examples=examples(300), deadline=None)
@given(SETTLED | RESULT)
def test_an_answer_dumps_as_marshmallow_dumps_it(result):
    assert_same(fastpath.run_answer(result), marshmallow(Schema.dump, run_answer_schema, result))


GOOD_REPLY = {"run_id": "run_1", "owner_identity_id": "acct", "runner_name": "r", "image": "alpine", "args": ["a"],
              "exit_code": 0, "stdout": "", "stderr": "", "duration_ms": 3, "extra": 1,
              "runtime": {"provider": "p", "state": "ready"}}


@pytest.mark.parametrize("call,data", [
    (run_request_schema.load, {"profile": "p", "args": ["a"], "timeout_seconds": 30}),
    (run_request_schema.load, {"image": "alpine", "command": ["true"]}),
    (run_result_schema.load, GOOD_REPLY),
    (run_result_schema.load, dict(GOOD_REPLY, status="failed", timed_out=True, stdout_truncated=True)),
])
def test_the_common_shapes_take_the_fast_path_and_agree(call, data):
    fast = {run_request_schema.load: fastpath.run_request, run_result_schema.load: fastpath.run_result}[call]
    assert fast(data) is not None
    assert list(call(data).items()) == list(marshmallow(Schema.load, call.__self__, data).items())


def test_a_settled_answer_takes_the_fast_path():
    from bus_containers_provider.results import settle

    settled = settle(run_result_schema.load(GOOD_REPLY), 10)
    assert fastpath.run_answer(settled) == Schema.dump(run_answer_schema, settled)


def test_what_the_fast_path_leaves_is_still_refused_by_marshmallow():
    with pytest.raises(ValidationError, match="profile or image"):
        run_request_schema.load({"command": ["x"]})
    with pytest.raises(ValidationError):
        run_result_schema.load(dict(GOOD_REPLY, exit_code=True))
