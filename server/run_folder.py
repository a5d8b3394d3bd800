"""The coordinator's run folder: what it keeps so a run can be resumed, audited and built on.

    RUN_DIR/run.json                         run id, the run's config, fingerprints, how often it was resumed
    RUN_DIR/checkpoints/round-K.safetensors  the global trainable state after round K (what a resume starts from)
    RUN_DIR/history.json                     site reports and validation AUROCs of past rounds (a resumed summary)
    RUN_DIR/adapter/                         the latest global model as a plain PEFT adapter plus edfed's heads
    RUN_DIR/summary.json                     written at the end (server.summary)

In simulation the sites keep their ledgers/ here too; their note-derived caches stay in their own data folders
(client.site), never here. Everything in it is owner-only: the arrays are what the sites' budgets paid for.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from edfed.common.config import RUN_DEFAULTS
from edfed.common.errors import EdfedError
from edfed.common.files import atomic_write, atomic_write_text, latest_checkpoint, private_dir
from edfed.common.model import OutcomeModel
from edfed.server.strategy import CheckedAggregation


class RunFolder:
    """RUN_DIR: run.json (id + config), checkpoints/round-K.safetensors, history.json, adapter/ (PEFT)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.checkpoints = path / "checkpoints"

    @classmethod
    def open(cls, run_config: dict) -> tuple[RunFolder, dict, dict]:
        """The run's folder, its run.json, and the settings it runs with: a new run's own (missing keys take
        RUN_DEFAULTS), or, with `resume`, those the run was started with."""
        run_config = {**RUN_DEFAULTS, **run_config}
        folder = cls(Path(str(run_config["run-dir"]) or f"runs/federated-{datetime.now():%Y%m%d-%H%M%S}"))
        meta = folder.start(run_config)
        if run_config.get("resume"):
            run_config = {**RUN_DEFAULTS, **meta["config"], "resume": True}
        return folder, meta, run_config

    def start(self, run_config: dict) -> dict:
        meta_path = self.path / "run.json"
        if run_config.get("resume"):
            if not meta_path.exists():
                raise EdfedError(f"--resume {self.path}: no run.json there, nothing to resume")
            meta = json.loads(meta_path.read_text())
            meta["resumed"] = meta.get("resumed", 0) + 1
        else:
            if (self.path / "summary.json").exists() or self.checkpoints.exists():
                raise EdfedError(f"{self.path} already holds a run; use --resume {self.path} or another --out")
            meta = {"run-id": uuid.uuid4().hex[:12], "config": run_config, "started": datetime.now().isoformat()}
        private_dir(self.path)  # the coordinator's: arrays the sites' budgets paid for
        atomic_write_text(meta_path, json.dumps(meta, indent=1))
        return meta

    def record(self, meta: dict, facts: dict) -> None:
        meta.update(facts)
        atomic_write_text(self.path / "run.json", json.dumps(meta, indent=1))

    def save_history(self, strategy: CheckedAggregation, rounds: dict[int, dict]) -> None:
        """What the summary reports about past rounds, kept so that a resumed run's summary covers them."""
        history = {"reports": {str(k): v for k, v in strategy.reports.items()}, "rejected": strategy.rejected,
                   "rounds": {str(k): v for k, v in rounds.items()}}
        atomic_write_text(self.path / "history.json", json.dumps(history, indent=1))

    def load_history(self, strategy: CheckedAggregation, rounds: dict[int, dict], upto: int) -> None:
        path = self.path / "history.json"
        if not path.exists():
            return
        history = json.loads(path.read_text())
        strategy.reports.update({int(k): v for k, v in history["reports"].items() if int(k) <= upto})
        strategy.rejected.extend(r for r in history["rejected"] if r["round"] <= upto)
        rounds.update({int(k): v for k, v in history["rounds"].items() if int(k) <= upto})

    def last_round(self) -> tuple[int, dict[str, torch.Tensor] | None]:
        checkpoint = latest_checkpoint(self.path)
        if checkpoint is None:
            return 0, None
        return int(checkpoint.stem.split("-")[1]), load_file(checkpoint)

    def save_round(self, server_round: int, model: OutcomeModel, state: dict[str, torch.Tensor]) -> None:
        """The round's global state (for resume) and, as the latest, a plain PEFT adapter folder."""
        private_dir(self.checkpoints)
        atomic_write(self.checkpoints / f"round-{server_round}.safetensors",
                     lambda tmp: save_file({k: v.contiguous() for k, v in state.items()}, tmp))
        model.load_trainable_state(state)
        if isinstance(model.encoder, PeftModel):  # the GLM has no adapter: its encoder is the sites' own, unchanged
            model.encoder.save_pretrained(self.path / "adapter")
        # Everything outside the encoder, frozen parts too (compact's frozen projection and fusion are the seeded
        # ones, but the adapter folder should not depend on torch reproducing that seed).
        heads = {n: p.detach().contiguous() for n, p in model.named_parameters() if not n.startswith("encoder.")}
        private_dir(self.path / "adapter")
        atomic_write(self.path / "adapter" / "edfed_heads.safetensors", lambda tmp: save_file(heads, tmp))
