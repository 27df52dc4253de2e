"""Train the digits demo models: ``python -m fastdiff.models.train_digits [--steps N] [--out DIR]``.

A class-conditional v-prediction UNet on the cosine DiscreteVP schedule with 15% label dropout (so
classifier-free guidance works), EMA of the weights, and a small classifier for the quality figure.  A few minutes
on 2 CPU cores; weights are saved in fp16 (a few MB).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch.nn import functional as F

from .digits import WEIGHTS, load_digits, schedule
from .unet import DigitsClassifier, DigitsUNet


def _shift(x, g):
    """Random shifts of up to one pixel (zero padding at -1): cheap augmentation for 1.5k training digits."""
    dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
    x = F.pad(x, (1, 1, 1, 1), value=-1.0)
    return x[:, :, 1 + dy : 9 + dy, 1 + dx : 9 + dx]


def train_classifier(images, labels, steps=1500, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    clf = DigitsClassifier()
    opt = torch.optim.Adam(clf.parameters(), lr=2e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(labels), (128,), generator=g)
        loss = F.cross_entropy(clf(_shift(images[idx], g)), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return clf.eval()


def train_unet(images, labels, steps=4000, batch=128, lr=2e-3, p_uncond=0.15, seed=0, log=print):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    sch = schedule()
    alpha_bar = torch.tensor(sch.alphas_cumprod, dtype=torch.float32)
    model = DigitsUNet()
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    t0 = time.time()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(labels), (batch,), generator=g)
        x0 = images[idx]
        lab = labels[idx].clone()
        lab[torch.rand(batch, generator=g) < p_uncond] = model.num_classes  # label dropout -> null label
        t = torch.randint(0, len(alpha_bar), (batch,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        ab = alpha_bar[t][:, None, None, None]
        a, s = ab.sqrt(), (1 - ab).sqrt()
        x_t = a * x0 + s * eps
        # v-prediction (Salimans & Ho 2022): well conditioned where alpha -> 0 at the cosine schedule's end,
        # where an epsilon model's x0 = (x - sigma eps) / alpha would amplify errors by 1 / alpha ~ 2e4.
        loss = F.mse_loss(model(x_t, t.float(), lab), a * eps - s * x0)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            decay = min(0.999, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        if step % 500 == 0 or step == steps:
            log(f"step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f} s)")
    return ema.eval()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--out", default=str(WEIGHTS))
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    images, labels = load_digits("train")
    clf = train_classifier(images, labels)
    test_x, test_y = load_digits("test")
    print(f"classifier held-out accuracy: {(clf(test_x).argmax(1) == test_y).float().mean().item():.3f}")
    unet = train_unet(images, labels, steps=args.steps)
    import pathlib

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.half() for k, v in unet.state_dict().items()}, out / "digits_unet.pt")
    torch.save({k: v.half() for k, v in clf.state_dict().items()}, out / "digits_classifier.pt")
    print(f"saved {out}/digits_unet.pt and digits_classifier.pt")


if __name__ == "__main__":
    main()
