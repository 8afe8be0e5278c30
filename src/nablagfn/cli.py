"""The ``nablagfn`` command line: train, sample, eval, export, compare, pretrain."""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime
from pathlib import Path

from .errors import CheckpointError, ConfigError, NonFiniteLossError
from .files import atomic_write_text, strict_json


def _run_dir(out: str | None) -> Path:
    return Path(out) if out else Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


def _load_run(run_dir: Path, checkpoint: str | None = None, device: str | None = None):
    """A run rebuilt from RUN_DIR/config.yaml with the weights of its latest (or given) checkpoint, on ``device``
    (default: the run's own)."""
    from .train.run import load_run

    run = load_run(run_dir, checkpoint, device=device)
    run.progress = True
    return run, run.checkpoint


def _format_metrics(metrics: dict[str, float]) -> str:
    return "\n".join(f"  {key:24s} {value:.4f}" for key, value in metrics.items())


def cmd_train(args: argparse.Namespace) -> int:
    from .config_loading import load_config, parse_override
    from .train.trainer import CHANGEABLE_ON_RESUME, Trainer

    if args.resume:
        if args.config:
            raise ConfigError("--resume continues a run with its saved config; drop --config")
        for override in args.overrides:
            key = ".".join(parse_override(override)[0])
            if key not in CHANGEABLE_ON_RESUME:
                raise ConfigError(f"--resume: {key} cannot change in a run under way (it would rewrite its history); "
                                  f"the keys that can: {', '.join(CHANGEABLE_ON_RESUME)}")
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"{run_dir} is not a run directory (no config.yaml)")
        config = load_config(run_dir / "config.yaml", args.overrides)
        from .train.checkpoint import list_checkpoints

        if not list_checkpoints(run_dir):
            print(f"{run_dir} has no checkpoint yet (its first one was never finished): starting it again from "
                  "the beginning, with its saved config")
            args.resume = None
    else:
        config = load_config(args.config, args.overrides)
        run_dir = _run_dir(args.out)
        from .train.rundir import prepare_fresh_run

        prepare_fresh_run(run_dir, clear=False)  # refuse before any model is loaded
    trainer = Trainer.from_config(config, run_dir, progress=not args.no_progress)
    trainer.accept_config_changes = args.accept_config_changes
    processes = trainer.processes
    if not processes.is_main:  # one process writes the run directory and prints
        trainer.train(resume=bool(args.resume))
        return 0
    print(f"run directory: {run_dir}")
    from .train.run import describe_run

    print(describe_run(trainer.config))
    if processes.world_size > 1:
        print(f"training processes: {processes.world_size}, data shards: {trainer.config.train.data_shards}")
    metrics = trainer.train(resume=bool(args.resume))
    for name, path in trainer.outputs.items():
        if name != "eval.json":
            print(f"{name.removesuffix('.png')} figure: {path}")
    print("final metrics (finetuned):")
    print(_format_metrics(metrics))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import numpy as np

    run, checkpoint = _load_run(Path(args.run_dir), args.checkpoint, args.device)
    out = Path(args.out)
    images = len(run.backend.sample_shape) == 3
    if args.grid and (not images or out.suffix != ".png"):
        raise ConfigError(f"--grid writes one image grid of an image model: --out must be a .png file (got {out})")
    samples = run.sample(args.num, seed=args.seed, finetuned=not args.pretrained, split=args.split)
    if out.suffix == ".npy":
        out.parent.mkdir(parents=True, exist_ok=True)
        np.save(out, (run.decode(samples) if images else samples).cpu().numpy())
    elif args.grid:
        _save_grid(run.decode(samples), out)
    elif images:
        _save_pngs(run.decode(samples), out)
    else:
        raise ConfigError(f"--out {out}: vector backends write a .npy array")
    kind = "pretrained" if args.pretrained else f"finetuned ({checkpoint.name})"
    written = f"{out}/00000.png …" if images and out.suffix not in (".npy", ".png") else str(out)
    print(f"wrote {args.num} {kind} samples to {written}")
    return 0


def _save_grid(images, out: Path, min_side: int = 64) -> None:
    """One PNG of the images tiled in a near-square grid, each upscaled (nearest) to at least ``min_side`` pixels."""
    import math

    import torch.nn.functional as F
    from PIL import Image

    from .viz import tile_images

    scale = max(1, math.ceil(min_side / images.shape[-1]))
    upscaled = F.interpolate(images.float().cpu(), scale_factor=scale, mode="nearest")
    grid = tile_images(upscaled, columns=math.ceil(math.sqrt(len(images))), pad=2)
    pixels = (grid * 255).round().byte().numpy()
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(out)


def _save_pngs(images, out: Path) -> None:
    """One PNG per image (values in [0, 1]) into the directory ``out``."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    pixels = (images.float().clamp(0, 1) * 255).round().byte().cpu()
    for index, image in enumerate(pixels):
        array = image[0].numpy() if image.shape[0] == 1 else image.permute(1, 2, 0).numpy()
        Image.fromarray(array).save(out / f"{index:05d}.png")


def cmd_pretrain(args: argparse.Namespace) -> int:
    from .pretrain import pretrain_classifier, pretrain_digits, pretrain_digits_flow

    train, default_out, use = {
        "digits": (pretrain_digits, "digits_unet.safetensors", "model.weights"),
        "digits-flow": (pretrain_digits_flow, "digits_flow_unet.safetensors", "model.parameterization=flow model.weights"),
        "classifier": (pretrain_classifier, "digits_classifier.safetensors", "reward.weights"),
    }[args.what]
    out = Path(args.out or default_out)
    steps = {"steps": args.steps} if args.steps else {}
    result = train(out, seed=args.seed, progress=not args.no_progress, **steps)
    print(_format_metrics(result))
    print(f"wrote {out}; use it with {use}={out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    run, checkpoint = _load_run(Path(args.run_dir), args.checkpoint, args.device)
    results = {"checkpoint": str(checkpoint), "num_samples": args.num, "seed": args.seed, "split": args.split}
    results["finetuned"] = run.evaluate(args.num, seed=args.seed, finetuned=True, split=args.split)
    results["pretrained"] = run.evaluate(args.num, seed=args.seed, finetuned=False, split=args.split)
    default = Path(args.run_dir) / "evaluations" / f"{checkpoint.name}_{args.split}_n{args.num}_seed{args.seed}.json"
    out = Path(args.out) if args.out else default
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, strict_json(results, indent=1))
    for name in ("pretrained", "finetuned"):
        print(f"{name}:")
        print(_format_metrics(results[name]))
    print(f"wrote {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import LORA_FILE, export_lora

    out = export_lora(Path(args.run_dir), Path(args.out), args.checkpoint, merge=args.merge)
    if args.merge:
        print(f"wrote a diffusers pipeline with the LoRA fused to {out}; "
              f"load it with diffusers' from_pretrained as {out / 'README.md'} shows")
    else:
        print(f"wrote {out / LORA_FILE}; load it with pipe.load_lora_weights({str(out)!r})")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare

    # `--seeds 0 1 key=value …`: the list options swallow the overrides that follow them; give them back
    overrides = [*args.overrides, *(v for v in (args.methods or []) + (args.seeds or []) if "=" in v)]

    def split(values: list[str] | None) -> list[str] | None:  # "--methods a b" and "--methods a,b" alike
        if values is None:
            return None
        return [item for value in values if "=" not in value for item in value.split(",") if item]

    seeds = split(args.seeds)
    try:
        seeds = None if seeds is None else [int(seed) for seed in seeds]
    except ValueError:
        raise ConfigError(f"--seeds takes integers (got {' '.join(split(args.seeds))})") from None
    out = Path(args.out) if args.out else Path("runs") / f"compare-{datetime.now():%Y%m%d}"
    if args.report_only and (args.config or args.settings or overrides):
        raise ConfigError("--report-only reads the runs under --out; drop --config, --settings and overrides")
    try:
        return compare(out, split(args.methods), seeds, args.config, args.settings, overrides, args.jobs,
                       progress=not args.no_progress, report_only=args.report_only)
    except KeyboardInterrupt:
        print(f"nablagfn: interrupted; rerun the same command with --out {out} to resume", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nablagfn",
        description="Reward finetuning of diffusion models with residual ∇-DB (Nabla-GFlowNet) and baselines.",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (or NABLAGFN_DEBUG=1)")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="finetune a model (defaults: the built-in digits model toward the digit 3 with residual ∇-DB)",
                                description="Finetune. Config = defaults ← --config YAML ← key=value overrides.")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. method.beta=2.0")
    train.add_argument("--config", help="YAML config file (see docs/config.md)")
    train.add_argument("--out", help="run directory (default: runs/<date-time>)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its last checkpoint")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--accept-config-changes", action="store_true",
                       help="with --resume: go on although RUN_DIR/config.yaml was edited since the checkpoint")
    train.set_defaults(func=cmd_train)

    sample = commands.add_parser("sample", help="draw samples from a trained run")
    sample.add_argument("run_dir")
    sample.add_argument("--num", type=int, default=1000, help="number of samples (default 1000)")
    sample.add_argument("--out", required=True,
                        help="a .npy file (an array), or for image models a directory of PNG files")
    sample.add_argument("--pretrained", action="store_true", help="sample the pretrained model instead")
    sample.add_argument("--grid", action="store_true", help="write one upscaled image grid to --out (a .png file)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--checkpoint", help="a checkpoint directory (default: the run's latest)")
    sample.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: the run's train.device)")
    sample.add_argument("--split", choices=["train", "eval"], default="train",
                        help="prompts to condition on: training ones, or the held-out ones (model.prompts.held_out)")
    sample.set_defaults(func=cmd_sample)

    evaluate = commands.add_parser("eval", help="metrics of a trained run, finetuned and pretrained")
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--num", type=int, default=10_000, help="evaluation samples (default 10000)")
    evaluate.add_argument("--seed", type=int, default=1234)
    evaluate.add_argument("--checkpoint", help="a checkpoint directory (default: the run's latest)")
    evaluate.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: the run's train.device)")
    evaluate.add_argument("--out", help="JSON output (default RUN_DIR/evaluations/<checkpoint>_<split>_n<num>_seed<seed>.json; "
                          "the training's own eval.json is left as it is)")
    evaluate.add_argument("--split", choices=["train", "eval"], default="train",
                        help="prompts to condition on: training ones, or the held-out ones (model.prompts.held_out)")
    evaluate.set_defaults(func=cmd_eval)

    export = commands.add_parser(
        "export", help="write a Stable Diffusion run's LoRA for diffusers (or a pipeline with it fused)",
        description="Write RUN_DIR's LoRA as diffusers loads it (pipe.load_lora_weights(OUT)), or with --merge the "
        "base pipeline with the LoRA fused (DiffusionPipeline.from_pretrained(OUT)); plus a model card.",
    )
    export.add_argument("run_dir")
    export.add_argument("--out", required=True, help="directory to write")
    export.add_argument("--checkpoint", help="a checkpoint directory (default: the run's latest)")
    export.add_argument("--merge", action="store_true", help="write the full pipeline with the LoRA fused")
    export.set_defaults(func=cmd_export)

    compare = commands.add_parser(
        "compare", help="train a grid of methods × seeds alike and write a report (Table 1, trade-off figures)",
        description="Train every (method, seed) with the same config (defaults ← --config ← key=value overrides ← "
        "the method's --settings) and write OUT/results.md, summary.json, curves.png, pareto.png and grids.png. "
        "Resumable: rerunning skips finished runs and resumes unfinished ones. See docs/compare.md.",
    )
    compare.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides for every run")
    compare.add_argument("--methods", nargs="+", metavar="METHOD",
                         help="method names, space- or comma-separated (default: all 13)")
    compare.add_argument("--seeds", nargs="+", metavar="SEED", help="train.seed values (default: 0 1 2)")
    compare.add_argument("--config", help="YAML config file for every run (see docs/config.md)")
    compare.add_argument("--settings", metavar="FILE",
                         help="YAML mapping method name → list of key=value overrides for that method "
                         "(e.g. configs/compare_digits.yaml)")
    compare.add_argument("--out", help="report directory (default: runs/compare-<date>)")
    compare.add_argument("--jobs", type=int, default=1, help="runs trained in parallel processes, one thread each")
    compare.add_argument("--report-only", action="store_true",
                         help="rebuild the report from the run directories under --out, without training")
    compare.add_argument("--no-progress", action="store_true", help="no progress bars (the per-run lines stay)")
    compare.set_defaults(func=cmd_compare)

    pretrain = commands.add_parser(
        "pretrain", help="rebuild the shipped digits models or classifier (seeded)",
        description="Train the built-in digits diffusion model (digits), its rectified flow (digits-flow) or the digits "
        "classifier from scikit-learn's digits.",
    )
    pretrain.add_argument("what", choices=["digits", "digits-flow", "classifier"])
    pretrain.add_argument("--out", help="safetensors file (default: ./digits_unet.safetensors, "
                          "./digits_flow_unet.safetensors or ./digits_classifier.safetensors)")
    pretrain.add_argument("--steps", type=int, help="optimiser steps (default 4000 for digits and digits-flow, 3000 for "
                          "the classifier)")
    pretrain.add_argument("--seed", type=int, default=0)
    pretrain.add_argument("--no-progress", action="store_true", help="no progress bar")
    pretrain.set_defaults(func=cmd_pretrain)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command; every error ends in one ``nablagfn: error: …`` line (exit 2; 130 when interrupted), its traceback
    only with ``--debug`` or ``NABLAGFN_DEBUG=1``."""
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("NABLAGFN_DEBUG", "") not in ("", "0")
    if getattr(args, "num", 1) < 1:
        print("nablagfn: error: --num must be ≥ 1", file=sys.stderr)
        return 2
    if args.command == "eval" and args.num < 2:
        print("nablagfn: error: eval --num must be ≥ 2 (the metrics compare samples with each other)", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("nablagfn: interrupted; resume with `nablagfn train --resume RUN_DIR`", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 — each kind gets its one line below
        if debug:
            raise
        print(f"nablagfn: error: {_one_line(error)}", file=sys.stderr)
        return 2


def _one_line(error: Exception) -> str:
    """The one-line message of an error: ours as they are; a file-system error naming its file; anything else with
    its kind and how to see the traceback."""
    if isinstance(error, (ConfigError, CheckpointError, NonFiniteLossError)):
        return str(error)  # written for the user (an invalid config lists its keys one per line)
    text = " ".join(str(error).split())
    if isinstance(error, OSError):
        where = f" ({error.filename})" if getattr(error, "filename", None) else ""
        return f"{error.strerror or text}{where}; check the path, its permissions and free space"
    if isinstance(error, MemoryError) or any(sign in text.lower() for sign in ("out of memory", "can't allocate memory")):
        return ("out of memory; ask for fewer samples at once (--num, train.eval_samples, model.sample_batch_size) "
                "or a smaller batch")
    return (f"unexpected {type(error).__name__}: {text[:500]} (if this looks like a bug, rerun with --debug for the "
            "traceback and report it)")


if __name__ == "__main__":
    sys.exit(main())
