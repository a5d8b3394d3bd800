"""A site's own models, trained at the site on its data and never sent anywhere.

- local-only: the site's data alone, the full model, no DP (nothing of it leaves), as many epochs as the site
  gives a federation: the level joining must beat.
- personalized: the federation's final global model fine-tuned on the site's data (`edfed personalize` at a
  deployed site, `edfed simulate --personalize` for every simulated site).

Both train with `common.train.fit_model`, the trainer central training uses; validation picks the epoch.
"""

from __future__ import annotations

import argparse
import json
import math
from datetime import datetime
from pathlib import Path

import pandas as pd
import torch

from common.config import RUN_DEFAULTS, TrainConfig, train_config_from
from common.data import load_cohort, load_site_splits
from common.display import make_console, progress_bar
from common.errors import EdfedError
from common.evaluation import evaluate_on_test, write_summary
from common.exchange import frozen_init_fingerprint
from common.features import load_tokenizer
from common.model import build_model
from common.train import fit_model, save_trainable_state


def site_epochs(run_config: dict) -> int:
    """The epochs a site gives its own model: as many passes over its data as it gave the federation."""
    run_config = {**RUN_DEFAULTS, **run_config}
    return int(run_config["num-server-rounds"]) * int(run_config["local-epochs"])


def local_only_config(run_config: dict) -> TrainConfig:
    """The one local-only model: the full model (no `compact`, which exists for DP), no DP, the federation's
    learning rate and epochs."""
    return train_config_from({**run_config, "epsilon": math.inf, "compact": False}).replace(
        epochs=site_epochs(run_config))


def local_only_models(run_config: dict, data_dir: Path, out_dir: Path) -> dict:
    """Each site's local-only model scored on its own test split: {site: metrics}; OUT_DIR/<site>/ gets its model,
    plots and predictions.parquet (pool them with common.evaluation.score_saved_predictions)."""
    config = local_only_config(run_config)
    return fit_site_models(config, load_cohort(data_dir, config.seed), data_dir, out_dir, "local-only")


def personalized_models(run_config: dict, data_dir: Path, run_dir: Path) -> dict:
    """The final global model fine-tuned at each site on its own data, scored on that site's test split."""
    config, start = personalization_start(run_config, run_dir)
    return fit_site_models(config, load_cohort(data_dir, config.seed), data_dir, run_dir / "personalized",
                           "personalized", initial_state=start)


def personalization_start(run_config: dict, run_dir: Path) -> tuple[TrainConfig, dict[str, torch.Tensor]]:
    """The whole model to fine-tune at a site, and its start: the run's last global model.

    No DP: the fine-tuned model never leaves the site, and neither does anything computed from it. So the whole
    model trains, even where the federation kept parts frozen for DP (`compact`): those parts are the seeded
    init, which the full model shares; as a training site does, this checks the encoder and those seeded
    matrices against the ones the run recorded. Validation then picks among the epochs and the untouched global
    model, so a site keeps the federation's model when its own data cannot improve it.
    """
    from safetensors.torch import load_file

    from client.site import check_encoder
    from common.files import latest_checkpoint

    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise EdfedError(f"{run_dir}: no global model checkpoint (checkpoints/round-K.safetensors) to personalize")
    recorded = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    global_config = train_config_from(run_config)
    check_encoder(global_config, recorded.get("encoder-fingerprint", ""))
    if recorded.get("frozen-fingerprint", "") not in ("", frozen_init_fingerprint(build_model(global_config))):
        raise EdfedError(f"{run_dir}: the run's seeded frozen matrices differ from the ones built here "
                         "(another torch version?); refusing to fine-tune its global model")
    config = train_config_from({**run_config, "compact": False}).replace(epochs=site_epochs(run_config))
    return config, {**build_model(config).trainable_state(), **load_file(checkpoint)}


def run_personalize(args: argparse.Namespace) -> dict:
    """`edfed personalize RUN_DIR --data SITE_FILE`: a deployed site fine-tunes a finished run's global model.

    RUN_DIR is a copy of the coordinator's run folder (run.json and checkpoints/: settings and arrays, no
    patient data). Everything written goes to --out, at the site.
    """
    if not (args.run_dir / "run.json").exists():
        raise EdfedError(f"{args.run_dir}: no run.json; pass a copy of the coordinator's run folder "
                         "(run.json and checkpoints/)")
    run_config = {**RUN_DEFAULTS, **json.loads((args.run_dir / "run.json").read_text())["config"],
                  "model": str(args.model or "")}  # the coordinator's encoder path means nothing here
    name = args.site_name or args.data.stem
    config, start = personalization_start(run_config, args.run_dir)
    rows = load_site_splits(name, args.data, config.seed, args.mapping).table
    out = args.out or Path("runs") / f"personalized-{name}-{datetime.now():%Y%m%d-%H%M%S}"
    final = fit_site_models(config, rows, args.data.parent, out, "personalized", start)[name]
    summary = {"kind": "personalized", "config": {**run_config, "train": config.to_dict(),
                                                  "global-run": str(args.run_dir.resolve())},
               "final": final, "per_site": {name: final}}
    write_summary(out, summary)
    make_console().print(f"wrote {out / 'summary.json'}; the fine-tuned model is {out / name / 'model.safetensors'}")
    return summary


def fit_site_models(config: TrainConfig, cohort: pd.DataFrame, data_dir: Path, out_dir: Path, label: str,
                    initial_state: dict | None = None) -> dict:
    """Train `config` at every site of `cohort` on its own rows; OUT_DIR/<site>/ gets model, plots, predictions."""
    tokenizer = load_tokenizer(config)
    results = {}
    sites = cohort.groupby("site", sort=False)
    with progress_bar() as progress:
        task = progress.add_task(f"{label} models", total=len(sites), status="")
        for site, rows in sites:
            progress.update(task, status=site)
            model, _ = fit_model(config, rows[rows["split"] == "train"], rows[rows["split"] == "val"],
                                 tokenizer, show_progress=False, initial_state=initial_state)
            site_dir = out_dir / site
            final, _ = evaluate_on_test(model, rows[rows["split"] == "test"], tokenizer, data_dir, site_dir,
                                        f"{label}, {site}", site_dir / "predictions.parquet")
            save_trainable_state(model, site_dir / "model.safetensors")
            results[site] = final
            progress.advance(task)
    return results
