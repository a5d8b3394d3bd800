"""The one model: a frozen pretrained encoder with LoRA adapters, a structured tower, fusion, three heads.

    notes ─ tokens ─ frozen lower layers ─ LoRA upper layers ─ mean pool ─┐
                                                                         ├─ fusion ─ 3 logits
    structured ─ fixed transforms + missing flags ─ tower ───────────────┘

Only the adapters, tower, fusion and heads train; they are all that ever leaves a site. The encoder
is split at the first adapted layer: everything below is frozen and deterministic (dropout is off),
so its output can be computed once per visit and reused across epochs and rounds (`lower`), while
`upper` runs the adapted layers on it. `--modality` removes a branch without changing any other code.

The DP model (`architecture="glm"`) is the same class with the branches replaced by one linear layer: a logistic
regression per outcome on fixed features, each block scaled to norm at most 1 in `glm_inputs` (an intercept, the
structured features, the whole frozen encoder's mean-pooled text, the hashed n-grams). Nothing of it is learned but
that layer, so one patient's gradient is bounded by `glm_sensitivity` whatever the data (common.train.glm_step).

    notes ─ frozen encoder, all layers ─ mean pool ─ unit norm ─┐
    structured ─ /4, norm ≤ 1 ──────────────────────────────────┼─ linear ─ 3 logits
    hashed n-grams ─ norm ≤ 1 ──────────────────────────────────┘
"""

from __future__ import annotations

import math
import warnings

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoConfig, AutoModel
from transformers.masking_utils import create_bidirectional_mask
from transformers.utils import logging as hf_logging

from edfed.common.config import TrainConfig
from edfed.common.contract import OUTCOMES
from edfed.common.errors import EdfedError
from edfed.common.features import structured_feature_names
from edfed.common.precision import autocast, resolve_precision

STRUCT_DIM, FUSION_DIM = 64, 128
# The GLM divides the structured features by this before bounding their norm by 1: their typical norm is ~3 (median
# 3.1 on the default cohort), so most visits keep their full vector and only outliers are scaled down.
GLM_STRUCTURED_SCALE = 4.0
# Keep transformers' per-load progress bars and a deprecation notice it raises itself out of our output.
hf_logging.disable_progress_bar()
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def load_frozen_encoder(encoder_dir) -> nn.Module:
    """A local Hugging Face encoder with every weight frozen and every dropout set to 0."""
    if not (encoder_dir / "config.json").is_file():
        raise EdfedError(f"--model {encoder_dir}: not a Hugging Face model directory (no config.json)")
    config = AutoConfig.from_pretrained(encoder_dir, local_files_only=True)
    # Dropout off, so the frozen layers give the same output every epoch and can be cached.
    for name in list(vars(config)):
        if "dropout" in name and isinstance(getattr(config, name), float):
            setattr(config, name, 0.0)
    try:
        encoder = AutoModel.from_pretrained(encoder_dir, config=config, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise EdfedError(f"--model {encoder_dir}: cannot load encoder weights ({exc})") from exc
    encoder.requires_grad_(False)
    return encoder


class OutcomeModel(nn.Module):
    def __init__(self, config: TrainConfig, n_struct: int, precision: str | None = None) -> None:
        super().__init__()
        self.config = config
        # The frozen pass's float format is this machine's choice (common.precision), not the run's.
        self.precision = resolve_precision(precision)
        self.encoder = None
        if config.glm:
            self._build_glm(config, n_struct)
            return
        fusion_in = 0
        if config.uses_text:
            base = load_frozen_encoder(config.encoder_dir)
            layers = _transformer_layers(base)
            n_layers = len(layers) if layers is not None else 0
            top = config.lora_layers if 0 < config.lora_layers < n_layers else n_layers
            # Split only where we know how to run the layers one by one (BERT-style encoders).
            self.first_adapted = n_layers - top if layers is not None else 0
            lora = LoraConfig(
                r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                target_modules=list(config.lora_targets),
                layers_to_transform=list(range(self.first_adapted, n_layers)) if layers is not None else None,
                layers_pattern="layer" if layers is not None else None,
            )
            self.encoder = get_peft_model(base, lora)
            # Normalise and project the pooled text to the structured branch's width, so neither
            # branch dominates the fusion layer by sheer number of inputs.
            self.text_proj = nn.Sequential(nn.LayerNorm(base.config.hidden_size),
                                           nn.Linear(base.config.hidden_size, STRUCT_DIM), nn.GELU())
            if config.compact:  # FFA-LoRA: every site seeds A identically, so only B trains and travels
                for name, param in self.encoder.named_parameters():
                    if "lora_A" in name:
                        param.requires_grad_(False)
            fusion_in += STRUCT_DIM
        self.struct_tower = None
        if config.uses_structured:
            self.struct_tower = nn.Sequential(
                nn.Linear(n_struct, STRUCT_DIM), nn.GELU(), nn.Linear(STRUCT_DIM, STRUCT_DIM), nn.GELU())
            fusion_in += STRUCT_DIM
        self.fusion = nn.Sequential(nn.Linear(fusion_in, FUSION_DIM), nn.GELU(), nn.Dropout(0.1))
        self.heads = nn.Linear(FUSION_DIM, len(OUTCOMES))
        # Multimodal only: each branch also predicts alone, with its own loss, so the fused model cannot
        # lean on the faster-learning branch and leave the other one weak.
        self.aux_heads = None
        if config.modality == "multimodal" and config.aux_weight > 0:
            self.aux_heads = nn.ModuleList([nn.Linear(STRUCT_DIM, len(OUTCOMES)) for _ in range(2)])
        if config.compact:  # seeded identically everywhere, like FFA's A: never trained or sent
            for frozen in (getattr(self, "text_proj", None), self.fusion):
                if frozen is not None:
                    frozen.requires_grad_(False)
        # The lexical path: a logistic regression on hashed n-grams of all of the note text, inside the model (its
        # logits join the prediction), so the fused model starts from what a TF-IDF regression sees. Zero at the
        # start: it adds nothing until it has learned something. Built last, so the seeded modules above
        # are the same with it (the full model) and without it (the compact DP model).
        self.lexical = None
        if config.uses_lexical:
            self.lexical = nn.Linear(config.lexical_features, len(OUTCOMES))
            nn.init.zeros_(self.lexical.weight)
            nn.init.zeros_(self.lexical.bias)

    def _build_glm(self, config: TrainConfig, n_struct: int) -> None:
        """The DP model: the frozen encoder whole (no adapters; every layer is below the "first adapted" one, so
        all of them are cached), and one linear layer on the bounded blocks, zero at the start."""
        width = n_struct if config.uses_structured else 0
        if config.uses_text:
            self.encoder = load_frozen_encoder(config.encoder_dir)
            layers = _transformer_layers(self.encoder)
            self.first_adapted = len(layers) if layers is not None else 0
            width += self.encoder.config.hidden_size
        if config.uses_lexical:
            width += config.lexical_features
        self.glm = nn.Linear(width, len(OUTCOMES))  # its bias is the intercept block
        nn.init.zeros_(self.glm.weight)
        nn.init.zeros_(self.glm.bias)

    @property
    def glm_blocks(self) -> int:
        """Feature blocks of norm at most 1 in `glm_inputs`, the intercept included."""
        c = self.config
        return 1 + int(c.uses_structured) + int(c.uses_text) + int(c.uses_lexical)

    @property
    def glm_sensitivity(self) -> float:
        """The most one unit of total weight 1 moves the summed loss gradient of the GLM (Frobenius norm): each
        outcome's residual sigmoid - label is in [-1, 1] and the feature vector's norm at most sqrt(blocks)."""
        return math.sqrt(len(OUTCOMES)) * math.sqrt(self.glm_blocks)

    def glm_inputs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The GLM's features [B, width]: every block scaled to norm <= 1 here, so the bound holds for any input."""
        parts = []
        if self.config.uses_structured:
            parts.append(_norm_at_most_one(batch["struct"] / GLM_STRUCTURED_SCALE))
        if self.encoder is not None:
            with torch.no_grad():
                text = self.encode_text(batch)
            parts.append(_norm_at_most_one(text / text.norm(dim=1, keepdim=True).clamp(min=1e-12)))
        if self.config.uses_lexical:
            parts.append(_norm_at_most_one(batch["lexical"]))
        return torch.cat(parts, dim=1)

    # --- the encoder, in two halves ---------------------------------------------------------
    @property
    def base_encoder(self) -> nn.Module:
        return self.encoder.get_base_model() if isinstance(self.encoder, PeftModel) else self.encoder

    @property
    def can_split(self) -> bool:
        return self.encoder is not None and _transformer_layers(self.base_encoder) is not None

    @torch.no_grad()
    def lower(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Embeddings and the frozen layers below the first adapter: [B, T, H], no gradient."""
        bert = self.base_encoder
        with autocast(self.precision):
            # Explicit [B, T] position/type ids: HF's broadcast [1, T] buffers break per-example grads.
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
            hidden = bert.embeddings(input_ids=input_ids, position_ids=positions,
                                     token_type_ids=torch.zeros_like(input_ids))
            mask = create_bidirectional_mask(config=bert.config, inputs_embeds=hidden,
                                             attention_mask=attention_mask)
            for layer in _transformer_layers(bert)[: self.first_adapted]:
                hidden = layer(hidden, mask)
        return hidden

    def upper(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The adapted layers on the frozen layers' output, mean-pooled over real tokens: [B, H]."""
        bert = self.base_encoder
        hidden = hidden.float()
        mask = create_bidirectional_mask(config=bert.config, inputs_embeds=hidden,
                                         attention_mask=attention_mask)
        for layer in _transformer_layers(bert)[self.first_adapted:]:
            hidden = layer(hidden, mask)
        return _mean_pool(hidden, attention_mask)

    def encode_text(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "hidden" in batch:
            return self.upper(batch["hidden"], batch["attention_mask"])
        if self.can_split:
            return self.upper(self.lower(batch["input_ids"], batch["attention_mask"]), batch["attention_mask"])
        out = self.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return _mean_pool(out.last_hidden_state, batch["attention_mask"])

    # --- the whole model ----------------------------------------------------------------------
    def _branches(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        parts = []
        if self.encoder is not None:
            parts.append(self.text_proj(self.encode_text(batch)))
        if self.struct_tower is not None:
            parts.append(self.struct_tower(batch["struct"]))
        return parts

    def _logits(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if self.config.glm:
            return self.glm(self.glm_inputs(batch)), []
        parts = self._branches(batch)
        fused = self.heads(self.fusion(torch.cat(parts, dim=1)))
        lexical = [self.lexical(batch["lexical"])] if self.lexical is not None else []
        if self.aux_heads is None:
            return fused + sum(lexical), []
        # Each branch's own logits also enter the prediction (a stack of the unimodal predictors, each also
        # trained to predict alone, plus the fusion layer's interactions on top).
        branch_logits = [head(part) for head, part in zip(self.aux_heads, parts, strict=True)] + lexical
        return fused + sum(branch_logits), branch_logits

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits [B, 3], one per outcome in `OUTCOMES` order."""
        return self._logits(batch)[0]

    def training_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-example training loss [B]: the prediction's, plus each branch's own (auxiliary) loss."""
        logits, branch_logits = self._logits(batch)
        loss = per_example_loss(logits, batch["labels"])
        for branch in branch_logits:
            loss = loss + self.config.aux_weight * per_example_loss(branch, batch["labels"])
        return loss

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What leaves a site: LoRA adapters, structured tower, lexical path, fusion and heads. Never the encoder."""
        return {name: p.detach().clone() for name, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.named_parameters())
        expected = {n for n, p in params.items() if p.requires_grad}
        if set(state) != expected:
            missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
            raise EdfedError(f"trainable state does not match the model (missing {missing}, unexpected {extra})")
        with torch.no_grad():
            for name, value in state.items():
                if params[name].shape != value.shape:
                    raise EdfedError(f"{name}: shape {tuple(value.shape)} != model's {tuple(params[name].shape)}")
                params[name].copy_(value)


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy summed over outcomes, skipping empty (NaN) labels: [B]."""
    known = ~torch.isnan(labels)
    bce = nn.functional.binary_cross_entropy_with_logits(
        logits, torch.nan_to_num(labels), reduction="none")
    return (bce * known).sum(dim=1)


def _norm_at_most_one(x: torch.Tensor) -> torch.Tensor:
    """Rows of norm > 1 scaled to just under norm 1 (the margin keeps float32 rounding from pushing one above 1)."""
    norms = x.double().norm(dim=1, keepdim=True)
    return (x.double() / (norms.clamp(min=1.0) * (1 + 1e-6))).to(x.dtype)


def _mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def _transformer_layers(encoder: nn.Module) -> nn.ModuleList | None:
    """The encoder's block list for BERT-style models (BERT, RoBERTa, ELECTRA, ...), else None."""
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    has_embeddings = hasattr(encoder, "embeddings")
    return layers if isinstance(layers, nn.ModuleList) and has_embeddings else None


def build_model(config: TrainConfig, state: dict[str, torch.Tensor] | None = None,
                precision: str | None = None) -> OutcomeModel:
    """The one way to make the model. Seeded first, so its frozen seeded matrices (FFA-LoRA's A, the compact
    model's text projection) are the same at every site, at the coordinator and in a later audit: their
    fingerprint (common.exchange.frozen_init_fingerprint) is checked before a site trains."""
    torch.manual_seed(config.seed)
    model = OutcomeModel(config, n_struct=len(structured_feature_names()), precision=precision)
    if state is not None:
        model.load_trainable_state(state)
    return model
