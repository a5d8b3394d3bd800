"""The site's DP mechanisms and its privacy ledger: the accountant, the noise, and DP-SGD's Opacus wrapping.

The site owns its budget (epsilon, delta) and its ledger file. The ledger keeps every DP round the site ever
trained (Flower rebuilds the ClientApp every round, and a hospital's budget outlives a run), so epsilon only ever
accumulates. The noise multiplier is planned once per run, for the whole run, from what the budget has left;
before every round the site projects its epsilon after that round and refuses the round if it would pass the
budget. Epsilon is computed tightly: every step of the DP-GLM sees every unit (sample rate 1), so a history of them
is one Gaussian mechanism, whose exact (epsilon, delta) curve is the analytic Gaussian; a history with subsampled
steps (DP-SGD) is composed by privacy loss distributions (dp-accounting's PLD accountant, a pessimistic
estimate). Both are below Opacus' RDP bound, which `rdp_epsilon_of` keeps for comparison.

The privacy unit is a patient (default): patients are Poisson-sampled, a sampled patient brings all of its
training visits, and the sum of their gradients is clipped as one. The epsilon then holds per patient, whatever
their number of visits. `privacy-unit = visit` (one visit per unit, for comparison) protects a patient with k
visits at about k times the epsilon (group privacy).

The noise: a deployed site without `dp-seed` draws it from the operating system's CSPRNG (`os.urandom`), in
float64, as the sum of four Gaussians halved (Opacus' secure mode, after Holohan and Braghin's mitigation of
floating-point attacks on Gaussian noise). A seeded site (simulation, or a site that sets `dp-seed` to replay its
runs) draws it from torch's Mersenne Twister, seeded from its secret and its ledger's own random id.
"""

from __future__ import annotations

import functools
import json
import math
import os
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from filelock import FileLock
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.optimizers import DPOptimizer, DPPerLayerOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from scipy.special import log_ndtr
from torch.utils.data import DataLoader, Dataset

from edfed.common.errors import EdfedError
from edfed.common.files import FILE_MODE, atomic_write_text, private_dir

MAX_NOISE = 50.0
ORDERS = tuple(RDPAccountant.DEFAULT_ALPHAS)
# The planned noise multiplier is within this factor of the smallest that fits the budget (and never below it).
PLAN_TOLERANCE = 1e-4
UNITS = ("patient", "visit")
DAY_SECONDS = 86400.0
# PLD's discretisation of the privacy loss (dp-accounting's default): finer costs time, not validity.
PLD_DISCRETISATION = 1e-4

History = list[tuple[float, float, int]]  # (noise multiplier, sample rate, steps)


def _grouped(history: History) -> list[tuple[float, float, int]]:
    """The same (noise, rate) pairs merged: a ledger repeats the same few, and composition only counts steps."""
    steps: dict[tuple[float, float], int] = {}
    for noise, rate, k in history:
        if k:
            steps[float(noise), float(rate)] = steps.get((float(noise), float(rate)), 0) + int(k)
    return [(n, q, k) for (n, q), k in sorted(steps.items())]


def gaussian_epsilon(mu: float, delta: float) -> float:
    """The exact epsilon at `delta` of a Gaussian mechanism of sensitivity 1 and noise 1/mu (mu-GDP):
    delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) (Balle and Wang 2018), solved by bisection."""
    if mu <= 0:
        return 0.0

    def delta_at(eps: float) -> float:
        return math.exp(log_ndtr(-eps / mu + mu / 2)) - math.exp(eps + log_ndtr(-eps / mu - mu / 2))

    if delta_at(0.0) <= delta:
        return 0.0
    low, high = 0.0, 1.0
    while delta_at(high) > delta:
        low, high = high, 2 * high
    while high - low > 1e-9 * max(1.0, high):
        mid = (low + high) / 2
        low, high = (mid, high) if delta_at(mid) > delta else (low, mid)
    return high


@functools.lru_cache(maxsize=512)
def _pld_epsilon(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    import dp_accounting
    from dp_accounting.pld import PLDAccountant

    accountant = PLDAccountant(value_discretization_interval=PLD_DISCRETISATION)
    for noise, rate, steps in history:
        step = dp_accounting.GaussianDpEvent(noise)
        accountant.compose(step if rate >= 1 else dp_accounting.PoissonSampledDpEvent(rate, step), steps)
    return float(accountant.get_epsilon(delta))


def epsilon_of(history: History, delta: float) -> float:
    """Epsilon of a list of (noise multiplier, sample rate, steps), tightly: exact for full-batch steps (they compose
    as one Gaussian mechanism, mu = sqrt(sum steps / noise^2)), PLD as soon as one step was subsampled."""
    grouped = _grouped(history)
    if not grouped:
        return 0.0
    if any(math.isinf(n) for n, _, _ in grouped):
        grouped = [(n, q, k) for n, q, k in grouped if math.isfinite(n)]
        if not grouped:
            return 0.0
    if all(q >= 1 for _, q, _ in grouped):
        return gaussian_epsilon(math.sqrt(sum(k / n**2 for n, _, k in grouped)), delta)
    return _pld_epsilon(tuple(grouped), delta)


@functools.lru_cache(maxsize=256)
def _rdp_per_step(noise: float, sample_rate: float) -> np.ndarray:
    return np.asarray(compute_rdp(q=sample_rate, noise_multiplier=noise, steps=1, orders=list(ORDERS)))


def rdp_epsilon_of(history: History, delta: float) -> float:
    """Opacus' RDP bound on the same history (its default orders): looser, kept to check the tight one against."""
    grouped = _grouped(history)
    if not grouped:
        return 0.0
    rdp = sum(k * _rdp_per_step(n, q) for n, q, k in grouped)
    return float(get_privacy_spent(orders=list(ORDERS), rdp=rdp, delta=delta)[0])


# --- the noise -----------------------------------------------------------------------------------------------

GaussianNoise = Callable[[tuple[int, ...], float], torch.Tensor]  # (shape, standard deviation) -> float32 noise


def secure_gaussian(shape: tuple[int, ...], std: float) -> torch.Tensor:
    """Gaussian noise from the OS's CSPRNG: Box-Muller on 53-bit uniforms in float64, four draws summed and
    halved (a N(0, std^2) whose low-order bits no longer reveal the draw), rounded to float32 last."""
    n = int(np.prod(shape)) if shape else 1
    words = np.frombuffer(os.urandom(8 * 8 * n), dtype=np.uint64).reshape(4, 2, n)
    uniform = ((words >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0**-53  # in (0, 1]
    normal = np.sqrt(-2.0 * np.log(uniform[:, 0])) * np.cos(2.0 * np.pi * uniform[:, 1])
    return torch.from_numpy(std * normal.sum(axis=0) / 2.0).reshape(shape).float()


def seeded_gaussian(seed: int) -> GaussianNoise:
    """Reproducible noise (simulation, or a site's own `dp-seed`): torch's generator, seeded by the site alone."""
    generator = torch.Generator().manual_seed(seed)

    def draw(shape: tuple[int, ...], std: float) -> torch.Tensor:
        return std * torch.randn(shape, generator=generator)

    return draw


# --- the ledger ----------------------------------------------------------------------------------------------

LEDGER_INIT_HINT = "initialise it on purpose with `edfed ledger init PATH` (a new ledger starts a new budget)"


@dataclass
class PrivacyLedger:
    """A site's record of every DP round it ever trained, stored as JSON at `path`.

    Each history entry: noise multiplier, sample rate and steps (what the accountant composes), the privacy
    unit they protect, the run and round they were spent on (a round is never trained twice) and when (`at`, Unix
    seconds: the site's rate cap). `queries` counts the evaluations the site answered, per run. `id` is the
    ledger's own random identity: a seeded site's noise depends on it, so a new ledger never replays old noise.
    """

    path: Path
    id: str = ""
    history: list[dict] = field(default_factory=list)
    plans: dict[str, float] = field(default_factory=dict)  # run id -> planned noise multiplier
    queries: dict[str, int] = field(default_factory=dict)

    @classmethod
    def init(cls, path: Path, ledger_id: str | None = None) -> PrivacyLedger:
        """A new, empty ledger at `path` (refused if one is there: its spend would be forgotten)."""
        path = Path(path)
        if path.exists():
            raise EdfedError(f"privacy ledger {path} already exists; a ledger is never reset (its spend would be "
                             "forgotten)")
        private_dir(path.parent)
        ledger = cls(path, id=ledger_id or secrets.token_hex(16))
        ledger.save()
        return ledger

    @classmethod
    def open(cls, path: Path, create: str | None = None) -> PrivacyLedger:
        """The ledger at `path`. A missing file is refused (a renamed site or a moved table must not start a fresh
        budget) unless `create` is the id a new one takes (a simulated site, whose harness starts every run's
        ledgers itself and replays its noise)."""
        path = Path(path)
        if not path.exists():
            if create:
                return cls(path, id=create)
            raise EdfedError(f"privacy ledger {path} does not exist; refusing to train or answer without it: "
                             f"{LEDGER_INIT_HINT}, or point ledger-path at the site's existing ledger")
        try:
            state = json.loads(path.read_text())
            # A ledger from before the privacy unit was recorded holds visit-level spending.
            history = [h if isinstance(h, dict) else {"noise": h[0], "sample-rate": h[1], "steps": h[2],
                                                      "unit": "visit", "run": None, "round": None}
                       for h in state["history"]]
            # A ledger from before it had an id gets one now (kept from its next save on).
            ledger = cls(path, str(state.get("id") or secrets.token_hex(16)), history,
                         dict(state.get("plans", {})), dict(state.get("queries", {})))
            ledger.accounting()  # every entry has its numbers
            return ledger
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise EdfedError(f"privacy ledger {path} is unreadable ({exc}); refusing to train without it") from exc

    @staticmethod
    @contextmanager
    def locked(path: Path, create: str | None = None) -> Iterator[PrivacyLedger]:
        """The ledger, held exclusively (across processes) from reading it to saving it: read, plan, train, record.

        Without the lock, two train messages at once (two runs, a repeated round) both read the same spend and
        the later save forgets the other's."""
        path = Path(path)
        if not path.parent.exists():
            if not create:
                raise EdfedError(f"privacy ledger {path}: its folder does not exist; {LEDGER_INIT_HINT}")
            private_dir(path.parent)
        with FileLock(f"{path}.lock", mode=FILE_MODE):
            yield PrivacyLedger.open(path, create=create)

    def accounting(self, since: float | None = None, own_share: bool = False) -> History:
        """What the accountant composes; `since` (Unix seconds): only entries recorded then or later. `own_share`:
        a securely aggregated round at the noise of the site's own share alone (secure aggregation broken, or
        the coordinator colluding with the other sites); any other round at its noise."""
        noise = "share-noise" if own_share else "noise"
        return [(float(h.get(noise, h["noise"])), float(h["sample-rate"]), int(h["steps"])) for h in self.history
                if since is None or float(h.get("at", -math.inf)) >= since]

    def spent(self, delta: float) -> float:
        return epsilon_of(self.accounting(), delta)

    def spent_without_secagg(self, delta: float) -> float:
        """Epsilon from every round at what the site itself added (`accounting(own_share=True)`)."""
        return epsilon_of(self.accounting(own_share=True), delta)

    def spent_by_run(self, run_id: str, delta: float) -> float:
        return self.projected(0.0, 0.0, 0, delta, run_id=run_id)

    def projected(self, noise: float, sample_rate: float, steps: int, delta: float, run_id: str | None = None,
                  since: float | None = None) -> float:
        """Epsilon after `steps` more steps at this noise and sample rate: of everything, of run `run_id` alone, or
        of what was recorded since `since`."""
        past = [(float(h["noise"]), float(h["sample-rate"]), int(h["steps"])) for h in self.history
                if (run_id is None or h["run"] == run_id)
                and (since is None or float(h.get("at", -math.inf)) >= since)]
        return epsilon_of([*past, (noise, sample_rate, steps)], delta)

    def trained(self, run_id: str, server_round: int) -> bool:
        return any(h["run"] == run_id and h["round"] == server_round for h in self.history)

    def check_unit(self, unit: str) -> None:
        """One ledger, one privacy unit: visit-level spending says nothing exact about a patient's epsilon."""
        if unit not in UNITS:
            raise EdfedError(f"privacy-unit must be one of {', '.join(UNITS)}, got {unit!r}")
        other = sorted({h["unit"] for h in self.history} - {unit})
        if other:
            raise EdfedError(f"privacy ledger {self.path} records {other[0]}-level spending and this site now "
                             f"trains at {unit} level; the two do not add up to one guarantee: keep privacy-unit="
                             f"{other[0]} or start a new ledger (ledger-path) with your privacy officer's approval")

    def plan_noise(self, run_id: str, budget: float, delta: float, sample_rate: float, total_steps: int,
                   run_cap: float = math.inf) -> float:
        """The run's noise multiplier: the smallest that fits all of the run's steps in the budget left, and
        the run's own spend under `run_cap` (the site's `max-epsilon-per-run`, or its daily cap if smaller).

        Planned once per run and kept in the ledger, so every round of a run uses the same noise.
        Returns `inf` when not even `MAX_NOISE` fits.
        """
        if run_id in self.plans:
            return self.plans[run_id]
        past = self.accounting()

        def fits(noise: float) -> bool:
            this_run = [(noise, sample_rate, total_steps)]
            return epsilon_of([*past, *this_run], delta) <= budget and epsilon_of(this_run, delta) <= run_cap

        noise = smallest_fitting(fits, 0.1, MAX_NOISE) if fits(MAX_NOISE) else math.inf
        self.plans[run_id] = noise
        return noise

    def record(self, noise: float, sample_rate: float, steps: int, *, unit: str, run_id: str,
               server_round: int, secagg_sites: int = 0) -> None:
        """One round's spend. A securely aggregated round (`secagg_sites` = t > 0) added noise / sqrt(t) here: its
        entry keeps both figures, `noise` (the sum's, with t sites' shares in it) and `share-noise` (this site's)."""
        entry = {"noise": float(noise), "sample-rate": float(sample_rate), "steps": int(steps),
                 "unit": unit, "run": run_id, "round": int(server_round), "at": time.time()}
        if secagg_sites:
            entry.update({"secagg-sites": int(secagg_sites), "share-noise": float(noise) / math.sqrt(secagg_sites)})
        self.history.append(entry)

    def save(self) -> None:
        """Atomic, owner-only, fsynced write: a crash mid-save never leaves a ledger that forgets spent budget, and
        the spend is on disk before the arrays it paid for leave."""
        atomic_write_text(self.path, json.dumps({"id": self.id, "history": self.history, "plans": self.plans,
                                                 "queries": self.queries}, indent=1))


def central_noise(epsilon: float, delta: float, steps: int) -> float:
    """The smallest noise multiplier at which `steps` full-batch Gaussian steps cost at most `epsilon` (a
    securely aggregated run's noise in the sum, public: each site adds its share and checks it against its own
    budget); `inf` when not even MAX_NOISE fits."""
    def fits(noise: float) -> bool:
        return epsilon_of([(noise, 1.0, steps)], delta) <= epsilon

    return smallest_fitting(fits, 0.1, MAX_NOISE) if fits(MAX_NOISE) else math.inf


def smallest_fitting(fits, low: float, high: float) -> float:
    """The smallest noise in [low, high] that fits, to PLAN_TOLERANCE (bisection in log space); `high` fits."""
    while high / low > 1 + PLAN_TOLERANCE:
        mid = math.sqrt(low * high)
        low, high = (low, mid) if fits(mid) else (mid, high)
    return high


# --- DP-SGD --------------------------------------------------------------------------------------------------

CLIPPING = ("per-layer", "flat")


class _UnitDPSGD:
    """Mixin for Opacus' DP optimizers: per-visit gradients are summed per unit (patient) before they are clipped,
    a unit whose gradient is not finite counts as zero, and the noise is the site's own (`GaussianNoise`).

    `group_by(unit)` gives the batch's unit of each visit (any integer codes). Clipping and scaling are then
    Opacus' own, on one row per unit: each unit's summed gradient is clipped to the threshold, so the unit as a
    whole moves the noised sum by at most max_grad_norm. Zeroing a non-finite row is a function of that unit alone,
    so it keeps the bound: a global model that makes one visit's gradient overflow cannot make a NaN survive into
    what leaves (no noise would hide it).
    """

    _groups: torch.Tensor | None = None
    _noise: GaussianNoise

    def group_by(self, unit: torch.Tensor) -> None:
        self._groups = torch.unique(unit, return_inverse=True)[1]

    def clip_and_accumulate(self) -> None:
        if self._groups is None:
            raise EdfedError("DP-SGD: a batch came without its unit index; refusing to clip per visit")
        groups, self._groups = self._groups, None
        n_units = int(groups.max()) + 1 if len(groups) else 0
        per_unit = []
        for p in self.params:
            per_visit = self._get_flat_grad_sample(p)
            if len(per_visit) != len(groups):
                raise EdfedError(f"DP-SGD: {len(per_visit)} per-visit gradients for {len(groups)} visits")
            rows = per_visit.new_zeros((n_units, *per_visit.shape[1:]))
            per_unit.append(rows.index_add_(0, groups.to(per_visit.device), per_visit))
        finite = torch.ones(n_units, dtype=torch.bool)
        for rows in per_unit:
            finite &= torch.isfinite(rows.flatten(1)).all(dim=1).cpu()
        for p, rows in zip(self.params, per_unit, strict=True):
            rows[~finite.to(rows.device)] = 0.0
            p.grad_sample = rows
        super().clip_and_accumulate()

    def add_noise(self) -> None:
        from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

        for p in self.params:
            _check_processed_flag(p.summed_grad)
            noise = self._noise(tuple(p.summed_grad.shape), self.noise_multiplier * self.max_grad_norm)
            p.grad = (p.summed_grad + noise.to(p.summed_grad)).view_as(p)
            _mark_as_processed(p.summed_grad)


class UnitDPOptimizer(_UnitDPSGD, DPOptimizer):
    pass


class UnitDPPerLayerOptimizer(_UnitDPSGD, DPPerLayerOptimizer):
    pass


class _WithUnit(Dataset):
    """A visit dataset whose items also carry their unit's code (for `group_by`)."""

    def __init__(self, dataset, codes: np.ndarray) -> None:
        self.dataset, self.codes = dataset, torch.from_numpy(codes)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        return {**self.dataset[i], "patient": self.codes[i]}

    def collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        if not items:  # Poisson sampling can draw nobody: an empty batch (train_epoch skips it)
            return {"labels": torch.zeros((0, self.dataset.labels.shape[1])),
                    "patient": torch.zeros(0, dtype=torch.long)}
        batch = self.dataset.collate([{k: v for k, v in it.items() if k != "patient"} for it in items])
        batch["patient"] = torch.stack([it["patient"] for it in items])
        return batch


class UnitPoissonSampler:
    """Batches of visit indices: every unit is drawn independently with `sample_rate` at each of `steps` steps
    (Opacus' own sampler, over units) and brings all of its visits."""

    def __init__(self, codes: np.ndarray, sample_rate: float, steps: int, generator: torch.Generator) -> None:
        order = np.argsort(codes, kind="stable")
        self.visits = np.split(order, np.flatnonzero(np.diff(codes[order])) + 1) if len(codes) else []
        self.units = UniformWithReplacementSampler(num_samples=len(self.visits), sample_rate=sample_rate,
                                                   generator=generator, steps=steps)

    def __len__(self) -> int:
        return len(self.units)

    def __iter__(self) -> Iterator[list[int]]:
        for drawn in self.units:
            yield [int(v) for unit in drawn for v in self.visits[unit]]


def unit_codes(dataset, unit: str) -> np.ndarray:
    """Each visit's unit as an integer code: its patient's (unit "patient") or its own (unit "visit")."""
    if unit not in UNITS:
        raise EdfedError(f"privacy-unit must be one of {', '.join(UNITS)}, got {unit!r}")
    if unit == "visit":
        return np.arange(len(dataset), dtype=np.int64)
    if getattr(dataset, "patient_ids", None) is None:
        raise EdfedError("patient-level DP needs each visit's patient_id; this dataset has none")
    return pd.factorize(np.asarray(dataset.patient_ids).astype(str))[0].astype(np.int64)


def unit_loader(dataset, unit: str, sample_rate: float, steps: int, generator: torch.Generator) -> DataLoader:
    """Poisson sampling of units over a visit dataset: each batch holds all visits of its sampled units."""
    codes = unit_codes(dataset, unit)
    wrapped = _WithUnit(dataset, codes)
    return DataLoader(wrapped, batch_sampler=UnitPoissonSampler(codes, sample_rate, steps, generator),
                      collate_fn=wrapped.collate)


def make_private(model, optimizer, dataset, *, noise_multiplier: float, max_grad_norm: float, sample_rate: float,
                 steps: int, expected_units: float, noise: GaussianNoise, sampling_seed: int,
                 clipping: str = "per-layer", unit: str = "patient") -> tuple[DPOptimizer, DataLoader]:
    """The same model and optimizer, wrapped for DP-SGD, and a loader of `steps` Poisson-sampled batches of units.

    Every size that shapes the update is public: `sample_rate` and `steps` (the site's plan) and
    `expected_units` (the units a batch holds on average, from the site's declared size), which the summed
    gradient is divided by. None of them is a count of the site's rows, so the released arrays depend on the data
    only through the clipped, noised sums.

    `clipping="per-layer"` clips each trainable tensor's per-unit gradient to max_grad_norm / sqrt(n) (n tensors),
    so the thresholds' L2 norm, the sensitivity, is still max_grad_norm: the same noise and the same epsilon as
    flat clipping, but the largest gradients cannot take the whole budget (docs/experiments.md).

    The model stays unwrapped (Opacus' hooks only), so the trainable state keeps its names.
    """
    from opacus import PrivacyEngine

    if clipping not in CLIPPING:
        raise EdfedError(f"dp-clipping must be one of {', '.join(CLIPPING)}, got {clipping!r}")
    n_tensors = sum(len(group["params"]) for group in optimizer.param_groups)
    thresholds = ([max_grad_norm / math.sqrt(n_tensors)] * n_tensors if clipping == "per-layer"
                  else max_grad_norm)
    loader = unit_loader(dataset, unit, sample_rate, steps, torch.Generator().manual_seed(sampling_seed))
    model.train()  # Opacus' hooks see nothing in eval mode
    PrivacyEngine().make_private(module=model, optimizer=optimizer, data_loader=loader,
                                 noise_multiplier=noise_multiplier, max_grad_norm=thresholds,
                                 clipping="per_layer" if clipping == "per-layer" else "flat",
                                 poisson_sampling=False, grad_sample_mode="hooks", wrap_model=False)
    optimizer_class = UnitDPPerLayerOptimizer if clipping == "per-layer" else UnitDPOptimizer
    optimizer = optimizer_class(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=thresholds,
                                expected_batch_size=max(expected_units, 1.0), loss_reduction="mean")
    optimizer._noise = noise
    return optimizer, loader
