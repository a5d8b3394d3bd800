"""Where a deployed site's first round goes, phase by phase, in a fresh interpreter as a SuperNode runs it.

A SuperNode starts a new ClientApp process for every message, so round 1 at a site pays: the imports, the
data check, the model build, reading and caching its data (the frozen layers), planning the run's noise and
the DP step itself. Six sites on one 2-core machine (the deployment test, the rehearsal) pay it six times at
once. Prints the CPU, its bf16 support and each phase's wall seconds.

    python benchmarks/site_round.py [--visits 60] [--model DIR]   # default: a tiny random BERT, as the tests use
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

_ROUND = """
import sys, time
started = time.perf_counter()
import edfed.client.client_app  # noqa: F401  (what flwr-clientapp imports before it handles a message)
from edfed.client import site
from edfed.common.config import RUN_DEFAULTS, train_config_from
from edfed.common.model import build_model
from edfed.common.privacy import PrivacyLedger
imported = time.perf_counter()
data, encoder, scratch = sys.argv[1:4]
PrivacyLedger.init(f"{scratch}/ledger.json")
settings = site.settings_from_configs({"data-path": data, "epsilon": 8.0, "delta": 1e-5, "site-name": "bench",
                                       "ledger-path": f"{scratch}/ledger.json", "cache-dir": f"{scratch}/cache",
                                       "model-path": encoder, "declared-patients": 1000}, {})
config = train_config_from({**RUN_DEFAULTS, "model": encoder})
phases = {"imports": imported - started}
t = time.perf_counter(); site.check_site(settings, config); phases["data check"] = time.perf_counter() - t
t = time.perf_counter(); model = build_model(config); phases["model build"] = time.perf_counter() - t
t = time.perf_counter(); train = site.site_dataset(settings, config, model, "train")
phases["read, tokenize, cache frozen layers"] = time.perf_counter() - t
t = time.perf_counter()
PrivacyLedger(settings.ledger_path).plan_noise("bench-plan", 8.0, 1e-5, 1.0, 4 * config.glm_steps)
phases["noise plan"] = time.perf_counter() - t
t = time.perf_counter()
site.train_round(settings, config, model.trainable_state(), run_id="bench", server_round=1, num_rounds=4,
                 local_epochs=1)
phases["whole DP round (plan, step; data cached)"] = time.perf_counter() - t
phases["total"] = time.perf_counter() - started
for name, seconds in phases.items():
    print(f"  {name}: {seconds:.1f} s")
print(f"  precision {model.precision}, {len(train)} training visits")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--visits", type=int, default=60, help="visits per site (the deployment test: 60)")
    parser.add_argument("--model", type=Path, default=None, help="encoder folder (default: a tiny random BERT)")
    args = parser.parse_args()
    from edfed.common.precision import machine_facts
    from edfed.simulations.cohort import generate_cohort

    machine = machine_facts()
    print(f"CPU: {machine['cpu']}, {machine['cores']} cores, native bf16: {machine['native_bf16']}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        encoder = args.model or _tiny_encoder(root / "tiny")
        data = generate_cohort(root / "data", visits_per_site=args.visits, seed=1)
        print(f"one site's first round, fresh interpreter, {args.visits} visits, encoder {encoder.name}:", flush=True)
        subprocess.run([sys.executable, "-c", _ROUND, str(data / "site-1.parquet"), str(encoder), str(root)],
                       check=True, cwd=Path(__file__).resolve().parents[1])


def _tiny_encoder(path: Path) -> Path:
    """The tests' 2-layer, 32-wide random BERT with the real MiniLM tokenizer."""
    import shutil

    import torch
    from transformers import BertConfig, BertModel

    from edfed.common.config import default_encoder_dir

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=512)).save_pretrained(path)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (default_encoder_dir() / name).exists():
            shutil.copy(default_encoder_dir() / name, path / name)
    return path


if __name__ == "__main__":
    main()
