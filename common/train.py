"""The local training steps and evaluation, shared by centralized, federated and DP runs.

`train_epoch` is the step the full and compact models run; DP-SGD wraps the same model, optimizer and loader with
Opacus and FedProx passes a proximal term, but neither gets a loop of its own. Patient-level DP adds one line to it:
a batch's patient index goes to the optimizer, which clips per patient.

`glm_step` is the DP model's (architecture "glm"): one full-batch gradient step of its logistic regression, with
Gaussian noise when the site trains with DP. Its features are bounded by construction (common.model.glm_inputs),
so one patient's gradient is bounded exactly and nothing is clipped.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich.progress import Progress
from torch.utils.data import DataLoader

from edfed.common.config import TrainConfig, resolve_device
from edfed.common.data import VisitDataset
from edfed.common.display import Phases, progress_bar
from edfed.common.errors import EdfedError
from edfed.common.files import atomic_write
from edfed.common.metrics import evaluate
from edfed.common.model import OutcomeModel, build_model
from edfed.common.privacy import GaussianNoise

LEXICAL_LR_SCALE = 10.0


def make_loader(dataset: VisitDataset, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=dataset.collate,
                      generator=generator)


def on_model_device(model: OutcomeModel, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch on the model's device (common.config.resolve_device); on the CPU, the batch itself."""
    device = next(model.parameters()).device
    return batch if device.type == "cpu" else {k: v.to(device) for k, v in batch.items()}


def cache_frozen_layers(model: OutcomeModel, dataset: VisitDataset, batch_size: int = 64,
                        progress: Progress | None = None) -> bool:
    """Run the frozen lower encoder layers once per visit and keep their output on the dataset.

    Visits are batched in order of length, so almost no compute goes to padding. Returns False
    (and caches nothing) when the model has no text branch or an encoder it cannot split.
    """
    if not (model.config.cache_frozen and model.can_split) or dataset.token_ids is None:
        return False
    order = np.argsort([len(t) for t in dataset.token_ids], kind="stable")
    hidden: list[torch.Tensor | None] = [None] * len(dataset)
    task = progress.add_task("caching frozen layers", total=len(dataset), status="") if progress else None
    dataset.frozen_hidden = None
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = on_model_device(model, dataset.collate([dataset[i] for i in idx]))
        out = model.lower(batch["input_ids"], batch["attention_mask"]).cpu()  # the cache lives in host memory
        for row, i in enumerate(idx):
            hidden[i] = out[row, : len(dataset.token_ids[i])].clone()
        if progress:
            progress.advance(task, len(idx))
    dataset.frozen_hidden = hidden
    return True


def train_epoch(model: OutcomeModel, loader: Iterable[dict], optimizer: torch.optim.Optimizer,
                proximal_mu: float = 0.0, global_state: dict[str, torch.Tensor] | None = None,
                progress: Progress | None = None, description: str = "training") -> dict[str, float]:
    """One pass over `loader`: mean per-example loss, one optimizer step a batch.

    FedProx's proximal term mu/2 * ||w - w_global||^2 is applied as its own decoupled step after each
    optimizer step (like decoupled weight decay, towards the global model). It uses no data, so it
    works the same with and without DP (Opacus would otherwise overwrite its gradient).
    """
    model.train()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    lr = optimizer.param_groups[0]["lr"]
    total_loss, seen, started = 0.0, 0, time.perf_counter()
    task = progress.add_task(description, total=len(loader), status="") if progress else None
    for batch in loader:
        if len(batch["labels"]) == 0:  # Poisson sampling (DP) can draw an empty batch
            continue
        patients = batch.pop("patient", None)
        if patients is not None:  # patient-level DP: the optimizer clips each patient's summed gradient
            optimizer.group_by(patients)
        optimizer.zero_grad(set_to_none=True)
        losses = model.training_loss(on_model_device(model, batch))
        losses.mean().backward()
        optimizer.step()
        if proximal_mu > 0 and global_state is not None:
            with torch.no_grad():
                for name, param in trainable:
                    param.sub_(lr * proximal_mu * (param - global_state[name]))
        total_loss += float(losses.detach().sum())
        seen += len(losses)
        if progress:
            progress.update(task, advance=1, status=f"loss {total_loss / max(seen, 1):.3f}")
    seconds = time.perf_counter() - started
    return {"loss": total_loss / max(seen, 1), "examples": seen, "seconds": seconds,
            "examples_per_second": seen / max(seconds, 1e-9)}


@dataclass
class GLMRows:
    """A split as the GLM trains on it: its fixed features, labels, and each visit's weight in the loss."""

    features: torch.Tensor  # [n, width], every block of norm <= 1
    labels: torch.Tensor  # [n, outcomes], NaN where unknown
    weights: torch.Tensor  # [n]: 1/k for each of a patient's k visits (unit "patient"), or 1 (unit "visit")

    @property
    def units(self) -> float:
        return float(self.weights.sum())


@torch.no_grad()
def glm_rows(model: OutcomeModel, dataset: VisitDataset, unit: str = "patient", batch_size: int = 256) -> GLMRows:
    """The GLM's features of `dataset`, once (they do not change while it trains): its frozen pass is the cache's."""
    model.eval()
    features = torch.cat([model.glm_inputs(batch) for batch in make_loader(dataset, batch_size, shuffle=False)])
    if unit == "patient":
        if dataset.patient_ids is None:
            raise EdfedError("patient-level DP: these visits have no patient_id")
        _, inverse, counts = np.unique(dataset.patient_ids.astype(str), return_inverse=True, return_counts=True)
        weights = torch.from_numpy(1.0 / counts[inverse]).float()
    else:
        weights = torch.ones(len(dataset))
    return GLMRows(features, dataset.labels, weights)


@torch.no_grad()
def glm_gradient_sum(model: OutcomeModel, rows: GLMRows) -> tuple[torch.Tensor, torch.Tensor]:
    """The weighted sum over visits of the loss gradient (weight [outcomes, width], bias [outcomes]).

    The loss is `per_example_loss`'s (cross-entropy summed over outcomes, a missing label adds nothing): its
    gradient in the logits is sigmoid - label, in [-1, 1], so a unit of total weight 1 moves the sum by at most
    `model.glm_sensitivity`.
    """
    logits = rows.features @ model.glm.weight.T + model.glm.bias
    # A logit the global model made NaN counts as 0: each residual stays in [-1, 1] whatever the weights, so the
    # bound holds for any global model and no NaN, which no noise hides, can reach the sum.
    probability = torch.sigmoid(torch.nan_to_num(logits, nan=0.0))
    known = ~torch.isnan(rows.labels)
    residual = torch.where(known, probability - torch.nan_to_num(rows.labels), 0.0) * rows.weights[:, None]
    return residual.T @ rows.features, residual.sum(dim=0)


@torch.no_grad()
def glm_noisy_gradient(model: OutcomeModel, rows: GLMRows, noise_multiplier: float = 0.0,
                       noise: GaussianNoise | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient sum (`glm_gradient_sum`) plus, with DP, Gaussian noise of standard deviation noise_multiplier *
    sensitivity on every coordinate (the Gaussian mechanism at sample rate 1), drawn by `noise` (the site's own)."""
    weight_sum, bias_sum = glm_gradient_sum(model, rows)
    if noise_multiplier > 0:
        if noise is None:
            raise EdfedError("a DP step needs the site's noise source")
        scale = noise_multiplier * model.glm_sensitivity
        weight_sum += noise(tuple(weight_sum.shape), scale)
        bias_sum += noise(tuple(bias_sum.shape), scale)
    return weight_sum, bias_sum


@torch.no_grad()
def glm_apply(model: OutcomeModel, weight_sum: torch.Tensor, bias_sum: torch.Tensor, divisor: float) -> None:
    """w -= lr * (gradient sum / divisor + l2 * w), in place: post-processing of a (noisy) gradient sum."""
    config = model.config
    model.glm.weight -= config.glm_lr * (weight_sum / divisor + config.glm_l2 * model.glm.weight)
    model.glm.bias -= config.glm_lr * (bias_sum / divisor + config.glm_l2 * model.glm.bias)


def glm_step(model: OutcomeModel, rows: GLMRows, divisor: float, noise_multiplier: float = 0.0,
             noise: GaussianNoise | None = None) -> None:
    """One full-batch gradient step of the GLM, in place: w -= lr * ((gradient sum + noise) / divisor + l2 * w).

    `divisor`: with DP, a public constant of the site's (its declared size), never a count of its rows.
    """
    glm_apply(model, *glm_noisy_gradient(model, rows, noise_multiplier, noise), divisor)


@torch.no_grad()
def predict(model: OutcomeModel, dataset: VisitDataset, batch_size: int = 128) -> np.ndarray:
    """Predicted probability of each outcome: [n_visits, 3]."""
    model.eval()
    loader = make_loader(dataset, batch_size, shuffle=False)
    return np.concatenate([torch.sigmoid(model(on_model_device(model, batch))).cpu().numpy() for batch in loader])


def make_optimizer(model: OutcomeModel, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over what trains. The lexical path steps LEXICAL_LR_SCALE times larger: a linear model on sparse
    unit-norm n-gram vectors, each weight seeing only the few visits that use its n-gram, is far from fitted after
    the epochs that fit the dense layers (the lexical path's learning rates: docs/results.md)."""
    lexical = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("lexical.")]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("lexical.")]
    groups = [{"params": rest}] + ([{"params": lexical, "lr": lr * LEXICAL_LR_SCALE}] if lexical else [])
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def fit_model(config: TrainConfig, train: pd.DataFrame, val: pd.DataFrame, tokenizer,
              show_progress: bool = True, initial_state: dict[str, torch.Tensor] | None = None,
              precision: str | None = None, phases: Phases | None = None,
              device: str | None = None) -> tuple[OutcomeModel, list[dict]]:
    """Train on `train` without DP, keeping the epoch with the best mean validation AUROC: central training, a
    site's local-only model and a site's personalization all train here.

    From `initial_state` (a federation's global model, fine-tuned at one site), the starting point is
    epoch 0 and a candidate too, so fine-tuning never ends worse on validation than where it began.
    `device`: auto, cpu or cuda (default: the run settings' `device`); the GLM trains on the CPU, and the model is
    returned there, so what callers save or send is unchanged.
    """
    target = resolve_device(device)  # first: `cuda` where there is none fails before any work
    model = build_model(config, initial_state, precision)
    if not config.glm:
        model.to(target)
    train_set, val_set = VisitDataset(train, tokenizer, config), VisitDataset(val, tokenizer, config)
    history, best, best_state = [], -np.inf, None
    phases = phases or Phases(quiet=True)
    with progress_bar(show_progress) as progress:
        with phases("frozen-layer caching"):
            cache_frozen_layers(model, train_set, progress=progress)
            cache_frozen_layers(model, val_set, progress=progress)
        if config.glm:
            rows = glm_rows(model, train_set)
        else:
            optimizer = make_optimizer(model, config.lr, config.weight_decay)
        for epoch in range(0 if initial_state is None else -1, config.epochs):
            stats = {}
            if epoch >= 0 and config.glm:  # an epoch of the GLM: glm_steps full-batch steps, without noise
                started = time.perf_counter()
                for _ in range(config.glm_steps):
                    glm_step(model, rows, rows.units)
                stats = {"seconds": time.perf_counter() - started}
            elif epoch >= 0:
                loader = make_loader(train_set, config.batch_size, shuffle=True, seed=config.seed + epoch)
                stats = train_epoch(model, loader, optimizer, progress=progress,
                                    description=f"epoch {epoch + 1}/{config.epochs}")
            val_metrics = evaluate(val_set.labels.numpy(), predict(model, val_set), bootstrap=0)
            aurocs = [m["auroc"] for m in val_metrics.values() if not np.isnan(m["auroc"])]
            val_auroc = float(np.mean(aurocs)) if aurocs else float("nan")
            history.append({"epoch": epoch + 1, **stats, "val_mean_auroc": val_auroc,
                            "val_auroc": {o: m["auroc"] for o, m in val_metrics.items()}})
            if epoch >= 0:
                phases.line(f"epoch {epoch + 1}/{config.epochs}: {stats['seconds']:.0f} s, "
                            f"val mean AUROC {val_auroc:.3f}")
            # A validation split too small to have both classes gives no AUROC: that epoch ranks last, and
            # with no AUROC in any epoch the last epoch is kept.
            score = val_auroc if aurocs else -np.inf
            if best_state is None or score > best or score == best == -np.inf:
                best, best_state = score, model.trainable_state()
    model.load_trainable_state(best_state)
    return model.cpu(), history


def save_trainable_state(model: OutcomeModel, path: Path) -> Path:
    """The trained arrays (adapters, tower, fusion, heads; not the encoder), atomically, for audits and reuse."""
    from safetensors.torch import save_file

    return atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in model.trainable_state().items()},
                                                    str(tmp)))
