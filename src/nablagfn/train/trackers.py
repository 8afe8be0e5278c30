"""Experiment trackers (TensorBoard, Weights & Biases) through accelerate's tracker classes, on the main process.

``metrics.jsonl`` is always written; the trackers get the same records, and a grid of evaluation samples at each
evaluation. TensorBoard writes under ``RUN_DIR/tensorboard/``; a resumed run drops the events logged after its
checkpoint (``purge_step``), as ``metrics.jsonl`` does. W&B resumes the same run (its id is kept in
``RUN_DIR/wandb_id.txt``) and works offline with ``WANDB_MODE=offline``.
"""

from __future__ import annotations

import importlib.util
import json
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import ConfigError, RunConfig
from ..config_loading import flatten

if TYPE_CHECKING:
    from .run import Run

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
SAMPLE_GRID = 16  # images logged at each evaluation
SAMPLE_SEED = 1234  # the evaluation's sampling seed: the grid shows the same noise every time


class Trackers:
    def __init__(self, config: RunConfig, run_dir: Path):
        self.config = config
        self.run_dir = Path(run_dir)
        self.trackers: list = []
        for name in config.train.trackers:
            if importlib.util.find_spec(PACKAGES[name]) is None:
                raise ConfigError(
                    f"train.trackers includes {name!r} but the {PACKAGES[name]} package is not installed "
                    f"(pip install {PACKAGES[name]}, or pip install -e '.[trackers]')"
                )

    def start(self, resume: bool, update: int = 0) -> None:
        """Open the configured trackers; on resume, continue the same runs from ``update``."""
        from accelerate.tracking import TensorBoardTracker, WandBTracker

        # trackers take scalars: a list or None goes as its JSON text
        hyperparameters = {key: json.dumps(value) if isinstance(value, list) or value is None else value
                           for key, value in flatten(json.loads(self.config.model_dump_json())).items()}
        for name in self.config.train.trackers:
            if name == "tensorboard":
                tracker = TensorBoardTracker("tensorboard", self.run_dir, purge_step=update + 1 if resume else None)
            else:
                id_file = self.run_dir / "wandb_id.txt"
                if not id_file.is_file():
                    id_file.write_text(uuid.uuid4().hex[:16])
                tracker = WandBTracker(self.config.train.project, name=self.run_dir.name, dir=str(self.run_dir),
                                       id=id_file.read_text().strip(), resume="allow")
            tracker.start()
            if not resume:
                tracker.store_init_configuration(hyperparameters)
            self.trackers.append(tracker)

    def log(self, record: dict) -> None:
        values = {key: value for key, value in record.items() if key != "update"}
        for tracker in self.trackers:
            tracker.log(values, step=record["update"])

    def log_samples(self, run: Run, update: int) -> None:
        """A grid of the finetuned model's samples at this evaluation (image models only), each captioned with its
        prompt (text models) and log-reward: W&B as image captions, TensorBoard as a text table beside the grid."""
        if not self.trackers or len(run.backend.sample_shape) == 1:
            return
        states, cond = run.sample_with_conditions(SAMPLE_GRID, seed=SAMPLE_SEED)
        images = run.decode(states).clamp(0, 1).float()
        captions = sample_captions(run, images, cond)
        images = images.cpu()
        for tracker in self.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({"samples": images}, step=update, dataformats="NCHW")
                table = "\n".join(f"| {index} | {caption} |" for index, caption in enumerate(captions))
                tracker.writer.add_text("samples/captions", "| sample | caption |\n| --- | --- |\n" + table,
                                        global_step=update)
            else:
                import wandb

                tracker.log({"samples": [wandb.Image(image.permute(1, 2, 0).numpy(), caption=caption)
                                         for image, caption in zip(images, captions)]}, step=update)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []



def sample_captions(run: Run, images, cond) -> list[str]:
    """``"<prompt> · log R <value>"`` per sample (no prompt for models without text)."""
    log_rewards = run.reward.log_reward(images, cond).tolist()
    prompts = [run.backend.prompts[i] for i in cond.tolist()] if run.backend.prompts else [""] * len(log_rewards)
    return [f"{prompt} · log R {value:.3g}" if prompt else f"log R {value:.3g}"
            for prompt, value in zip(prompts, log_rewards)]
