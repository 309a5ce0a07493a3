"""Gated cross-attention (paper Figure 2; Flamingo / open_flamingo ``GatedCrossAttentionBlock``).

Text tokens are the queries, visual tokens the keys and values. Each text token attends only
to the tokens of the image that most recently precedes it in the interleaved prompt (tokens
before the first ``<image>`` attend to nothing and get no update). A masked cross-attention
and a feed-forward are each added to the residual stream scaled by ``tanh(gate)``; both gates
start at 0, so an untrained block is exactly the identity and the model is exactly its base LM.
"""

from __future__ import annotations

import threading
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def media_attention_mask(image_positions: torch.Tensor, seq_len: int, num_images: int) -> torch.Tensor:
    """(B, T, M) bool: text token t may attend to image m iff m is the latest image at or before t.

    ``image_positions`` (B, M): token index of each ``<image>`` marker, -1 for padding images.
    """
    t = torch.arange(seq_len, device=image_positions.device)[None, :, None]       # (1, T, 1)
    pos = image_positions[:, None, :]                                             # (B, 1, M)
    valid = pos >= 0
    seen = valid & (pos <= t)                                                     # (B, T, M) images at or before t
    # Latest seen image: the one with the largest position among those seen.
    latest = torch.where(seen, pos, torch.full_like(pos, -1)).amax(dim=2, keepdim=True)  # (B, T, 1)
    return seen & (pos == latest)


class GatedCrossAttention(nn.Module):
    def __init__(self, dim: int, vis_dim: int, heads: int = 8, head_dim: int = 64, ff_mult: int = 4,
                 media_norm: bool = False):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.norm = nn.LayerNorm(dim)
        # Flamingo's visual tokens reach the cross-attention through the Perceiver Resampler, whose
        # output is layer-normalised; ``media_norm`` normalises each visual token first. On ELPV it
        # learned worse at equal tokens than the raw EfficientNet features (README, learning curve).
        self.media_norm = nn.LayerNorm(vis_dim) if media_norm else None
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(vis_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, ff_mult * dim, bias=False), nn.GELU(),
                                nn.Linear(ff_mult * dim, dim, bias=False))
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def project_media(self, media: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the visual tokens, (B, h, M*N, hd) each."""
        b, m, n, _ = media.shape
        if self.media_norm is not None:
            media = self.media_norm(media)
        k, v = self.to_kv(media.reshape(b, m * n, -1)).chunk(2, dim=-1)                        # (B, M*N, inner)
        k = k.view(b, m * n, self.heads, self.head_dim).transpose(1, 2)
        v = v.view(b, m * n, self.heads, self.head_dim).transpose(1, 2)
        return k, v

    def forward(self, x: torch.Tensor, media: torch.Tensor, media_mask: torch.Tensor,
                kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """x (B, T, D) text states; media (B, M, N, V) visual tokens of M images; media_mask (B, T, M);
        ``kv``: :meth:`project_media` of ``media`` when the caller already has it."""
        b, t, _ = x.shape
        n = media.shape[2]
        q = self.to_q(self.norm(x)).view(b, t, self.heads, self.head_dim).transpose(1, 2)      # (B, h, T, hd)
        k, v = kv if kv is not None else self.project_media(media)                             # (B, h, M*N, hd)
        allowed = media_mask.repeat_interleave(n, dim=2)[:, None]                              # (B, 1, T, M*N)
        has_media = allowed.any(dim=-1, keepdim=True)                                          # (B, 1, T, 1)
        # Rows with no image yet would be all -inf: let them attend anywhere, then zero them.
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~has_media)        # (B, h, T, hd)
        attn = attn * has_media
        out = self.to_out(attn.transpose(1, 2).reshape(b, t, -1))                              # (B, T, D)
        x = x + torch.tanh(self.attn_gate) * out
        return x + torch.tanh(self.ff_gate) * self.ff(x)


class GatedXAttnDecoderLayer(nn.Module):
    """A decoder layer of the LM with a gated cross-attention block in front of it
    (open_flamingo's ``FlamingoLayer``). The visual context is set per forward pass with
    :meth:`condition` so the wrapped layer keeps its own signature (KV cache included)."""

    def __init__(self, xattn: Optional[GatedCrossAttention], decoder_layer: nn.Module):
        super().__init__()
        self.xattn = xattn
        self.decoder_layer = decoder_layer
        # The visual context of the forward pass running on this thread: two requests answered
        # at once in one server process never see each other's images.
        self._ctx = threading.local()

    @property
    def media(self) -> Optional[torch.Tensor]:
        return getattr(self._ctx, "media", None)

    @property
    def media_mask(self) -> Optional[torch.Tensor]:
        return getattr(self._ctx, "media_mask", None)

    @property
    def _kv(self):
        return getattr(self._ctx, "kv", None)

    def condition(self, media: Optional[torch.Tensor], media_mask: Optional[torch.Tensor]) -> None:
        self._ctx.media, self._ctx.media_mask, self._ctx.kv = media, media_mask, None

    def remask(self, media_mask: torch.Tensor) -> None:
        """The same visual context for the next tokens of the same prompts, with their
        ``media_mask``: the keys and values already projected from it are kept."""
        self._ctx.media_mask = media_mask

    def forward(self, hidden_states, *args, **kwargs):
        if self.xattn is not None and self.media is not None:
            mask = self.media_mask
            if mask.shape[1] != hidden_states.shape[1]:   # cached generation: only the newest tokens
                mask = mask[:, -hidden_states.shape[1]:]
            kv = None
            if not torch.is_grad_enabled():
                # Decoding: the visual keys/values are the same at every step; project them once
                # per prompt (for a 5-image prompt this was most of a step's compute).
                if self._kv is None:
                    self._ctx.kv = self.xattn.project_media(self.media)
                kv = self._ctx.kv
            hidden_states = self.xattn(hidden_states, self.media, mask, kv)
        return self.decoder_layer(hidden_states, *args, **kwargs)
