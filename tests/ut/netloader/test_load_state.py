"""State that ``load_weights`` sets besides tensors: recorded, carried, checked, replayed.

The models here stand in for vLLM's EAGLE heads, which set ``has_own_embed_tokens`` /
``has_own_lm_head`` on the instance while loading (the class says False)."""

import math
import typing

import pytest
import torch
from torch import nn

from tests.helpers.toy import IDENTITY, SMALL_BUCKET, fetch_for, make_toy, untouched
from vllm_ascend.model_loader.netloader import load_state
from vllm_ascend.model_loader.netloader.load_state import Change, LoadState, LoadStateError
from vllm_ascend.model_loader.netloader.manifest import LoadedWeights
from vllm_ascend.model_loader.netloader.seed.server import SeedServer, SeedSettings
from vllm_ascend.model_loader.netloader.wire.addresses import listen


class Head(nn.Module):
    has_own_embed_tokens: bool = False
    has_own_lm_head: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.helper = object()


def loaded(model: nn.Module, **flags: object) -> LoadState:
    """What a load that sets ``flags`` on ``model`` records."""
    before = load_state.snapshot(model)
    for name, value in flags.items():
        setattr(model, name, value)
    return load_state.changes(before, load_state.snapshot(model), model)


def test_flags_set_while_loading_are_recorded_with_what_they_were():
    state = loaded(Head(), has_own_embed_tokens=True)
    assert state.changes == (Change("", "has_own_embed_tokens", False, None, True),)
    assert state.uncarried == ()
    assert state.describe() == ["has_own_embed_tokens=True"]


def test_a_load_that_sets_nothing_has_no_state_and_keeps_the_fingerprint():
    model = make_toy(1)
    state = loaded(model)
    assert state == load_state.NO_STATE and state.digest() is None
    plain = LoadedWeights.capture(model)
    assert LoadedWeights.capture(model, state=state).value_fingerprint() == (
        plain.value_fingerprint()
    )


def test_state_is_part_of_the_value_fingerprint():
    model = make_toy(1)
    flagged = LoadedWeights.capture(model, state=loaded(Head(), has_own_lm_head=True))
    assert flagged.value_fingerprint() != LoadedWeights.capture(model).value_fingerprint()


def test_a_replaced_object_or_tensor_attribute_is_state_that_cannot_be_carried():
    head = Head()
    state = loaded(head, helper=object(), table=torch.zeros(2))
    assert state.changes == ()
    assert sorted(state.uncarried) == ["helper (object)", "table (Tensor)"]


def test_wire_form_round_trips_with_types_kept():
    # The wire carries every plain value (``check`` decides which a client takes).
    state = LoadState(tuple(Change("", attr, False, None, after) for attr, after in (
        ("gone", None), ("has_own_lm_head", True), ("ids", (1, 2)), ("names", ["a"]),
        ("scale", 0.5),
    )))
    again = LoadState.from_wire(state.to_wire())
    assert again.changes == state.changes
    after = {c.attr: c.after for c in again.changes}
    assert type(after["ids"]) is tuple and type(after["names"]) is list
    assert again.digest() == state.digest()


def test_a_fresh_empty_table_is_carried_and_each_model_gets_its_own():
    """DeepSeek-V2's load_weights starts ``self._pending_indexer_wk_fp8 = {}``."""
    state = loaded(Head(), _pending_indexer_wk_fp8={})
    assert state.uncarried == () and state.describe() == ["_pending_indexer_wk_fp8={}"]
    again = LoadState.from_wire(state.to_wire())
    a, b = Head(), Head()
    for model in (a, b):
        load_state.check(model, again)
        load_state.apply(model, again)
    assert a._pending_indexer_wk_fp8 == {} and a._pending_indexer_wk_fp8 is not (
        b._pending_indexer_wk_fp8)


def test_a_list_changed_in_place_is_seen_and_not_carried():
    head = Head()
    head.ids = [1]
    before = load_state.snapshot(head)
    head.ids.append(2)
    state = load_state.changes(before, load_state.snapshot(head), head)
    assert state.changes == ()
    assert state.uncarried == ("ids (only flags and new empty tables are carried)",)


def test_equal_states_have_one_wire_form_whatever_the_order_of_the_load():
    a, b = Head(), Head()
    first = loaded(a, x={}, has_own_lm_head=True)
    second = loaded(b, has_own_lm_head=True, x={})
    assert first.to_wire() == second.to_wire() and first.digest() == second.digest()
    with pytest.raises(LoadStateError, match="not sorted"):
        LoadState.from_wire(list(reversed(first.to_wire())))
    with pytest.raises(LoadStateError, match="not sorted"):
        LoadState.from_wire([first.to_wire()[0]] * 2)


def test_a_change_that_changes_nothing_is_malformed():
    with pytest.raises(LoadStateError, match="changes nothing"):
        LoadState.from_wire([["", "x", True, 1, 1]])
    with pytest.raises(LoadStateError, match="malformed"):
        LoadState.from_wire([["", "x", False, 1, 2]])  # not set before, yet a value
    # -0.0 is another value than 0.0 (its canonical form differs).
    assert LoadState.from_wire([["", "x", True, 0.0, -0.0]]).changes[0].after == 0.0


@pytest.mark.parametrize("change", [
    Change("", "_parameters", True, {}, 5),          # a table every module keeps
    Change("inner", "_buffers", True, {}, None),
    Change("", "training", True, True, "x"),         # not a bool any more
])
def test_check_refuses_state_that_names_what_every_torch_module_keeps(change):
    head = Head()
    head._parameters.clear()  # an empty table is a plain value: it must still be refused
    with pytest.raises(LoadStateError, match="which every torch module keeps"):
        load_state.check(head, LoadState((change,)))


@pytest.mark.parametrize("change", [
    Change("inner", "weight", False, None, 1),   # a parameter
    Change("inner", "bias", False, None, None),  # a parameter set to None
    Change("", "inner", False, None, None),      # a submodule
])
def test_check_refuses_state_that_names_a_parameter_buffer_or_submodule(change):
    head = Head()
    with pytest.raises(LoadStateError, match="a parameter, buffer or module"):
        load_state.check(head, LoadState((change,)))
    assert isinstance(head.inner.bias, nn.Parameter) and isinstance(head.inner, nn.Linear)


class WithProperty(Head):
    @property
    def boom(self) -> nn.Module:
        raise RuntimeError("a getter the seed made us run")


def test_check_walks_submodules_only_and_cleans_what_it_reports():
    with pytest.raises(LoadStateError, match="lacks"):
        load_state.check(WithProperty(), LoadState((Change("boom", "x", False, None, 1),)))
    with pytest.raises(LoadStateError) as raised:
        load_state.check(Head(), LoadState((Change("x\n\x1b[31mFAKE", "y", False, None, 1),)))
    assert "\n" not in str(raised.value) and "\x1b" not in str(raised.value)


@pytest.mark.parametrize("item", [
    ["", "__class__", False, None, 1],              # dunder
    ["", "not an identifier", False, None, 1],
    ["", "x", False, None, {"nested": 1}],          # not plain
    ["", "x", False, None, [[1]]],                  # nested list
    ["", "x", False, None, math.nan],               # not finite
    ["", "x", False, None, "s" * 1000],              # long string
    ["", "x", 0, None, 1],                          # had is not a bool
    ["", "x", False, None],                         # short
    [1, "x", False, None, 1],                       # module not a string
])
def test_malformed_entries_are_refused(item):
    with pytest.raises(LoadStateError):
        LoadState.from_wire([item])


def test_too_many_changes_are_refused():
    with pytest.raises(LoadStateError):
        LoadState.from_wire([["", f"a{i}", False, None, 1] for i in range(1025)])


def test_check_accepts_what_applies_and_apply_replays_it():
    seed_state = loaded(Head(), has_own_embed_tokens=True)
    client = Head()
    load_state.check(client, seed_state)
    load_state.apply(client, seed_state)
    assert client.has_own_embed_tokens is True
    assert Head().has_own_embed_tokens is False  # the class is untouched


@pytest.mark.parametrize("change, why", [
    (Change("missing", "flag", False, None, True), "lacks"),
    (Change("", "has_own_lm_head", True, False, True), "starts from"),  # not on the instance here
    (Change("", "training", True, False, True), "every torch module keeps"),
    (Change("", "forward", False, None, "x"), "its class holds"),       # a method
    (Change("", "has_own_lm_head", False, None, 1), "its class holds"), # bool becomes int
])
def test_check_refuses_state_that_does_not_apply_to_this_model(change, why):
    with pytest.raises(LoadStateError, match=why):
        load_state.check(Head(), LoadState((change,)))


class FlaggedToy(nn.Module):
    """The toy model inside a head whose load sets a flag."""

    has_own_lm_head: bool = False

    def __init__(self, seed: int | None) -> None:
        super().__init__()
        self.body = make_toy(seed)


def flagged_seed(seed_model: FlaggedToy, state: LoadState) -> SeedServer:
    return SeedServer(
        LoadedWeights.capture(seed_model, state=state),
        SeedSettings(IDENTITY, 0, "127.0.0.1", 5.0, bucket_bytes=SMALL_BUCKET),
        listen("127.0.0.1", 0),
    ).start()


def test_client_receives_the_seeds_state_with_its_tensors():
    seed_model = FlaggedToy(3)
    seed = flagged_seed(seed_model, loaded(seed_model, has_own_lm_head=True))
    try:
        client = FlaggedToy(None)
        fetch = fetch_for(client)
        fetch.model = client
        received = fetch.run([seed.address])
    finally:
        seed.stop()
    assert received is not None, fetch.reasons
    assert received.state == seed.weights.state
    assert client.has_own_lm_head is False  # replayed by the loader, after the fetch
    load_state.apply(client, received.state)
    assert client.has_own_lm_head is True
    assert seed.describe()["load_state"] == ["has_own_lm_head=True"]


def test_client_refuses_a_state_that_names_other_modules_before_any_byte():
    seed_model = FlaggedToy(3)
    state = LoadState((Change("body.nowhere", "flag", False, None, True),))
    seed = flagged_seed(seed_model, state)
    try:
        client = FlaggedToy(None)
        fetch = fetch_for(client)
        fetch.model = client
        assert fetch.run([seed.address]) is None
    finally:
        seed.stop()
    (reason,) = fetch.reasons
    assert "refused" in reason and "lacks" in reason
    assert untouched(client)


def test_seed_whose_load_set_uncarried_state_refuses_clients():
    seed_model = FlaggedToy(3)
    seed = flagged_seed(seed_model, loaded(seed_model, helper=object()))
    try:
        client = FlaggedToy(None)
        fetch = fetch_for(client)
        assert fetch.run([seed.address]) is None
    finally:
        seed.stop()
    (reason,) = fetch.reasons
    assert "cannot carry: helper (object)" in reason
    assert untouched(client)


class Layer(nn.Module):
    """Instance values a forward computes with (as vLLM layers keep sizes and names)."""

    supports_quant: typing.ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        self.eps, self.steps, self.padding_idx, self.shape = 1e-5, 2, None, (4,)
        self.layer_name, self.enabled, self.cache = "model.layers.0", False, {}


@pytest.mark.parametrize("change", [
    Change("", "padding_idx", True, None, "x"),      # found by the third attack review
    Change("", "steps", True, 2, 10**18),            # a loop bound: the forward hangs
    Change("", "steps", True, 2, True),              # an int is no flag
    Change("", "eps", True, 1e-5, 0.5),
    Change("", "shape", True, (4,), (8,)),
    Change("", "layer_name", True, "model.layers.0", "model.layers.1"),
    Change("", "cache", True, {}, None),
    Change("", "fresh", False, None, 7),             # a new name that is no table
    Change("", "fresh", False, None, None),
    Change("", "is_pooling_model", False, None, True),   # a flag nobody declared
    Change("", "supports_quant", False, None, True),     # a ClassVar flag
    Change("", "dump_patches", False, None, True),       # what every torch module keeps
    Change("", "_version", False, None, 7),
])
def test_check_refuses_every_change_but_a_flag_or_a_new_empty_table(change):
    layer = Layer()
    with pytest.raises(LoadStateError, match="does not carry|every torch module keeps"):
        load_state.check(layer, LoadState((change,)))
    # A seed whose own load made the change refuses it as state it cannot carry.
    if change.attr not in ("dump_patches", "_version"):
        before = load_state.snapshot(layer)
        setattr(layer, change.attr, change.after)
        state = load_state.changes(before, load_state.snapshot(layer), layer)
        assert state.changes == () and state.uncarried[0].startswith(change.attr)


def test_a_flag_and_a_new_empty_table_are_carried():
    layer = Layer()
    state = LoadState((
        Change("", "enabled", True, False, True), Change("", "table", False, None, {}),
    ))
    load_state.check(layer, state)
    load_state.apply(layer, state)
    assert layer.enabled is True and layer.table == {}


def test_a_refusal_survives_a_client_value_whose_repr_raises():
    class Loud:
        def __repr__(self) -> str:
            raise RuntimeError("repr")

    head = Head()
    head.thing = Loud()
    with pytest.raises(LoadStateError, match="starts from"):
        load_state.check(head, LoadState((Change("", "thing", True, False, True),)))
