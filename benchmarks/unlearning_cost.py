"""Cost of `genattr.methods.unlearning` on the tiny SD-shaped pipeline (the tests' one, built by
`harness.sd_pipeline`: 16x16x4 latents, 10,240 cross-attention key/value weights), one torch
thread: the Fisher per training image, a loss evaluation per gallery image, one unlearning step,
and one whole query measured end to end, against the gradient attributor's per-image gradient
measured in the same run.

    .venv/bin/python benchmarks/unlearning_cost.py
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from genattr.methods import (
    GradientSpec,
    UnlearningSpec,
    fisher_diagonal,
    image_losses,
    projected_gradients,
    unlearned,
    unlearning_scores,
)
from harness import emit_row, sd_pipeline, timed


def main() -> None:
    torch.set_num_threads(1)
    pipe = sd_pipeline("tiny")
    unet, sched = pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config)
    g = torch.Generator().manual_seed(0)
    n = 64
    lat, txt = torch.randn((n, 4, 16, 16), generator=g), torch.randn((n, 77, 32), generator=g)
    spec = UnlearningSpec(step_size=1e-5)  # 4 loss pairs, 16 samples per step (the defaults)
    kv = GradientSpec()
    projected_gradients(unet, sched, lat[:2], txt[:2], kv)  # warm-up
    grad = timed(lambda: projected_gradients(unet, sched, lat[:16], txt[:16], kv), repeat=3) / 16
    fisher_s = timed(lambda: fisher_diagonal(unet, sched, lat[:16], txt[:16], spec)) / 16
    fisher = fisher_diagonal(unet, sched, lat[:4], txt[:4], spec)
    loss_s = timed(lambda: image_losses(unet, sched, lat, txt, spec), repeat=3) / n

    def steps(k: int) -> None:
        with unlearned(
            unet, sched, lat[0], txt[0], fisher=fisher, spec=spec.model_copy(update={"steps": k})
        ):
            pass

    step_s = (timed(lambda: steps(6), repeat=3) - timed(lambda: steps(1), repeat=3)) / 5
    print(f"gradient attributor, per image (4 pairs, projected)  {grad:.4f} s")
    print(f"Fisher, per training image (4 pairs, one at a time) {fisher_s:.4f} s")
    print(f"loss, per gallery image (4 pairs, batch 16)         {loss_s:.4f} s")
    print(f"unlearning step (16 samples)                        {step_s:.4f} s")
    # one whole query, end to end, against the model: steps x step + G x loss (x2 with flips)
    small = spec.model_copy(update={"steps": 5})
    base = image_losses(unet, sched, lat, txt, small)
    whole = timed(
        lambda: unlearning_scores(
            unet,
            sched,
            lat,
            txt,
            query_latents=lat[:1],
            query_text=txt[:1],
            fisher=fisher,
            spec=small,
            base_losses=base,
        ),
        repeat=2,
    )
    print(
        f"one query, 5 steps, {n} gallery images: {whole:.3f} s measured, "
        f"{5 * step_s + n * loss_s:.3f} s modelled"
    )
    emit_row(
        "unlearning_cost",
        gradient_s=grad,
        fisher_s=fisher_s,
        loss_s=loss_s,
        step_s=step_s,
        query_5_steps_s=whole,
        gallery=n,
    )
    for steps_n, gallery in ((100, 1_000), (100, 10_000), (10, 1_000)):
        per_query = steps_n * step_s + gallery * loss_s
        print(
            f"steps {steps_n:3d}, gallery {gallery:6d}: {per_query:8.1f} s per query "
            f"({2 * gallery * loss_s + steps_n * step_s:8.1f} s with flips); the gradient "
            f"attributor: {grad:.3f} s per query after a one-off {gallery * grad:.0f} s "
            f"for the gallery; unlearning's base losses are a one-off {gallery * loss_s:.0f} s"
        )


if __name__ == "__main__":
    main()
