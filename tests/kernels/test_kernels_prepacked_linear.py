"""engine.linear.Linear's oneDNN-prepacked CPU path: when it packs, and that it agrees.

The packed matmul is a torch-internal op, so ``prepack`` probes it against F.linear
before use. The probe must accept a good packing even where the output is a small
difference of large terms (an elementwise tolerance once rejected a SmolLM2 layer,
leaving it on the slower unpacked path) and must still reject a wrong one.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.linear import Linear, _onednn_available

pytestmark = pytest.mark.skipif(not _onednn_available(), reason="torch built without oneDNN")


def _linear(n_in: int, n_out: int, bias: bool, seed: int) -> Linear:
    torch.manual_seed(seed)
    return Linear(n_in, n_out, bias=bias).eval()


@pytest.mark.parametrize("bias", [False, True])
def test_packs_and_matches_f_linear(bias: bool) -> None:
    lin = _linear(576, 1536, bias, seed=0)
    assert lin.prepack()
    x = torch.randn(7, 576)
    with torch.inference_mode():
        got = lin(x)
    torch.testing.assert_close(got, F.linear(x, lin.weight, lin.bias), rtol=1e-4, atol=1e-5)


def test_packs_weights_with_cancelling_sums() -> None:
    # Large weights of both signs: the outputs are small differences of large products,
    # so the two summation orders disagree by more than 1e-5 on some of them.
    lin = _linear(1536, 576, False, seed=1)
    with torch.no_grad():
        lin.weight.mul_(200.0)
    assert lin.prepack()


def test_rejects_a_wrong_packing(monkeypatch: pytest.MonkeyPatch) -> None:
    lin = _linear(64, 32, False, seed=2)
    real = torch.ops.mkldnn._linear_pointwise

    def transposed_output(x: torch.Tensor, *args: object) -> torch.Tensor:
        return real(x, *args).flip(-1)  # as if the packed layout were misread

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", transposed_output)
    assert not lin.prepack()
    assert lin.packed is None


def test_grad_mode_uses_the_plain_weight() -> None:
    lin = _linear(32, 16, True, seed=3)
    assert lin.prepack()
    x = torch.randn(2, 32, requires_grad=True)
    lin(x).sum().backward()  # the packed op has no backward; F.linear does
    assert x.grad is not None
