"""A deferred model's forward (`netdoctor.loading.materializing`): weights materialised at the ops
that use them, drawn once, and a Gaussian linear layer's output drawn from its exact distribution
without its weight."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from netdoctor.loading import deferred as deferred_module
from netdoctor.loading.deferred import record
from netdoctor.loading.materializing import materialized_in_forward


class GaussianLinear(nn.Module):
    """A linear layer drawn as language models draw theirs: normal_(std), bias zero."""

    def __init__(self, fan_in: int = 1024, fan_out: int = 2048, std: float = 0.02) -> None:
        super().__init__()
        self.fc = nn.Linear(fan_in, fan_out)
        nn.init.normal_(self.fc.weight, std=std)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class CalledTwice(GaussianLinear):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fc(x), self.fc(x)


def test_a_gaussian_linear_output_has_its_exact_distribution_without_the_weight(monkeypatch):
    deferred = record(GaussianLinear)
    drawn = []
    original = deferred.materialize
    monkeypatch.setattr(deferred, "materialize", lambda t: drawn.append(t.shape) or original(t))
    x = torch.randn(8, 1024, generator=torch.Generator().manual_seed(1))
    with materialized_in_forward(deferred), torch.no_grad():
        y = deferred.model(x)
    assert drawn == [torch.Size([2048])]  # the bias alone: the weight was never drawn
    # Each output column is N(0, std^2 X X^T): the columns' covariance estimates it.
    gram = x @ x.T
    estimate, expected = y @ y.T / 2048, 0.02**2 * gram
    diagonal = torch.diagonal(gram)
    error = 0.02**2 * torch.sqrt((torch.outer(diagonal, diagonal) + gram**2) / 2048)
    assert ((estimate - expected).abs() <= 5 * error).all()


def test_a_sampled_output_is_the_same_in_every_forward():
    deferred = record(GaussianLinear)
    x = torch.randn(4, 1024)
    outputs = []
    for _ in range(2):
        with materialized_in_forward(deferred), torch.no_grad():
            outputs.append(deferred.model(x))
    assert torch.equal(outputs[0], outputs[1])


def test_a_weight_used_again_is_drawn_given_what_its_first_use_showed():
    deferred = record(CalledTwice)
    x = torch.randn(6, 1024)
    with materialized_in_forward(deferred), torch.no_grad():
        sampled, computed = deferred.model(x)  # the second call computes with a drawn weight
    assert torch.allclose(sampled, computed, atol=1e-4)
    weight = deferred.model.fc.weight
    with materialized_in_forward(deferred), torch.no_grad():
        deferred.model(x)
        drawn = deferred.materialize(weight)
    assert drawn.std().item() == pytest.approx(0.02, rel=0.02)


def test_a_uniform_weight_is_materialised_and_multiplied():
    deferred = record(lambda: nn.Linear(256, 64))  # kaiming_uniform_: not Gaussian
    x = torch.randn(3, 256)
    with materialized_in_forward(deferred), torch.no_grad():
        y = deferred.model(x)
    weight, bias = (deferred.materialize(t) for t in (deferred.model.weight, deferred.model.bias))
    assert torch.allclose(y, x @ weight.T + bias, atol=1e-6)


def test_metadata_never_materialises(monkeypatch):
    deferred = record(GaussianLinear)
    monkeypatch.setattr(deferred, "materialize", lambda t: pytest.fail("materialised"))
    weight = deferred.model.fc.weight
    with materialized_in_forward(deferred):
        assert weight.shape == (2048, 1024) and weight.dtype == torch.float32
        assert weight.dim() == 2 and weight.numel() == 2048 * 1024 and weight.is_meta
        assert weight.device == torch.device("cpu")  # where its values are computed


def test_an_overwritten_init_is_not_drawn_again(monkeypatch):
    """A Linear's kaiming_uniform_ that normal_ overwrites whole: only the normal_ is replayed."""
    deferred = record(GaussianLinear)
    replayed = []
    original = deferred_module.Deferred._replay

    def replay(self, op, real):
        replayed.append(deferred_module._op_name(op.func))
        original(self, op, real)

    monkeypatch.setattr(deferred_module.Deferred, "_replay", replay)
    weight = deferred.materialize(deferred.model.fc.weight)
    assert replayed == ["normal_"]
    assert weight.std().item() == pytest.approx(0.02, rel=0.01)


def test_a_large_draw_is_the_same_on_any_number_of_threads():
    deferred = record(lambda: GaussianLinear(4096, 4096))
    weight = deferred.model.fc.weight
    assert weight.numel() >= 2 * deferred_module.DRAW_CHUNK  # drawn in chunks
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = deferred.materialize(weight)
        torch.set_num_threads(2)
        two = deferred.materialize(weight)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    assert one.std().item() == pytest.approx(0.02, rel=0.01)
    assert not math.isclose(one[0, 0].item(), one[-1, -1].item())


class ChangedInPlace(GaussianLinear):
    """Libraries change a layer's output in place (a padding mask written into scores)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        y[:, 0] = 0.0
        return y.add_(self.fc.bias)


def test_a_forward_may_change_what_it_computed_in_place():
    deferred = record(ChangedInPlace)
    with materialized_in_forward(deferred):  # grad enabled, as the recorded forward runs
        y = deferred.model(torch.randn(2, 1024, requires_grad=True))
    assert y.requires_grad and (y[:, 0] == 0).all()
