"""LlamaGen-style class-conditional GPT over image tokens, built on transformers' Llama.

The sequence is one class-embedding prefix token followed by the image tokens in raster order.
Llama supplies the blocks (RMSNorm, SwiGLU, SDPA attention, KV cache); this file adds the class
prefix, the image-token embedding and head over the codebook, LlamaGen's dropouts, and a 2D
rotary embedding that replaces Llama's 1D one in ``model.rotary_emb``.

(About 500 lines, over the house's ~450: the config, the 2D rotary embedding it derives and the
model's checked, cached and compiled entry points are read together.)
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from diffusers.utils import BaseOutput
from torch import nn
from transformers import AutoConfig, AutoModel, LlamaConfig, LlamaModel, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache

from .token_loss import chunked_cross_entropy, token_accuracy

# LlamaGen's GPT sizes: name -> (num_hidden_layers, hidden_size, num_attention_heads).
GPT_SIZES = {
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (36, 1280, 20),
    "XXL": (48, 1536, 24),
    "XXXL": (48, 2560, 40),
    "3B": (24, 3200, 32),
}

PREFIX_ROTATIONS = ("identity", "zero")

# transformers 5.x renames LlamaModel's `past_key_values` argument and output field to `cache`
# (its ModelOutput even rewrites the old name), hence BaseOutput for our output and this lookup.
_CACHE_NAME = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def swiglu_hidden_size(hidden_size: int, multiple_of: int = 256) -> int:
    """LlamaGen's SwiGLU width: 2/3 of 4 x hidden_size, rounded up to a multiple of ``multiple_of``."""
    return multiple_of * math.ceil(int(2 * 4 * hidden_size / 3) / multiple_of)


class FullVQGPTConfig(PretrainedConfig):
    """Configuration of :class:`FullVQGPT`.

    Args:
        codebook_size: number of image-token ids (the tokenizer's K); the embedding and head span it.
        num_classes: number of class labels; id ``num_classes`` is the null class used for guidance.
        grid_size: token grid, ``h`` for a square grid or ``(h, w)``; sequences hold ``h * w`` tokens.
        hidden_size, num_hidden_layers, num_attention_heads: the transformer's shape.
        intermediate_size: SwiGLU width; ``None`` derives it with :func:`swiglu_hidden_size`.
        rms_norm_eps, initializer_range: RMSNorm epsilon and the init std of every weight.
        rope_theta: base of the 2D rotary embedding's frequencies.
        prefix_rotation: ``"identity"`` (the class prefix is not rotated) or ``"zero"`` (cos = sin = 0
            at the prefix, zeroing its query and key, as LlamaGen's table does; needed for its weights).
        class_dropout_prob: probability, in training, of replacing a label by the null class.
        token_dropout_prob: dropout on the input embeddings (prefix and tokens).
        residual_dropout_prob: dropout on each attention block's output projection.
        ffn_dropout_prob: dropout on each SwiGLU block's output projection.
        attention_dropout: dropout on the attention probabilities (Llama's own; 0 in LlamaGen).
    """

    model_type = "fullvq_gpt"

    def __init__(
        self,
        codebook_size: int = 16384,
        num_classes: int = 1000,
        grid_size: int | tuple[int, int] | list[int] = 16,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int | None = None,
        rms_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        rope_theta: float = 10000.0,
        prefix_rotation: str = "identity",
        class_dropout_prob: float = 0.1,
        token_dropout_prob: float = 0.1,
        residual_dropout_prob: float = 0.1,
        ffn_dropout_prob: float = 0.1,
        attention_dropout: float = 0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        grid = [grid_size, grid_size] if isinstance(grid_size, int) else [int(n) for n in grid_size]
        if len(grid) != 2 or min(grid) < 1:
            raise ValueError(f"grid_size={grid_size!r} must be a positive int or a pair (h, w) of positive ints")
        if codebook_size < 1 or num_classes < 1:
            raise ValueError(
                f"codebook_size={codebook_size} and num_classes={num_classes} must both be at least 1"
            )
        shape = dict(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                     num_attention_heads=num_attention_heads)
        if min(shape.values()) < 1:
            raise ValueError(", ".join(f"{k}={v}" for k, v in shape.items()) + " must all be at least 1")
        dropouts = dict(class_dropout_prob=class_dropout_prob, token_dropout_prob=token_dropout_prob,
                        residual_dropout_prob=residual_dropout_prob, ffn_dropout_prob=ffn_dropout_prob,
                        attention_dropout=attention_dropout)
        for key, value in dropouts.items():
            if not 0 <= value <= 1:
                raise ValueError(f"{key}={value} must be in [0, 1]")
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"hidden_size={hidden_size} is not divisible by num_attention_heads={num_attention_heads}; "
                "choose a width that is a multiple of the head count"
            )
        head_dim = hidden_size // num_attention_heads
        if head_dim % 4:
            raise ValueError(
                f"head_dim={head_dim} (hidden_size / num_attention_heads) must be divisible by 4: the 2D "
                "rotary embedding gives rows and columns head_dim / 4 rotary pairs each"
            )
        if prefix_rotation not in PREFIX_ROTATIONS:
            raise ValueError(f"prefix_rotation={prefix_rotation!r} must be one of {PREFIX_ROTATIONS}")
        self.codebook_size = codebook_size
        self.num_classes = num_classes
        self.grid_size = grid
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size or swiglu_hidden_size(hidden_size)
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.rope_theta = rope_theta
        self.prefix_rotation = prefix_rotation
        self.class_dropout_prob = class_dropout_prob
        self.token_dropout_prob = token_dropout_prob
        self.residual_dropout_prob = residual_dropout_prob
        self.ffn_dropout_prob = ffn_dropout_prob
        self.attention_dropout = attention_dropout

    @classmethod
    def from_size(cls, size: str, **overrides) -> FullVQGPTConfig:
        """LlamaGen's GPT-``size`` (B, L, XL, XXL, XXXL, 3B); ``overrides`` replace any setting."""
        if size not in GPT_SIZES:
            raise ValueError(f"unknown GPT size {size!r}; choose one of {list(GPT_SIZES)}")
        layers, width, heads = GPT_SIZES[size]
        settings = dict(num_hidden_layers=layers, hidden_size=width, num_attention_heads=heads)
        return cls(**{**settings, **overrides})

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_image_tokens(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def null_class(self) -> int:
        return self.num_classes

    def backbone_config(self) -> LlamaConfig:
        """The Llama configuration of the transformer trunk (derived; not saved on its own)."""
        return LlamaConfig(
            vocab_size=self.codebook_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_attention_heads,
            hidden_act="silu",
            max_position_embeddings=1 + self.num_image_tokens,
            rms_norm_eps=self.rms_norm_eps,
            initializer_range=self.initializer_range,
            attention_dropout=self.attention_dropout,
            attention_bias=False,
            mlp_bias=False,
            tie_word_embeddings=False,
            use_cache=False,
            pad_token_id=None,
            bos_token_id=None,
            eos_token_id=None,
            attn_implementation=self._attn_implementation,
        )


class GridRotaryEmbedding(nn.Module):
    """2D rotary position embedding over an ``h x w`` token grid, in transformers' rotate-half layout.

    A drop-in for Llama's ``rotary_emb``: ``forward(x, position_ids)`` returns ``(cos, sin)`` of shape
    ``position_ids.shape + (head_dim,)``. Sequence positions ``< prefix_length`` are the class prefix;
    position ``p`` after it is grid cell ``i = p - prefix_length`` at row ``i // w``, column ``i % w``.
    Of each head's ``head_dim / 2`` rotary pairs (dim ``j`` with dim ``j + head_dim / 2``), the first
    half turns with the row index and the second with the column index, each at the 1D RoPE
    frequencies ``theta ** (-2k / (head_dim / 2))``, as in LlamaGen (whose pairs are interleaved
    dims ``2j, 2j + 1`` instead: permute q/k rows to convert its weights).
    """

    def __init__(
        self,
        head_dim: int,
        grid_size: int | tuple[int, int] | list[int],
        theta: float = 10000.0,
        prefix_rotation: str = "identity",
        prefix_length: int = 1,
    ):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"head_dim={head_dim} must be divisible by 4 for a 2D rotary embedding")
        if prefix_rotation not in PREFIX_ROTATIONS:
            raise ValueError(f"prefix_rotation={prefix_rotation!r} must be one of {PREFIX_ROTATIONS}")
        self.head_dim = head_dim
        self.grid_size = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
        self.theta = theta
        self.prefix_rotation = prefix_rotation
        self.prefix_length = prefix_length

    @classmethod
    def from_config(cls, config: FullVQGPTConfig) -> GridRotaryEmbedding:
        return cls(config.head_dim, config.grid_size, config.rope_theta, config.prefix_rotation)

    def angles(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Rotation angle of each rotary pair, ``position_ids.shape + (head_dim / 2,)``, float32."""
        width = self.grid_size[1]
        cell = (position_ids - self.prefix_length).clamp(min=0)
        row = torch.div(cell, width, rounding_mode="floor").float()
        col = (cell % width).float()
        axis_dim = self.head_dim // 2  # dims per axis; each axis is ordinary 1D RoPE over them
        steps = torch.arange(0, axis_dim, 2, device=position_ids.device, dtype=torch.float32)
        inv_freq = 1.0 / (self.theta ** (steps / axis_dim))
        return torch.cat([row[..., None] * inv_freq, col[..., None] * inv_freq], dim=-1)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = self.angles(position_ids)
        angles = torch.cat([angles, angles], dim=-1)
        cos, sin = angles.cos(), angles.sin()
        is_prefix = (position_ids < self.prefix_length)[..., None]
        prefix_cos = 1.0 if self.prefix_rotation == "identity" else 0.0
        cos = torch.where(is_prefix, torch.full_like(cos, prefix_cos), cos)
        sin = torch.where(is_prefix, torch.zeros_like(sin), sin)
        return cos.to(x.dtype), sin.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, grid_size={self.grid_size}, theta={self.theta}, "
                f"prefix_rotation={self.prefix_rotation}")


def _output_dropout(module: nn.Module, args, output: torch.Tensor, p: float) -> torch.Tensor:
    return F.dropout(output, p, module.training)


@dataclass
class FullVQGPTOutput(BaseOutput):
    """loss: mean next-token cross-entropy when ``labels`` are given; logits: (B, L, codebook_size),
    row ``t`` predicting image token ``past_length + t``; past_key_values: the KV cache when used;
    token_accuracy: share of targets predicted right by the argmax, when ``labels`` are given."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: Cache | None = None
    token_accuracy: torch.Tensor | None = None


class FullVQGPT(PreTrainedModel):
    """Class-conditional autoregressive GPT over image tokens (LlamaGen's c2i GPT).

    Layout: ``class_embedding`` (num_classes + 1 rows, the last being the null class),
    ``model`` (transformers' ``LlamaModel``; its ``embed_tokens`` embeds the image tokens and its
    ``rotary_emb`` is a :class:`GridRotaryEmbedding`) and ``lm_head`` (hidden -> codebook_size, no
    bias, zero-initialised as in LlamaGen, so an untrained model predicts uniform tokens; never tied to
    the token embedding).

    Dropout: ``token_dropout_prob`` on the input embeddings, ``residual_dropout_prob`` after each
    attention output projection and ``ffn_dropout_prob`` after each SwiGLU down projection (as
    forward hooks on Llama's ``o_proj`` / ``down_proj``, so weight names stay Llama's), and Llama's
    own ``attention_dropout`` on attention probabilities. All are active only in ``train()`` mode,
    as is class dropout.
    """

    config_class = FullVQGPTConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: FullVQGPTConfig):
        super().__init__(config)
        self.class_embedding = nn.Embedding(config.num_classes + 1, config.hidden_size)
        self.token_dropout = nn.Dropout(config.token_dropout_prob)
        self.model = LlamaModel(config.backbone_config())
        self.model.rotary_emb = GridRotaryEmbedding.from_config(config)
        for layer in self.model.layers:
            if config.residual_dropout_prob > 0:
                layer.self_attn.o_proj.register_forward_hook(partial(_output_dropout, p=config.residual_dropout_prob))
            if config.ffn_dropout_prob > 0:
                layer.mlp.down_proj.register_forward_hook(partial(_output_dropout, p=config.ffn_dropout_prob))
        self.lm_head = nn.Linear(config.hidden_size, config.codebook_size, bias=False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if module is self.lm_head:
            nn.init.zeros_(module.weight)
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif "RMSNorm" in type(module).__name__:
            nn.init.ones_(module.weight)

    def compile_blocks(self, **options) -> None:
        """``torch.compile`` each decoder layer in place (``options`` go to ``torch.compile``).

        Regional compilation: the layers share one graph, so a 24-layer GPT-L compiles about as fast
        as one layer; weight names and saved files are unchanged.
        """
        for layer in self.model.layers:
            layer.compile(**options)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def _flatten_tokens(self, tokens: torch.Tensor, name: str) -> torch.Tensor:
        """(B, T) or a (B, h, w) grid -> (B, T) long, checked against the config's grid and codebook."""
        h, w = self.config.grid_size
        if tokens.ndim == 3:
            if tuple(tokens.shape[1:]) != (h, w):
                raise ValueError(
                    f"{name} is a {tuple(tokens.shape[1:])} token grid but the model's grid_size is ({h}, {w}); "
                    "cache tokens with the tokenizer this GPT was configured for, or set grid_size to match"
                )
            tokens = tokens.flatten(1)
        if tokens.ndim != 2:
            raise ValueError(f"{name} must have shape (B, T) or (B, {h}, {w}), got {tuple(tokens.shape)}")
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer token ids, got {tokens.dtype}")
        size = self.config.codebook_size
        if tokens.device.type != "cpu":
            # Reading min / max back would stall the GPU every step (every token when sampling).
            valid = (tokens >= 0) & (tokens < size)
            if name == "labels":
                valid |= tokens == -100
            torch._assert_async(valid.all(), f"{name} hold token ids outside [0, {size}) (codebook_size)")
            return tokens.long()
        valid = tokens[tokens != -100] if name == "labels" else tokens
        if valid.numel() and (valid.min() < 0 or valid.max() >= size):
            raise ValueError(
                f"{name} holds token ids in [{int(valid.min())}, {int(valid.max())}] but must lie in "
                f"[0, {self.config.codebook_size}) (codebook_size)"
                + ("; -100 marks ignored targets" if name == "labels" else "")
            )
        return tokens.long()

    def _check_class_labels(self, class_labels: torch.Tensor | list[int], batch_size: int | None) -> torch.Tensor:
        class_labels = torch.as_tensor(class_labels, device=self.device)
        if class_labels.ndim != 1 or class_labels.dtype.is_floating_point or class_labels.dtype == torch.bool:
            raise ValueError(f"class_labels must be a 1D tensor of integer ids, got {class_labels.dtype} "
                             f"of shape {tuple(class_labels.shape)}")
        if batch_size is not None and len(class_labels) != batch_size:
            raise ValueError(f"class_labels holds {len(class_labels)} labels for a batch of {batch_size} sequences")
        num_classes = self.config.num_classes
        if class_labels.device.type != "cpu":  # no read-back on a GPU (see _flatten_tokens)
            torch._assert_async(((class_labels >= 0) & (class_labels <= num_classes)).all(),
                                f"class_labels outside [0, {num_classes}] (num_classes; {num_classes} = null class)")
            return class_labels.long()
        if len(class_labels) and (class_labels.min() < 0 or class_labels.max() > num_classes):
            bad = class_labels[(class_labels < 0) | (class_labels > num_classes)].unique()[:10].tolist()
            raise ValueError(
                f"class_labels {bad} are outside [0, {num_classes}): the model has num_classes={num_classes} "
                f"(id {num_classes} is the null class used for guidance)"
            )
        return class_labels.long()

    def _input_embeddings(self, input_ids, class_labels, past_length: int) -> torch.Tensor:
        """The class prefix (on a new sequence; dropped to the null class in training) followed by the
        embedded image tokens: (B, prefix + T, hidden)."""
        if input_ids is not None:
            input_ids = self._flatten_tokens(input_ids, "input_ids")
        batch_size = input_ids.shape[0] if input_ids is not None else None

        pieces = []
        if class_labels is not None:
            if past_length:
                raise ValueError(
                    f"class_labels start a sequence but past_key_values already holds {past_length} positions; "
                    "pass class_labels only on the first call"
                )
            class_labels = self._check_class_labels(class_labels, batch_size)
            if self.training and self.config.class_dropout_prob > 0:
                dropped = torch.rand(class_labels.shape, device=class_labels.device) < self.config.class_dropout_prob
                class_labels = class_labels.masked_fill(dropped, self.config.null_class)
            pieces.append(self.class_embedding(class_labels)[:, None])
        elif past_length == 0:
            raise ValueError("class_labels are required to start a sequence (no past_key_values given)")
        if input_ids is not None and input_ids.shape[1]:
            pieces.append(self.model.embed_tokens(input_ids))
        if not pieces:
            raise ValueError("nothing to run: pass input_ids to continue a cached sequence")

        inputs_embeds = torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]
        return inputs_embeds

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        class_labels: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        return_logits: bool = True,
    ) -> FullVQGPTOutput:
        """Next-token logits over the codebook.

        Args:
            input_ids: image tokens, (B, T) or a (B, h, w) grid. A sequence starts with the class
                prefix, so row 0 of the logits predicts token 0 and row ``t + 1`` (input token ``t``)
                predicts token ``t + 1``. For training pass the grid and ``labels`` = the same grid
                (or ``input_ids = grid[:, :-1]``, LlamaGen's way; the loss is the same).
            class_labels: (B,) ids in [0, num_classes], ``num_classes`` = null class. Required to start a
                sequence (empty cache); must be omitted when continuing one from ``past_key_values``.
                In training, each is replaced by the null class with probability class_dropout_prob.
            labels: (B, N) or (B, h, w) target tokens (-100 = ignore); the loss is the mean cross-entropy
                of logits rows ``0..N-1`` against them.
            past_key_values: a transformers ``Cache`` from an earlier call (its tokens precede these).
            use_cache: return the updated cache (default: only when ``past_key_values`` is given).
            logits_to_keep: compute logits for the last ``logits_to_keep`` positions only (0 = all).
            return_logits: ``False`` returns no logits; with ``labels`` the loss is then computed in
                row chunks that never hold the (B, L, codebook_size) logits at once (training at
                262,144 codes: ~8.6 GB per float32 copy at B = 32).

        Returns:
            :class:`FullVQGPTOutput` with ``logits`` (B, L, codebook_size), L = prefix + T positions
            (or the last ``logits_to_keep``), and with ``labels`` the ``loss`` and ``token_accuracy``.
        """
        hidden, cache = self.trunk(input_ids, class_labels, past_key_values, use_cache)
        loss = accuracy = logits = None
        if labels is not None:
            labels = self._flatten_tokens(labels, "labels").to(hidden.device)
            if labels.shape[0] != hidden.shape[0] or labels.shape[1] > hidden.shape[1]:
                raise ValueError(
                    f"labels of shape {tuple(labels.shape)} do not fit logits of shape {tuple(hidden.shape[:2])}: "
                    "give at most one target per logits row (prefix + input_ids)"
                )
            if not return_logits:
                loss, accuracy = chunked_cross_entropy(hidden[:, : labels.shape[1]], self.lm_head.weight, labels)
        if return_logits:
            logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
            if labels is not None:
                targets = logits[:, : labels.shape[1]].float()
                loss = F.cross_entropy(targets.reshape(-1, targets.shape[-1]), labels.reshape(-1), ignore_index=-100)
                accuracy = token_accuracy(targets.detach(), labels)
        return FullVQGPTOutput(loss=loss, logits=logits, past_key_values=cache, token_accuracy=accuracy)

    def trunk(
        self,
        input_ids: torch.LongTensor | None = None,
        class_labels: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
    ) -> tuple[torch.Tensor, Cache | None]:
        """The transformer's last hidden states (B, L, hidden_size) and the cache (``None`` unless
        ``use_cache``); arguments and checks as :meth:`forward`, which adds the head and the loss."""
        past_length = int(past_key_values.get_seq_length()) if past_key_values is not None else 0
        if use_cache is None:
            use_cache = past_key_values is not None
        inputs_embeds = self._input_embeddings(input_ids, class_labels, past_length)
        total = past_length + inputs_embeds.shape[1]
        if total > 1 + self.config.num_image_tokens:
            h, w = self.config.grid_size
            raise ValueError(
                f"sequence of {total - 1} image tokens (after the class prefix) exceeds the {h}x{w} grid of "
                f"{self.config.num_image_tokens} tokens the model was configured for (grid_size)"
            )
        outputs = self.model(
            inputs_embeds=self.token_dropout(inputs_embeds),
            use_cache=use_cache,
            **{_CACHE_NAME: past_key_values},
        )
        return outputs.last_hidden_state, getattr(outputs, _CACHE_NAME, None) if use_cache else None

    def decode_step(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: Cache) -> torch.Tensor:
        """One cached decoding step: appends token ``input_ids`` (R, 1) of each row at sequence position
        ``position_ids`` ((1, 1) or (R, 1)) to ``cache`` and returns the last hidden state (R, hidden_size).

        No input checks and no host reads, so that a sampler can run it once per token, compiled and
        captured as a CUDA graph with a ``StaticCache``; :meth:`forward` is the checked entry point.
        """
        outputs = self.model(inputs_embeds=self.model.embed_tokens(input_ids), position_ids=position_ids,
                             use_cache=True, **{_CACHE_NAME: cache})
        return outputs.last_hidden_state[:, -1]

    def next_token_logits(self, hidden: torch.Tensor, head_weight: torch.Tensor | None = None) -> torch.Tensor:
        """float32 logits (R, codebook_size) from hidden states (R, hidden_size), the head run in float32
        whatever the model's dtype: guidance multiplies logit differences by (scale - 1), and with them
        any bf16 rounding. ``head_weight``: ``lm_head.weight.float()``, made once per sampling call."""
        weight = self.lm_head.weight.float() if head_weight is None else head_weight
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return F.linear(hidden.float(), weight)


AutoConfig.register(FullVQGPTConfig.model_type, FullVQGPTConfig, exist_ok=True)
AutoModel.register(FullVQGPTConfig, FullVQGPT, exist_ok=True)
