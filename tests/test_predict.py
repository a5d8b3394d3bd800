"""`edfed predict` and the Python API on a hospital's own export: the same numbers, a model folder that says what it
is, and refusals that leave nothing behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from test_own_data import MAPPING_TOML, hospital_export

import edfed
from edfed.cli import main as cli
from edfed.client.model_folder import RISK_COLUMNS, platt_parameters, save_deployed_model
from edfed.common.config import train_config_from
from edfed.common.contract import OUTCOMES, load_site
from edfed.common.data import VisitDataset
from edfed.common.errors import EdfedError
from edfed.common.exchange import encoder_fingerprint
from edfed.common.features import load_tokenizer
from edfed.common.model import build_model
from edfed.common.peers import fit_peers
from edfed.common.train import predict

N = 80


def _risks(model, table: pd.DataFrame) -> np.ndarray:
    with torch.no_grad():
        return predict(model, VisitDataset(table, load_tokenizer(model.config), model.config)).astype(float)


class _Stack:
    """The global model stacked with the site's regressions, as client.local_models fits it: `.fits`."""

    def __init__(self, peers, global_train: np.ndarray, train: pd.DataFrame) -> None:
        self.fits = {}
        for k, outcome in enumerate(OUTCOMES):
            fit = peers.fits[outcome]
            x = np.column_stack([np.log(global_train[fit.known, k] / (1 - global_train[fit.known, k])), fit.oof])
            y = train[outcome].to_numpy(float)[fit.known].astype(int)
            # safe discharge: the regressions' alone, as a stack does whose global model ranks no better than chance
            uses_global = outcome != "safe_discharge"
            self.fits[outcome] = (make_pipeline(StandardScaler(), LogisticRegression()).fit(
                x if uses_global else x[:, 1:], y), uses_global)


def _randomised(model, seed: int):
    """A trained-looking model: its trainable arrays drawn at random (a zero-initialised head predicts 0.5)."""
    gen = torch.Generator().manual_seed(seed)
    model.load_trainable_state({k: torch.randn(v.shape, generator=gen) * 0.05
                                for k, v in model.trainable_state().items()})
    return model


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_encoder):
    """A hospital CSV (cp1252, local names, F/M, yes/no, timestamps), its mapping, and a deployed model folder of
    a DP global model, a local-only model and the site's regressions, blended and recalibrated."""
    root = tmp_path_factory.mktemp("site")
    contract, local = hospital_export(N)
    local.to_csv(root / "export.csv", index=False, encoding="cp1252")
    (root / "mapping.toml").write_text(MAPPING_TOML)
    run_config = {"model": str(tiny_encoder), "epsilon": 8.0, "lexical-features": 64, "lora-layers": 1}
    global_model = _randomised(build_model(train_config_from(run_config)), 1)
    local_model = _randomised(build_model(train_config_from({**run_config, "epsilon": float("inf")})), 2)
    table = load_site(contract)
    train = table.iloc[:60]
    peers = fit_peers(train)
    global_train = _risks(global_model, train)
    stack = _Stack(peers, global_train, train)
    recipes = {
        "mortality_30d": {"parts": {"regression: stacked": 1.0}, "calibration": None},
        "safe_discharge": {"parts": {"global + regressions": 0.5, "local-only": 0.5},
                           "scales": {"global + regressions": 1.3, "local-only": 0.7}, "calibration": (1.2, -0.1)},
        "readmission_30d": {"parts": {"global": 0.3, "global + local-only": 0.7}, "calibration": (0.9, 0.2)},
    }
    metrics = {"deployed": {o: {"auroc": 0.71, "auroc_ci": [0.6, 0.8], "n": 20, "events": 12} for o in OUTCOMES}}
    folder = save_deployed_model(
        root / "model", site="site-4", run_config={**run_config, "num-server-rounds": 4},
        encoder_fingerprint=encoder_fingerprint(tiny_encoder), recipes=recipes,
        models={"global": global_model, "local-only": local_model, "personalized": local_model}, peers=peers,
        stack=stack, metrics=metrics, privacy={"epsilon": 8.0, "delta": 1e-5, "privacy_unit": "patient"},
        rows={"train": 60, "val": 10, "test": 10})
    return {"root": root, "folder": folder, "table": table, "peers": peers, "stack": stack, "global": global_model,
            "train": train, "global_train": global_train, "run_config": run_config,
            "local": local_model, "encoder": tiny_encoder, "recipes": recipes}


def _predict_cli(site, out: Path, *extra: str) -> int:
    return cli.main(["predict", str(site["folder"]), "--data", str(site["root"] / "export.csv"), "--mapping",
                     str(site["root"] / "mapping.toml"), "--model", str(site["encoder"]), "--out", str(out), *extra])


def test_cli_predict_equals_the_api(site, tmp_path):
    out = tmp_path / "predictions.csv"
    assert _predict_cli(site, out) == 0
    from_cli = pd.read_csv(out, dtype={"visit_id": str})
    model = edfed.load_model(site["folder"], encoder=site["encoder"])
    table = edfed.read_table(site["root"] / "export.csv", mapping=site["root"] / "mapping.toml")
    from_api = model.predict_proba(table)
    assert list(from_cli.columns) == ["visit_id", *RISK_COLUMNS] == list(from_api.columns)
    assert len(from_cli) == N
    pd.testing.assert_frame_equal(from_cli, from_api, check_exact=True)
    # the raw export with its mapping, straight into the API: the same again
    raw = pd.read_csv(site["root"] / "export.csv", encoding="cp1252", dtype=str, keep_default_na=False)
    pd.testing.assert_frame_equal(model.predict_proba(raw, mapping=site["root"] / "mapping.toml"), from_api,
                                  check_exact=True)
    assert os.stat(out).st_mode & 0o077 == 0  # visit ids and risks: the site's own
    risks = from_api[list(RISK_COLUMNS)].to_numpy()
    assert np.all((risks > 0) & (risks < 1)) and risks.std(axis=0).min() > 0


def _logit(p):
    return np.log(p / (1 - p))


def test_the_folder_reproduces_the_components(site):
    """Each outcome's risk is its recipe applied to the in-memory models', regressions' and stack's risks."""
    table, peers = site["table"], site["peers"]
    g, local = _risks(site["global"], table), _risks(site["local"], table)
    regressions = peers.predict(table)
    logits = peers.logits(table)
    def stacked(k: int, outcome: str) -> np.ndarray:
        fit, uses_global = site["stack"].fits[outcome]
        x = np.column_stack([_logit(g[:, k]), logits[:, k]])
        return fit.predict_proba(x if uses_global else x[:, 1:])[:, 1]

    stacked_global = np.column_stack([stacked(k, o) for k, o in enumerate(OUTCOMES)])
    expected = np.column_stack([
        regressions["stacked"][:, 0],
        1 / (1 + np.exp(-(1.2 * (0.5 * _logit(stacked_global[:, 1]) / 1.3 + 0.5 * _logit(local[:, 1]) / 0.7) - 0.1))),
        1 / (1 + np.exp(-(0.9 * (0.3 * _logit(g[:, 2]) + 0.7 * _logit((g[:, 2] + local[:, 2]) / 2)) + 0.2))),
    ])
    got = edfed.load_model(site["folder"], encoder=site["encoder"]).predict_proba(table)
    np.testing.assert_allclose(got[list(RISK_COLUMNS)].to_numpy(), expected, rtol=1e-9, atol=1e-12)


def test_the_folder_describes_itself(site):
    folder = site["folder"]
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "vocabulary.json", "README.md"}
    config = json.loads((folder / "config.json").read_text())
    assert config["encoder_fingerprint"] == encoder_fingerprint(site["encoder"])
    assert config["edfed_version"] == edfed.__version__
    assert set(config["components"]) == {"global", "local-only"}  # no recipe uses the personalized model
    card = (folder / "README.md").read_text()
    for needed in ("## Intended use", "## Data", "0.710 [0.600, 0.800]", "(8, 1e-05)-differential privacy per "
                   "patient", "## Limitations", "stays at the site"):
        assert needed in card, needed
    assert not any(p.name.startswith(".") for p in folder.parent.iterdir())  # no temporary folder left


def test_a_run_folder_predicts_with_its_global_model(site, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    save_file(site["global"].trainable_state(), str(run / "checkpoints" / "round-2.safetensors"))
    config = site["global"].config
    (run / "run.json").write_text(json.dumps({"config": {"epsilon": 8.0, "lexical-features": config.lexical_features,
                                                         "lora-layers": config.lora_layers},
                                              "encoder-fingerprint": encoder_fingerprint(site["encoder"])}))
    got = edfed.load_model(run, encoder=site["encoder"]).predict_proba(site["table"])
    g = _risks(site["global"], site["table"])
    np.testing.assert_allclose(got[list(RISK_COLUMNS)].to_numpy(), g, rtol=1e-6)


def _error(capsys) -> str:
    return capsys.readouterr().err


def test_another_encoder_is_refused_and_nothing_is_written(site, tmp_path, capsys):
    out = tmp_path / "predictions.csv"
    # the packaged encoder is not the tiny one the model was trained with
    code = cli.main(["predict", str(site["folder"]), "--data", str(site["root"] / "export.csv"), "--mapping",
                     str(site["root"] / "mapping.toml"), "--out", str(out)])
    assert code == 2
    assert "fingerprint" in _error(capsys) and not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_a_bad_table_is_refused_and_nothing_is_written(site, tmp_path, capsys):
    out = tmp_path / "predictions.csv"
    # without the mapping, the export's names and values are not the contract's
    code = cli.main(["predict", str(site["folder"]), "--data", str(site["root"] / "export.csv"),
                     "--model", str(site["encoder"]), "--out", str(out)])
    assert code == 2
    assert "missing required column" in _error(capsys)
    assert list(tmp_path.iterdir()) == []


def test_outcomes_are_not_needed_but_a_given_one_must_be_valid(site):
    model = edfed.load_model(site["folder"], encoder=site["encoder"])
    visits = site["table"].drop(columns=list(OUTCOMES))
    assert len(model.predict_proba(visits)) == N
    bad = site["table"].copy()
    bad.loc[3, "safe_discharge"] = 7
    with pytest.raises(EdfedError, match="safe_discharge.*not 0/1"):
        model.predict_proba(bad)


@pytest.mark.parametrize("damage", ["no config", "other format", "truncated weights", "missing component"])
def test_a_damaged_folder_is_refused(site, tmp_path, damage):
    import shutil

    folder = shutil.copytree(site["folder"], tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    if damage == "no config":
        (folder / "config.json").unlink()
    elif damage == "other format":
        config["format"] = "something-else"
        (folder / "config.json").write_text(json.dumps(config))
    elif damage == "truncated weights":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    else:
        del config["components"]["local-only"]
        (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(EdfedError, match=str(folder)):
        edfed.load_model(folder, encoder=site["encoder"])


def test_a_folder_written_before_ffa_lora_left_still_loads_and_predicts_the_same(site, tmp_path):
    import shutil

    folder = shutil.copytree(site["folder"], tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    for component in config["components"].values():
        component["train_config"]["ffa_lora"] = False
    (folder / "config.json").write_text(json.dumps(config))
    table = edfed.read_table(site["root"] / "export.csv", mapping=site["root"] / "mapping.toml")
    old = edfed.load_model(folder, encoder=site["encoder"]).predict_proba(table)
    new = edfed.load_model(site["folder"], encoder=site["encoder"]).predict_proba(table)
    np.testing.assert_array_equal(old[list(RISK_COLUMNS)].to_numpy(), new[list(RISK_COLUMNS)].to_numpy())

    for component in config["components"].values():
        component["train_config"]["ffa_lora"] = True  # a model of that comparison: not one this edfed builds
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(EdfedError, match="ffa_lora"):
        edfed.load_model(folder, encoder=site["encoder"])


def test_platt_parameters_are_those_of_a_logistic_fit():
    rng = np.random.default_rng(0)
    risk = rng.uniform(0.05, 0.95, 400)
    labels = (rng.uniform(size=400) < risk ** 2).astype(float)
    a, b = platt_parameters(risk, labels)
    assert a > 0 and b < 0  # labels rarer than the risks say: the calibrated risks are lower
    assert platt_parameters(risk, np.zeros(400)) is None
    assert platt_parameters(risk, (risk < 0.3).astype(float)) is None  # reversed ranking: never recalibrated


def test_save_refuses_a_recipe_it_cannot_write(site, tmp_path):
    with pytest.raises(EdfedError, match="unknown candidate"):
        save_deployed_model(tmp_path / "m", site="s", run_config={}, encoder_fingerprint="", models={},
                            recipes={o: {"parts": {"oracle": 1.0}} for o in OUTCOMES})
    with pytest.raises(EdfedError, match="components not given"):
        save_deployed_model(tmp_path / "m", site="s", run_config={}, encoder_fingerprint="", models={},
                            recipes={o: {"parts": {"local-only": 1.0}} for o in OUTCOMES})
    assert not (tmp_path / "m").exists()


def test_the_documented_flags_and_api_exist(capsys):
    import re

    doc = (Path(__file__).resolve().parents[1] / "docs" / "using-a-model.md").read_text()
    with pytest.raises(SystemExit):
        cli.main(["predict", "--help"])
    help_text = capsys.readouterr().out
    flags = set(re.findall(r"`(--[a-z-]+)", doc)) | set(re.findall(r" (--[a-z-]+) ", doc))
    assert {"--data", "--mapping", "--model", "--out", "--encoding"} <= flags
    assert all(flag in help_text for flag in flags), flags
    for name in re.findall(r"edfed\.(\w+)\(", doc):
        assert callable(getattr(edfed, name)), name


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a CUDA GPU")
def test_predict_on_cuda_without_a_gpu_exits_2_and_writes_nothing(site, tmp_path, capsys):
    out = tmp_path / "predictions.csv"
    assert _predict_cli(site, out, "--device", "cuda") == 2
    assert "torch sees no CUDA GPU" in capsys.readouterr().err and not out.exists()
    assert _predict_cli(site, out, "--device", "cpu") == 0 and out.exists()


def test_the_sites_own_stack_predicts_as_at_the_site(site, tmp_path):
    """client.local_models' stack of the global model with the regressions, saved and read back: its risks."""
    from edfed.client.local_models import _GlobalStack

    stack = _GlobalStack.fit(site["peers"], site["global_train"], site["train"])
    folder = save_deployed_model(tmp_path / "model", site="site-4", run_config=site["run_config"],
                                 encoder_fingerprint=encoder_fingerprint(site["encoder"]),
                                 recipes={o: {"parts": {"global + regressions": 1.0}} for o in OUTCOMES},
                                 models={"global": site["global"]}, peers=site["peers"], stack=stack)
    got = edfed.load_model(folder, encoder=site["encoder"]).predict_proba(site["table"])
    expected = stack.predict(site["peers"], _risks(site["global"], site["table"]), site["table"])
    np.testing.assert_allclose(got[list(RISK_COLUMNS)].to_numpy(), expected, rtol=1e-9, atol=1e-12)
