"""REBEL: pairs, the regression, its surrogate, the base anchor's coefficients, trained steps and
fit statistics (pure math)."""

import itertools

import numpy as np
import pytest
import torch

from rebel_diffusion.algorithms.rebel import (
    image_coefficients,
    pair_indices,
    pair_targets,
    rebel_loss,
    rebel_residual,
    rebel_surrogate,
    regression_fit,
    subsample_steps,
    trained_steps,
)

# ------------------------------------------------------------------------------------------------
# pure math


def test_pair_indices_all_pairs_within_groups():
    group = torch.tensor([0, 0, 0, 1, 1, 2])  # k = 3, 2, 1
    pairs = pair_indices(group).tolist()
    assert pairs == [[0, 1], [0, 2], [1, 2], [3, 4]]  # k(k-1)/2 per group, none across groups


def test_rebel_loss_closed_form():
    la = torch.tensor([0.3, -0.2, 0.0])
    lb = torch.tensor([0.1, 0.4, 0.5])
    target = torch.tensor([1.0, -0.5, 0.25])
    eta = 0.5
    expected = np.mean(
        [((0.3 - 0.1) / 0.5 - 1.0) ** 2, ((-0.2 - 0.4) / 0.5 + 0.5) ** 2, ((0 - 0.5) / 0.5 - 0.25) ** 2]
    )
    assert rebel_loss(la, lb, target, eta).item() == pytest.approx(expected, rel=1e-6)
    assert rebel_residual(la, lb, target, eta)[0].item() == pytest.approx(0.4 - 1.0, rel=1e-6)


def test_surrogate_gradient_equals_loss_gradient():
    """Pairs' weights summed per image give the loss gradient, with each image differentiated once."""
    pairs = pair_indices(torch.tensor([0, 0, 0, 1, 1, 1, 1]))  # k = 3 and 4: 3 + 6 pairs
    logp = torch.randn(7, dtype=torch.float64, requires_grad=True)
    target = torch.randn(len(pairs), dtype=torch.float64)
    eta = 0.7
    rebel_loss(logp[pairs[:, 0]], logp[pairs[:, 1]], target, eta).backward()
    expected = logp.grad.clone()
    logp.grad = None
    residual = rebel_residual(logp[pairs[:, 0]].detach(), logp[pairs[:, 1]].detach(), target, eta)
    coef = image_coefficients(pairs, residual, eta, num_pairs=len(pairs), num_images=7)  # (7,)
    rebel_surrogate(logp, coef).backward()
    torch.testing.assert_close(logp.grad, expected, rtol=1e-12, atol=1e-12)
    # by hand for image 0 (first of pairs (0, 1) and (0, 2)): 2 (rho_01 + rho_02) / (eta P)
    assert coef[0].item() == pytest.approx(2 * (residual[0] + residual[1]).item() / (eta * len(pairs)))


def test_pair_targets_reward_gap_and_preference():
    adv = torch.tensor([1.0, -1.0, 0.5])
    pairs = torch.tensor([[0, 1], [0, 2], [1, 2]])
    assert pair_targets(adv, pairs).tolist() == [2.0, 0.5, -1.5]
    pref = torch.tensor([0.9, 0.5, 0.2])
    torch.testing.assert_close(pair_targets(adv, pairs, pref), torch.tensor([0.4, 0.0, -0.3]))


def test_subsample_steps_is_unbiased():
    steps = list(range(10))
    values = torch.arange(10.0) ** 2  # per-step terms g_t
    gen = torch.Generator().manual_seed(0)
    sub, scale = subsample_steps(steps, 0.3, gen)
    assert len(sub) == 3 and len(set(sub)) == 3 and scale == pytest.approx(10 / 3)
    # Exact expectation over all equally likely subsets of size 3: equals the full sum.
    subsets = list(itertools.combinations(steps, 3))
    expectation = np.mean([scale * values[list(s)].sum().item() for s in subsets])
    assert expectation == pytest.approx(values.sum().item(), rel=1e-9)
    assert subsample_steps(steps, 1.0, gen) == (steps, 1.0)
    with pytest.raises(ValueError):
        subsample_steps(steps, 0.0, gen)


def test_regression_fit_closed_forms():
    target = torch.tensor([1.0, -1.0, 2.0, 0.0])
    assert regression_fit(target, target) == pytest.approx({"fit_r2": 1.0, "fit_corr": 1.0})
    # predicting the target's mean explains nothing; on-policy (prediction 0) R^2 = -mean^2 / var
    fit = regression_fit(torch.full((4,), 0.5), target)
    assert fit["fit_r2"] == pytest.approx(0.0, abs=1e-12) and np.isnan(fit["fit_corr"])
    assert regression_fit(torch.zeros(4), target)["fit_r2"] == pytest.approx(-(0.5**2) / 1.25)
    assert regression_fit(2 * target + 1, target)["fit_corr"] == pytest.approx(1.0)


def test_trained_steps_leave_out_the_lowest_noise():
    std = [0.78, 0.5, 0.26, 0.041, 0.021, 0.0]  # toy's shape, and a deterministic last step
    assert trained_steps(std, 0.1) == [0, 1, 2]
    assert trained_steps(std, 0.0) == [0, 1, 2, 3, 4]  # never a deterministic step
    with pytest.raises(ValueError, match="no step left"):
        trained_steps(std, 1.0)


def test_proximal_coefficients_match_autograd_of_the_clipped_loss():
    """c_{i,t} is the gradient of mean max(rho^2, rho_clip^2) with respect to each step's log-prob."""
    from rebel_diffusion.algorithms.rebel import proximal_coefficients

    gen = torch.Generator().manual_seed(0)
    pairs = pair_indices(torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2]))
    step_ratio = 0.3 * torch.randn(9, 5, generator=gen, dtype=torch.float64)
    offset = torch.randn(9, generator=gen, dtype=torch.float64)
    target = torch.randn(len(pairs), generator=gen, dtype=torch.float64)
    valid = torch.ones(len(pairs), dtype=torch.bool)
    valid[2] = False
    eta, eps = 0.7, 0.25
    coef, loss, prediction = proximal_coefficients(pairs, step_ratio, offset, target, eta, eps, valid)

    x = step_ratio.clone().requires_grad_(True)
    full = x.sum(1) + offset
    clipped = x.clamp(-eps, eps).sum(1) + offset
    rho = (full[pairs[:, 0]] - full[pairs[:, 1]]) / eta - target
    rho_c = (clipped[pairs[:, 0]] - clipped[pairs[:, 1]]) / eta - target
    reference = torch.maximum(rho.pow(2), rho_c.pow(2))[valid].mean()
    reference.backward()
    torch.testing.assert_close(coef, x.grad, rtol=1e-12, atol=1e-12)
    assert loss.sum() / valid.sum() == pytest.approx(reference.item(), rel=1e-12)
    torch.testing.assert_close(prediction, rho.detach() + target)
    assert 0 < int((step_ratio.abs() > eps).sum()) < step_ratio.numel()  # both branches exercised
    assert bool(((rho_c.abs() > rho.abs()) & valid).any()) and bool(((rho_c.abs() <= rho.abs()) & valid).any())


def test_proximal_coefficients_without_clipping_are_the_plain_image_coefficients():
    """No step clipped and no offset: every step of an image carries REBEL's own image coefficient."""
    from rebel_diffusion.algorithms.rebel import proximal_coefficients

    gen = torch.Generator().manual_seed(1)
    pairs = pair_indices(torch.tensor([0, 0, 1, 1, 1]))
    step_ratio = 0.1 * torch.randn(5, 3, generator=gen, dtype=torch.float64)
    target = torch.randn(len(pairs), generator=gen, dtype=torch.float64)
    coef, _, prediction = proximal_coefficients(
        pairs, step_ratio, torch.zeros(5, dtype=torch.float64), target, 2.0, 1e9
    )
    residual = prediction - target
    plain = image_coefficients(pairs, residual, 2.0, num_pairs=len(pairs), num_images=5)
    torch.testing.assert_close(coef, plain[:, None].expand(5, 3))
