"""Server aggregation on toy tensors: exact values, errors."""

import pytest
import torch

from fl.aggregation import ServerOptimizer, weighted_average


def test_weighted_average_exact():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.0, 4.0]])}
    b = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([[8.0, 0.0]])}
    out = weighted_average([a, b], [1, 3])
    assert torch.equal(out["w"], torch.tensor([2.5, 5.0]))
    assert torch.equal(out["b"], torch.tensor([[6.0, 1.0]]))
    assert out["w"].dtype == torch.float32


def test_weighted_average_of_equal_updates_is_identity():
    t = {"x": torch.randn(17, 3)}
    out = weighted_average([t, {"x": t["x"].clone()}, {"x": t["x"].clone()}], [5, 1, 7])
    torch.testing.assert_close(out["x"], t["x"], rtol=0, atol=1e-7)


def test_weighted_average_errors():
    with pytest.raises(ValueError, match="no updates"):
        weighted_average([], [])
    with pytest.raises(KeyError, match="disagree"):
        weighted_average([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}], [1, 1])
    with pytest.raises(ValueError, match="weights"):
        weighted_average([{"a": torch.zeros(1)}], [0])


def test_server_sgd_lr1_adds_mean_delta():
    g = {"w": torch.tensor([1.0, -1.0])}
    opt = ServerOptimizer(g, "sgd", lr=1.0)
    opt.step({"w": torch.tensor([0.5, 0.25])})
    assert torch.equal(opt.tensors()["w"], torch.tensor([1.5, -0.75]))
    assert torch.equal(g["w"], torch.tensor([1.0, -1.0]))  # the caller's tensors untouched


def test_server_adam_moves_along_delta():
    opt = ServerOptimizer({"w": torch.zeros(3)}, "adam", lr=0.1)
    opt.step({"w": torch.tensor([1.0, -2.0, 0.0])})
    w = opt.tensors()["w"]
    assert w[0] > 0 and w[1] < 0 and w[2] == 0
    torch.testing.assert_close(w[:2].abs(), torch.full((2,), 0.1))  # Adam's first step is lr * sign
    with pytest.raises(ValueError, match="server optimizer"):
        ServerOptimizer({"w": torch.zeros(1)}, "lamb")
