"""The digits demo model: metrics against independent formulas, the shipped weights, a training smoke test."""

import numpy as np
import pytest
import torch
from scipy import linalg

import fastdiff as fd
from fastdiff.models import digits
from fastdiff.models.train_digits import train_unet


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(300, 6)) + 0.5
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expect = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * linalg.sqrtm(ca @ cb).real)
    assert digits.frechet_distance(a, b) == pytest.approx(expect, rel=1e-6)
    assert digits.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_data_split_is_fixed_and_disjoint():
    train, _ = digits.load_digits("train")
    test, test_labels = digits.load_digits("test")
    assert train.shape == (1497, 1, 8, 8) and test.shape == (300, 1, 8, 8)
    assert float(train.min()) == -1.0 and float(train.max()) == 1.0
    assert torch.equal(test_labels, digits.load_digits("test")[1])


def test_shipped_model_draws_the_requested_digits():
    unet, clf = digits.pretrained_unet(), digits.pretrained_classifier()
    labels = torch.arange(10).repeat(3)
    plan = fd.plan("dpmpp_2m", digits.schedule(), 10, prediction=digits.PREDICTION)
    with torch.inference_mode():
        x = fd.sample(unet, plan, shape=(30, 1, 8, 8), seeds=list(range(30)), guidance_scale=2.0,
                      cond={"label": labels}, uncond={"label": torch.full_like(labels, 10)})
        q = digits.quality(x, labels, clf)
    assert q["accuracy"] >= 0.9, q
    # guidance matters: the unconditional model does not follow the labels
    with torch.inference_mode():
        null = {"label": torch.full_like(labels, 10)}
        u = fd.sample(unet, plan, shape=(30, 1, 8, 8), seeds=list(range(30)), cond=null)
    assert digits.quality(u, labels, clf)["accuracy"] < 0.5


def test_training_smoke():
    x, y = digits.load_digits("train")
    model = train_unet(x[:64], y[:64], steps=3, batch=8, log=lambda s: None)
    out = model(torch.randn(2, 1, 8, 8), torch.tensor([10.0, 900.0]), torch.tensor([3, 10]))
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()
