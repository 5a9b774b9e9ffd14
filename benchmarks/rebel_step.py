"""One REBEL optimizer step, each image differentiated once against once per pair, side by side.

With k images per prompt every image is in k - 1 pairs. ``rebel_accumulate`` sums each image's pair
weights and backpropagates each image once; ``per_pair_accumulate`` below is the same gradient
computed pair by pair (each micro-batch holds pairs, and both images of each pair are
differentiated), as the trainer did before, with all the step's pairs in one micro-batch. With the
whole step in one micro-batch and one UNet call (the toy preset on a CPU), ``rebel_accumulate``
also takes the log-ratios from the pass that backpropagates, where the per-pair step needs a
no-graph pass first. Both run on the same trajectories and weights, in interleaved repeats, after
one warm-up each; the JSON has the seconds per step of each, their ratio, the image passes that
backpropagate, and the relative difference of the two gradients.

    python -m benchmarks.rebel_step                          # toy, the quick start's step (2 prompts x 4 images)
    python -m benchmarks.rebel_step --images-per-prompt 8 --prompts 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks import env
from rebel_diffusion.algorithms.rebel import pair_indices, rebel_residual, trained_steps
from rebel_diffusion.algorithms.updates import StepModel, log_ratios, rebel_accumulate
from rebel_diffusion.models import add_lora, load_pipeline
from rebel_diffusion.sampling import SamplingSettings, make_scheduler, sample_trajectories, step_groups, steps_log_prob


def per_pair_accumulate(unet, scheduler, traj, pairs, targets, *, eta, pairs_per_micro_batch, steps, steps_per_pass):
    """The REBEL gradient pair by pair: per micro-batch of p pairs, 2p images x steps backpropagated.

    sum_p 2 rho_p / (eta P) d/dtheta [ln pi(y_a) - ln pi(y_b)], rho from a no-graph pass. Returns the
    number of image passes (image x UNet call) that backpropagated.
    """
    images = torch.unique(pairs.flatten())
    ratio = torch.zeros(len(traj), dtype=torch.float64)
    ratio[images] = log_ratios(unet, scheduler, traj, images, steps_per_pass=steps_per_pass, steps=steps).double()
    residual = rebel_residual(ratio[pairs[:, 0]], ratio[pairs[:, 1]], targets.double(), eta)  # (P,)
    weight = 2.0 * residual / (eta * len(pairs))  # (P,)
    passes = 0
    for chunk in torch.arange(len(pairs)).split(pairs_per_micro_batch):
        index = torch.cat([pairs[chunk, 0], pairs[chunk, 1]])  # (2p,)
        for group in step_groups(steps, steps_per_pass):
            la, lb = steps_log_prob(unet, scheduler, traj, group, index=index).sum(dim=1).split(len(chunk))
            (weight[chunk].to(la.dtype) * (la - lb)).sum().backward()
            passes += len(index) * len(group)
    return passes


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.rebel_step", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="toy", help="built-in model (toy, tiny)")
    p.add_argument("--prompts", type=int, default=2, help="prompts in the step")
    p.add_argument("--images-per-prompt", type=int, default=4, help="k")
    p.add_argument("--num-steps", type=int, default=10, help="DDIM steps (those with std >= 0.1 train)")
    p.add_argument("--guidance-scale", type=float, default=3.0)
    p.add_argument("--steps-per-pass", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5, help="timed steps of each method, interleaved")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", default=None, help="JSON path (default: results/rebel_step_cpu_DATE.json, a new file)")
    args = p.parse_args(argv)
    for name in ("prompts", "repeats", "threads", "num_steps", "steps_per_pass"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.images_per_prompt < 2:
        p.error("--images-per-prompt must be >= 2 (REBEL needs pairs)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    torch.manual_seed(0)
    add_lora(pipe.unet, rank=4, alpha=4)
    params = [p for p in pipe.unet.parameters() if p.requires_grad]
    settings = SamplingSettings(num_steps=args.num_steps, guidance_scale=args.guidance_scale, ddim_eta=1.0)
    prompts = [f"a red circle on a {c} background" for c in ("blue", "green", "yellow", "black", "white", "purple")]
    prompts = (prompts * args.prompts)[: args.prompts]
    traj = sample_trajectories(pipe, prompts, images_per_prompt=args.images_per_prompt, settings=settings, seed=0)
    scheduler = make_scheduler(pipe, traj.settings)
    with torch.no_grad():  # off-policy, as every step after an epoch's first
        for p in params:
            p.add_(1e-2 * torch.randn_like(p))
    steps = trained_steps(traj.step_std.tolist(), 0.1)
    pairs = pair_indices(traj.group)
    targets = torch.randn(len(pairs), generator=torch.Generator().manual_seed(0))
    num_images, eta = len(traj), 4.0 / traj.latents[0, 0].numel()
    passes = {}

    def ours():
        rows = []
        hook = pipe.unet.register_forward_hook(lambda m, a, o: rows.append(len(a[0])))
        try:
            rebel_accumulate(
                StepModel(pipe.unet, scheduler, traj, steps_per_pass=args.steps_per_pass),
                pairs,
                targets,
                eta=eta,
                train_batch_size=num_images,
                steps=steps,
                ratio_steps=steps,
            )
        finally:
            hook.remove()
        cfg = 2 if args.guidance_scale > 1 else 1
        passes["per_image"] = sum(rows) // cfg  # image x step rows, forward (the pass that backpropagates)

    def theirs():
        passes["per_pair"] = per_pair_accumulate(
            pipe.unet, scheduler, traj, pairs, targets, eta=eta, pairs_per_micro_batch=len(pairs),
            steps=steps, steps_per_pass=args.steps_per_pass,
        )  # fmt: skip

    grads, seconds = {}, {"per_image": [], "per_pair": []}
    for name, fn in (("per_image", ours), ("per_pair", theirs)):  # warm-up, and the gradients compared
        fn()
        grads[name] = torch.cat([p.grad.flatten().double() for p in params])
        for p in params:
            p.grad = None
    for _ in range(args.repeats):
        for name, fn in (("per_image", ours), ("per_pair", theirs)):
            t0 = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - t0)
            for p in params:
                p.grad = None
    median = {k: statistics.median(v) for k, v in seconds.items()}
    result = {
        "benchmark": "rebel_step",
        "command": "python -m benchmarks.rebel_step " + " ".join(argv or []),
        "env": env.record("cpu"),
        "settings": {**vars(args), "pairs": len(pairs), "images": num_images, "trained_steps": len(steps)},
        "seconds": seconds,
        "median_seconds": median,
        "speedup_per_image_over_per_pair": median["per_pair"] / median["per_image"],
        "image_passes": passes,
        "gradient_relative_difference": float(
            (grads["per_image"] - grads["per_pair"]).norm() / grads["per_pair"].norm()
        ),
    }
    out = args.out or env.default_out("rebel_step", torch.device("cpu"))
    env.write_json(out, result)
    print(
        f"per image {median['per_image']:.3f} s, per pair {median['per_pair']:.3f} s a step "
        f"({result['speedup_per_image_over_per_pair']:.2f}x); image passes {passes}; "
        f"gradients differ by {result['gradient_relative_difference']:.1e}; wrote {out}"
    )
    return result


if __name__ == "__main__":
    main()
