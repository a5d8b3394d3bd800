"""A site's own models, trained at the site on its data and never sent anywhere.

- local-only: the site's data alone, the full model, no DP (nothing of it leaves), as many epochs as the site
  gives a federation: the level joining must beat.
- personalized: the federation's final global model fine-tuned on the site's data.
- the site's own regressions (common.peers: structured, note TF-IDF, the two stacked), the models its
  statistician fits in an afternoon, and the global model stacked with them (a logistic regression on the global
  model's logit and the regressions' out-of-fold logits over the site's training rows).
- deployed: what the site uses, per outcome a blend of the global model stacked with its regressions and its
  local-only model (`deployment_recipes`), never with a part that ranks below chance on its validation split,
  recalibrated there (`edfed personalize` at a deployed site, `edfed simulate --personalize` for every simulated
  site). Every other candidate is scored beside it on the same test rows.

Both train with `common.train.fit_model`, the trainer central training uses; validation picks the epoch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from edfed.client.model_folder import _logit, apply_recipes, blended_risk, platt_parameters
from edfed.common.config import RUN_DEFAULTS, TrainConfig, train_config_from
from edfed.common.contract import OUTCOMES
from edfed.common.data import VisitDataset, load_cohort, load_site_splits
from edfed.common.display import make_console, progress_bar
from edfed.common.errors import EdfedError
from edfed.common.evaluation import evaluate_on_test, score_test, write_summary
from edfed.common.exchange import frozen_init_fingerprint
from edfed.common.features import load_tokenizer
from edfed.common.files import atomic_write, private_dir
from edfed.common.metrics import mean_paired_gain
from edfed.common.model import build_model
from edfed.common.train import cache_frozen_layers, fit_model, predict, save_trainable_state


def site_epochs(run_config: dict) -> int:
    """The epochs a site gives its own model: as many passes over its data as it gave the federation."""
    run_config = {**RUN_DEFAULTS, **run_config}
    return int(run_config["num-server-rounds"]) * int(run_config["local-epochs"])


def local_only_config(run_config: dict) -> TrainConfig:
    """The one local-only model: the full model (no `compact`, which exists for DP), no DP, the federation's
    learning rate and epochs."""
    return train_config_from({**run_config, "epsilon": math.inf, "architecture": "full"}).replace(
        epochs=site_epochs(run_config))


def local_only_models(run_config: dict, data_dir: Path, out_dir: Path) -> dict:
    """Each site's local-only model scored on its own test split: {site: metrics}; OUT_DIR/<site>/ gets its model,
    plots and predictions.parquet (pool them with common.evaluation.score_saved_predictions)."""
    config = local_only_config(run_config)
    return fit_site_models(config, load_cohort(data_dir, config.seed), data_dir, out_dir, "local-only")


# Everything a site holds after a run, each scored on its test rows beside the deployed blend of two of them.
CANDIDATES = ("global", "global + regressions", "personalized", "global + local-only", "local-only",
              "regression: stacked", "regression: structured", "regression: tfidf")
OWN_REGRESSION = "regression: stacked"  # the site's afternoon model, the second level joining must beat
DEPLOYED_MODEL = "model"  # in a site's deployed folder: what `edfed predict` and `edfed.load_model` read
CANDIDATE_RISKS = "candidates.npz"  # in a site's deployed folder: "<split>|<candidate>" -> risks [n, 3], "|labels"


def deployed_models(run_config: dict, data_dir: Path, run_dir: Path) -> dict:
    """Every simulated site's deployed model, local-only model and the rest of its candidates (`deploy_at_site`),
    and the mean over sites of deployed minus local-only with its paired interval."""
    config = local_only_config(run_config)
    cohort = load_cohort(data_dir, config.seed)
    start = personalization_start(run_config, run_dir)  # once: it checks the encoder and loads the checkpoint
    results, pairs = {}, {}
    with progress_bar() as progress:
        task = progress.add_task("deployed models", total=cohort["site"].nunique(), status="")
        for site, rows in cohort.groupby("site", sort=False):
            progress.update(task, status=site)
            started = time.perf_counter()
            results[site], pairs[site] = deploy_at_site(run_config, run_dir, rows, data_dir,
                                                        run_dir / "deployed" / site, start)
            progress.advance(task)
            if not progress.console.is_terminal:  # a log file gets a line per site, where the bar cannot show
                progress.console.print(f"deployed model of {site}: {time.perf_counter() - started:.0f} s")
    return summarize_deployment(results, pairs, config.bootstrap, config.seed)


def summarize_deployment(results: dict, pairs: dict, bootstrap: int, seed: int) -> dict:
    """{candidate: {site: metrics}} for every candidate and the deployed model, plus the paired gains of the
    deployed model over each of the two a site can build alone."""
    by_model = {name: {site: r[name] for site, r in results.items()} for name in (*CANDIDATES, "deployed")}
    return {**by_model, "choices": {site: r["choices"] for site, r in results.items()},
            "recipes": {site: r["recipes"] for site, r in results.items()},
            "gain_over_local_only": mean_paired_gain(
                {site: (y, risks["deployed"], risks["local-only"]) for site, (y, risks) in pairs.items()},
                bootstrap, seed),
            "gain_over_own_regression": mean_paired_gain(
                {site: (y, risks["deployed"], risks[OWN_REGRESSION]) for site, (y, risks) in pairs.items()},
                bootstrap, seed)}


def deploy_at_site(run_config: dict, run_dir: Path, rows: pd.DataFrame, data_dir: Path, out_dir: Path,
                   start: tuple[TrainConfig, dict[str, torch.Tensor]] | None = None
                   ) -> tuple[dict, tuple[np.ndarray, dict[str, np.ndarray]]]:
    """The model one site deploys (`deployment_recipes`, `blend`), and every one of CANDIDATES scored beside it:
    the run's DP global model, it fine-tuned at home, the site's local-only model, its own regressions, the global
    model stacked with them, the mean of global and local-only risks. All of it stays at the site: no DP is spent,
    nothing is sent.

    `start`: `personalization_start`'s result, when the caller has it (it hashes the encoder and reads the run).
    Returns ({candidate or "deployed": test metrics, "recipes": {outcome: {candidate: weight}}, "choices": the
    recipes in words},
    (test labels, {"deployed", "local-only", OWN_REGRESSION: test risks})) for the paired comparisons across sites.
    """
    from safetensors.torch import load_file

    from edfed.client.model_folder import save_deployed_model
    from edfed.common.exchange import encoder_fingerprint
    from edfed.common.files import latest_checkpoint
    from edfed.common.peers import fit_peers

    full_config, start_state = start or personalization_start(run_config, run_dir)
    local_config = local_only_config(run_config)
    tokenizer = load_tokenizer(full_config)
    parts = {s: rows[rows["split"] == s] for s in ("train", "val", "test")}
    models = {"global": build_model(train_config_from(run_config), load_file(latest_checkpoint(run_dir))),
              "personalized": fit_model(full_config, parts["train"], parts["val"], tokenizer, show_progress=False,
                                        initial_state=start_state)[0],
              "local-only": local_only_model(local_config, parts["train"], parts["val"], tokenizer,
                                             data_dir / LOCAL_ONLY_CACHE)}
    peers = fit_peers(parts["train"], full_config.seed)
    risks, sets = {}, {}
    for split in ("train", "val", "test"):
        risks[split] = {}
        for name, model in models.items():
            if split == "train" and name != "global":
                continue  # only the stack reads training rows, and only the global model's (DP-trained) risks
            # The frozen layers' output depends on where the model's adapters start (the GLM has none): one
            # cached dataset per kind of model.
            kind = model.config.architecture
            if (split, kind) not in sets:
                sets[split, kind] = VisitDataset(parts[split], tokenizer, model.config)
                cache_frozen_layers(model, sets[split, kind])
            risks[split][name] = predict(model, sets[split, kind])
        if split == "train":
            continue
        risks[split]["global + local-only"] = (risks[split]["global"] + risks[split]["local-only"]) / 2
        regressions = peers.predict(parts[split])
        for peer in ("tfidf", "stacked"):  # a table with no note text: the structured regression is all there is
            regressions.setdefault(peer, regressions["structured"])
        risks[split].update({f"regression: {p}": r for p, r in regressions.items()})
    stack = _GlobalStack.fit(peers, risks["train"]["global"], parts["train"])
    for split in ("val", "test"):
        risks[split]["global + regressions"] = stack.predict(peers, risks[split]["global"], parts[split])
    labels = {split: parts[split][list(OUTCOMES)].to_numpy(float) for split in ("val", "test")}
    out_dir.mkdir(parents=True, exist_ok=True)  # every candidate's risks, kept at the site for audit and benchmarks
    arrays = {**{f"{split}|{name}": r for split in ("val", "test") for name, r in risks[split].items()},
              **{f"{split}|labels": y for split, y in labels.items()}}
    atomic_write(out_dir / CANDIDATE_RISKS, lambda tmp: _save_npz(tmp, arrays))
    recipes = fit_recipes(deployment_recipes(labels["val"], risks["val"]), labels["val"], risks["val"])
    deployed = apply_recipes(recipes, risks["test"])
    result = {name: score_test(parts["test"], labels["test"], risks["test"][name], data_dir, out_dir / name, name,
                               full_config.bootstrap, full_config.seed)[0]
              for name in CANDIDATES}
    result["deployed"] = score_test(parts["test"], labels["test"], deployed, data_dir, out_dir, "deployed",
                                    full_config.bootstrap, full_config.seed, out_dir / "predictions.parquet")[0]
    save_trainable_state(models["personalized"], out_dir / "personalized.safetensors")
    save_trainable_state(models["local-only"], out_dir / "local-only.safetensors")
    save_deployed_model(
        out_dir / DEPLOYED_MODEL, site=str(rows["site"].iloc[0]) if "site" in rows else out_dir.name,
        run_config=run_config, encoder_fingerprint=encoder_fingerprint(full_config.encoder_dir)
        if full_config.uses_text else "", recipes=recipes, models=models, peers=peers, stack=stack,
        metrics={name: result[name] for name in ("deployed", *CANDIDATES)},
        privacy={key.replace("-", "_"): {**RUN_DEFAULTS, **run_config}[key] for key in ("epsilon", "delta",
                                                                                      "privacy-unit")},
        rows={split: len(table) for split, table in parts.items()})
    compared = {"deployed": deployed, "local-only": risks["test"]["local-only"],
                OWN_REGRESSION: risks["test"][OWN_REGRESSION]}
    return ({**result, "choices": {o: describe(r["parts"]) for o, r in recipes.items()}, "recipes": recipes},
            (labels["test"], compared))


# The site's two strongest models, each learned where it can be learned without leaning on the ~100-visit
# validation split: the global model stacked with the site's regressions (weights fitted on the training rows'
# out-of-fold logits), and the local-only model (its training rows are in-sample, so its weight cannot be fitted
# there). Their standardised logits are averaged with this public weight, chosen once on the main job's pooled
# validation split (docs/experiments.md, "The deployed model"), not per site.
LOCAL_ONLY_WEIGHT = 0.5
_STACKED, _LOCAL = "global + regressions", "local-only"


def deployment_recipes(val_labels: np.ndarray, val_risks: dict[str, np.ndarray],
                       local_weight: float = LOCAL_ONLY_WEIGHT) -> dict[str, dict[str, float]]:
    """Per outcome, {candidate: weight} of the blend the site deploys. A model that ranks below chance on the
    validation split never takes part (nor does a stack whose global model does: then the site's own stacked
    regression stands in); with neither part at or above chance, the site's own stacked regression alone.
    `local_weight`: another weight than the public one, for benchmarks/deploy_blend.py only."""
    recipes = {}
    for k, outcome in enumerate(OUTCOMES):
        def fair(name: str, k: int = k) -> bool:
            return not _auroc(val_labels[:, k], val_risks[name][:, k]) < 0.5  # NaN (one class): nothing to judge by

        stacked = _STACKED if fair("global") and fair(_STACKED) else OWN_REGRESSION
        parts = {stacked: 1 - local_weight, _LOCAL: local_weight}
        parts = {name: w for name, w in parts.items() if w > 0 and fair(name)} or {OWN_REGRESSION: 1.0}
        recipes[outcome] = {name: w / sum(parts.values()) for name, w in parts.items()}
    return recipes


def describe(recipe: dict[str, float]) -> str:
    """A recipe in words, for the summary and the report: "global + regressions 0.5, local-only 0.5"."""
    return ", ".join(f"{name} {weight:.2g}" for name, weight in recipe.items())


def fit_recipes(parts: dict[str, dict[str, float]], val_labels: np.ndarray,
                val_risks: dict[str, np.ndarray]) -> dict[str, dict]:
    """Per outcome, the deployed model's whole recipe (the format `client.model_folder` saves): its parts'
    weights, each part's logit scale (its spread on the validation rows: a sharper model must not outvote the
    other by its scale alone) and the Platt recalibration fitted on the validation split (None where it cannot
    be fitted or would reverse the ranking)."""
    recipes = {}
    for k, outcome in enumerate(OUTCOMES):
        scales = {name: float(np.std(_logit(val_risks[name][:, k]))) or 1.0 for name in parts[outcome]}
        recipe = {"parts": dict(parts[outcome]), "scales": scales, "calibration": None}
        recipe["calibration"] = platt_parameters(blended_risk(recipe, val_risks, k), val_labels[:, k])
        recipes[outcome] = recipe
    return recipes


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with path.open("wb") as handle:  # a handle: given a path, numpy appends ".npz" to the temporary file's name
        np.savez(handle, **arrays)


def _auroc(y: np.ndarray, risk: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    known = ~np.isnan(y)
    return float(roc_auc_score(y[known], risk[known])) if 0 < y[known].sum() < known.sum() else math.nan


@dataclass
class _GlobalStack:
    """The global model's logit stacked with the site's two regressions' logits, one logistic regression per
    outcome, fitted on the site's training rows with the regressions' out-of-fold logits (as `common.peers`
    stacks its own two); None where an outcome has no regressions (too few events). Where the fit would weigh
    the global model's logit at or below zero (it ranks the site's rows no better than chance, or backwards once
    the regressions are known), the stack is the regressions' alone: an inverted global model is never used."""

    fits: dict[str, tuple[object, bool] | None]  # outcome -> (fit, whether it reads the global model's logit)

    @classmethod
    def fit(cls, peers, global_train: np.ndarray, train: pd.DataFrame) -> _GlobalStack:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        fits = {}
        for k, outcome in enumerate(OUTCOMES):
            peer = peers.fits[outcome]
            if peer.oof is None:
                fits[outcome] = None
                continue
            x = np.column_stack([_logit(global_train[peer.known, k]), peer.oof])
            y = train[outcome].to_numpy(float)[peer.known].astype(int)
            fit = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000)).fit(x, y)
            uses_global = fit[-1].coef_[0, 0] > 0
            fits[outcome] = (fit if uses_global else make_pipeline(StandardScaler(), LogisticRegression(
                C=1.0, max_iter=1000)).fit(x[:, 1:], y), uses_global)
        return cls(fits)

    def predict(self, peers, global_risk: np.ndarray, table: pd.DataFrame) -> np.ndarray:
        logits, out = peers.logits(table), global_risk.copy()
        for k, outcome in enumerate(OUTCOMES):
            if self.fits[outcome] is not None:
                fit, uses_global = self.fits[outcome]
                x = np.column_stack([_logit(global_risk[:, k]), logits[:, k]])
                out[:, k] = fit.predict_proba(x if uses_global else x[:, 1:])[:, 1]
        return out


LOCAL_ONLY_CACHE = ".edfed-local-only"  # in the site's data folder: its own models, owner-only


def local_only_model(config: TrainConfig, train: pd.DataFrame, val: pd.DataFrame, tokenizer, cache_dir: Path):
    """The site's local-only model, trained once per table and settings and kept at the site (`cache_dir`): it
    depends on neither the run nor its noise, so every run and noise draw at the site deploys against the same one."""
    from safetensors.torch import load_file

    key = hashlib.sha256(repr([sorted(config.to_dict().items()), pd.util.hash_pandas_object(
        pd.concat([train, val]), index=False).to_numpy().tobytes()]).encode()).hexdigest()[:20]
    path = cache_dir / f"{key}.safetensors"
    if path.exists():
        return build_model(config, load_file(path))
    model = fit_model(config, train, val, tokenizer, show_progress=False)[0]
    private_dir(cache_dir)
    save_trainable_state(model, path)
    return model


def personalization_start(run_config: dict, run_dir: Path) -> tuple[TrainConfig, dict[str, torch.Tensor]]:
    """The whole model to fine-tune at a site, and its start: the run's last global model.

    No DP: the fine-tuned model never leaves the site, and neither does anything computed from it. So the whole
    model trains, even where the federation kept parts frozen for DP (`compact`): those parts are the seeded
    init, which the full model shares; as a training site does, this checks the encoder and those seeded
    matrices against the ones the run recorded. Validation then picks among the epochs and the untouched global
    model, so a site keeps the federation's model when its own data cannot improve it.
    """
    from safetensors.torch import load_file

    from edfed.client.site import check_encoder
    from edfed.common.files import latest_checkpoint

    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise EdfedError(f"{run_dir}: no global model checkpoint (checkpoints/round-K.safetensors) to personalize")
    recorded = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    global_config = train_config_from(run_config)
    check_encoder(global_config, recorded.get("encoder-fingerprint", ""))
    if recorded.get("frozen-fingerprint", "") not in ("", frozen_init_fingerprint(build_model(global_config))):
        raise EdfedError(f"{run_dir}: the run's seeded frozen matrices differ from the ones built here "
                         "(another torch version?); refusing to fine-tune its global model")
    if global_config.glm:  # the GLM fine-tuned at home: its full-batch steps, without noise
        return global_config.replace(epochs=site_epochs(run_config)), load_file(checkpoint)
    config = train_config_from({**run_config, "architecture": "full"}).replace(epochs=site_epochs(run_config))
    return config, {**build_model(config).trainable_state(), **load_file(checkpoint)}


def run_personalize(args: argparse.Namespace) -> dict:
    """`edfed personalize RUN_DIR --data SITE_FILE`: a deployed site picks the model it deploys (`deploy_at_site`).

    RUN_DIR is a copy of the coordinator's run folder (run.json and checkpoints/: settings and arrays, no
    patient data). Everything written goes to --out, at the site.
    """
    if not (args.run_dir / "run.json").exists():
        raise EdfedError(f"{args.run_dir}: no run.json; pass a copy of the coordinator's run folder "
                         "(run.json and checkpoints/)")
    run_config = {**RUN_DEFAULTS, **json.loads((args.run_dir / "run.json").read_text())["config"],
                  "model": str(args.model or "")}  # the coordinator's encoder path means nothing here
    name = args.site_name or args.data.stem
    config = local_only_config(run_config)
    rows = load_site_splits(name, args.data, config.seed, args.mapping, getattr(args, "encoding", None)).table
    out = args.out or Path("runs") / f"personalized-{name}-{datetime.now():%Y%m%d-%H%M%S}"
    result, _ = deploy_at_site(run_config, args.run_dir, rows, args.data.parent, out / name)
    summary = {"kind": "personalized", "config": {**run_config, "global-run": str(args.run_dir.resolve())},
               "final": result["deployed"], "per_site": {name: result["deployed"]},
               **{candidate: {name: result[candidate]} for candidate in CANDIDATES},
               "choices": {name: result["choices"]}, "recipes": {name: result["recipes"]}}
    write_summary(out, summary)
    console = make_console()
    choices = ", ".join(f"{outcome}: {choice}" for outcome, choice in result["choices"].items())
    console.print(f"deployed model of {name}, per outcome: {choices}")
    console.print(f"wrote {out / 'summary.json'}; the site's models are in {out / name}")
    console.print(f"predict with it: edfed predict {out / name / DEPLOYED_MODEL} --data NEW_VISITS --out risks.csv")
    return summary


def fit_site_models(config: TrainConfig, cohort: pd.DataFrame, data_dir: Path, out_dir: Path, label: str) -> dict:
    """Each site's local-only model (`local_only_model`, kept at the site) scored on its own test split;
    OUT_DIR/<site>/ gets model, plots and predictions."""
    tokenizer = load_tokenizer(config)
    results = {}
    sites = cohort.groupby("site", sort=False)
    with progress_bar() as progress:
        task = progress.add_task(f"{label} models", total=len(sites), status="")
        for site, rows in sites:
            progress.update(task, status=site)
            started = time.perf_counter()
            model = local_only_model(config, rows[rows["split"] == "train"], rows[rows["split"] == "val"],
                                     tokenizer, data_dir / LOCAL_ONLY_CACHE)
            site_dir = out_dir / site
            final, _ = evaluate_on_test(model, rows[rows["split"] == "test"], tokenizer, data_dir, site_dir,
                                        f"{label}, {site}", site_dir / "predictions.parquet")
            save_trainable_state(model, site_dir / "model.safetensors")
            results[site] = final
            progress.advance(task)
            if not progress.console.is_terminal:
                progress.console.print(f"{label} model of {site}: {time.perf_counter() - started:.0f} s")
    return results
