"""Continuous batching throughput: images/s of the ContinuousBatcher vs serving each request alone, at 1 / 8 / 32
concurrent requests (digits UNet, dpmpp_2m 10 steps, guidance 2, requests with staggered steps: every other one
uses a 6-step plan so requests join and leave mid-batch).

    python benchmarks/bench_serving.py [--quick]
"""

from __future__ import annotations

import argparse
import time

import torch

import fastdiff as fd

try:
    from _common import write
except ImportError:
    from ._common import write


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    from fastdiff.models import digits
    from fastdiff.serving import ContinuousBatcher

    unet, sch = digits.pretrained_unet(), digits.schedule()
    plans = [fd.plan("dpmpp_2m", sch, 10, prediction=digits.PREDICTION),
             fd.plan("dpmpp_2m", sch, 6, prediction=digits.PREDICTION)]
    null = torch.tensor(10)
    rows = []
    with torch.inference_mode():  # warm-up: kernel build / load and first model call outside the timings
        fd.sample(unet, plans[1], shape=(1, 1, 8, 8), seeds=[0], guidance_scale=2.0, cond={"label": null[None]},
                  uncond={"label": null[None]})
    for n in [1, 8] if args.quick else [1, 8, 32]:
        reqs = [(plans[i % 2], i, torch.tensor(i % 10)) for i in range(n)]
        with torch.inference_mode():
            t0 = time.perf_counter()
            for p, s, lab in reqs:
                fd.sample(unet, p, shape=(1, 1, 8, 8), seeds=[s], guidance_scale=2.0, cond={"label": lab[None]},
                          uncond={"label": null[None]})
            t_alone = time.perf_counter() - t0
            t_batch = {}
            for threads in (None, 1):  # the caller's thread count, and one intra-op thread on the batcher's thread
                with ContinuousBatcher(unet, max_batch=32, cpu_threads=threads) as b:
                    t0 = time.perf_counter()
                    futs = [b.submit(p, s, (1, 8, 8), cond={"label": lab}, uncond={"label": null},
                                     guidance_scale=2.0) for p, s, lab in reqs]
                    for f in futs:
                        f.result()
                    t_batch[threads] = time.perf_counter() - t0
        row = dict(bench="serving", concurrent=n, alone_images_per_s=n / t_alone,
                   batcher_images_per_s=n / t_batch[None], speedup=t_alone / t_batch[None],
                   batcher_1thread_images_per_s=n / t_batch[1], speedup_1thread=t_alone / t_batch[1], ticks=b.ticks)
        rows.append(row)
        print(f"{n:3d} concurrent: alone {row['alone_images_per_s']:7.1f} img/s  batcher "
              f"{row['batcher_images_per_s']:7.1f} img/s  x{row['speedup']:.2f}  batcher(cpu_threads=1) "
              f"{row['batcher_1thread_images_per_s']:7.1f} img/s  x{row['speedup_1thread']:.2f}  "
              f"({b.ticks} model calls)")
    print(f"wrote {write('serving_quick' if args.quick else 'serving', rows, args.out)}")


if __name__ == "__main__":
    main()
