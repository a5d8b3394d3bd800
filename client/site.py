"""Everything that runs inside a hospital: its settings, its data, one training round, its evaluation.

A site operator can audit this file: the table is read and validated here, the frozen encoder
layers are cached here (on the site's own disk, never in a run folder), DP training (the GLM's full-batch DP
steps, or DP-SGD) runs here under the site's own budget, and what it returns is `trainable_state()` arrays plus
the scalar metrics built below — nothing else.

What the coordinator sends is checked against public bounds before anything is read or spent
(`check_global_state`, `check_settings`): within them, training cannot overflow, so the site's behaviour and the
finiteness of what it releases never depend on its data. Every size that shapes a DP update is the site's declared
size (`declared-patients`, public), never a count of its rows.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import secrets
import time
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.common.logger import log

from edfed.common.config import TrainConfig
from edfed.common.data import SPLIT_SHARES, SiteSplits, VisitDataset, load_site_splits
from edfed.common.errors import EdfedError
from edfed.common.exchange import (
    REFUSED_BUDGET,
    REFUSED_RATE,
    REFUSED_REPEAT,
    encoder_fingerprint,
    frozen_init_fingerprint,
)
from edfed.common.features import load_tokenizer
from edfed.common.files import atomic_write, private_dir
from edfed.common.metrics import evaluate
from edfed.common.model import OutcomeModel, build_model
from edfed.common.privacy import (
    DAY_SECONDS,
    GaussianNoise,
    PrivacyLedger,
    epsilon_of,
    make_private,
    secure_gaussian,
    seeded_gaussian,
)
from edfed.common.train import (
    GLMRows,
    cache_frozen_layers,
    glm_noisy_gradient,
    glm_rows,
    glm_step,
    make_loader,
    make_optimizer,
    predict,
    train_epoch,
)


@dataclass(frozen=True)
class SiteSettings:
    """What belongs to the site alone. In deployment all of it comes from the node config."""

    name: str
    data_path: Path
    epsilon: float  # the site's total budget; inf turns DP off
    delta: float
    ledger_path: Path
    # About how many patients the site's table holds, declared by the site (public): the GLM's step divides by
    # its training share, DP-SGD's batches are sized from it, and it is the site's weight in the average. Never
    # recomputed from the rows, so one patient more or less changes nothing but the DP-covered sums.
    declared_patients: int = 0
    cache_dir: Path | None = None  # the site's own folder for note-derived caches (owner-only); None = none
    mapping: Path | None = None
    model_path: str = ""  # the site's copy of the encoder; "" = the packaged default
    # The DP randomness (sampling and noise) must be the site's own secret: whoever can replay it can strip the
    # noise, and noise shared by sites would not average out. None (deployment default): noise from the OS's
    # CSPRNG every round. A site may set its own `dp-seed` to replay its runs (seeded with its ledger's random id,
    # so a new ledger never replays old noise); simulation seeds with the site's name, run seed and noise draw.
    dp_seed: str | None = None
    privacy_unit: str = "patient"  # or "visit" (common.privacy says what each protects)
    max_epsilon_per_run: float = math.inf  # what one run may spend of `epsilon` (inf: all of it)
    # What the site spends in any 24 hours, whoever starts the runs (inf: no rate cap).
    max_epsilon_per_day: float = math.inf
    # Simulation only: the harness starts every run's ledgers; a deployed site's must exist (`edfed ledger init`).
    create_ledger: bool = False

    @property
    def new_ledger_id(self) -> str | None:
        """The id a missing ledger is created with (simulation: derived from its seed, so it replays), or None."""
        if not self.create_ledger:
            return None
        return hashlib.sha256(f"simulated:{self.dp_seed}".encode()).hexdigest()[:32]
    # The release policy: what the site shares beyond DP-protected arrays (docs/deployment.md lists each field).
    release_metrics: bool = False  # answer `evaluate` with AUROCs (val/test splits only)
    release_timing: bool = False  # seconds a round took (depends on how many visits were sampled)
    max_queries_per_run: int | None = 10  # evaluations answered per run; None: no cap (simulation)
    # The float format of the frozen encoder pass on this machine (common.precision): "" = auto-detected.
    precision: str = ""
    # Secure aggregation (docs/secure-aggregation.md): whether the site takes part, the smallest t (sites whose
    # noise shares the sum is guaranteed to hold) it trusts, and the epsilon it keeps from its own shares alone.
    secure_aggregation: bool = False
    min_secagg_sites: int = 0
    max_epsilon_without_secagg: float = math.inf


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
        epsilon, delta = _budget(node_config)
        if "ledger-path" not in node_config:
            raise EdfedError("this site's node config has no `ledger-path`: a deployed site names its privacy ledger "
                             "explicitly (a default derived from its name or data file would start a fresh budget "
                             "when either moves); create it once with `edfed ledger init PATH` and set "
                             "ledger-path=\"PATH\"; refusing to join")
        cache = node_config.get("cache-dir")
        mapping = node_config.get("mapping")
        return SiteSettings(
            name=name, data_path=data_path, epsilon=epsilon, delta=delta,
            ledger_path=Path(str(node_config["ledger-path"])), declared_patients=_declared(node_config),
            cache_dir=Path(str(cache)) if cache else data_path.parent / SITE_CACHE,
            mapping=Path(str(mapping)) if mapping else None, model_path=str(node_config.get("model-path", "")),
            dp_seed=str(node_config["dp-seed"]) if "dp-seed" in node_config else None,
            privacy_unit=str(node_config.get("privacy-unit", "patient")),
            max_epsilon_per_run=_positive(node_config, "max-epsilon-per-run", epsilon),
            max_epsilon_per_day=_positive(node_config, "max-epsilon-per-day", math.inf),
            release_metrics=_flag(node_config, "release-metrics", False),
            release_timing=_flag(node_config, "release-timing", False),
            max_queries_per_run=int(node_config.get("max-queries-per-run", 10)),
            precision=str(node_config.get("precision", "")), **secagg_policy(node_config))
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
    train_config = json.loads(str(message_config.get("train-config", "{}")))
    draw = int(message_config.get("noise-draw", 0))
    return SiteSettings(name=name, data_path=data_path, epsilon=float(message_config.get("site-epsilon", math.inf)),
                        delta=float(message_config.get("site-delta", 1e-5)), ledger_path=ledger_dir / f"{name}.json",
                        declared_patients=simulated_declaration(data_path),
                        cache_dir=data_path.parent / SITE_CACHE, model_path=str(message_config.get("model", "")),
                        # Simulated sites replay exactly; each run seed and each `noise-draw` draws other noise.
                        dp_seed=f"{name}#seed{train_config.get('seed', 0)}" + (f"#draw{draw}" if draw else ""),
                        privacy_unit=str(message_config.get("site-privacy-unit", "patient")), create_ledger=True,
                        release_metrics=True, release_timing=True, max_queries_per_run=None,
                        # A simulated site accepts the run's secure rounds and takes its bounds from the run.
                        secure_aggregation=_flag(message_config, "secure-aggregation", False),
                        min_secagg_sites=int(message_config.get("secagg-sites", 0)),
                        max_epsilon_without_secagg=float(message_config.get("max-epsilon-without-secagg",
                                                                            math.inf)))


def secagg_policy(node_config: dict) -> dict:
    """A deployed site's secure-aggregation settings (node config `secure-aggregation`, `min-secagg-sites`,
    `max-epsilon-without-secagg`): a site that accepts names both bounds, none is guessed for it."""
    if not _flag(node_config, "secure-aggregation", False):
        return {}
    absent = [k for k in ("min-secagg-sites", "max-epsilon-without-secagg") if k not in node_config]
    if absent:
        raise EdfedError(f"this site's node config sets secure-aggregation=true but has no "
                         f"{' or '.join(f'`{k}`' for k in absent)}: name the smallest number of sites whose noise the "
                         "sum must hold (e.g. min-secagg-sites=4) and the epsilon the site keeps if secure "
                         "aggregation fails (e.g. max-epsilon-without-secagg=30); refusing to join")
    return {"secure_aggregation": True, "min_secagg_sites": _whole(node_config, "min-secagg-sites", 2),
            "max_epsilon_without_secagg": _positive(node_config, "max-epsilon-without-secagg", math.inf)}


SITE_CACHE = ".edfed-cache"  # in the site's data folder: the encoder's states of its notes, owner-only


def _positive(node_config: dict, key: str, default: float) -> float:
    try:
        value = float(node_config.get(key, default))
    except (TypeError, ValueError):
        raise EdfedError(f"node config `{key}` must be a number, got {node_config[key]!r}") from None
    if not value > 0:
        raise EdfedError(f"node config `{key}` must be positive, got {value}")
    return value


def _declared(node_config: dict) -> int:
    """The site's declared number of patients (node config `declared-patients`); required: it sizes DP updates."""
    if "declared-patients" not in node_config:
        raise EdfedError("this site's node config has no `declared-patients`: a deployed site declares about how "
                         "many patients its table holds (public: it sets the step size of its DP updates and its "
                         "weight in the average, and is never recounted from the rows); e.g. declared-patients=1200; "
                         "refusing to join")
    return _whole(node_config, "declared-patients", 1)


def _whole(node_config: dict, key: str, low: int) -> int:
    try:
        value = int(node_config[key])
    except (TypeError, ValueError):
        raise EdfedError(f"node config `{key}` must be a whole number, got {node_config[key]!r}") from None
    if value < low:
        raise EdfedError(f"node config `{key}` must be at least {low}, got {value}")
    return value


@functools.lru_cache(maxsize=64)
def _patients_in(path: str, size: int, mtime_ns: int) -> int:
    import pandas as pd

    reader = pd.read_parquet if path.endswith(".parquet") else pd.read_csv
    return int(reader(path, columns=["patient_id"])["patient_id"].nunique())


def simulated_declaration(data_path: Path) -> int:
    """What a simulated site declares: its table's patients, rounded to 10 (a deployed site's operator sets it)."""
    if not data_path.exists():
        return 1  # the check that follows names the missing file
    stat = data_path.stat()
    return max(10, 10 * round(_patients_in(str(data_path), stat.st_size, stat.st_mtime_ns) / 10))


def declared_train_units(settings: SiteSettings) -> int:
    """The site's declared training units: its declared patients' training share (the split is by patient)."""
    return max(1, round(SPLIT_SHARES["train"] * settings.declared_patients))


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
    disk = settings.cache_dir / f"{settings.name}-{key}-{split}.pt" if settings.cache_dir else None  # site-owned
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


# Public bounds on what the coordinator sends, checked before anything is read or spent. Within them a round
# cannot overflow float32 (weights stay far below its range over any number of steps allowed), so whether a site
# trains, and whether what it releases is finite, never depends on its data.
MAX_GLOBAL_ABS = 1e4  # any global array's entries; trained models stay within a few units
SETTING_BOUNDS = {  # TrainConfig field -> (lowest, highest) the site trains with
    "glm_lr": (1e-6, 100.0), "glm_l2": (0.0, 1.0), "glm_steps": (1, 1000), "lr": (0.0, 1.0), "dp_lr": (0.0, 1.0),
    "weight_decay": (0.0, 1.0), "epochs": (1, 100),
}
MESSAGE_BOUNDS = {"local-epochs": (1, 100), "max-grad-norm": (1e-6, 1e3), "proximal-mu": (0.0, 100.0)}


def check_global_state(global_state: dict[str, torch.Tensor]) -> None:
    """Refuse arrays from the server with NaN, Inf or entries beyond MAX_GLOBAL_ABS before any budget is spent."""
    def within(value: torch.Tensor) -> bool:
        return value.numel() == 0 or bool(torch.isfinite(value).all() and value.abs().max() <= MAX_GLOBAL_ABS)

    bad = sorted(name for name, value in global_state.items() if not within(value))
    if bad:
        raise EdfedError(f"the server sent NaN, Inf or entries beyond +-{MAX_GLOBAL_ABS:g} in {len(bad)} global "
                         f"array(s) ({', '.join(bad[:3])}); refusing to train or evaluate on them")


def check_settings(config: TrainConfig, message_config: dict) -> None:
    """Refuse training settings outside the site's public bounds (SETTING_BOUNDS, MESSAGE_BOUNDS) before any
    budget is spent: the coordinator chooses them, and a step size of 1e38 overflows whatever the data."""
    problems = []
    for name, (low, high) in SETTING_BOUNDS.items():
        value = getattr(config, name)
        if not (isinstance(value, int | float) and math.isfinite(value) and low <= value <= high):
            problems.append(f"{name}={value!r} (allowed {low:g} to {high:g})")
    for key, (low, high) in MESSAGE_BOUNDS.items():
        if key in message_config:
            value = float(message_config[key])
            if not (math.isfinite(value) and low <= value <= high):
                problems.append(f"{key}={value!r} (allowed {low:g} to {high:g})")
    if config.glm and config.glm_lr * config.glm_l2 > 1:
        problems.append(f"glm_lr * glm_l2 = {config.glm_lr * config.glm_l2:g} (at most 1: decay must not overshoot)")
    if problems:
        raise EdfedError(f"the server's training settings are outside this site's bounds: {'; '.join(problems)}; "
                         "refusing to train")


def check_site(settings: SiteSettings, config: TrainConfig, expected_fingerprint: str = "",
               secure: dict | None = None) -> dict[str, float]:
    """Before a site's first round: its encoder matches, its table passes the data contract, its ledger reads.

    Raises EdfedError (its `offsite` message names file, column and rule, never a value) when the site
    cannot join; otherwise returns the scalars the coordinator logs: rounded split sizes, the budget and
    what is spent, and the release policy the coordinator needs to know (whether it may ask for metrics).
    `secure`: the message config of a run of secure rounds, which the site joins only if all of it fits its bounds.
    """
    check_encoder(config, expected_fingerprint)
    load_site_splits(settings.name, settings.data_path, config.seed, settings.mapping)  # the contract, or refuse
    # No count of the table's rows leaves: only the site's declared size (public, its operator's).
    metrics = {"declared-patients": settings.declared_patients, "epsilon-budget": settings.epsilon,
               "patient-level": float(settings.privacy_unit == "patient"),
               "releases-metrics": float(settings.release_metrics)}
    if math.isfinite(settings.epsilon) or settings.release_metrics:
        ledger = PrivacyLedger.open(settings.ledger_path, create=settings.new_ledger_id)
        ledger.check_unit(settings.privacy_unit)
        metrics["epsilon-spent"] = ledger.spent(settings.delta)
        if secure is not None:  # a run of secure rounds: joined only if all of it fits both of the site's bounds
            round_ = secure_round(settings, config, secure)
            metrics.update(_secure_projection(settings, ledger, round_, run_id=str(secure.get("run-id", ""))))
    elif secure is not None:
        raise EdfedError("secure aggregation sums DP updates; this site trains without DP (epsilon=inf)")
    return metrics


@dataclass(frozen=True)
class SecureRound:
    """What a secure run asks of a site: t, the noise multiplier of the sum (public), and the run's steps."""

    sites: int  # t: the sum holds at least t sites' shares (SecAgg+'s threshold >= t, checked at its setup)
    noise: float  # the sum's noise multiplier; this site adds noise / sqrt(t)
    total_steps: int

    @property
    def share(self) -> float:
        return self.noise / math.sqrt(self.sites)


def secure_round(settings: SiteSettings, config: TrainConfig, message_config: dict,
                 threshold: int | None = None) -> SecureRound:
    """The secure round the coordinator asks for, checked against the site's policy (before anything is spent).

    `threshold`: SecAgg+'s reconstruction threshold this site agreed to at the protocol's setup; with every site
    a neighbour of every other (edfed's setting), a round with fewer than `threshold` contributors aborts, so t
    may not exceed it.
    """
    if not settings.secure_aggregation:
        raise EdfedError("this site does not take part in secure aggregation (its node config has no "
                         "secure-aggregation=true); refusing the round")
    if not config.glm:
        raise EdfedError("secure aggregation sums the DP-GLM's full-batch gradients only (architecture glm); "
                         "refusing the round")
    try:
        round_ = SecureRound(int(message_config["secagg-sites"]), float(message_config["secagg-noise"]),
                             int(message_config["num-rounds"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise EdfedError(f"the coordinator's secure round has no valid secagg-sites, secagg-noise or num-rounds "
                         f"({exc}); refusing it") from None
    if round_.sites < max(2, settings.min_secagg_sites):
        raise EdfedError(f"the coordinator's secure round guarantees the noise of {round_.sites} sites, fewer than "
                         f"this site's min-secagg-sites={settings.min_secagg_sites}; refusing it")
    if threshold is not None and threshold < round_.sites:
        raise EdfedError(f"the secure round claims t={round_.sites} but SecAgg+'s threshold is {threshold}: a sum "
                         "of fewer sites' shares could complete; refusing it")
    if not (math.isfinite(round_.noise) and 0 < round_.noise <= MAX_SECAGG_NOISE) or round_.total_steps < 1:
        raise EdfedError(f"the coordinator's secure round asks for noise {round_.noise!r} over "
                         f"{round_.total_steps} steps; refusing it")
    return round_


MAX_SECAGG_NOISE = 1e3  # a larger noise multiplier is no privacy risk, but would drown the quantisation range


def _secure_projection(settings: SiteSettings, ledger: PrivacyLedger, round_: SecureRound, run_id: str,
                       ) -> dict[str, float]:
    """The site's epsilon, and its epsilon from its own shares alone, after the run's remaining secure steps; raise
    EdfedError when either passes its bound (the budget, the run and day caps; max-epsilon-without-secagg)."""
    done = sum(int(h["steps"]) for h in ledger.history if h["run"] == run_id)
    steps = max(1, round_.total_steps - done)
    after = ledger.projected(round_.noise, 1.0, steps, settings.delta)
    run_after = ledger.projected(round_.noise, 1.0, steps, settings.delta, run_id=run_id)
    day_after = ledger.projected(round_.noise, 1.0, steps, settings.delta, since=time.time() - DAY_SECONDS)
    alone = epsilon_of([*ledger.accounting(own_share=True), (round_.share, 1.0, steps)], settings.delta)
    problems = [f"{name} would reach {value:.3g} (its bound {bound:g})" for name, value, bound in (
        ("epsilon", after, settings.epsilon), ("this run's epsilon", run_after, settings.max_epsilon_per_run),
        ("the last 24 hours' epsilon", day_after, settings.max_epsilon_per_day),
        ("epsilon without secure aggregation", alone, settings.max_epsilon_without_secagg))
        if value > bound * (1 + 1e-6)]
    if problems:
        raise EdfedError(f"this site refuses the secure run (t={round_.sites}, noise {round_.noise:.4g}, its share "
                         f"{round_.share:.4g}, {steps} steps left): {'; '.join(problems)}")
    return {"epsilon-projected": after, "epsilon-without-secagg-projected": alone}


_GLM_ROWS: dict[tuple[str, str], GLMRows] = {}


def _secure_rows(settings: SiteSettings, config: TrainConfig, model: OutcomeModel, data: VisitDataset) -> GLMRows:
    """The GLM's features of the training split, kept in this process: a secure round is one step, and the
    features depend on the frozen layers only (a process that serves several steps computes them once)."""
    key = (_cache_key(settings, config, model.precision), settings.privacy_unit)
    if key not in _GLM_ROWS:
        _GLM_ROWS[key] = glm_rows(model, data, settings.privacy_unit)
    return _GLM_ROWS[key]


def secure_contribution(settings: SiteSettings, config: TrainConfig, global_state: dict[str, torch.Tensor],
                        message_config: dict, threshold: int) -> tuple[dict[str, np.ndarray], int, dict[str, float]]:
    """One secure step at the site: (its noisy gradient sum / its declared units, those units, scalar metrics).

    The gradient sum of the current global model over every training unit, plus Gaussian noise of multiplier
    noise / sqrt(t): one Gaussian mechanism. SecAgg+ quantises it, weighted by the units, into the masked sum, so
    the coordinator gets sum(gradient sums) / sum(units), one full-batch step of the pooled data. The spend is
    recorded (both figures) before the arrays leave; a round refused by either bound spends nothing.
    """
    started = time.perf_counter()
    run_id, step = str(message_config["run-id"]), int(message_config["server-round"])
    check_encoder(config, str(message_config.get("encoder-fingerprint", "")))
    check_global_state(global_state)
    check_settings(config, {})
    if not math.isfinite(settings.epsilon):
        raise EdfedError("secure aggregation sums DP updates; this site trains without DP (epsilon=inf)")
    round_ = secure_round(settings, config, message_config, threshold)
    model = build_model(config, global_state, settings.precision or None)
    expected_frozen = str(message_config.get("frozen-fingerprint", ""))
    if expected_frozen and frozen_init_fingerprint(model) != expected_frozen:
        raise EdfedError("this site's seeded frozen matrices differ from the server's; refusing to train")
    data = site_dataset(settings, config, model, "train")
    units = declared_train_units(settings)
    with PrivacyLedger.locked(settings.ledger_path, create=settings.new_ledger_id) as ledger:
        ledger.check_unit(settings.privacy_unit)
        if ledger.trained(run_id, step):
            raise EdfedError(f"step {step} of run {run_id} was already trained here; refusing it (its noise would "
                             "be spent twice on the same question)")
        projection = _secure_projection(settings, ledger, round_, run_id)
        noise_draw = noise_source(settings, dp_rng_seed(settings, ledger))
        rows = _secure_rows(settings, config, model, data)
        weight_sum, bias_sum = glm_noisy_gradient(model, rows, round_.share, noise_draw)
        contribution = {name: (value / units).numpy() for name, value in
                        (("glm.weight", weight_sum), ("glm.bias", bias_sum))}
        if not all(np.isfinite(v).all() for v in contribution.values()):
            raise EdfedError("this round's gradient is not finite; refusing to send it")
        ledger.record(round_.noise, 1.0, 1, unit=settings.privacy_unit, run_id=run_id, server_round=step,
                      secagg_sites=round_.sites)
        ledger.save()
        metrics = {"refused": 0, "delta": settings.delta, "num-examples": units, "steps": 1,
                   "epsilon": ledger.spent(settings.delta), "epsilon-budget": settings.epsilon,
                   "epsilon-without-secagg": ledger.spent_without_secagg(settings.delta),
                   "max-epsilon-without-secagg": settings.max_epsilon_without_secagg,
                   "secagg-sites": round_.sites, "noise-multiplier": round_.noise, "share-noise": round_.share,
                   "sample-rate": 1.0, "patient-level": float(settings.privacy_unit == "patient"),
                   "bf16": float(model.precision == "bf16"), **projection}
    if settings.release_timing:
        metrics["round-seconds"] = time.perf_counter() - started
    return contribution, units, metrics


def dp_rng_seed(settings: SiteSettings, ledger: PrivacyLedger) -> int:
    """The seed of one round's DP sampling (and, for a seeded site, its noise): secret to the site, never the same
    at two sites, two ledgers or two rounds.

    Nothing the server sends enters it (it could otherwise make a site replay its noise on other gradients,
    which then cancels in the difference). With a `dp_seed`, the key is the site's secret, its ledger's random id
    and the number of rounds that ledger has recorded (read under its lock).
    """
    if settings.dp_seed is None:
        return secrets.randbits(62)
    key = f"{settings.dp_seed}:{ledger.id}:{len(ledger.history)}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") >> 2


def noise_source(settings: SiteSettings, seed: int) -> GaussianNoise:
    """The site's Gaussian noise: the OS's CSPRNG (deployed default), or replayable from its secret seed."""
    return secure_gaussian if settings.dp_seed is None else seeded_gaussian(seed + 1)


def train_round(settings: SiteSettings, config: TrainConfig, global_state: dict[str, torch.Tensor], *,
                run_id: str, server_round: int, num_rounds: int, local_epochs: int, proximal_mu: float = 0.0,
                max_grad_norm: float = 1.0, dp_clipping: str = "per-layer",
                expected_fingerprint: str = "", expected_frozen: str = "") -> tuple[dict | None, dict]:
    """One round at the site: (new trainable state or None if the round is refused, scalar metrics).

    With DP, everything from reading the ledger to recording the round's spend holds the ledger's lock, and the
    spend is on disk before the arrays are returned.
    """
    round_started = time.perf_counter()
    check_encoder(config, expected_fingerprint)
    check_global_state(global_state)
    check_settings(config, {"local-epochs": local_epochs, "max-grad-norm": max_grad_norm, "proximal-mu": proximal_mu})
    if settings.declared_patients < 1:
        raise EdfedError("this site has no declared size (declared-patients); refusing to train")
    model = build_model(config, global_state, settings.precision or None)
    if expected_frozen and frozen_init_fingerprint(model) != expected_frozen:
        raise EdfedError("this site's seeded frozen matrices (LoRA A; with compact also the text projection and "
                         "fusion layer) differ from the server's (another torch version?); refusing to train")
    data_started = time.perf_counter()
    data = site_dataset(settings, config, model, "train")
    data_seconds = time.perf_counter() - data_started  # read, check, tokenize, frozen-layer cache (first round)
    units = declared_train_units(settings)
    # The machine's float format is no patient data; data-seconds is timing, released only with release-timing.
    # num-examples, the site's weight in the average, is its declared size, not a count of its rows.
    metrics: dict[str, float] = {"refused": 0, "delta": settings.delta, "bf16": float(model.precision == "bf16"),
                                 "num-examples": units}
    if settings.release_timing:
        metrics["data-seconds"] = data_seconds
    if not math.isfinite(settings.epsilon):
        if config.glm:
            state, trained = _train_glm(settings, model, data, units, 0.0, None, round_started)
            return state, {**metrics, **trained, "epsilon": math.inf, "steps": config.glm_steps}
        # Without DP the shuffle is a public, reproducible function of the run.
        loader = make_loader(data, config.batch_size, shuffle=True, seed=config.seed * 1000 + server_round)
        optimizer = make_optimizer(model, config.lr, config.weight_decay)
        state, trained = _train(settings, model, loader, optimizer, local_epochs, proximal_mu, global_state,
                                round_started)
        return state, {**metrics, **trained, "epsilon": math.inf, "steps": local_epochs * len(loader)}
    with PrivacyLedger.locked(settings.ledger_path, create=settings.new_ledger_id) as ledger:
        ledger.check_unit(settings.privacy_unit)
        metrics.update({"epsilon-budget": settings.epsilon, "patient-level": float(settings.privacy_unit == "patient")})
        if ledger.trained(run_id, server_round):  # a replayed round would spend twice on the same question
            log(WARNING, "edfed: round %d of run %s was already trained here; refusing it", server_round, run_id)
            return None, {**metrics, "refused": REFUSED_REPEAT, "epsilon": ledger.spent(settings.delta), "steps": 0,
                          "num-examples": 0}
        seed = dp_rng_seed(settings, ledger)
        if config.glm:  # full-batch steps: every unit is in every step, exactly known sensitivity, no clipping
            sample_rate, steps = 1.0, config.glm_steps
        else:  # Poisson-sampled batches of about batch-size units, sized from the declared size alone
            per_epoch = max(1, math.ceil(units / config.batch_size))
            sample_rate, steps = 1 / per_epoch, local_epochs * per_epoch
        day_ago = time.time() - DAY_SECONDS
        run_cap = min(settings.max_epsilon_per_run, settings.max_epsilon_per_day)
        noise = ledger.plan_noise(run_id, settings.epsilon, settings.delta, sample_rate, num_rounds * steps,
                                  run_cap=run_cap)
        after = run_after = day_after = math.inf
        if math.isfinite(noise):
            after = ledger.projected(noise, sample_rate, steps, settings.delta)
            run_after = ledger.projected(noise, sample_rate, steps, settings.delta, run_id=run_id)
            day_after = ledger.projected(noise, sample_rate, steps, settings.delta, since=day_ago)
        metrics.update({"noise-multiplier": noise, "sample-rate": sample_rate})
        refusal = (REFUSED_BUDGET if after > settings.epsilon * (1 + 1e-6)
                   or run_after > settings.max_epsilon_per_run * (1 + 1e-6)
                   else REFUSED_RATE if day_after > settings.max_epsilon_per_day * (1 + 1e-6) else 0)
        if refusal:
            ledger.save()  # keep the plan, spend nothing
            return None, {**metrics, "refused": refusal, "epsilon": ledger.spent(settings.delta),
                          "epsilon-projected": after, "steps": 0, "num-examples": 0}
        noise_draw = noise_source(settings, seed)
        if config.glm:
            state, trained = _train_glm(settings, model, data, units, noise, noise_draw, round_started)
        else:
            optimizer = make_optimizer(model, config.dp_lr, config.weight_decay)
            optimizer, loader = make_private(
                model, optimizer, data, noise_multiplier=noise, max_grad_norm=max_grad_norm, sample_rate=sample_rate,
                steps=steps // local_epochs, expected_units=units * sample_rate, noise=noise_draw,
                sampling_seed=seed, clipping=dp_clipping, unit=settings.privacy_unit)
            state, trained = _train(settings, model, loader, optimizer, local_epochs, proximal_mu, global_state,
                                    round_started)
        if not all(torch.isfinite(value).all() for value in state.values()):
            # Unreachable within the bounds checked above; should it happen, nothing leaves (and nothing is spent).
            raise EdfedError("this round's update is not finite; refusing to send it")
        ledger.record(noise, sample_rate, steps, unit=settings.privacy_unit, run_id=run_id, server_round=server_round)
        ledger.save()
    return state, {**metrics, **trained, "epsilon": ledger.spent(settings.delta), "steps": steps}


def _train_glm(settings: SiteSettings, model: OutcomeModel, data: VisitDataset, divisor: int, noise: float,
               noise_draw: GaussianNoise | None, round_started: float) -> tuple[dict, dict[str, float]]:
    """The GLM's `glm_steps` full-batch steps; every step sees every unit, so each is one Gaussian mechanism.

    The step divides by `divisor`, the site's declared training units: a public constant, so one patient more or
    less moves the update only through the noised gradient sum.
    """
    started = time.perf_counter()
    rows = glm_rows(model, data, settings.privacy_unit)
    for _ in range(model.config.glm_steps):
        glm_step(model, rows, divisor, noise, noise_draw)
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
        with PrivacyLedger.locked(settings.ledger_path, create=settings.new_ledger_id) as ledger:
            answered = ledger.queries.get(run_id, 0)
            if answered >= settings.max_queries_per_run:
                raise EdfedError(f"this site answers at most {settings.max_queries_per_run} evaluations per run "
                                 "(max-queries-per-run in its node config); this run has had them all")
            ledger.queries[run_id] = answered + 1
            ledger.save()
    model = build_model(config, global_state, settings.precision or None)
    data = site_dataset(settings, config, model, split)
    # A prediction the global model made NaN scores as 0.5 (no crash that says which visits are there).
    result = evaluate(data.labels.numpy(), np.nan_to_num(predict(model, data), nan=0.5), bootstrap=0)
    # The split's size, as its declared share: the released AUROCs are the policy's, the count is not a row count.
    metrics = {"num-examples": max(1, round(SPLIT_SHARES[split] * settings.declared_patients))}
    for outcome, m in result.items():
        metrics[f"{outcome}-auroc"] = float(m["auroc"]) if np.isfinite(m["auroc"]) else math.nan
    defined = [v for k, v in metrics.items() if k.endswith("-auroc") and math.isfinite(v)]
    metrics["mean-auroc"] = float(np.mean(defined)) if defined else math.nan
    return metrics
