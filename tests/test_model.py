"""The model: split forward, frozen-layer cache, what trains, what leaves, the masked loss."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from edfed.common.config import TrainConfig
from edfed.common.features import structured_feature_names, structured_features, tokenize_notes
from edfed.common.model import OutcomeModel, _mean_pool, per_example_loss

N_STRUCT = len(structured_feature_names())


def _model(tiny_encoder, precision: str = "fp32", **kw) -> OutcomeModel:
    torch.manual_seed(0)
    config = TrainConfig(model=str(tiny_encoder), **{"lora_layers": 1, **kw})
    model = OutcomeModel(config, N_STRUCT, precision=precision)
    with torch.no_grad():  # LoRA B starts at zero; make the adapters matter for the comparisons
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model


def _batch(seed: int = 0, b: int = 5, t: int = 17) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 20000, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    for row, n in enumerate(torch.randint(3, t + 1, (b,), generator=g).tolist()):
        ids[row, n:], mask[row, n:] = 0, 0
    labels = torch.randint(0, 2, (b, 3), generator=g).float()
    labels[0, 2] = float("nan")
    n_lex = TrainConfig().lexical_features
    lexical = torch.rand(b, n_lex, generator=g) * (torch.rand(b, n_lex, generator=g) < 0.01)
    return {"input_ids": ids, "attention_mask": mask, "struct": torch.randn(b, N_STRUCT, generator=g),
            "lexical": lexical, "labels": labels}


def test_split_forward_equals_the_encoders_own_forward(tiny_encoder):
    model = _model(tiny_encoder)
    batch = _batch()
    reference = _mean_pool(model.encoder(input_ids=batch["input_ids"],
                                         attention_mask=batch["attention_mask"]).last_hidden_state,
                           batch["attention_mask"])
    split = model.upper(model.lower(batch["input_ids"], batch["attention_mask"]), batch["attention_mask"])
    assert model.first_adapted == 1
    torch.testing.assert_close(split, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bf16", [False, True])
def test_cached_frozen_layers_give_same_logits_and_gradients(tiny_encoder, bf16):
    model = _model(tiny_encoder, precision="bf16" if bf16 else "fp32")
    model.train()
    batch = _batch()

    def logits_and_grads(b):
        model.zero_grad()
        torch.manual_seed(1)  # same dropout mask in the fusion layer for both paths
        logits = model(b)
        model.training_loss(b).sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    uncached_logits, uncached_grads = logits_and_grads(batch)
    # Cache each visit separately, unpadded, as the dataset does, then re-pad in a batch.
    lengths = batch["attention_mask"].sum(1).tolist()
    per_visit = [model.lower(batch["input_ids"][i:i + 1, :n], batch["attention_mask"][i:i + 1, :n])[0]
                 for i, n in enumerate(lengths)]
    hidden = torch.zeros(len(lengths), max(lengths), per_visit[0].shape[-1], dtype=per_visit[0].dtype)
    for i, h in enumerate(per_visit):
        hidden[i, : len(h)] = h
    cached = {**batch, "hidden": hidden, "attention_mask": batch["attention_mask"][:, : max(lengths)]}
    del cached["input_ids"]
    cached_logits, cached_grads = logits_and_grads(cached)
    tol = 2e-2 if bf16 else 1e-5
    torch.testing.assert_close(cached_logits, uncached_logits, atol=tol, rtol=tol)
    for name in uncached_grads:
        torch.testing.assert_close(cached_grads[name], uncached_grads[name], atol=tol, rtol=tol)
    assert any(g.abs().sum() > 0 for n, g in cached_grads.items() if "lora" in n)


def test_training_changes_only_trainable_parts(tiny_encoder):
    model = _model(tiny_encoder, lora_layers=0)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable_before = model.trainable_state()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        batch = _batch(step)
        optimizer.zero_grad()
        per_example_loss(model(batch), batch["labels"]).mean().backward()
        optimizer.step()
    for name, before in frozen_before.items():
        assert torch.equal(dict(model.named_parameters())[name], before), name
    after = model.trainable_state()
    assert all(not torch.equal(after[n], trainable_before[n]) for n in after if "lora_A" in n)
    assert len(frozen_before) > 0


def test_only_adapters_tower_fusion_heads_leave(tiny_encoder):
    state = _model(tiny_encoder).trainable_state()
    heads = {"text_proj", "struct_tower", "fusion", "heads", "aux_heads", "lexical"}
    for name in state:
        assert "lora_" in name or name.split(".")[0] in heads, name
    assert any("lora_" in n for n in state) and any(n.startswith("heads") for n in state)
    assert not any("embeddings" in n or "dense" in n for n in state if "lora_" not in n)


def test_lora_only_in_top_layers(tiny_encoder):
    top_only = _model(tiny_encoder, lora_layers=1).trainable_state()
    every = _model(tiny_encoder, lora_layers=0).trainable_state()
    assert {n for n in top_only if "lora_" in n and ".layer.0." in n} == set()
    assert any(".layer.0." in n for n in every if "lora_" in n)


def test_loss_skips_empty_labels():
    logits = torch.zeros(2, 3, requires_grad=True)
    labels = torch.tensor([[1.0, 0.0, float("nan")], [0.0, 1.0, 1.0]])
    loss = per_example_loss(logits, labels)
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss, torch.tensor([2.0, 3.0]) * np.log(2.0), atol=1e-6, rtol=0)
    loss.sum().backward()
    assert logits.grad[0, 2] == 0 and logits.grad[1, 2] != 0


@pytest.mark.parametrize("modality", ["multimodal", "text", "structured"])
def test_modality_selects_inputs_with_the_same_code(tiny_encoder, modality):
    model = _model(tiny_encoder, modality=modality).eval()
    batch = _batch()
    assert model(batch).shape == (5, 3)
    assert (model.encoder is None) == (modality == "structured")
    assert (model.struct_tower is None) == (modality == "text")
    # The structured-only model must ignore the notes entirely.
    if modality == "structured":
        other = {**batch, "input_ids": torch.zeros_like(batch["input_ids"])}
        torch.testing.assert_close(model(other), model(batch))


def test_structured_features_need_no_other_rows():
    table = pd.DataFrame({"sex": ["male", "female", "female"], "age": [80.0, 30.0, np.nan],
                          "crp": [300.0, np.nan, 5.0], "on_oxygen": [1.0, 0.0, np.nan],
                          "arrival_date": pd.to_datetime(["2020-04-01", "2020-12-24", "2021-06-30"])})
    alone = np.concatenate([structured_features(table.iloc[[i]]) for i in range(3)])
    np.testing.assert_array_equal(alone, structured_features(table))
    names = structured_feature_names()
    feats = dict(zip(names, structured_features(table)[2], strict=True))
    assert feats["age"] == 0 and feats["age_missing"] == 1 and feats["crp_missing"] == 0


def test_calendar_basis_is_piecewise_linear_on_fixed_knots():
    from edfed.common.features import _CALENDAR_KNOTS, calendar_features

    knot, next_knot = _CALENDAR_KNOTS[2], _CALENDAR_KNOTS[3]
    middle = knot + (next_knot - knot) // 2
    table = pd.DataFrame({"arrival_date": pd.to_datetime([str(knot), str(middle), "2019-06-01", "2030-01-01"])})
    basis = calendar_features(table)
    np.testing.assert_allclose(basis.sum(axis=1), 1.0, rtol=1e-6)
    assert basis[0, 2] == pytest.approx(1.0)  # on a knot: all weight there
    assert basis[1, 2] == pytest.approx(0.5, abs=0.02) and basis[1, 3] == pytest.approx(0.5, abs=0.02)
    assert basis[2, 0] == pytest.approx(1.0) and basis[3, -1] == pytest.approx(1.0)  # flat beyond the knots
    np.testing.assert_array_equal(np.concatenate([calendar_features(table.iloc[[i]]) for i in range(4)]), basis)


def test_lexical_features_are_stateless_tagged_by_section_and_read_any_language():
    from edfed.common.features import lexical_features

    table = pd.DataFrame({
        "note_triage": ["dyspné, feber", "", "cough"],
        "note_physician": ["Anamnes: hosta sedan en vecka. IMPRESSION: misstänkt covid-19-pneumoni", "cough",
                           "IMPRESSION: cough"],
        "note_assessment_plan": ["ASSESSMENT/PLAN: inläggning på avdelning", "", ""]})
    x = lexical_features(table, 2**12)
    np.testing.assert_allclose(np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel()), 1.0, rtol=1e-5)
    one_at_a_time = [lexical_features(table.iloc[[i]], 2**12).toarray() for i in range(3)]
    np.testing.assert_array_equal(np.concatenate(one_at_a_time), x.toarray())  # no vocabulary, no other rows
    assert x[0].nnz > 10  # Swedish words (å, ä, é) are words too
    # "cough" in a history (row 1) and in an impression (row 2) are different features
    assert set(x[1].indices).isdisjoint(x[2].indices)


def test_truncation_keeps_impression_and_plan_first(tiny_encoder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder)
    table = pd.DataFrame({
        "note_triage": ["triage words " * 40],
        "note_physician": ["long history " * 60 + "IMPRESSION: viral pneumonia, looks unwell"],
        "note_assessment_plan": ["ASSESSMENT/PLAN: admit to ward, dnr"],
    })
    ids = tokenize_notes(table, tokenizer, ("impression", "assessment_plan", "triage", "history"), 32)[0]
    text = tokenizer.decode(ids)
    assert len(ids) == 32
    assert "viral pneumonia" in text and "admit to ward" in text and "history" not in text
    full = tokenize_notes(table, tokenizer, ("impression", "assessment_plan", "triage", "history"), 512)[0]
    assert "long history" in tokenizer.decode(full)
