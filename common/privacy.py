"""DP-SGD at a site: the privacy unit, the privacy ledger, the noise plan and the Opacus wrapping.

The site owns its budget (epsilon, delta) and its ledger file. The ledger keeps the RDP
accountant's history across rounds and runs (Flower rebuilds the ClientApp every round, and a
hospital's budget outlives a run), so epsilon only ever accumulates. The noise multiplier is
planned once per run, for the whole run, from what the budget has left; before every round
the site projects its epsilon after that round and refuses the round if it would pass the budget.

The privacy unit is a patient (default): patients are Poisson-sampled, a sampled patient brings
all of its training visits, and the sum of their gradients is clipped as one. The epsilon then
holds per patient, whatever their number of visits. `privacy-unit = visit` (one visit per unit,
for comparison) protects a patient with k visits at about k times the epsilon (group privacy).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterator
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
from torch.utils.data import DataLoader, Dataset

from common.errors import EdfedError
from common.files import FILE_MODE, atomic_write_text, private_dir

MAX_NOISE = 50.0
ORDERS = tuple(RDPAccountant.DEFAULT_ALPHAS)
INTEGER_ORDERS = tuple(o for o in ORDERS if float(o).is_integer())
# The planned noise multiplier is within this factor of the smallest that fits the budget (and never below it).
PLAN_TOLERANCE = 1e-5
UNITS = ("patient", "visit")


@functools.lru_cache(maxsize=256)
def _rdp_per_step(noise: float, sample_rate: float, orders: tuple[float, ...]) -> np.ndarray:
    """One step's RDP curve; cached because a ledger's history repeats the same few (noise, rate) pairs."""
    return np.asarray(compute_rdp(q=sample_rate, noise_multiplier=noise, steps=1, orders=list(orders)))


def _epsilon_and_order(history: list[tuple[float, float, int]], delta: float,
                       orders: tuple[float, ...] = ORDERS) -> tuple[float, float]:
    """(epsilon, the RDP order that gives it); fewer `orders` can only give a larger epsilon (a minimum over them)."""
    history = [(float(n), float(q), int(k)) for n, q, k in history if k]
    if not history:
        return 0.0, 0.0
    rdp = sum(steps * _rdp_per_step(noise, rate, orders) for noise, rate, steps in history)
    eps, order = get_privacy_spent(orders=list(orders), rdp=rdp, delta=delta)
    return float(eps), float(order)


def epsilon_of(history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon (Opacus' RDP accountant, its default orders) of a list of (noise multiplier, sample rate, steps)."""
    return _epsilon_and_order(history, delta)[0]


@dataclass
class PrivacyLedger:
    """A site's record of every DP-SGD round it ever trained, stored as JSON at `path`.

    Each history entry: noise multiplier, sample rate and steps (what the accountant composes), the privacy
    unit they protect, and the run and round they were spent on (a round is never trained twice).
    `queries` counts the evaluations the site answered, per run.
    """

    path: Path
    history: list[dict] = field(default_factory=list)
    plans: dict[str, float] = field(default_factory=dict)  # run id -> planned noise multiplier
    queries: dict[str, int] = field(default_factory=dict)

    @classmethod
    def open(cls, path: Path) -> PrivacyLedger:
        path = Path(path)
        if not path.exists():
            return cls(path)
        try:
            state = json.loads(path.read_text())
            # A ledger from before the privacy unit was recorded holds visit-level spending.
            history = [h if isinstance(h, dict) else {"noise": h[0], "sample-rate": h[1], "steps": h[2],
                                                      "unit": "visit", "run": None, "round": None}
                       for h in state["history"]]
            ledger = cls(path, history, dict(state.get("plans", {})), dict(state.get("queries", {})))
            ledger.accounting()  # every entry has its numbers
            return ledger
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise EdfedError(f"privacy ledger {path} is unreadable ({exc}); refusing to train without it") from exc

    @staticmethod
    @contextmanager
    def locked(path: Path) -> Iterator[PrivacyLedger]:
        """The ledger, held exclusively (across processes) from reading it to saving it: read, plan, train, record.

        Without the lock, two train messages at once (two runs, a repeated round) both read the same spend and
        the later save forgets the other's."""
        path = Path(path)
        private_dir(path.parent)
        with FileLock(f"{path}.lock", mode=FILE_MODE):
            yield PrivacyLedger.open(path)

    def accounting(self) -> list[tuple[float, float, int]]:
        return [(float(h["noise"]), float(h["sample-rate"]), int(h["steps"])) for h in self.history]

    def spent(self, delta: float) -> float:
        return epsilon_of(self.accounting(), delta)

    def spent_by_run(self, run_id: str, delta: float) -> float:
        return self.projected(0.0, 0.0, 0, delta, run_id=run_id)

    def projected(self, noise: float, sample_rate: float, steps: int, delta: float, run_id: str | None = None) -> float:
        """Epsilon after `steps` more steps at this noise and sample rate (of run `run_id` alone, if given)."""
        past = [a for a, h in zip(self.accounting(), self.history, strict=True) if run_id is None or h["run"] == run_id]
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
        the run's own spend under `run_cap` (the site's `max-epsilon-per-run`).

        Planned once per run and kept in the ledger, so every round of a run uses the same noise.
        Returns `inf` when not even `MAX_NOISE` fits.
        """
        if run_id in self.plans:
            return self.plans[run_id]

        past = self.accounting()

        def fits(noise: float, orders: tuple[float, ...] = ORDERS) -> bool:
            this_run = [(noise, sample_rate, total_steps)]
            return (_epsilon_and_order([*past, *this_run], delta, orders)[0] <= budget
                    and _epsilon_and_order(this_run, delta, orders)[0] <= run_cap)

        if not fits(MAX_NOISE):
            noise = math.inf
        else:
            # The fractional orders' series cost ~20x the integer orders' closed form. Search on the integer
            # orders first, then only on the orders next to the best ones there. Fewer orders can only give a
            # larger epsilon, so the noise found fits with every order too (`spent` uses all of them).
            noise = smallest_fitting(lambda n: fits(n, INTEGER_ORDERS), 0.1, MAX_NOISE)
            best = {_epsilon_and_order(h, delta, INTEGER_ORDERS)[1]
                    for h in ([*past, (noise, sample_rate, total_steps)], [(noise, sample_rate, total_steps)])}
            near = tuple(o for o in ORDERS if any(abs(o - b) <= 1.0 for b in best))
            noise = smallest_fitting(lambda n: fits(n, near), 0.1, noise)
        self.plans[run_id] = noise
        return noise

    def record(self, noise: float, sample_rate: float, steps: int, *, unit: str, run_id: str,
               server_round: int) -> None:
        self.history.append({"noise": float(noise), "sample-rate": float(sample_rate), "steps": int(steps),
                             "unit": unit, "run": run_id, "round": int(server_round)})

    def save(self) -> None:
        """Atomic, owner-only write: a crash mid-save never leaves a ledger that forgets spent budget."""
        atomic_write_text(self.path, json.dumps({"history": self.history, "plans": self.plans,
                                                 "queries": self.queries}, indent=1))


def smallest_fitting(fits, low: float, high: float) -> float:
    """The smallest noise in [low, high] that fits, to PLAN_TOLERANCE (bisection in log space); `high` fits."""
    while high / low > 1 + PLAN_TOLERANCE:
        mid = math.sqrt(low * high)
        low, high = (low, mid) if fits(mid) else (mid, high)
    return high


CLIPPING = ("per-layer", "flat")


class _PatientGrouping:
    """Mixin for Opacus' DP optimizers: per-visit gradients are summed per patient before they are clipped.

    `group_by(patient)` gives the batch's patient of each visit (any integer codes). Clipping, noise and
    scaling are then Opacus' own, on one row per patient: each patient's summed gradient is clipped to the
    threshold, so the patient as a whole moves the noised sum by at most max_grad_norm.
    """

    _groups: torch.Tensor | None = None

    def group_by(self, patient: torch.Tensor) -> None:
        self._groups = torch.unique(patient, return_inverse=True)[1]

    def clip_and_accumulate(self) -> None:
        if self._groups is None:
            raise EdfedError("patient-level DP: a batch came without its patient index; refusing to clip per visit")
        groups, self._groups = self._groups, None
        n_patients = int(groups.max()) + 1 if len(groups) else 0
        for p in self.params:
            per_visit = self._get_flat_grad_sample(p)
            if len(per_visit) != len(groups):
                raise EdfedError(f"patient-level DP: {len(per_visit)} per-visit gradients for {len(groups)} visits")
            per_patient = per_visit.new_zeros((n_patients, *per_visit.shape[1:]))
            p.grad_sample = per_patient.index_add_(0, groups.to(per_visit.device), per_visit)
        super().clip_and_accumulate()


class PatientDPOptimizer(_PatientGrouping, DPOptimizer):
    pass


class PatientDPPerLayerOptimizer(_PatientGrouping, DPPerLayerOptimizer):
    pass


class _WithPatient(Dataset):
    """A visit dataset whose items also carry their patient's code (for `group_by`)."""

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


class PatientPoissonSampler:
    """Batches of visit indices: every patient is drawn independently with `sample_rate` at each of `steps`
    steps (Opacus' own sampler, over patients) and brings all of its visits."""

    def __init__(self, codes: np.ndarray, sample_rate: float, steps: int, generator: torch.Generator) -> None:
        order = np.argsort(codes, kind="stable")
        self.visits = np.split(order, np.flatnonzero(np.diff(codes[order])) + 1) if len(codes) else []
        self.patients = UniformWithReplacementSampler(num_samples=len(self.visits), sample_rate=sample_rate,
                                                      generator=generator, steps=steps)

    def __len__(self) -> int:
        return len(self.patients)

    def __iter__(self) -> Iterator[list[int]]:
        for drawn in self.patients:
            yield [int(v) for patient in drawn for v in self.visits[patient]]


def patient_loader(dataset, sample_rate: float, steps: int, generator: torch.Generator) -> DataLoader:
    """Patient-level Poisson sampling over a visit dataset: each batch holds all visits of its sampled patients."""
    if getattr(dataset, "patient_ids", None) is None:
        raise EdfedError("patient-level DP needs each visit's patient_id; this dataset has none")
    codes = pd.factorize(np.asarray(dataset.patient_ids).astype(str))[0].astype(np.int64)
    wrapped = _WithPatient(dataset, codes)
    return DataLoader(wrapped, batch_sampler=PatientPoissonSampler(codes, sample_rate, steps, generator),
                      collate_fn=wrapped.collate)


def make_private(model, optimizer, loader, noise_multiplier: float, max_grad_norm: float, seed: int,
                 clipping: str = "per-layer", unit: str = "patient"):
    """Wrap the same model, optimizer and loader for DP-SGD (Poisson sampling, clipping per unit).

    `unit="patient"`: `loader`'s steps stay (as many per epoch), but each step samples patients at rate
    1/steps, so a batch holds about as many visits as before; the optimizer clips each patient's summed
    gradient and scales by the expected number of patients. `unit="visit"`: Opacus' visit-level DP-SGD.

    `clipping="per-layer"` clips each trainable tensor's per-unit gradient to max_grad_norm / sqrt(n)
    (n tensors), so the thresholds' L2 norm, the sensitivity, is still max_grad_norm: the same noise
    and the same epsilon as flat clipping. Flat clipping lets the largest gradients take the whole budget:
    per visit, the text projection's is ~14 and the structured tower's ~0.9 (MiniLM, default cohort), so
    after clipping the structured branch kept ~6% of its signal under the same noise (README, Federated).

    Returns (optimizer, loader, accountant). The model stays unwrapped (hooks only), so the
    trainable state keeps its names. The accountant starts empty: the ledger holds the past.
    """
    from opacus import PrivacyEngine

    if clipping not in CLIPPING:
        raise EdfedError(f"dp-clipping must be one of {', '.join(CLIPPING)}, got {clipping!r}")
    if unit not in UNITS:
        raise EdfedError(f"privacy-unit must be one of {', '.join(UNITS)}, got {unit!r}")
    n_tensors = sum(len(group["params"]) for group in optimizer.param_groups)
    thresholds = ([max_grad_norm / math.sqrt(n_tensors)] * n_tensors if clipping == "per-layer"
                  else max_grad_norm)
    model.train()  # Opacus' hooks see nothing in eval mode
    engine = PrivacyEngine(accountant="rdp")
    noise_generator = torch.Generator().manual_seed(seed)
    if unit == "visit":
        _, optimizer, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=noise_multiplier,
            max_grad_norm=thresholds, clipping="per_layer" if clipping == "per-layer" else "flat",
            poisson_sampling=True, grad_sample_mode="hooks", wrap_model=False, noise_generator=noise_generator)
        return optimizer, loader, engine.accountant
    steps = len(loader)
    sample_rate = 1 / steps
    generator = loader.generator if loader.generator is not None else torch.Generator().manual_seed(seed + 1)
    loader = patient_loader(loader.dataset, sample_rate, steps, generator)
    # Opacus' hooks on the model, as for visits; the optimizer is built here with the patient-level batch size.
    engine.make_private(module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=noise_multiplier,
                        max_grad_norm=thresholds, clipping="per_layer" if clipping == "per-layer" else "flat",
                        poisson_sampling=False, grad_sample_mode="hooks", wrap_model=False)
    patients = loader.batch_sampler.patients.num_samples
    optimizer_class = PatientDPPerLayerOptimizer if clipping == "per-layer" else PatientDPOptimizer
    optimizer = optimizer_class(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=thresholds,
                                expected_batch_size=patients * sample_rate, loss_reduction="mean",
                                generator=noise_generator)
    optimizer.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    return optimizer, loader, engine.accountant
