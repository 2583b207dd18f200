"""Checkpoints of a ``CloudTrainer``: everything needed to resume (model, optimizer, schedule, steps,
RNG), written by DeepSpeed itself (per rank, ZeRO-partitioned) or, for the torch engine, as one
``trainer_state.pt``; a ``cloud_engine.json`` beside each tag says which engine and ZeRO stage wrote
it, so a checkpoint is never loaded into a trainer that would misread it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .world import process_rank

LATEST = "latest"  # DeepSpeed's name for the file holding the newest checkpoint tag; used for both engines
META_NAME = "cloud_engine.json"  # beside each checkpoint tag: settings, steps, time
TORCH_STATE_NAME = "trainer_state.pt"  # the torch engine's checkpoint inside a tag folder


class CheckpointError(ValueError):
    """A checkpoint folder is missing, or was written by a different engine or ZeRO stage."""


class TrainerCheckpoints:
    """``save_checkpoint`` / ``load_checkpoint`` of ``CloudTrainer`` (a mixin: they read and restore
    the trainer's engine, module, optimizer and schedule)."""

    def _meta(self) -> dict:
        return {"settings": self.settings.model_dump(mode="json"), "micro_steps": self.micro_steps,
                "optimizer_steps": self.optimizer_steps, "optimizer": self.optimizer_kind,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def save_checkpoint(self, directory: str | Path) -> Path:
        """Everything needed to resume (model, optimizer, schedule, steps, RNG) under
        ``directory/step<N>``; ``directory/latest`` names the newest tag. DeepSpeed writes its own
        (per-rank, ZeRO-partitioned) checkpoint; the torch engine one ``trainer_state.pt``."""
        self._check_open()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tag = f"step{self.optimizer_steps}"
        client = {"micro_steps": self.micro_steps, "torch_rng": torch.get_rng_state()}
        if self._engine is not None:
            self._engine.save_checkpoint(str(directory), tag=tag, client_state=client)
        else:
            (directory / tag).mkdir(exist_ok=True)
            state = {
                "model": self._module.state_dict(),
                "optimizer": self._optimizer.state_dict(),
                "scheduler": self._scheduler.state_dict() if self._scheduler is not None else None,
                "optimizer_steps": self._optimizer_steps,
                **client,
            }
            torch.save(state, directory / tag / TORCH_STATE_NAME)
            (directory / LATEST).write_text(tag)
        if process_rank() == 0:
            (directory / tag / META_NAME).write_text(json.dumps(self._meta(), indent=2) + "\n")
        return directory / tag

    def load_checkpoint(self, directory: str | Path) -> int:
        """Resume from the newest checkpoint in ``directory`` (written by the same engine and ZeRO
        stage); returns the optimizer step it was saved at."""
        self._check_open()
        directory = Path(directory)
        if not (directory / LATEST).is_file():
            raise CheckpointError(f"'{directory}' holds no checkpoint (no '{LATEST}' file)")
        tag = (directory / LATEST).read_text().strip()
        meta_path = directory / tag / META_NAME
        if not meta_path.is_file():
            raise CheckpointError(f"checkpoint '{directory / tag}' has no {META_NAME}")
        saved = json.loads(meta_path.read_text())["settings"]
        for key in ("engine", "zero_stage"):
            if saved[key] != getattr(self.settings, key):
                raise CheckpointError(
                    f"checkpoint '{directory / tag}' was written with cloud.{key}={saved[key]!r}, this trainer "
                    f"has cloud.{key}={getattr(self.settings, key)!r}; resume with the same settings, or start "
                    "from its exported Hugging Face folder instead")
        if self._engine is not None:
            path, client = self._engine.load_checkpoint(str(directory), tag=tag)
            if path is None:
                raise CheckpointError(f"DeepSpeed could not load checkpoint '{directory / tag}'")
        else:
            # CPU first (the RNG state must stay a CPU tensor); load_state_dict moves to the model's device
            client = torch.load(directory / tag / TORCH_STATE_NAME, map_location="cpu", weights_only=False)
            self._module.load_state_dict(client["model"])
            self._optimizer.load_state_dict(client["optimizer"])
            if self._scheduler is not None and client["scheduler"] is not None:
                self._scheduler.load_state_dict(client["scheduler"])
            self._optimizer_steps = client["optimizer_steps"]
        self.micro_steps = int(client["micro_steps"])
        torch.set_rng_state(client["torch_rng"])
        return self.optimizer_steps
