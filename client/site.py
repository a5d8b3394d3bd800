"""Everything that runs inside a hospital: its settings, its data, one training round, its evaluation.

A site operator can audit this file: the table is read and validated here, the frozen encoder
layers are cached here (on the site's own disk), DP training (the GLM's full-batch DP steps, or DP-SGD) runs
here under the site's own budget, and
what it returns is `trainable_state()` arrays plus the scalar metrics built below — nothing else.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import time
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.common.logger import log

from common.config import TrainConfig
from common.data import SiteSplits, VisitDataset, load_site_splits
from common.errors import EdfedError
from common.exchange import REFUSED_BUDGET, REFUSED_REPEAT, encoder_fingerprint, frozen_init_fingerprint
from common.features import load_tokenizer
from common.files import atomic_write, private_dir
from common.metrics import evaluate
from common.model import OutcomeModel, build_model
from common.privacy import PrivacyLedger, make_private
from common.train import cache_frozen_layers, glm_rows, glm_step, make_loader, make_optimizer, predict, train_epoch


@dataclass(frozen=True)
class SiteSettings:
    """What belongs to the site alone. In deployment all of it comes from the node config."""

    name: str
    data_path: Path
    epsilon: float  # the site's total budget; inf turns DP off
    delta: float
    ledger_path: Path
    cache_dir: Path | None = None
    mapping: Path | None = None
    model_path: str = ""  # the site's copy of the encoder; "" = the packaged default
    # DP-SGD's randomness (Poisson sampling and noise) must be the site's own secret: whoever can replay it can
    # strip the noise, and noise shared by sites would not average out. None (deployment default): fresh OS
    # entropy every round. A site may set its own `dp-seed` to replay its runs; simulation uses the site's name.
    dp_seed: str | None = None
    privacy_unit: str = "patient"  # or "visit" (common.privacy says what each protects)
    max_epsilon_per_run: float = math.inf  # what one run may spend of `epsilon` (inf: all of it)
    # The release policy: what the site shares beyond DP-protected arrays (docs/deployment.md lists each field).
    release_metrics: bool = False  # answer `evaluate` with AUROCs (val/test splits only)
    release_timing: bool = False  # seconds a round took (depends on how many visits were sampled)
    max_queries_per_run: int | None = 10  # evaluations answered per run; None: no cap (simulation)
    size_rounding: int = 10  # split sizes leave rounded to this
    # The float format of the frozen encoder pass on this machine (common.precision): "" = auto-detected.
    precision: str = ""


def _flag(node_config: dict, key: str, default: bool) -> bool:
    value = node_config.get(key, default)
    if isinstance(value, bool):
        return value
    if str(value).strip().lower() in ("true", "1", "yes"):
        return True
    if str(value).strip().lower() in ("false", "0", "no"):
        return False
    raise EdfedError(f"node config `{key}` must be true or false, got {value!r}")


def _budget(node_config: dict) -> tuple[float, float]:
    """The site's own (epsilon, delta); a deployed site without them does not join (it never takes the server's)."""
    absent = [key for key in ("epsilon", "delta") if key not in node_config]
    if absent:
        raise EdfedError(f"this site's node config has no {' or '.join(f'`{k}`' for k in absent)}: a deployed site "
                         "sets its own privacy budget (e.g. epsilon=8.0 delta=1e-5; epsilon=\"inf\" opts out of DP "
                         "explicitly); refusing to join")
    try:
        epsilon, delta = float(node_config["epsilon"]), float(node_config["delta"])
    except (TypeError, ValueError) as exc:
        raise EdfedError(f"node config `epsilon` and `delta` must be numbers ({exc})") from None
    if not epsilon > 0 or not 0 < delta < 1:
        raise EdfedError(f"node config: epsilon must be positive (or inf) and delta in (0, 1); "
                         f"got epsilon={epsilon}, delta={delta}")
    if math.isinf(epsilon):
        log(WARNING, "edfed: DP is OFF at this site (epsilon=inf in its node config): its model updates leave "
            "without differential privacy")
    return epsilon, delta


def settings_from_configs(node_config: dict, message_config: dict) -> SiteSettings:
    """Deployment: node config keys `data-path`, `epsilon`, `delta` (both required), `ledger-path`, ...

    Simulation (a node config with only `partition-id`): the site is `site-<partition-id + 1>` of the
    run's data folder, with the run's per-site budget and privacy unit. A deployed site takes nothing
    about its privacy from the server.
    """
    if "data-path" in node_config:
        data_path = Path(str(node_config["data-path"]))
        name = str(node_config.get("site-name", data_path.stem))
        ledger = Path(str(node_config.get("ledger-path", data_path.parent / f"{name}.privacy-ledger.json")))
        cache = node_config.get("cache-dir")
        mapping = node_config.get("mapping")
        epsilon, delta = _budget(node_config)
        cap = float(node_config.get("max-epsilon-per-run", epsilon))
        queries = int(node_config.get("max-queries-per-run", 10))
        return SiteSettings(
            name=name, data_path=data_path, epsilon=epsilon, delta=delta,
            ledger_path=ledger, cache_dir=Path(str(cache)) if cache else None,
            mapping=Path(str(mapping)) if mapping else None, model_path=str(node_config.get("model-path", "")),
            dp_seed=str(node_config["dp-seed"]) if "dp-seed" in node_config else None,
            privacy_unit=str(node_config.get("privacy-unit", "patient")), max_epsilon_per_run=cap,
            release_metrics=_flag(node_config, "release-metrics", False),
            release_timing=_flag(node_config, "release-timing", False), max_queries_per_run=queries,
            size_rounding=max(1, int(node_config.get("size-rounding", 10))),
            precision=str(node_config.get("precision", "")))
    if "partition-id" not in node_config or "data-dir" not in message_config:
        raise EdfedError("this node has no `data-path` in its node config; start it with "
                         "--node-config 'data-path=\"/path/to/site.parquet\" epsilon=8.0 delta=1e-5'")
    # Simulation: every site's file is on the coordinator's machine, so the run's settings are the sites' own.
    name = f"site-{int(node_config['partition-id']) + 1}"
    run_dir = Path(str(message_config["run-dir"]))
    data_dir = Path(str(message_config["data-dir"]))
    candidates = [data_dir / f"{name}.parquet", data_dir / f"{name}.csv"]
    data_path = next((p for p in candidates if p.exists()), candidates[0])
    ledger_dir = Path(str(message_config.get("ledger-dir") or run_dir / "ledgers"))
    return SiteSettings(name=name, data_path=data_path, epsilon=float(message_config.get("site-epsilon", math.inf)),
                        delta=float(message_config.get("site-delta", 1e-5)), ledger_path=ledger_dir / f"{name}.json",
                        cache_dir=run_dir / "cache", model_path=str(message_config.get("model", "")),
                        # Simulated sites replay exactly; another `noise-draw` gives each of them other noise.
                        dp_seed=name + (f"#draw{draw}" if (draw := int(message_config.get("noise-draw", 0))) else ""),
                        privacy_unit=str(message_config.get("site-privacy-unit", "patient")),
                        release_metrics=True, release_timing=True, max_queries_per_run=None, size_rounding=1)


def _rounded(settings: SiteSettings, n: int) -> int:
    """A count as it leaves the site: rounded to `size-rounding` (never to 0 when there is something)."""
    step = settings.size_rounding
    return 0 if n <= 0 else max(step, step * round(n / step))


# Datasets with their frozen-layer output, kept in this process across rounds (simulation reuses
# worker processes) and on the site's disk (deployment starts a fresh process every round).
_SITE_DATA: dict[tuple[str, str], VisitDataset] = {}
_SITE_SPLITS: dict[str, SiteSplits] = {}


def _cache_key(settings: SiteSettings, config: TrainConfig, precision: str) -> str:
    stat = settings.data_path.stat()
    parts = [settings.data_path.resolve(), stat.st_size, stat.st_mtime_ns, config.modality, config.max_tokens,
             config.note_sections, "all" if config.glm else config.lora_layers, precision, config.cache_frozen,
             config.seed, config.architecture, config.lexical_features,
             encoder_fingerprint(config.encoder_dir) if config.uses_text else "-"]
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:20]


def site_dataset(settings: SiteSettings, config: TrainConfig, model: OutcomeModel, split: str) -> VisitDataset:
    """One of the site's splits, validated against the contract, its frozen-layer states cached.

    Only the split asked for is cached (a round trains on `train`, the final score reads `test`): with no
    per-round evaluation, caching val and test at every site would be ~30% more of the costliest pass.
    """
    key = _cache_key(settings, config, model.precision)
    if (key, split) in _SITE_DATA:
        return _SITE_DATA[key, split]
    if key not in _SITE_SPLITS:
        _SITE_SPLITS[key] = load_site_splits(settings.name, settings.data_path, config.seed, settings.mapping)
    dataset = VisitDataset(_SITE_SPLITS[key].part(split), load_tokenizer(config), config)
    disk = settings.cache_dir / f"{settings.name}-{key}-{split}.pt" if settings.cache_dir else None
    if disk is not None and disk.exists():
        saved = torch.load(disk)
        dataset.frozen_hidden = list(torch.split(saved["flat"], saved["lengths"]))
    elif cache_frozen_layers(model, dataset) and disk is not None:
        # The encoder's states of patient notes: patient data, owner-only like the table itself.
        private_dir(disk.parent)
        atomic_write(disk, lambda tmp: torch.save({"flat": torch.cat(dataset.frozen_hidden),
                                                   "lengths": [len(h) for h in dataset.frozen_hidden]}, tmp))
    _SITE_DATA[key, split] = dataset
    return dataset



def check_encoder(config: TrainConfig, expected_fingerprint: str) -> None:
    if config.uses_text and expected_fingerprint:
        mine = encoder_fingerprint(config.encoder_dir)
        if mine != expected_fingerprint:
            raise EdfedError(f"this site's encoder ({config.encoder_dir}, fingerprint {mine}) is not the one the "
                             f"server expects ({expected_fingerprint}); refusing to train")


def check_global_state(global_state: dict[str, torch.Tensor]) -> None:
    """Refuse NaN/Inf arrays from the server before any budget is spent on them."""
    bad = sorted(name for name, value in global_state.items() if not torch.isfinite(value).all())
    if bad:
        raise EdfedError(f"the server sent NaN or Inf in {len(bad)} global array(s) ({', '.join(bad[:3])}); "
                         "refusing to train or evaluate on them")


def check_site(settings: SiteSettings, config: TrainConfig, expected_fingerprint: str = "") -> dict[str, float]:
    """Before a site's first round: its encoder matches, its table passes the data contract, its ledger reads.

    Raises EdfedError (its `offsite` message names file, column and rule, never a value) when the site
    cannot join; otherwise returns the scalars the coordinator logs: rounded split sizes, the budget and
    what is spent, and the release policy the coordinator needs to know (whether it may ask for metrics).
    """
    check_encoder(config, expected_fingerprint)
    table = load_site_splits(settings.name, settings.data_path, config.seed, settings.mapping).table
    counts = table["split"].value_counts()
    metrics = {"rows": _rounded(settings, len(table)), "epsilon-budget": settings.epsilon,
               "patient-level": float(settings.privacy_unit == "patient"),
               "releases-metrics": float(settings.release_metrics),
               **{f"{split}-rows": _rounded(settings, int(counts.get(split, 0))) for split in ("train", "val", "test")}}
    if math.isfinite(settings.epsilon):
        ledger = PrivacyLedger.open(settings.ledger_path)
        ledger.check_unit(settings.privacy_unit)
        metrics["epsilon-spent"] = ledger.spent(settings.delta)
    return metrics


def dp_rng_seed(settings: SiteSettings, trainings: int) -> int:
    """The seed of one round's DP sampling and noise: secret to the site, never the same at two sites.

    Nothing the server sends enters it (it could otherwise make a site replay its noise on other gradients,
    which then cancels in the difference). With a `dp_seed`, the key is the site's secret and `trainings`,
    the number of rounds its ledger has recorded (read under the ledger's lock), so no two rounds share it.
    """
    if settings.dp_seed is None:
        return secrets.randbits(62)
    key = f"{settings.dp_seed}:{trainings}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") >> 2


def train_round(settings: SiteSettings, config: TrainConfig, global_state: dict[str, torch.Tensor], *,
                run_id: str, server_round: int, num_rounds: int, local_epochs: int, proximal_mu: float = 0.0,
                max_grad_norm: float = 1.0, dp_clipping: str = "per-layer",
                expected_fingerprint: str = "", expected_frozen: str = "") -> tuple[dict | None, dict]:
    """One round at the site: (new trainable state or None if the round is refused, scalar metrics).

    With DP, everything from reading the ledger to recording the round's spend holds the ledger's lock.
    """
    round_started = time.perf_counter()
    check_encoder(config, expected_fingerprint)
    check_global_state(global_state)
    model = build_model(config, global_state, settings.precision or None)
    if expected_frozen and frozen_init_fingerprint(model) != expected_frozen:
        raise EdfedError("this site's seeded frozen matrices (LoRA A; with compact also the text projection and "
                         "fusion layer) differ from the server's (another torch version?); refusing to train")
    data_started = time.perf_counter()
    data = site_dataset(settings, config, model, "train")
    data_seconds = time.perf_counter() - data_started  # read, check, tokenize, frozen-layer cache (first round)
    # The machine's float format is no patient data; data-seconds is timing, released only with release-timing.
    metrics: dict[str, float] = {"refused": 0, "delta": settings.delta, "bf16": float(model.precision == "bf16")}
    if settings.release_timing:
        metrics["data-seconds"] = data_seconds
    if not math.isfinite(settings.epsilon):
        if config.glm:
            state, trained = _train_glm(settings, model, data, 0.0, None, round_started)
            return state, {**metrics, **trained, "num-examples": _rounded(settings, len(data)), "epsilon": math.inf,
                           "steps": config.glm_steps}
        # Without DP the shuffle is a public, reproducible function of the run.
        loader = make_loader(data, config.batch_size, shuffle=True, seed=config.seed * 1000 + server_round)
        optimizer = make_optimizer(model, config.lr, config.weight_decay)
        state, trained = _train(settings, model, loader, optimizer, local_epochs, proximal_mu, global_state,
                                round_started)
        return state, {**metrics, **trained, "num-examples": _rounded(settings, len(data)), "epsilon": math.inf,
                       "steps": local_epochs * len(loader)}
    with PrivacyLedger.locked(settings.ledger_path) as ledger:
        ledger.check_unit(settings.privacy_unit)
        metrics.update({"epsilon-budget": settings.epsilon, "patient-level": float(settings.privacy_unit == "patient")})
        if ledger.trained(run_id, server_round):  # a replayed round would spend twice on the same question
            log(WARNING, "edfed: round %d of run %s was already trained here; refusing it", server_round, run_id)
            return None, {**metrics, "refused": REFUSED_REPEAT, "epsilon": ledger.spent(settings.delta), "steps": 0,
                          "num-examples": 0}
        seed = dp_rng_seed(settings, len(ledger.history))
        if config.glm:  # full-batch steps: every unit is in every step, exactly known sensitivity, no clipping
            sample_rate, steps = 1.0, config.glm_steps
        else:
            loader = make_loader(data, config.batch_size, shuffle=True, seed=seed)
            sample_rate = 1 / len(loader)  # patient-level: each patient's chance to be in a batch
            steps = local_epochs * len(loader)
        noise = ledger.plan_noise(run_id, settings.epsilon, settings.delta, sample_rate, num_rounds * steps,
                                  run_cap=settings.max_epsilon_per_run)
        after, run_after = math.inf, math.inf
        if math.isfinite(noise):
            after = ledger.projected(noise, sample_rate, steps, settings.delta)
            run_after = ledger.projected(noise, sample_rate, steps, settings.delta, run_id=run_id)
        metrics.update({"noise-multiplier": noise, "sample-rate": sample_rate})
        if after > settings.epsilon * (1 + 1e-6) or run_after > settings.max_epsilon_per_run * (1 + 1e-6):
            ledger.save()  # keep the plan, spend nothing
            return None, {**metrics, "refused": REFUSED_BUDGET, "epsilon": ledger.spent(settings.delta),
                          "epsilon-projected": after, "steps": 0, "num-examples": 0}
        if config.glm:
            generator = torch.Generator().manual_seed(seed)
            state, trained = _train_glm(settings, model, data, noise, generator, round_started)
            taken = steps
        else:
            optimizer = make_optimizer(model, config.dp_lr, config.weight_decay)
            optimizer, loader, accountant = make_private(model, optimizer, loader, noise, max_grad_norm, seed=seed + 1,
                                                         clipping=dp_clipping, unit=settings.privacy_unit)
            state, trained = _train(settings, model, loader, optimizer, local_epochs, proximal_mu, global_state,
                                    round_started)
            taken = sum(h[2] for h in accountant.history)
        ledger.record(noise, sample_rate, taken, unit=settings.privacy_unit, run_id=run_id, server_round=server_round)
        ledger.save()
    return state, {**metrics, **trained, "num-examples": _rounded(settings, len(data)),
                   "epsilon": ledger.spent(settings.delta), "steps": taken}


def _train_glm(settings: SiteSettings, model: OutcomeModel, data: VisitDataset, noise: float,
               generator: torch.Generator | None, round_started: float) -> tuple[dict, dict[str, float]]:
    """The GLM's `glm_steps` full-batch steps; every step sees every unit, so each is one Gaussian mechanism.

    The step divides by the train units rounded to `size-rounding`: the one count it uses that DP does not cover,
    declared in docs/deployment.md (a coordinator can read it off the update's scale).
    """
    started = time.perf_counter()
    rows = glm_rows(model, data, settings.privacy_unit)
    divisor = _rounded(settings, round(rows.units))
    for _ in range(model.config.glm_steps):
        glm_step(model, rows, divisor, noise, generator)
    metrics = {}
    if settings.release_timing:
        metrics.update({"train-seconds": time.perf_counter() - started,
                        "round-seconds": time.perf_counter() - round_started})
    return model.trainable_state(), metrics


def _train(settings: SiteSettings, model: OutcomeModel, loader, optimizer, local_epochs: int, proximal_mu: float,
           global_state: dict[str, torch.Tensor], round_started: float) -> tuple[dict, dict[str, float]]:
    """The local epochs; returns the new trainable state and the scalars the release policy lets leave.

    No training loss: it is a noise-free function of the training visits, outside any DP budget.
    """
    started = time.perf_counter()
    before = {n: t for n, t in model.trainable_state().items() if "lora_" in n}
    for _ in range(local_epochs):
        train_epoch(model, loader, optimizer, proximal_mu=proximal_mu, global_state=global_state)
    state = model.trainable_state()
    # opacus#820: LoRA weights that silently never change; the server can see it here (and in the arrays)
    metrics = {"adapters-changed": float(any(not torch.equal(state[n], t) for n, t in before.items()))}
    if settings.release_timing:
        metrics.update({"train-seconds": time.perf_counter() - started,
                        "round-seconds": time.perf_counter() - round_started})  # incl. data, model, cache
    return state, metrics


SPLITS_RELEASED = ("val", "test")


def evaluate_site(settings: SiteSettings, config: TrainConfig, global_state: dict[str, torch.Tensor],
                  split: str = "val", run_id: str = "") -> dict[str, float]:
    """Scalar metrics of the global model on the site's val or test split (no bootstrap: it runs every round).

    Only with the site's `release-metrics`, never on `train` (its metrics would leave outside the budget),
    and at most `max-queries-per-run` times per run (counted in the ledger, before the answer is computed).
    An AUROC that is undefined (one class only) is NaN, not 0.5.
    """
    if not settings.release_metrics:
        raise EdfedError("this site does not release evaluation metrics (its node config has no "
                         "release-metrics=true)")
    if split not in SPLITS_RELEASED:
        raise EdfedError(f"this site scores only its {' or '.join(SPLITS_RELEASED)} split, not {split!r}: metrics "
                         "on training visits would leave outside its privacy budget")
    check_global_state(global_state)
    if settings.max_queries_per_run is not None:
        with PrivacyLedger.locked(settings.ledger_path) as ledger:
            answered = ledger.queries.get(run_id, 0)
            if answered >= settings.max_queries_per_run:
                raise EdfedError(f"this site answers at most {settings.max_queries_per_run} evaluations per run "
                                 "(max-queries-per-run in its node config); this run has had them all")
            ledger.queries[run_id] = answered + 1
            ledger.save()
    model = build_model(config, global_state, settings.precision or None)
    data = site_dataset(settings, config, model, split)
    result = evaluate(data.labels.numpy(), predict(model, data), bootstrap=0)
    metrics = {"num-examples": _rounded(settings, len(data))}
    for outcome, m in result.items():
        metrics[f"{outcome}-auroc"] = float(m["auroc"]) if np.isfinite(m["auroc"]) else math.nan
    defined = [v for k, v in metrics.items() if k.endswith("-auroc") and math.isfinite(v)]
    metrics["mean-auroc"] = float(np.mean(defined)) if defined else math.nan
    return metrics
