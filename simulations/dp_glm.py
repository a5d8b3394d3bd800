"""Experiment (not yet the product's DP model): a federated DP generalised linear model that clips nothing.

`python -m simulations.dp_glm --data DIR --epsilon 8 --draws 3 --split val` trains, at every simulated site, a
logistic regression per outcome on fixed features by full-batch DP gradient descent, averages the sites'
models every round (FedAvg) and scores the average on the pooled `--split` rows, once per noise draw.

Why: DP-SGD clips every patient's gradient to the same small norm, and that bias costs the deep model more
than the noise does (issue 19). Here nothing is clipped. Every feature block is scaled to norm at most 1 by a
fixed, public transform, every patient weighs 1 in total (each of its k visits 1/k), and the logistic loss's
residual is in [-1, 1] per outcome, so one patient moves the gradient sum by at most
sqrt(outcomes) * sqrt(blocks) in Frobenius norm: the Gaussian mechanism's sensitivity is known exactly, and
each step's noise is calibrated to it (sample rate 1, Opacus' RDP accountant, as the site ledger counts).

Features: an intercept, edfed's structured features (`structured_features`, divided by 4 and then scaled down to
norm 1 where longer), the frozen encoder's mean-pooled note text at unit norm (the model's own frozen pass, no
fine-tuning), and the lexical path's hashed n-grams (unit norm).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.special import expit

from common.config import RUN_DEFAULTS, train_config_from
from common.contract import OUTCOMES
from common.data import VisitDataset, load_cohort
from common.features import lexical_features, load_tokenizer, structured_features
from common.files import atomic_write_text, private_dir
from common.metrics import evaluate
from common.privacy import epsilon_of, smallest_fitting

STRUCTURED_SCALE = 4.0  # the structured features' typical norm is ~3 (median 3.1 on the default cohort)
BLOCKS = 4  # intercept, structured, pooled text, lexical: each of norm <= 1


def sensitivity(n_outcomes: int = len(OUTCOMES), blocks: int = BLOCKS) -> float:
    """How far one patient (weight 1, residuals in [-1, 1]) moves the gradient sum, in Frobenius norm."""
    return math.sqrt(n_outcomes) * math.sqrt(blocks)


def pooled_text(table: pd.DataFrame, model_dir: str = "") -> np.ndarray:
    """[n, hidden] the frozen encoder's mean-pooled note text (LoRA at its zero start: the pretrained encoder)."""
    import torch

    from common.model import build_model
    from common.train import cache_frozen_layers, make_loader

    config = train_config_from({**RUN_DEFAULTS, "epsilon": math.inf, "compact": False, "model": model_dir})
    model = build_model(config).eval()
    dataset = VisitDataset(table, load_tokenizer(config), config)
    cache_frozen_layers(model, dataset)  # the frozen pass as training runs it: batched by length, little padding
    with torch.no_grad():
        return np.concatenate([model.encode_text(batch).float().numpy()
                               for batch in make_loader(dataset, 64, shuffle=False)])


def glm_features(table: pd.DataFrame, text: np.ndarray, n_lexical: int) -> sp.csr_matrix:
    """[n, 1 + structured + hidden + n_lexical]; each block's row norm is at most 1 (fixed transforms only)."""
    structured = structured_features(table) / STRUCTURED_SCALE
    structured /= np.maximum(np.linalg.norm(structured, axis=1, keepdims=True), 1.0)
    text = text / np.maximum(np.linalg.norm(text, axis=1, keepdims=True), 1e-12)
    dense = np.hstack([np.ones((len(table), 1), np.float32), structured, text]).astype(np.float32)
    return sp.hstack([sp.csr_matrix(dense), lexical_features(table, n_lexical)]).tocsr()


def patient_weights(patient_ids: np.ndarray) -> np.ndarray:
    """1/k for each visit of a patient with k visits: every patient weighs 1."""
    _, inverse, counts = np.unique(patient_ids.astype(str), return_inverse=True, return_counts=True)
    return 1.0 / counts[inverse]


def gradient_sum(weights: np.ndarray, x: sp.csr_matrix, labels: np.ndarray, visit_weights: np.ndarray) -> np.ndarray:
    """Sum over visits of the weighted logistic-loss gradient; a missing label contributes nothing."""
    risk = expit(x @ weights)
    residual = np.where(np.isnan(labels), 0.0, risk - np.nan_to_num(labels)) * visit_weights[:, None]
    return np.asarray(x.T @ residual)


def site_training_sets(cohort: pd.DataFrame, x: sp.csr_matrix, labels: np.ndarray) -> dict[str, tuple]:
    """{site: (features, labels, visit weights, patients)} of each site's training rows."""
    sites = {}
    split = cohort["split"].to_numpy()
    for site, index in cohort.groupby("site", sort=False).indices.items():
        train = index[split[index] == "train"]
        visit_weights = patient_weights(cohort["patient_id"].to_numpy()[train])
        sites[site] = (x[train], labels[train], visit_weights, int(round(visit_weights.sum())))
    return sites


def noise_for(epsilon: float, delta: float, steps: int) -> float:
    """The smallest noise multiplier whose `steps` full-batch Gaussian steps spend at most `epsilon`."""
    if math.isinf(epsilon):
        return 0.0
    return smallest_fitting(lambda noise: epsilon_of([(noise, 1.0, steps)], delta) <= epsilon, 0.1, 500.0)


def train_federated(sites: dict[str, tuple], rounds: int, lr: float, l2: float, noise: float,
                    rng: np.random.Generator) -> np.ndarray:
    """FedAvg over `rounds` rounds of one noisy full-batch step per site, weighted by patients."""
    dim = next(iter(sites.values()))[0].shape[1]
    weights = np.zeros((dim, len(OUTCOMES)))
    scale = noise * sensitivity()
    for _ in range(rounds):
        updates, sizes = [], []
        for x, labels, visit_weights, n_patients in sites.values():
            noisy = gradient_sum(weights, x, labels, visit_weights) + rng.normal(0.0, scale, weights.shape)
            updates.append(weights - lr * (noisy / n_patients + l2 * weights))
            sizes.append(n_patients)
        weights = np.average(np.stack(updates), axis=0, weights=sizes)
    return weights


def run(data_dir: Path, epsilon: float, draws: int, split: str, rounds: int, lr: float, l2: float,
        seed: int = 0, model_dir: str = "", cache: Path | None = None) -> dict:
    started = time.perf_counter()
    cohort = load_cohort(data_dir, seed)
    text = np.load(cache) if cache is not None and cache.exists() else None
    if text is None or len(text) != len(cohort):
        text = pooled_text(cohort, model_dir)
        if cache is not None:
            private_dir(cache.parent)
            np.save(cache, text)
    print(f"frozen pooled text of {len(cohort)} visits: {time.perf_counter() - started:.0f} s", flush=True)
    n_lexical = int(RUN_DEFAULTS["lexical-features"])
    x = glm_features(cohort, text, n_lexical)
    labels = cohort[list(OUTCOMES)].to_numpy(float)
    sites = site_training_sets(cohort, x, labels)
    delta = float(RUN_DEFAULTS["delta"])
    noise = noise_for(epsilon, delta, rounds)
    rows = (cohort["split"] == split).to_numpy()
    scores = []
    for draw in range(draws):
        weights = train_federated(sites, rounds, lr, l2, noise, np.random.default_rng([seed, draw]))
        risk = expit(x[rows] @ weights)
        metrics = evaluate(labels[rows], risk, bootstrap=0)
        scores.append([metrics[o]["auroc"] for o in OUTCOMES])
        print(f"draw {draw}: " + ", ".join(f"{o} {s:.3f}" for o, s in zip(OUTCOMES, scores[-1], strict=True)),
              flush=True)
    return {"epsilon": epsilon, "delta": delta, "noise_multiplier": noise, "sensitivity": sensitivity(),
            "epsilon_spent": epsilon_of([(noise, 1.0, rounds)], delta) if noise else math.inf,
            "rounds": rounds, "lr": lr, "l2": l2, "split": split, "draws": draws, "features": x.shape[1],
            "auroc_by_draw": scores, "auroc_mean": dict(zip(OUTCOMES, np.mean(scores, axis=0).tolist(), strict=True)),
            "seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m simulations.dp_glm", description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--epsilon", type=float, default=8.0, help="per site and patient (inf: no noise)")
    parser.add_argument("--draws", type=int, default=3, help="noise draws; the figures are their mean")
    parser.add_argument("--split", choices=("val", "test"), default="val", help="tune on val, report test once")
    parser.add_argument("--rounds", type=int, default=30, help="rounds of one full-batch DP step per site")
    parser.add_argument("--lr", type=float, default=4.0)
    parser.add_argument("--l2", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="", help="local Hugging Face encoder directory")
    parser.add_argument("--out", type=Path, help="write results.json here")
    args = parser.parse_args(argv)
    result = run(args.data, args.epsilon, args.draws, args.split, args.rounds, args.lr, args.l2, args.seed,
                 args.model, (args.out / "pooled-text.npy") if args.out else None)
    mean = result["auroc_mean"]
    print(f"mean of {args.draws} draws ({args.split}): " + ", ".join(f"{o} {mean[o]:.3f}" for o in OUTCOMES))
    if args.out:
        atomic_write_text(args.out / "results.json", json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
