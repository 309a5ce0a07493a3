"""Every row of the paper's Tables 7 and 8: what it is, which library implements it, how it is
built at each size, or why it cannot run here.

Sizes: ``default`` is the profile's (small enough that the whole zoo trains within a few hours
on a 2-core CPU at ``paper_baselines.image_size``); ``tiny`` is what the tests train. Widths and
depths are the rows' own design at reduced scale, never another row's architecture.

Where the rows come from:

- ``vit-pytorch`` (Phil Wang's model zoo, its model files loaded without the package
  ``__init__``, see library_modules.py): ATS, CaiT, CCT, CrossViT, CvT, DeepViT, Distillation
  (DeiT's distillable ViT), LeViT, NesT, PatchMerger, PiT, RegionViT, T2TViT, VanillaViT, ViT-SD
  (ViT for small datasets), SMIM (SimMIM pretraining of a ViT).
- ``transformers`` (randomly initialised from a config, no weights downloaded): ResNet, SwinT,
  ConvVT (the paper cites CvT twice, as "CVT" and "ConvVT": the second row is transformers'
  CvT implementation).
- ``convnets.py`` (the published architectures, written here because torchvision's compiled
  operators do not load beside the CPU torch): AlexNet, DenseNet, VGG, GoogleNet, SqueezeNet.
- ``image_ssl.py``: Barlowtwins, SimCLR, byol, moco, simsiam (a ResNet backbone) and Dino (a
  ViT backbone), losses from PyGCL's ``GCL.losses`` where it has them; pretraining without
  labels, then a linear probe.
- ``torch-geometric`` layers on patch graphs (patch_graphs.py, graph_models.py): APPNP, AGNN,
  ARMA, DNA, GAT, GGConv, GraphConv, GCN2Conv, ChebConv, GraphUNet, MPNN (NNConv), RGGConv,
  SuperGAT, TAGConv; graph contrastive methods GBT, GRACE, BGRL, InfoGraph (graph_contrastive.py,
  PyGCL's losses).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.nn as nn

from maemi_core.vision.paper_baselines.library_modules import import_submodule

SIZES = ("default", "tiny")


@dataclass(frozen=True)
class Row:
    method: str                     # the paper's row name (the Dagster partition key)
    table: int                      # 7 (vision) or 8 (graph)
    family: str                     # convnet | vit | vsl | gnn | gcl
    source: str                     # the library that implements it
    citation: str
    kind: str                       # supervised | image_ssl | graph | graph_contrastive
    unavailable: Optional[str] = None   # why it cannot run here (the table lists it with this reason)


class LogitsModel(nn.Module):
    """Any classifier as ``x -> logits`` (transformers' outputs unwrapped), with ``num_classes``."""

    def __init__(self, net: nn.Module, num_classes: int, unwrap: bool = False):
        super().__init__()
        self.net, self.num_classes, self.unwrap = net, num_classes, unwrap

    def forward(self, x):
        out = self.net(x) if not self.unwrap else self.net(pixel_values=x).logits
        return out[0] if isinstance(out, tuple) else out


def _vp(module: str):
    return import_submodule("vit_pytorch", module)


def _scale(size: str, default, tiny):
    return tiny if size == "tiny" else default


def _vit_kw(size: str) -> dict:
    return dict(dim=_scale(size, 128, 32), depth=_scale(size, 6, 1), heads=_scale(size, 4, 2),
                mlp_dim=_scale(size, 256, 64), dim_head=_scale(size, 32, 16))


def build_supervised(method: str, num_classes: int, image_size: int, size: str = "default") -> nn.Module:
    """A fresh classifier for a supervised row (input: (B, 3, S, S) standardised images)."""
    s = image_size
    p = 8 if s % 8 == 0 else 4
    kw = _vit_kw(size)
    width = _scale(size, 0.5, 0.125)
    if method in ("AlexNet", "DenseNet", "VGG", "GoogleNet", "SqueezeNet"):
        from maemi_core.vision.paper_baselines import convnets

        cls = {"GoogleNet": convnets.GoogLeNet}.get(method) or getattr(convnets, method)
        extra = {"blocks": (2, 2, 2, 2)} if method == "DenseNet" and size == "tiny" else {}
        return LogitsModel(cls(num_classes, width=width, **extra), num_classes)
    if method == "ResNet":
        from transformers import ResNetConfig, ResNetForImageClassification

        cfg = ResNetConfig(embedding_size=_scale(size, 32, 8), hidden_sizes=_scale(size, [32, 64, 128, 256], [8, 16]),
                           depths=_scale(size, [2, 2, 2, 2], [1, 1]), layer_type="basic", num_labels=num_classes)
        return LogitsModel(ResNetForImageClassification(cfg), num_classes, unwrap=True)
    if method == "SwinT":
        from transformers import SwinConfig, SwinForImageClassification

        cfg = SwinConfig(image_size=s, patch_size=4, embed_dim=_scale(size, 48, 16), depths=_scale(size, [2, 2, 4], [1, 1]),
                         num_heads=_scale(size, [2, 4, 8], [1, 2]), window_size=_scale(size, 6, 4), num_labels=num_classes)
        return LogitsModel(SwinForImageClassification(cfg), num_classes, unwrap=True)
    if method == "ConvVT":
        from transformers import CvtConfig, CvtForImageClassification

        cfg = CvtConfig(embed_dim=_scale(size, [32, 64, 128], [8, 16, 32]), num_heads=_scale(size, [1, 2, 4], [1, 1, 2]),
                        depth=_scale(size, [1, 2, 4], [1, 2, 3]), num_labels=num_classes)   # 3 stages, as CvT-13 (transformers indexes each stage's drop-path rates by the stage: depth[i] > i)
        return LogitsModel(CvtForImageClassification(cfg), num_classes, unwrap=True)
    if method == "VanillaViT":
        return LogitsModel(_vp("vit").ViT(image_size=s, patch_size=p, num_classes=num_classes, **kw), num_classes)
    if method == "ViT-SD":
        return LogitsModel(_vp("vit_for_small_dataset").ViT(image_size=s, patch_size=p, num_classes=num_classes, **kw),
                           num_classes)
    if method == "DeepViT":
        return LogitsModel(_vp("deepvit").DeepViT(image_size=s, patch_size=p, num_classes=num_classes, **kw), num_classes)
    if method == "PatchMerger":
        return LogitsModel(_vp("vit_with_patch_merger").ViT(image_size=s, patch_size=p, num_classes=num_classes,
                                                            patch_merge_layer=kw["depth"] // 2,
                                                            patch_merge_num_tokens=8, **kw), num_classes)
    if method == "ATS":
        tokens = (s // p) ** 2
        per_depth = tuple(max(4, tokens // (2 ** (i + 1))) for i in range(kw["depth"]))
        return LogitsModel(_vp("ats_vit").ViT(image_size=s, patch_size=p, num_classes=num_classes,
                                              max_tokens_per_depth=per_depth, **kw), num_classes)
    if method == "CaiT":
        return LogitsModel(_vp("cait").CaiT(image_size=s, patch_size=p, num_classes=num_classes,
                                            cls_depth=_scale(size, 2, 1), **kw), num_classes)
    if method == "PiT":
        depth = _scale(size, (2, 2, 2), (1, 1))
        return LogitsModel(_vp("pit").PiT(image_size=s, patch_size=p, num_classes=num_classes, dim=kw["dim"], depth=depth,
                                          heads=kw["heads"], mlp_dim=kw["mlp_dim"], dim_head=kw["dim_head"]), num_classes)
    if method == "T2TViT":
        return LogitsModel(_vp("t2t").T2TViT(image_size=s, num_classes=num_classes, dim=kw["dim"], depth=kw["depth"],
                                             heads=kw["heads"], mlp_dim=kw["mlp_dim"], dim_head=kw["dim_head"],
                                             t2t_layers=((7, 4), (3, 2))), num_classes)
    if method == "CCT":
        # one convolution (7x7, stride 4) and a 2x pooling: as many tokens as 8-pixel patches
        return LogitsModel(_vp("cct").CCT(img_size=s, embedding_dim=kw["dim"], n_conv_layers=1, kernel_size=7, stride=4,
                                          padding=3, pooling_kernel_size=3, pooling_stride=2, pooling_padding=1,
                                          num_layers=kw["depth"], num_heads=kw["heads"], mlp_ratio=2.0,
                                          num_classes=num_classes, positional_embedding="learnable"), num_classes)
    if method == "CVT":
        d = kw["dim"]
        return LogitsModel(_vp("cvt").CvT(num_classes=num_classes, s1_emb_dim=d // 4, s1_depth=1, s1_heads=1,
                                          s2_emb_dim=d // 2, s2_depth=_scale(size, 2, 1), s2_heads=2,
                                          s3_emb_dim=d, s3_depth=_scale(size, 4, 1), s3_heads=4), num_classes)
    if method == "CrossViT":
        d = kw["dim"]
        return LogitsModel(_vp("cross_vit").CrossViT(image_size=s, num_classes=num_classes, sm_dim=d // 2, lg_dim=d,
                                                     sm_patch_size=p // 2 if s % (p // 2) == 0 else p, lg_patch_size=p,
                                                     sm_enc_depth=1, sm_enc_heads=2, sm_enc_mlp_dim=d, sm_enc_dim_head=16,
                                                     lg_enc_depth=_scale(size, 2, 1), lg_enc_heads=kw["heads"],
                                                     lg_enc_mlp_dim=kw["mlp_dim"], lg_enc_dim_head=kw["dim_head"],
                                                     cross_attn_depth=1, cross_attn_heads=2, cross_attn_dim_head=16,
                                                     depth=_scale(size, 2, 1), dropout=0.1, emb_dropout=0.1), num_classes)
    if method == "LeViT":
        return LogitsModel(_vp("levit").LeViT(image_size=s, num_classes=num_classes,
                                              dim=_scale(size, (64, 96, 128), (16, 24, 32)),
                                              depth=_scale(size, 2, 1), heads=(2, 3, 4), mlp_mult=2, stages=3,
                                              dim_key=16, dim_value=_scale(size, 32, 16)), num_classes)
    if method == "NesT":
        # NesT doubles the width at every hierarchy: half the others' base width
        return LogitsModel(_vp("nest").NesT(image_size=s, patch_size=p // 2 if s // p % 4 else p, num_classes=num_classes,
                                            dim=kw["dim"] // 2, heads=kw["heads"], num_hierarchies=3,
                                            block_repeats=_scale(size, (2, 2, 2), (1, 1, 1)), dim_head=kw["dim_head"]),
                           num_classes)
    if method == "RegionViT":
        return LogitsModel(_vp("regionvit").RegionViT(dim=_scale(size, (32, 64, 128, 256), (8, 16, 32, 64)),
                                                      depth=_scale(size, (1, 1, 2, 1), (1, 1, 1, 1)),
                                                      window_size=_scale(size, 3, 2), num_classes=num_classes,
                                                      local_patch_size=4), num_classes)
    if method == "Distillation":
        return LogitsModel(_vp("distill").DistillableViT(image_size=s, patch_size=p, num_classes=num_classes, **kw),
                           num_classes)
    raise KeyError(f"no supervised row named {method!r}")


def _r(method, table, family, source, citation, kind, unavailable=None) -> Row:
    return Row(method, table, family, source, citation, kind, unavailable)


VP, TF, OWN, PYG = "vit-pytorch", "transformers", "maemi_core (convnets.py)", "torch-geometric"
ROWS: tuple[Row, ...] = (
    # Table 7: ConvNets
    _r("AlexNet", 7, "convnet", OWN, "Krizhevsky et al., 2017", "supervised"),
    _r("DenseNet", 7, "convnet", OWN, "Huang et al., 2017", "supervised"),
    _r("ResNet", 7, "convnet", TF, "He et al., 2016", "supervised"),
    _r("VGG", 7, "convnet", OWN, "Simonyan & Zisserman, 2014", "supervised"),
    _r("GoogleNet", 7, "convnet", OWN, "Szegedy et al., 2015", "supervised"),
    _r("SqueezeNet", 7, "convnet", OWN, "Iandola et al., 2016", "supervised"),
    # Table 7: vision self-supervised learning (pretrain without labels, then a linear probe)
    _r("Barlowtwins", 7, "vsl", "maemi_core (image_ssl.py) + PyGCL loss", "Zbontar et al., 2021", "image_ssl"),
    _r("SimCLR", 7, "vsl", "maemi_core (image_ssl.py) + PyGCL loss", "Chen et al., 2020b", "image_ssl"),
    _r("byol", 7, "vsl", "maemi_core (image_ssl.py) + PyGCL loss", "Grill et al., 2020", "image_ssl"),
    _r("moco", 7, "vsl", "maemi_core (image_ssl.py) + PyGCL loss", "He et al., 2020", "image_ssl"),
    _r("simsiam", 7, "vsl", "maemi_core (image_ssl.py) + PyGCL loss", "Chen & He, 2021", "image_ssl"),
    # Table 7: vision transformers
    _r("CCT", 7, "vit", VP, "Hassani et al., 2021", "supervised"),
    _r("CVT", 7, "vit", VP, "Wu et al., 2021", "supervised"),
    _r("ConViT", 7, "vit", "timm", "d'Ascoli et al., 2021", "supervised",
       "implemented only in timm, whose import needs torchvision's compiled operators (they do not load beside "
       "the project's CPU torch)"),
    _r("ConvVT", 7, "vit", TF, "Wu et al., 2021", "supervised"),
    _r("CrossViT", 7, "vit", VP, "Chen et al., 2021b", "supervised"),
    _r("SwinT", 7, "vit", TF, "Liu et al., 2021", "supervised"),
    _r("VanillaViT", 7, "vit", VP, "Dosovitskiy et al., 2020", "supervised"),
    _r("Visformer", 7, "vit", "timm", "Chen et al., 2021c", "supervised",
       "implemented only in timm, whose import needs torchvision's compiled operators (they do not load beside "
       "the project's CPU torch)"),
    _r("ATS", 7, "vit", VP, "Fayyaz et al., 2021", "supervised"),
    _r("CaiT", 7, "vit", VP, "Touvron et al., 2021b", "supervised"),
    _r("DeepViT", 7, "vit", VP, "Zhou et al., 2021", "supervised"),
    _r("Dino", 7, "vit", "maemi_core (image_ssl.py), vit-pytorch ViT backbone", "Caron et al., 2021", "image_ssl"),
    _r("Distillation", 7, "vit", VP, "Touvron et al., 2021a", "supervised"),
    _r("LeViT", 7, "vit", VP, "Graham et al., 2021", "supervised"),
    _r("NesT", 7, "vit", VP, "Zhang et al., 2022", "supervised"),
    _r("PatchMerger", 7, "vit", VP, "Renggli et al., 2022", "supervised"),
    _r("PiT", 7, "vit", VP, "Heo et al., 2021", "supervised"),
    _r("RegionViT", 7, "vit", VP, "Chen et al., 2021a", "supervised"),
    _r("SMIM", 7, "vit", VP + " (SimMIM)", "Xie et al., 2021", "image_ssl"),
    _r("T2TViT", 7, "vit", VP, "Yuan et al., 2021", "supervised"),
    _r("ViT-SD", 7, "vit", VP, "Lee et al., 2021", "supervised"),
    # Table 8: graph contrastive learning (pretrain without labels, then a linear probe)
    _r("GBT", 8, "gcl", "maemi_core (graph_contrastive.py) + PyGCL loss", "Bielak et al., 2021", "graph_contrastive"),
    _r("GRACE", 8, "gcl", "maemi_core (graph_contrastive.py) + PyGCL loss", "Zhu et al., 2020", "graph_contrastive"),
    _r("BGRL", 8, "gcl", "maemi_core (graph_contrastive.py) + PyGCL loss", "Thakoor et al., 2021", "graph_contrastive"),
    _r("InfoGraph", 8, "gcl", "maemi_core (graph_contrastive.py) + PyGCL loss", "Sun et al., 2019", "graph_contrastive"),
    # Table 8: graph neural networks
    _r("APPNP", 8, "gnn", PYG, "Klicpera et al., 2018", "graph"),
    _r("AGNN", 8, "gnn", PYG, "Thekumparampil et al., 2018", "graph"),
    _r("ARMA", 8, "gnn", PYG, "Bianchi et al., 2021", "graph"),
    _r("DNA", 8, "gnn", PYG, "Fey, 2019", "graph"),
    _r("GAT", 8, "gnn", PYG, "Velickovic et al., 2017", "graph"),
    _r("GGConv", 8, "gnn", PYG, "Li et al., 2015", "graph"),
    _r("GraphConv", 8, "gnn", PYG, "Morris et al., 2019", "graph"),
    _r("GCN2Conv", 8, "gnn", PYG, "Chen et al., 2020a", "graph"),
    _r("ChebConv", 8, "gnn", PYG, "Defferrard et al., 2016", "graph"),
    _r("GraphUNet", 8, "gnn", PYG, "Gao & Ji, 2019", "graph"),
    _r("MPNN", 8, "gnn", PYG, "Gilmer et al., 2017", "graph"),
    _r("RGGConv", 8, "gnn", PYG, "Bresson & Laurent, 2017", "graph"),
    _r("SuperGAT", 8, "gnn", PYG, "Kim & Oh, 2022", "graph"),
    _r("TAGConv", 8, "gnn", PYG, "Du et al., 2017", "graph"),
)
BY_METHOD = {r.method: r for r in ROWS}


def row(method: str) -> Row:
    try:
        return BY_METHOD[method]
    except KeyError:
        raise KeyError(f"no row {method!r} in the paper's tables; one of {', '.join(BY_METHOD)}") from None
