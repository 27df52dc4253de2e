"""The digits demo model: data, the pretrained class-conditional UNet and classifier, quality metrics.

Images are scikit-learn's 8x8 digits scaled to [-1, 1]; a fixed split keeps 300 digits out of training for the
quality figure.  Weights are trained by ``python -m fastdiff.models.train_digits`` and shipped in
``fastdiff/models/weights/``.
"""

from __future__ import annotations

import pathlib

import numpy as np
import torch

from .. import schedules
from .unet import DigitsClassifier, DigitsUNet

HERE = pathlib.Path(__file__).resolve().parent
WEIGHTS = HERE / "weights"
NUM_HELD_OUT = 300
PREDICTION = "v"


def schedule():
    """The schedule the digits UNet is trained on (improved-DDPM cosine, 1000 steps)."""
    return schedules.DiscreteVP.cosine()


def load_digits(split: str = "train"):
    """(images float32 [N, 1, 8, 8] in [-1, 1], labels int64 [N]) for split "train", "test" or "all"."""
    data = np.load(HERE / "data" / "digits.npz")
    images = torch.from_numpy(data["images"].astype(np.float32) / 8.0 - 1.0)[:, None]
    labels = torch.from_numpy(data["labels"].astype(np.int64))
    perm = torch.from_numpy(np.random.default_rng(0).permutation(len(labels)))
    test, train = perm[:NUM_HELD_OUT], perm[NUM_HELD_OUT:]
    idx = {"train": train, "test": test, "all": perm}[split]
    return images[idx], labels[idx]


def _load(module, name):
    path = WEIGHTS / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: train it with `python -m fastdiff.models.train_digits`")
    state = torch.load(path, map_location="cpu", weights_only=True)
    module.load_state_dict({k: v.float() for k, v in state.items()})
    return module.eval().requires_grad_(False)


def pretrained_unet() -> DigitsUNet:
    """The trained class-conditional v-prediction UNet (``label=10`` is the null label)."""
    return _load(DigitsUNet(), "digits_unet.pt")


def pretrained_classifier() -> DigitsClassifier:
    return _load(DigitsClassifier(), "digits_classifier.pt")


def frechet_distance(feat_a: np.ndarray, feat_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2), with symmetric eigendecompositions."""
    mu_a, mu_b = feat_a.mean(0), feat_b.mean(0)
    ca, cb = np.cov(feat_a, rowvar=False), np.cov(feat_b, rowvar=False)
    w, v = np.linalg.eigh(ca)
    sqrt_ca = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(sqrt_ca @ cb @ sqrt_ca)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


@torch.no_grad()
def quality(images: torch.Tensor, labels: torch.Tensor, classifier=None) -> dict:
    """Accuracy of the classifier on conditional samples, and the Frechet distance of its features to the
    held-out real digits (lower is better; the train split itself scores about the noise floor)."""
    classifier = classifier or pretrained_classifier()
    x = images.float().clamp(-1, 1)
    acc = float((classifier(x).argmax(1) == labels).float().mean())
    real, _ = load_digits("test")
    fd = frechet_distance(classifier.features(x).double().numpy(), classifier.features(real).double().numpy())
    return {"accuracy": acc, "frechet": fd}
