"""An empirical membership-inference audit: does the trained model tell its training visits apart?

DP's epsilon is a worst-case bound; this measures what a simple attacker actually gets. The attack
is the shadow-free loss threshold (Yeom et al. 2018): a visit whose loss under the model is low is
guessed to be a training visit. Members are one site's training split, non-members its held-out
test split (never used to fit or select the model), balanced by subsampling so that AUROC is not
skewed by the 70/20 split sizes. AUROC 0.5 means the attacker learns nothing; TPR at a low FPR is
what matters for the few visits most at risk (Carlini et al. 2022).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from edfed.common.config import TrainConfig
from edfed.common.data import VisitDataset, load_site_splits, site_files
from edfed.common.errors import EdfedError
from edfed.common.features import load_tokenizer
from edfed.common.files import atomic_write_text, latest_checkpoint
from edfed.common.model import OutcomeModel, build_model, per_example_loss
from edfed.common.train import cache_frozen_layers, make_loader

MIN_PER_SIDE = 5  # fewer members or non-members than this and the AUROC is noise


@torch.no_grad()
def per_example_scores(model: OutcomeModel, dataset: VisitDataset, batch_size: int = 128) -> tuple[np.ndarray, ...]:
    """(loss, confidence) per visit: mean BCE over the outcomes with a label, and the mean probability
    the model gives the true label. A visit with no label at all gets NaN (nothing to attack).

    The loss is the fused prediction's (`per_example_loss`), what anyone who can query the model sees,
    divided by the labels present, so that a death (no readmission label) is not "member-like" by count.
    """
    model.eval()
    losses, confidences = [], []
    for batch in make_loader(dataset, batch_size, shuffle=False):
        logits, labels = model(batch), batch["labels"]
        known = (~torch.isnan(labels)).sum(dim=1).float()
        p_true = torch.where(torch.nan_to_num(labels) > 0.5, torch.sigmoid(logits), 1 - torch.sigmoid(logits))
        p_true = torch.where(torch.isnan(labels), torch.zeros_like(p_true), p_true)
        losses.append((per_example_loss(logits, labels) / known).numpy())  # 0/0 -> NaN when no label
        confidences.append((p_true.sum(dim=1) / known).numpy())
    return np.concatenate(losses), np.concatenate(confidences)


def _balanced(members: np.ndarray, nonmembers: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The two index sets, the larger subsampled (fixed seed) to the size of the smaller."""
    rng = np.random.default_rng(seed)
    n = min(len(members), len(nonmembers))
    return tuple(np.sort(rng.choice(x, n, replace=False)) if len(x) > n else x for x in (members, nonmembers))


def membership_attack(member_loss: np.ndarray, nonmember_loss: np.ndarray, seed: int = 0,
                      member_confidence: np.ndarray | None = None,
                      nonmember_confidence: np.ndarray | None = None) -> dict:
    """Loss-threshold attack (score = -loss, members = 1) on balanced sets: AUROC, TPR at FPR 1% / 10%,
    the best threshold's balanced accuracy; with confidences also the confidence attack's AUROC."""
    member_loss, nonmember_loss = np.asarray(member_loss, float), np.asarray(nonmember_loss, float)
    keep_m, keep_n = ~np.isnan(member_loss), ~np.isnan(nonmember_loss)
    if keep_m.sum() < MIN_PER_SIDE or keep_n.sum() < MIN_PER_SIDE:
        raise EdfedError(f"membership audit needs at least {MIN_PER_SIDE} labelled members and non-members, "
                         f"got {int(keep_m.sum())} and {int(keep_n.sum())}")
    idx_m, idx_n = _balanced(np.flatnonzero(keep_m), np.flatnonzero(keep_n), seed)
    is_member = np.r_[np.ones(len(idx_m)), np.zeros(len(idx_n))]
    score = -np.r_[member_loss[idx_m], nonmember_loss[idx_n]]
    fpr, tpr, _ = roc_curve(is_member, score)
    result = {
        "attack": "loss threshold (shadow-free): score = -loss, members = 1",
        "n_members": int(len(idx_m)), "n_nonmembers": int(len(idx_n)),
        "auroc": float(roc_auc_score(is_member, score)),
        # The best TPR the attacker reaches while wrongly flagging at most 1% / 10% of non-members.
        # With n non-members the FPR moves in steps of 1/n, so with n < 100 "1%" means "none".
        "tpr_at_fpr_1pct": float(tpr[fpr <= 0.01].max()),
        "tpr_at_fpr_10pct": float(tpr[fpr <= 0.10].max()),
        "best_balanced_accuracy": float(np.max((tpr + 1 - fpr) / 2)),
        "mean_loss_members": float(member_loss[idx_m].mean()),
        "mean_loss_nonmembers": float(nonmember_loss[idx_n].mean()),
        "seed": seed,
    }
    if member_confidence is not None and nonmember_confidence is not None:
        conf = np.r_[np.asarray(member_confidence)[idx_m], np.asarray(nonmember_confidence)[idx_n]]
        result["confidence_auroc"] = float(roc_auc_score(is_member, conf))
    return result


def audit_model(model: OutcomeModel, members: pd.DataFrame, nonmembers: pd.DataFrame, tokenizer,
                seed: int = 0) -> dict:
    """The membership attack on `model` with `members` (training visits) vs `nonmembers` (held-out)."""
    scores = []
    for table in (members, nonmembers):
        dataset = VisitDataset(table, tokenizer, model.config)
        cache_frozen_layers(model, dataset)
        scores.append(per_example_scores(model, dataset))
    (loss_m, conf_m), (loss_n, conf_n) = scores
    return membership_attack(loss_m, loss_n, seed, conf_m, conf_n)


def _config_and_data(summary: dict, run_dir: Path) -> tuple[TrainConfig, Path]:
    """The run's TrainConfig and data folder, from a central or federated summary.json."""
    config = summary.get("config", {})
    if summary.get("kind") == "federated":
        train, data = config.get("train"), config.get("data-dir")
    elif summary.get("kind") == "central":
        train, data = config, config.get("data")
    else:
        raise EdfedError(f"{run_dir}: summary.json is of kind {summary.get('kind')!r}; the membership audit "
                         "needs a central or federated run")
    if not train or not data:
        raise EdfedError(f"{run_dir}: summary.json does not record the run's training config and data folder")
    fields = set(TrainConfig.__dataclass_fields__)
    return TrainConfig(**{k: v for k, v in train.items() if k in fields}), Path(str(data))


def load_run_model(run_dir: Path, config: TrainConfig) -> tuple[OutcomeModel, str]:
    """The run's final model: central `model.safetensors`, or a federation's last checkpoint, or its
    PEFT `adapter/` (a deployed coordinator may keep only that). Returns (model, what was loaded)."""
    from safetensors.torch import load_file

    model = build_model(config)
    checkpoint = latest_checkpoint(run_dir)
    adapter = run_dir / "adapter"
    if (run_dir / "model.safetensors").exists():
        source = run_dir / "model.safetensors"
        model.load_trainable_state(load_file(source))
    elif checkpoint is not None:
        source = checkpoint
        model.load_trainable_state(load_file(source))
    elif (adapter / "edfed_heads.safetensors").exists():
        from peft import set_peft_model_state_dict

        source = adapter
        heads = load_file(adapter / "edfed_heads.safetensors")
        missing = set(model.trainable_state()) - set(heads)
        if any("lora_" not in name for name in missing):
            raise EdfedError(f"{adapter}: edfed_heads.safetensors lacks {sorted(missing)[:3]}")
        model.load_state_dict(heads, strict=False)  # the encoder's weights are the base model's
        if missing:  # the LoRA adapters (the GLM has none)
            set_peft_model_state_dict(model.encoder, load_file(adapter / "adapter_model.safetensors"))
    else:
        raise EdfedError(f"{run_dir}: no trained model (model.safetensors, checkpoints/ or adapter/) to audit")
    return model, str(source.relative_to(run_dir))


def audit_run(run_dir: Path, site: str = "site-1", data_dir: Path | None = None, seed: int = 0) -> dict:
    """Audit a finished run's final model on one site; writes RUN_DIR/audit.json and returns it.

    `data_dir` overrides the data folder recorded in summary.json (e.g. a run moved between machines).
    """
    run_dir = Path(run_dir)
    if not (run_dir / "summary.json").exists():
        raise EdfedError(f"{run_dir}: no summary.json; audit a finished run")
    summary = json.loads((run_dir / "summary.json").read_text())
    config, recorded = _config_and_data(summary, run_dir)
    data_dir = Path(data_dir) if data_dir is not None else recorded
    files = site_files(data_dir)
    if site not in files:
        raise EdfedError(f"no {site} in {data_dir}; sites there: {', '.join(files)}")
    model, source = load_run_model(run_dir, config)
    splits = load_site_splits(site, files[site], config.seed)
    result = audit_model(model, splits.part("train"), splits.part("test"), load_tokenizer(config), seed)
    result.update({"site": site, "members": "train split", "nonmembers": "test split", "model": source})
    atomic_write_text(run_dir / "audit.json", json.dumps(result, indent=2))
    return result
