"""A site's visits as tensors: patient-level splits, the torch dataset and batch padding."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from edfed.common.contract import OUTCOMES, load_site
from edfed.common.errors import EdfedError
from edfed.common.features import lexical_features, structured_features, tokenize_notes

SPLIT_SHARES = {"train": 0.7, "val": 0.1, "test": 0.2}
_SITE_FILE = re.compile(r"^site-(\d+)\.(parquet|csv)$")


def site_files(data_dir: Path) -> dict[str, Path]:
    """`site-K` -> file for every site table in a cohort folder, in site order."""
    if not data_dir.is_dir():
        raise EdfedError(f"{data_dir}: no such data folder")
    found = sorted((int(m.group(1)), p) for p in data_dir.iterdir() if (m := _SITE_FILE.match(p.name)))
    if not found:
        raise EdfedError(f"{data_dir}: no site files (expected site-1.parquet, site-2.parquet, ...)")
    return {f"site-{k}": path for k, path in found}


def patient_split(patient_ids: pd.Series, seed: int) -> np.ndarray:
    """'train' / 'val' / 'test' per visit, by a keyed hash of the patient id.

    Every visit of a patient lands in the same split, the split never depends on other rows or
    other sites, and it is the same on every machine for the same seed.
    """
    key = f"edfed-split{seed:05d}"[-16:]
    u = pd.util.hash_array(patient_ids.astype(str).to_numpy(), hash_key=key) / np.float64(2**64)
    cut_train, cut_val = SPLIT_SHARES["train"], SPLIT_SHARES["train"] + SPLIT_SHARES["val"]
    return np.where(u < cut_train, "train", np.where(u < cut_val, "val", "test"))


def load_oracle(data_dir: Path, site: str) -> pd.DataFrame | None:
    """The true risks of a simulated site (DIR/oracle/site-K.parquet), if the cohort has them."""
    path = data_dir / "oracle" / f"{site}.parquet"
    return pd.read_parquet(path) if path.exists() else None


@dataclass
class SiteSplits:
    """One site's validated table with its split column."""

    name: str
    table: pd.DataFrame

    def part(self, split: str) -> pd.DataFrame:
        return self.table[self.table["split"] == split]


def load_site_splits(name: str, path: Path, seed: int, mapping: Path | None = None,
                     encoding: str | None = None) -> SiteSplits:
    table = load_site(path, mapping=mapping, encoding=encoding).copy()
    table["split"] = patient_split(table["patient_id"], seed)
    table["site"] = name
    return SiteSplits(name, table.reset_index(drop=True))


class VisitDataset(Dataset):
    """Token ids, structured features and labels of a set of visits (one site, or pooled)."""

    def __init__(self, table: pd.DataFrame, tokenizer, config) -> None:
        self.visit_ids = table["visit_id"].to_numpy()
        # patient-level DP samples and clips per patient (common.privacy)
        self.patient_ids = table["patient_id"].to_numpy() if "patient_id" in table else None
        self.sites = table["site"].to_numpy() if "site" in table else np.full(len(table), "site")
        self.struct = torch.from_numpy(structured_features(table).copy())
        self.labels = torch.from_numpy(table[list(OUTCOMES)].to_numpy(np.float32, copy=True))
        self.token_ids = (tokenize_notes(table, tokenizer, config.note_sections, config.max_tokens)
                          if config.uses_text else None)
        self.lexical = lexical_features(table, config.lexical_features) if config.uses_lexical else None
        self.fixed_length = config.max_tokens if config.padding == "max_tokens" else None
        self.frozen_hidden: list[torch.Tensor] | None = None  # per-visit output of the frozen layers

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        item = {"struct": self.struct[i], "labels": self.labels[i]}
        if self.lexical is not None:
            item["lexical"] = torch.from_numpy(self.lexical[i].toarray()[0])
        if self.frozen_hidden is not None:
            item["hidden"] = self.frozen_hidden[i]
        elif self.token_ids is not None:
            item["input_ids"] = torch.tensor(self.token_ids[i])
        return item

    def collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        """Stack a batch, padding sequences to the batch's longest (or to `fixed_length`)."""
        batch = {k: torch.stack([it[k] for it in items]) for k in ("struct", "labels", "lexical") if k in items[0]}
        key = "hidden" if "hidden" in items[0] else "input_ids" if "input_ids" in items[0] else None
        if key:
            lengths = [len(it[key]) for it in items]
            width = self.fixed_length or max(lengths)
            first = items[0][key]
            padded = first.new_zeros((len(items), width, *first.shape[1:]))
            mask = torch.zeros(len(items), width, dtype=torch.long)
            for row, (it, n) in enumerate(zip(items, lengths, strict=True)):
                padded[row, :n] = it[key]
                mask[row, :n] = 1
            batch[key], batch["attention_mask"] = padded, mask
        return batch


def load_cohort(data_dir: Path, seed: int) -> pd.DataFrame:
    """Every site's validated visits with `site` and `split` columns (validation before any output)."""
    sites = site_files(data_dir)
    return pd.concat([load_site_splits(name, path, seed).table for name, path in sites.items()], ignore_index=True)
