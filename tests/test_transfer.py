"""Carrying weights between related architectures (kpac_cli.model.transfer_state)."""

from __future__ import annotations

import pytest
import torch

from kpac_cli.model import KPACConfig, build_model, transfer_state


def _trained(cfg: KPACConfig, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():  # perturb every tensor so that no copy can pass by accident
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _carry(src: torch.nn.Module, target: KPACConfig):
    fresh_model = build_model(target).eval()
    state, fresh = transfer_state(src.state_dict(), src.config, target, fresh_model.state_dict())
    fresh_model.load_state_dict(state)
    return fresh_model, fresh


def test_single_to_dual_computes_the_single_model_on_the_centre_view():
    single = _trained(KPACConfig(levels=2, channels=16), 1)
    dual, fresh = _carry(single, KPACConfig(levels=2, channels=16, in_views=2))
    assert fresh == []
    g = torch.Generator().manual_seed(2)
    left, right = torch.rand(1, 3, 40, 48, generator=g) * 2 - 1, torch.rand(1, 3, 40, 48, generator=g) * 2 - 1
    with torch.no_grad():
        expected = single((left + right) / 2)
        got = dual(torch.cat([left, right], 1))
    assert (got - expected).abs().max() < 1e-5
    assert not torch.equal(left, right)


def test_dual_to_single_computes_the_dual_model_with_equal_views():
    dual = _trained(KPACConfig(levels=2, channels=16, in_views=2), 3)
    single, fresh = _carry(dual, KPACConfig(levels=2, channels=16))
    x = torch.rand(1, 3, 32, 40, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        assert (single(x) - dual(torch.cat([x, x], 1))).abs().max() < 1e-5


def test_three_to_two_levels_copies_every_shared_tensor_and_back_starts_the_rest_fresh():
    three = _trained(KPACConfig(levels=3, channels=16), 5)
    two, fresh = _carry(three, KPACConfig(levels=2, channels=16))
    assert fresh == []
    src = three.state_dict()
    for name, t in two.state_dict().items():
        assert torch.equal(t, src[name]), name
    back, fresh_back = _carry(two, KPACConfig(levels=3, channels=16))
    assert sorted(fresh_back) == sorted(k for k in src if k.startswith(("encoder.c4", "decoder.d0")))
    assert all(torch.equal(back.state_dict()[k], src[k]) for k in two.state_dict())


@pytest.mark.parametrize("change", [dict(channels=24), dict(blocks=3), dict(kernel_size=3), dict(shared_kernel=False)])
def test_other_architecture_changes_are_refused(change):
    src = KPACConfig(levels=2, channels=16)
    dst = KPACConfig(**{**src.to_dict(), **change})
    with pytest.raises(ValueError, match=next(iter(change))):
        transfer_state(build_model(src).state_dict(), src, dst, build_model(dst).state_dict())
