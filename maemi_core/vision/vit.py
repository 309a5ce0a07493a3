"""The paper's Vision Transformer (A.5, A.8), trained from scratch.

Image 224x224x3 in [-1, 1] -> 32x32 patches (7x7 = 49) -> linear patch embedding (d = 64)
+ learned position embedding -> a ``<cls>`` token -> pre-norm encoder layers whose
attention has 4 heads of key/query/value width 32 (inner width 128, wider than d: this is
why transformers' ``ViTConfig``, which ties head width to d / heads = 16, is not used) ->
``h_cls`` (the cls output, LayerNorm-ed) and the patch tokens, both reusable by the
vision-language model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file


@dataclass
class PaperViTConfig:
    num_classes: int
    image_size: int = 224
    patch_size: int = 32
    channels: int = 3
    dim: int = 64
    depth: int = 8
    heads: int = 4
    head_dim: int = 32
    mlp_dim: int = 128
    dropout: float = 0.1

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class Attention(nn.Module):
    def __init__(self, cfg: PaperViTConfig):
        super().__init__()
        inner = cfg.heads * cfg.head_dim
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.dim, 3 * inner)
        self.proj = nn.Linear(inner, cfg.dim)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape                                                      # (B, T, d)
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, h, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))                 # (B, T, d)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: PaperViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.dim, cfg.mlp_dim), nn.GELU(), nn.Dropout(cfg.dropout),
            nn.Linear(cfg.mlp_dim, cfg.dim), nn.Dropout(cfg.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PaperViT(nn.Module):
    def __init__(self, cfg: PaperViTConfig):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(cfg.channels, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.dim))
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(patch_tokens (B, n, d), h_cls (B, d))`` for standardised images (B, 3, H, W)."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2)               # (B, n, d)
        cls = self.cls_token.expand(x.shape[0], -1, -1)                        # (B, 1, d)
        x = self.drop(torch.cat([cls, x], dim=1) + self.pos_embed)             # (B, n+1, d)
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)
        return x[:, 1:], x[:, 0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encode(images)[1])                              # (B, classes)

    # --- persistence (safetensors + config json, like save_pretrained) -----------------
    def save(self, directory: str | Path, class_names: list[str]) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.state_dict(), str(directory / "model.safetensors"))
        (directory / "config.json").write_text(json.dumps(
            {"architecture": "PaperViT", **asdict(self.cfg), "class_names": class_names}, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> tuple["PaperViT", list[str]]:
        directory = Path(directory)
        meta = json.loads((directory / "config.json").read_text())
        meta.pop("architecture")
        class_names = meta.pop("class_names")
        model = cls(PaperViTConfig(**meta))
        model.load_state_dict(load_file(str(directory / "model.safetensors")))
        return model.eval(), class_names
