"""The dino.txt text tower of DINOv3.txt (docs/method.md §1) and its official weights.

    tokens (B, 77) --token_embedding + positional_embedding--> (B, 77, W)
      -> N causal pre-norm blocks: x + proj(causal_attn(qkv(LN(x)))); x + fc2(GELU(fc1(LN(x))))
      -> ln_final -> the end-of-text token of each prompt (argmax of the token ids)
      -> Linear(W, 2 * D, bias=False): the 2-D-wide embedding [class-token half | mean-patch half]

For ViT-L (``DINOTXT_L``): W = 1280, 24 blocks of 20 heads, MLP 5120, q/k/v without bias, context 77,
OpenAI CLIP's BPE vocabulary (49,408 tokens), 2 x 1024 output. Dense segmentation uses the second,
patch-aligned half ``[:, D:]`` (`DinoTxtTextTower.encode_dense`).

Parameter names are those of the official ``TextTower`` (``backbone.*``, ``head.linear_projection``),
so the official file ``dinov3_vitl16_dinotxt_vision_head_and_text_encoder-*.pth`` maps onto this
module by dropping its ``text_model.`` prefix (`text_state_from_dinotxt`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

OFFICIAL_PREFIX = "text_model."  # the text tower's keys in the official dino.txt file
UNUSED_PREFIXES = ("visual_model.", "logit_scale")  # the vision head and CLIP scale: not used for dense maps


@dataclass(frozen=True)
class TextConfig:
    """Shape of a dino.txt text tower."""

    width: int
    layers: int
    heads: int
    mlp: int
    embed_dim: int  # output of the projection: [class half | patch half], 2 x the image tower's width
    context_length: int = 77
    vocab_size: int = 49408


TEXT_CONFIGS: dict[str, TextConfig] = {
    "dinotxt-l": TextConfig(width=1280, layers=24, heads=20, mlp=5120, embed_dim=2048),
    "dinotxt-test": TextConfig(width=32, layers=2, heads=2, mlp=128, embed_dim=64),  # dinov3txt-test
}


class CausalBlock(nn.Module):
    """Pre-norm causal self-attention block (names as the official ``CausalSelfAttentionBlock``)."""

    def __init__(self, width: int, heads: int, mlp: int):
        super().__init__()
        self.heads = heads
        self.attention_norm = nn.LayerNorm(width)
        self.attention = nn.Module()
        self.attention.qkv = nn.Linear(width, 3 * width, bias=False)
        self.attention.proj = nn.Linear(width, width)
        self.ffn_norm = nn.LayerNorm(width)
        self.feed_forward = nn.Module()
        self.feed_forward.fc1 = nn.Linear(width, mlp)
        self.feed_forward.fc2 = nn.Linear(mlp, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.attention.qkv(self.attention_norm(x)).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, n, c)
        x = x + self.attention.proj(a)
        return x + self.feed_forward.fc2(F.gelu(self.feed_forward.fc1(self.ffn_norm(x))))


class _TextBackbone(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.blocks = nn.ModuleList(CausalBlock(cfg.width, cfg.heads, cfg.mlp) for _ in range(cfg.layers))
        self.ln_final = nn.LayerNorm(cfg.width)


class DinoTxtTextTower(nn.Module):
    """Token ids ``(B, L)`` -> ``(B, embed_dim)`` text embeddings (not normalised)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = _TextBackbone(cfg)
        self.head = nn.Module()
        self.head.linear_projection = nn.Linear(cfg.width, cfg.embed_dim, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        """Random initialisation (the scales of the official ``init_weights``)."""
        w, n = self.cfg.width, self.cfg.layers
        nn.init.normal_(self.backbone.token_embedding.weight, std=0.02)
        nn.init.normal_(self.backbone.positional_embedding, std=0.01)
        for blk in self.backbone.blocks:
            nn.init.normal_(blk.attention.qkv.weight, std=w ** -0.5)
            nn.init.normal_(blk.attention.proj.weight, std=w ** -0.5 * (2 * n) ** -0.5)
            nn.init.normal_(blk.feed_forward.fc1.weight, std=(2 * w) ** -0.5)
            nn.init.normal_(blk.feed_forward.fc2.weight, std=w ** -0.5 * (2 * n) ** -0.5)
            for lin in (blk.attention.proj, blk.feed_forward.fc1, blk.feed_forward.fc2):
                nn.init.zeros_(lin.bias)
        nn.init.normal_(self.head.linear_projection.weight, std=w ** -0.5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        bb = self.backbone
        x = bb.token_embedding(tokens) + bb.positional_embedding[: tokens.shape[1]]
        for blk in bb.blocks:
            x = blk(x)
        x = bb.ln_final(x)
        eot = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]  # EOT has the largest id
        return self.head.linear_projection(eot)

    def encode_dense(self, tokens: torch.Tensor) -> torch.Tensor:
        """The patch-aligned half ``[:, embed_dim // 2:]``: the classifier of dense features."""
        return self(tokens)[:, self.cfg.embed_dim // 2:]


@functools.lru_cache(maxsize=None)
def _bpe(context_length: int):
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)  # reads the vocabulary once per process


def tokenizer(cfg: TextConfig) -> Callable[[str | Sequence[str]], torch.Tensor]:
    """OpenAI CLIP's BPE tokenizer (the one dino.txt uses), padded / truncated to the context (the
    last token of a truncated prompt stays the end-of-text token)."""
    return _bpe(cfg.context_length)


def is_dinotxt_file(state: dict) -> bool:
    """Whether a state dict is in the official dino.txt layout."""
    return any(k.startswith(OFFICIAL_PREFIX) for k in state)


def text_state_from_dinotxt(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the text tower's weights, keys that belong to neither it nor the unused vision head) of an
    official dino.txt state dict."""
    text, unexpected = {}, []
    for k, v in state.items():
        if k.startswith(OFFICIAL_PREFIX):
            text[k[len(OFFICIAL_PREFIX):]] = v
        elif not k.startswith(UNUSED_PREFIXES):
            unexpected.append(k)
    return text, unexpected
