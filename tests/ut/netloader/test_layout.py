"""The processed layout on toy models processed the ways vLLM's methods process:
which bytes move per tensor, what a seed keeps for it, the state both sides compare,
and installing received tensors into a model built on the meta device."""

import functools

import pytest
import torch
from torch import nn

from vllm_ascend.model_loader.netloader.layout import (
    LayoutError,
    install,
    meta_tensors,
    processed_weights,
    state_signature,
)
from vllm_ascend.model_loader.netloader.manifest import LoadedWeights, digest, model_tensors


class Toy(nn.Module):
    """Three linears and a buffer; ``tie`` shares ``a``'s weight with ``d``."""

    def __init__(self, tie: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 8, bias=False)
        self.b = nn.Linear(8, 8, bias=False)
        self.c = nn.Linear(8, 8, bias=False)
        self.register_buffer("scale", torch.ones(4))
        if tie:
            self.d = nn.Linear(8, 8, bias=False)
            self.d.weight = self.a.weight


def process(model: Toy) -> torch.Tensor:
    """What vLLM CPU's methods do: ``a`` repacked in place of the same shape (a MoE
    prepack), ``b`` consumed into a kernel that holds a copy (a oneDNN handle, which
    leaves an empty weight), ``c`` untouched; returns the kernel's copy."""
    model.a.weight = nn.Parameter(model.a.weight.detach().flip(0).contiguous(),
                                  requires_grad=False)
    packed = model.b.weight.detach().clone()
    model.b.weight = nn.Parameter(torch.empty(0), requires_grad=False)
    model.b.kernel = lambda x, _w=packed: x @ _w.t()  # noqa: E731 - as vLLM's cpu_linear
    model.b.packed_rows = 8
    return packed


def loaded_of(model: nn.Module) -> LoadedWeights:
    return LoadedWeights.capture(model)


def test_each_tensor_moves_as_the_running_model_reads_it_or_as_its_kernels_input():
    model = Toy()
    loaded = loaded_of(model)
    before = {name: t.clone() for name, t in model_tensors(model)}
    process(model)
    found, why = processed_weights(model, loaded)
    assert found is not None and why == ""
    by_name = dict(zip((s.name for s in found.weights.specs), found.weights.tensors,
                       strict=True))
    # Repacked in place of the same shape: the runtime tensor, with its own digest.
    assert torch.equal(by_name["a.weight"], before["a.weight"].flip(0))
    # Consumed into a kernel holding a copy: the bytes the kernel was built from, kept.
    assert torch.equal(by_name["b.weight"], before["b.weight"])
    assert found.kept == ("b.weight",) and found.kept_bytes == 8 * 8 * 4
    # Untouched: the same tensor and digest as loaded.
    assert by_name["c.weight"].data_ptr() == model.c.weight.data_ptr()
    assert [s for s in found.weights.specs] == [s for s in loaded.specs]
    assert list(found.weights.digests) == [digest(t) for t in found.weights.tensors]


def test_a_kernel_that_still_reads_the_loaded_tensor_costs_the_seed_nothing():
    model = Toy()
    loaded = loaded_of(model)
    held = model.b.weight.detach()
    model.b.weight = nn.Parameter(torch.empty(0), requires_grad=False)
    model.b.kernel = functools.partial(torch.matmul, other=held)
    found, _ = processed_weights(model, loaded)
    assert found is not None and found.kept == () and found.kept_bytes == 0


def test_a_quantization_method_without_pre_processed_support_keeps_the_loaded_layout():
    from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase

    class Method(QuantizeMethodBase):
        def create_weights(self, *args, **kwargs): ...
        def apply(self, *args, **kwargs): ...

    model = Toy()
    model.c.quant_method = Method()
    found, why = processed_weights(model, loaded_of(model))
    assert found is None and "c: Method" in why and "pre-processed" in why
    Method.supports_pre_processed_weights = True
    assert processed_weights(model, loaded_of(model))[0] is not None


def test_a_seed_that_dropped_loaded_tensors_has_no_processed_layout():
    model = Toy()
    loaded = loaded_of(model)
    dropped = LoadedWeights(
        [(s.name, t) for s, t in zip(loaded.specs, loaded.tensors, strict=True)],
        list(loaded.digests), dropped=("b.weight",))
    found, why = processed_weights(model, dropped)
    assert found is None and "b.weight" in why


def processed_toy(handle: int = 12345) -> Toy:
    """A toy processed as ``process`` does, holding the kinds of things kernels hold: a
    closure over a handle's address, sizes in a list, a partial."""
    model = Toy()
    process(model)

    def kernel_over(address: int):
        return lambda x: (address, x)

    model.b.kernel = kernel_over(handle)
    model.b.sizes = [64]
    model.b.op = functools.partial(torch.add)
    return model


def test_models_processed_alike_have_one_state_signature_and_any_difference_shows():
    # A kernel's handle is an address: an int a closure holds counts by its type.
    assert state_signature(processed_toy(12345)) == state_signature(processed_toy(67890))
    one, other = processed_toy(), processed_toy()
    one.b.kernel = lambda x, _h=12345: x  # noqa: E731 - a default argument is held too
    other.b.kernel = lambda x, _h=67890: x  # noqa: E731
    assert state_signature(one) == state_signature(other)
    reference = state_signature(processed_toy())
    for change in (
        lambda m: setattr(m.b, "packed_rows", 16),           # a plain value
        lambda m: setattr(m.b, "extra", torch.zeros(3)),     # a tensor the other lacks
        lambda m: m.register_buffer("scale", torch.ones(5)),  # a tensor's shape
        lambda m: setattr(m.b, "kernel", lambda x: x),       # another kernel
        lambda m: setattr(m.b, "sizes", [128]),              # an int in a list
        # The same shape in another memory order (a column-major weight).
        lambda m: setattr(m.c, "weight", nn.Parameter(m.c.weight.detach().t().contiguous().t(),
                                                      requires_grad=False)),
        # A tensor held by a partial's keyword.
        lambda m: setattr(m.b, "op", functools.partial(torch.add, other=torch.zeros(2))),
    ):
        twin = processed_toy()
        change(twin)
        assert state_signature(twin) != reference


def test_install_fills_a_meta_built_model_keeping_ties_and_parameter_attributes():
    with torch.device("meta"):
        model = Toy(tie=True)
    model.a.weight.weight_loader = "the layer's loader"
    names = [name for name, _ in model_tensors(model, meta=True)]
    assert "d.weight" not in names  # tied: one tensor under its first name
    assert meta_tensors(model) == ["a.weight", "b.weight", "c.weight", "d.weight", "scale"]
    received = [(name, torch.full(t.shape, float(i), dtype=t.dtype))
                for i, (name, t) in enumerate(model_tensors(model, meta=True))]
    install(model, received)
    assert meta_tensors(model) == []
    assert model.d.weight is model.a.weight  # the tie holds
    assert isinstance(model.a.weight, nn.Parameter)
    assert model.a.weight.weight_loader == "the layer's loader"
    assert torch.equal(model.scale, received[-1][1])
    with pytest.raises(LayoutError, match="no tensor nope"):
        install(model, [("nope", torch.zeros(1))])
