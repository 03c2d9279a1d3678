"""The two towers and the score head.

ItemTower   input_ids int64 [B, T]             -> embedding float32 [B, D], L2-normalised
            (PretrainedItemTower: the same contract over a pretrained Hugging Face encoder, T variable)
QueryTower  input_ids int64 [B, T]             -> the item tower's vector of a short query, distilled
            (twotower.model.query_tower: what the service runs for text queries)
UserTower   history   float32 [B, L, D]        -> embedding float32 [B, D], L2-normalised
            history_mask float32 [B, L] (1 = a purchase, 0 = padding; index 0 = most recent)
            history_age  float32 [B, L] (days between that purchase and the request)
ScoreHead   cosine float32 [...]               -> score in (0, 1)

The user tower reads item-tower vectors, not item ids, so an item added after training
is usable in a history as soon as its text has been embedded.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from twotower.config import ModelConfig
from twotower.model.clip_text import load_clip
from twotower.model.pretrained_text import BACKBONES, PAD_ID, is_pretrained_backbone, load_encoder
from twotower.model.query_tower import QueryTower, query_tower_for


class ItemTower(nn.Module):
    """open_clip's text transformer + a projection into the shared space (the small from-scratch configs,
    or real CLIP weights given with --pretrained)."""

    def __init__(self, clip_model: nn.Module, embed_dim: int):
        super().__init__()
        # open_clip's attributes are untyped modules: Any (CustomTextCLIP keeps the text tower in `.text`).
        text: Any = getattr(clip_model, "text", clip_model)
        for name in ("token_embedding", "positional_embedding", "transformer", "ln_final"):
            if not hasattr(text, name):
                raise ValueError(f"open_clip model has no text {name}: only CLIP-style text transformers are supported")
        self.token_embedding: Any = text.token_embedding
        self.positional_embedding: Any = text.positional_embedding
        self.transformer: Any = text.transformer
        self.ln_final: Any = text.ln_final
        projection = getattr(text, "text_projection", None)
        width = self.ln_final.normalized_shape[0]
        if isinstance(projection, nn.Linear):
            self.text_projection = projection
        else:
            self.text_projection = nn.Linear(width, width if projection is None else projection.shape[1], bias=False)
            if projection is not None:
                with torch.no_grad():
                    self.text_projection.weight.copy_(projection.T)
        self.attn_mask: torch.Tensor | None
        self.register_buffer(
            "attn_mask", text.attn_mask.clone() if text.attn_mask is not None else None, persistent=False
        )
        self.projection = nn.Linear(self.text_projection.out_features, embed_dim)

    def freeze_except_top(self, n_blocks: int, token_embedding: bool) -> None:
        """Freeze CLIP except the top `n_blocks` text blocks, ln_final and the projections."""
        for parameter in self.parameters():
            parameter.requires_grad = False
        blocks = list(self.transformer.resblocks)
        trainable: list[nn.Module] = blocks[len(blocks) - n_blocks :] if n_blocks > 0 else []
        trainable += [self.ln_final, self.text_projection, self.projection]
        for module in trainable:
            for parameter in module.parameters():
                parameter.requires_grad = True
        if token_embedding:
            self.token_embedding.weight.requires_grad = True
            self.positional_embedding.requires_grad = True

    @property
    def encoder_frozen(self) -> bool:
        return False  # ln_final and text_projection always train: features must be computed live

    def word_embeddings(self) -> nn.Embedding:
        return self.token_embedding

    def features(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(input_ids) + self.positional_embedding
        x = self.transformer(x, attn_mask=self.attn_mask)
        x = self.ln_final(x)
        # CLIP pooling: the end-of-text token has the highest id in each row.
        return x[torch.arange(x.shape[0], device=x.device), input_ids.argmax(dim=-1)]

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projection(self.text_projection(features)), dim=-1)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.project(self.features(input_ids))


class PretrainedItemTower(nn.Module):
    """A pretrained Hugging Face text encoder (mean pooled, twotower.model.pretrained_text) + a projection.

    With `unfreeze_text_blocks` = 0 the encoder is frozen: training computes its pooled features once per
    text (`features`) and learns the projection on them (`project`): 105k H&M captions once (25.5 min on 2
    cores, 65 captions/s; twotower.text_feature_cache keeps them for later runs), not at every step.
    """

    def __init__(self, encoder: nn.Module, width: int, embed_dim: int):
        super().__init__()
        self.encoder: Any = encoder  # open_clip HFTextEncoder: its `transformer` is the Hugging Face model
        self.projection = nn.Linear(width, embed_dim)

    def freeze_except_top(self, n_blocks: int, token_embedding: bool) -> None:
        """Freeze the encoder except its top `n_blocks` layers (and the word embeddings if asked)."""
        for parameter in self.encoder.parameters():
            parameter.requires_grad = False
        layers = list(self.encoder.transformer.encoder.layer)
        for layer in layers[len(layers) - n_blocks :] if n_blocks > 0 else []:
            for parameter in layer.parameters():
                parameter.requires_grad = True
        if token_embedding:
            self.encoder.transformer.embeddings.word_embeddings.weight.requires_grad = True

    @property
    def encoder_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.encoder.parameters())

    def word_embeddings(self) -> nn.Embedding:
        return self.encoder.transformer.embeddings.word_embeddings

    def features(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = (input_ids != PAD_ID).long()
        # A row of padding only (Triton's all-zeros warm-up) would attend to nothing: NaN, which an int8
        # tower's activation quantization refuses. Real texts start with [CLS]: for them this changes nothing.
        mask = torch.cat([torch.ones_like(mask[:, :1]), mask[:, 1:]], dim=1)
        out = self.encoder.transformer(input_ids=input_ids, attention_mask=mask)
        return self.encoder.pooler(out, mask)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projection(features), dim=-1)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.project(self.features(input_ids))

    @torch.no_grad()
    def initialise_projection(self, features: torch.Tensor) -> None:
        """Start from the features' top principal components (centred): the pretrained geometry, kept as
        well as `embed_dim` dimensions can, instead of a random projection that training must undo."""
        mean = features.mean(dim=0)
        _, _, components = torch.linalg.svd(features - mean, full_matrices=False)
        weight = self.projection.weight.clone()
        n = min(len(components), len(weight))  # a catalogue smaller than embed_dim keeps random rows beyond
        weight[:n] = components[:n]
        self.projection.weight.copy_(weight)
        self.projection.bias.copy_(-weight @ mean)


def build_item_tower(config: ModelConfig, load_weights: bool) -> ItemTower | PretrainedItemTower:
    """The configured text tower; `load_weights=False` when a saved state dict will supply them."""
    if is_pretrained_backbone(config.clip_model):
        encoder = load_encoder(config.clip_model, load_weights)
        tower: ItemTower | PretrainedItemTower = PretrainedItemTower(
            encoder, BACKBONES[config.clip_model].width, config.embed_dim
        )
    else:
        tower = ItemTower(load_clip(config.clip_model, config.pretrained if load_weights else ""), config.embed_dim)
    tower.freeze_except_top(config.unfreeze_text_blocks, config.unfreeze_token_embedding)
    return tower


class BitsDropout(nn.Dropout):
    """nn.Dropout with 16 random bits per element, four taken from each 64-bit draw. torch's own draws one
    Bernoulli number per element: on these 2 cores that was a fifth of the user tower's training step (108
    vs 85 ms forward + backward of a padded batch of 128). Identity in eval mode, so the exported towers are
    unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p >= 1.0:
            return torch.zeros_like(x)
        n = x.numel()
        draws = ((n + 3) // 4,)
        bits = torch.randint(-(2**63), 2**63 - 1, draws, dtype=torch.int64, device=x.device).view(torch.int16)[:n]
        keep = bits.view(x.shape) >= round(self.p * 65536) - 32768  # P(drop) = p to within 2**-16
        return x * keep.to(x.dtype) * (1.0 / (1.0 - self.p))


class UserTower(nn.Module):
    """A transformer encoder over the last L purchased items' vectors, position and recency."""

    def __init__(self, embed_dim: int, max_history: int, layers: int, heads: int, max_age_days: float):
        super().__init__()
        hidden = max(embed_dim, heads * 16)
        self.max_history = max_history
        self.age_scale = 1.0 / math.log1p(max_age_days)
        self.input = nn.Linear(embed_dim, hidden)
        self.position = nn.Parameter(torch.zeros(max_history, hidden))
        self.age = nn.Linear(1, hidden)
        layer = nn.TransformerEncoderLayer(hidden, heads, dim_feedforward=2 * hidden, dropout=0.1, batch_first=True)
        layer.dropout, layer.dropout1, layer.dropout2 = (BitsDropout(0.1) for _ in range(3))
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.output = nn.Linear(hidden, embed_dim)
        nn.init.normal_(self.position, std=0.02)

    def forward(self, history: torch.Tensor, history_mask: torch.Tensor, history_age: torch.Tensor) -> torch.Tensor:
        age = torch.log1p(history_age.clamp(min=0.0)).unsqueeze(-1) * self.age_scale
        x = self.input(history) + self.position[: history.shape[1]] + self.age(age)
        # Position 0 is never masked so a row that is all padding cannot turn into NaN.
        padding = history_mask <= 0
        padding = torch.cat([torch.zeros_like(padding[:, :1]), padding[:, 1:]], dim=1)
        x = self.encoder(x, src_key_padding_mask=padding)
        weights = history_mask.unsqueeze(-1)
        count = weights.sum(dim=1).clamp(min=1.0)
        pooled = (x * weights).sum(dim=1) / count
        mean_item = (history * weights).sum(dim=1) / count  # skip path: start from "the mean of my items"
        return F.normalize(self.output(pooled) + mean_item, dim=-1)


class ScoreHead(nn.Module):
    """2-layer MLP mapping a cosine similarity to a purchase score in (0, 1)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def logits(self, cosine: torch.Tensor) -> torch.Tensor:
        return self.layers(cosine.unsqueeze(-1)).squeeze(-1)

    def forward(self, cosine: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(cosine))


class TwoTowerModel(nn.Module):
    """Both towers, the score head, optionally a learned vector per known article and the query tower
    (distilled from the item tower at the end of training).

        With `item_id_embeddings`, an article seen in training is indexed as normalize(text vector + its id
        vector): the id part learns what text cannot say (who buys it with what). Articles without one (new,
        or never bought) keep the pure text vector; id dropout in training keeps those usable.
    """

    def __init__(self, config: ModelConfig, n_items: int = 0, load_weights: bool = True):
        super().__init__()
        self.config = config
        self.item_tower = build_item_tower(config, load_weights)
        self.user_tower = UserTower(
            config.embed_dim, config.max_history, config.user_layers, config.user_heads, config.max_age_days
        )
        self.score_head = ScoreHead(config.score_hidden)
        # open_clip's tokenizer pads with 0 too, like the pretrained backbones'
        self.query_tower: QueryTower | None = (
            query_tower_for(self.item_tower, config.embed_dim, PAD_ID) if config.query_tower else None
        )
        self.item_ids: nn.Embedding | None = None
        if config.item_id_embeddings and n_items > 0:
            self.item_ids = nn.Embedding(n_items, config.embed_dim)
            nn.init.zeros_(self.item_ids.weight)  # untrained rows add nothing to the text vector

    def hybrid(self, text_vectors: torch.Tensor, rows: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Indexed item vectors: text vector + id vector (rows < 0 or keep == 0: text only)."""
        if self.item_ids is None:
            return text_vectors
        known = (rows >= 0).float() if keep is None else (rows >= 0).float() * keep
        ids = self.item_ids(rows.clamp(min=0)) * known.unsqueeze(-1)
        return F.normalize(text_vectors + ids, dim=-1)


def build_model(config: ModelConfig, state_dict: dict | None = None, n_items: int = 0) -> TwoTowerModel:
    """A model from its config; with a saved state dict, the text weights come from it, not the hub."""
    if state_dict is None:
        return TwoTowerModel(config, n_items=n_items)
    model = TwoTowerModel(config, n_items=n_items, load_weights=False)
    model.load_state_dict(state_dict)
    return model


def embed_texts(
    encode: Callable[[torch.Tensor], torch.Tensor],
    tokenizer: Callable[[list[str]], torch.Tensor],
    texts: list[str],
    batch_size: int,
    description: str = "embedding texts",
) -> torch.Tensor:
    """float32 [N, ...] = encode(token ids) of every text, in order, without gradients. Each distinct text is
    encoded once (H&M: 98,686 distinct captions of 105,542), batched by length (a pretrained backbone pads to
    the longest text of a batch: 1.3x the captions/s of H&M order)."""
    distinct = list(dict.fromkeys(texts))
    order = sorted(range(len(distinct)), key=lambda i: len(distinct[i]))
    chunks: list[torch.Tensor] = []
    with torch.no_grad():  # not inference_mode: training indexes these features under autograd
        for start in tqdm(range(0, len(distinct), batch_size), desc=description, unit="batch", disable=None):
            chunks.append(encode(tokenizer([distinct[i] for i in order[start : start + batch_size]])).float())
    if not chunks:
        return torch.zeros((0, 0))
    out = torch.empty((len(distinct), *chunks[0].shape[1:]))
    out[torch.tensor(order)] = torch.cat(chunks)
    if len(distinct) == len(texts):
        return out
    position = {text: i for i, text in enumerate(distinct)}
    return out[torch.tensor([position[text] for text in texts])]
