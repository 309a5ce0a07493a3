"""The ConvNets of the paper's Table 7 that no importable library provides here.

torchvision implements them, but its compiled operators do not load beside the project's CPU
torch (``operator torchvision::nms does not exist``), and ``transformers`` has none of these
five. Each is the published architecture at a chosen width (``width`` scales every channel
count; the layer pattern is the paper's), ending in global average pooling and a linear
classifier so that any input size works:

- AlexNet: Krizhevsky, Sutskever & Hinton (2012), 5 convolutions (11/5/3/3/3) with max pooling.
- VGG: Simonyan & Zisserman (2015), configuration A (VGG-11): 3x3 convolutions, 8 conv layers.
- GoogLeNet: Szegedy et al. (2015), inception modules (1x1, 3x3, 5x5 and pool branches),
  a stem and inception blocks 3a, 3b, 4a, 4b (the auxiliary classifiers left out).
- SqueezeNet: Iandola et al. (2016), v1.1: fire modules (squeeze 1x1, expand 1x1 + 3x3).
- DenseNet: Huang et al. (2017), dense blocks (BN-ReLU-1x1-BN-ReLU-3x3, growth ``k``) with
  transition layers (1x1 conv + 2x2 average pooling), DenseNet-BC style.

ResNet comes from ``transformers`` (``ResNetForImageClassification``), see ``zoo.py``.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def _c(n: int, width: float) -> int:
    return max(8, int(round(n * width)))


class _Head(nn.Module):
    def __init__(self, channels: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.pool(x).flatten(1)))


def _conv(cin: int, cout: int, k: int, s: int = 1, p: int = 0, bn: bool = False) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, s, p, bias=not bn)] + ([nn.BatchNorm2d(cout)] if bn else []) + [nn.ReLU(inplace=True)]


class AlexNet(nn.Module):
    def __init__(self, num_classes: int, width: float = 1.0, channels: int = 3):
        super().__init__()
        c = [_c(n, width) for n in (64, 192, 384, 256, 256)]
        self.features = nn.Sequential(
            *_conv(channels, c[0], 11, 4, 2), nn.MaxPool2d(3, 2, 1, ceil_mode=True),
            *_conv(c[0], c[1], 5, 1, 2), nn.MaxPool2d(3, 2, 1, ceil_mode=True),
            *_conv(c[1], c[2], 3, 1, 1), *_conv(c[2], c[3], 3, 1, 1), *_conv(c[3], c[4], 3, 1, 1),
            nn.MaxPool2d(3, 2, 1, ceil_mode=True))   # padded pools: small inputs keep a 1x1 map
        self.head = _Head(c[4], num_classes, dropout=0.5)

    def forward(self, x):
        return self.head(self.features(x))


class VGG(nn.Module):
    CONFIG_A = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")

    def __init__(self, num_classes: int, width: float = 1.0, channels: int = 3):
        super().__init__()
        layers, cin = [], channels
        for v in self.CONFIG_A:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            else:
                layers += _conv(cin, _c(v, width), 3, 1, 1, bn=True)
                cin = _c(v, width)
        self.features = nn.Sequential(*layers)
        self.head = _Head(cin, num_classes, dropout=0.5)

    def forward(self, x):
        return self.head(self.features(x))


class _Inception(nn.Module):
    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, pool: int):
        super().__init__()
        self.b1 = nn.Sequential(*_conv(cin, c1, 1, bn=True))
        self.b3 = nn.Sequential(*_conv(cin, c3r, 1, bn=True), *_conv(c3r, c3, 3, 1, 1, bn=True))
        self.b5 = nn.Sequential(*_conv(cin, c5r, 1, bn=True), *_conv(c5r, c5, 5, 1, 2, bn=True))
        self.bp = nn.Sequential(nn.MaxPool2d(3, 1, 1), *_conv(cin, pool, 1, bn=True))
        self.out_channels = c1 + c3 + c5 + pool

    def forward(self, x):
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(x)], 1)


class GoogLeNet(nn.Module):
    # (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj) of inception 3a, 3b, 4a, 4b (paper Table 1)
    BLOCKS = ((64, 96, 128, 16, 32, 32), (128, 128, 192, 32, 96, 64), "M",
              (192, 96, 208, 16, 48, 64), (160, 112, 224, 24, 64, 64))

    def __init__(self, num_classes: int, width: float = 1.0, channels: int = 3):
        super().__init__()
        s = [_c(n, width) for n in (64, 64, 192)]
        layers = [*_conv(channels, s[0], 7, 2, 3, bn=True), nn.MaxPool2d(3, 2, ceil_mode=True),
                  *_conv(s[0], s[1], 1, bn=True), *_conv(s[1], s[2], 3, 1, 1, bn=True),
                  nn.MaxPool2d(3, 2, ceil_mode=True)]
        cin = s[2]
        for b in self.BLOCKS:
            if b == "M":
                layers.append(nn.MaxPool2d(3, 2, ceil_mode=True))
                continue
            block = _Inception(cin, *[_c(n, width) for n in b])
            layers.append(block)
            cin = block.out_channels
        self.features = nn.Sequential(*layers)
        self.head = _Head(cin, num_classes, dropout=0.4)

    def forward(self, x):
        return self.head(self.features(x))


class _Fire(nn.Module):
    def __init__(self, cin: int, squeeze: int, expand: int):
        super().__init__()
        self.squeeze = nn.Sequential(*_conv(cin, squeeze, 1))
        self.e1 = nn.Sequential(*_conv(squeeze, expand, 1))
        self.e3 = nn.Sequential(*_conv(squeeze, expand, 3, 1, 1))
        self.out_channels = 2 * expand

    def forward(self, x):
        x = self.squeeze(x)
        return torch.cat([self.e1(x), self.e3(x)], 1)


class SqueezeNet(nn.Module):
    # v1.1: (squeeze, expand) per fire module, max pooling after the stem, fire 3 and fire 5
    FIRES = ((16, 64), (16, 64), "M", (32, 128), (32, 128), "M", (48, 192), (48, 192), (64, 256), (64, 256))

    def __init__(self, num_classes: int, width: float = 1.0, channels: int = 3):
        super().__init__()
        cin = _c(64, width)
        layers = [*_conv(channels, cin, 3, 2), nn.MaxPool2d(3, 2, ceil_mode=True)]
        for f in self.FIRES:
            if f == "M":
                layers.append(nn.MaxPool2d(3, 2, ceil_mode=True))
                continue
            fire = _Fire(cin, _c(f[0], width), _c(f[1], width))
            layers.append(fire)
            cin = fire.out_channels
        self.features = nn.Sequential(*layers)
        # SqueezeNet's classifier is a 1x1 convolution to the classes, then global average pooling.
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(cin, num_classes, 1), nn.ReLU(inplace=True),
                                        nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.classifier(self.features(x))


class _DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.Conv2d(cin, 4 * growth, 1, bias=False),
                                  nn.BatchNorm2d(4 * growth), nn.ReLU(inplace=True),
                                  nn.Conv2d(4 * growth, growth, 3, 1, 1, bias=False))

    def forward(self, x):
        return torch.cat([x, self.body(x)], 1)


class DenseNet(nn.Module):
    def __init__(self, num_classes: int, width: float = 1.0, channels: int = 3, blocks: tuple[int, ...] = (6, 12, 24, 16)):
        super().__init__()
        growth = _c(32, width)
        cin = 2 * growth
        layers = [nn.Conv2d(channels, cin, 7, 2, 3, bias=False), nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
                  nn.MaxPool2d(3, 2, 1)]
        for i, n in enumerate(blocks):
            for _ in range(n):
                layers.append(_DenseLayer(cin, growth))
                cin += growth
            if i < len(blocks) - 1:           # transition: halve channels and resolution
                layers += [nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.Conv2d(cin, cin // 2, 1, bias=False),
                           nn.AvgPool2d(2, 2)]
                cin //= 2
        layers += [nn.BatchNorm2d(cin), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.head = _Head(cin, num_classes)

    def forward(self, x):
        return self.head(self.features(x))
