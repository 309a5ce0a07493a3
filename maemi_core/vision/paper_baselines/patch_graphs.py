"""Images as graphs for the paper's Table 8: one node per patch of a ``grid x grid`` tiling.

Choice (the paper does not say how it turns micrographs into graphs): node features are the
patch's own pixels, read at 4 x 4 (area-averaged, 16 values), plus its mean, standard deviation
and mean gradient magnitude (19 features, standardised with the training images' statistics);
edges join each patch to its 8 neighbours (both directions), with the edge attribute the unit
offset (dx, dy) for layers that read edge features (MPNN). Every graph has the same edges, so a
batch is built by offsetting one edge list. Nothing here is learned: the GNN sees pixels, as the
ConvNets and ViTs of Table 7 do.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

FEATURES = 19


def grid_edges(grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(2, E) edge index of the 8-neighbour grid and (E, 2) offsets."""
    src, dst, off = [], [], []
    for r in range(grid):
        for c in range(grid):
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    rr, cc = r + dr, c + dc
                    if (dr or dc) and 0 <= rr < grid and 0 <= cc < grid:
                        src.append(r * grid + c)
                        dst.append(rr * grid + cc)
                        off.append((dc, dr))
    return torch.tensor([src, dst]), torch.tensor(off, dtype=torch.float32)


def node_features(images_u8: np.ndarray, grid: int) -> np.ndarray:
    """(N, 3, S, S) uint8 -> (N, grid*grid, 19) float32 raw (unstandardised) node features."""
    x = torch.from_numpy(np.asarray(images_u8)).float().mean(1, keepdim=True) / 255.0     # (N, 1, S, S) grey
    n, _, s, _ = x.shape
    size = (s // grid) * grid
    x = F.interpolate(x, size=(size, size), mode="area") if size != s else x
    p = size // grid
    small = F.adaptive_avg_pool2d(x, grid * 4)                                          # (N, 1, 4g, 4g)
    pix = small.view(n, grid, 4, grid, 4).permute(0, 1, 3, 2, 4).reshape(n, grid * grid, 16)
    patches = x.view(n, grid, p, grid, p).permute(0, 1, 3, 2, 4).reshape(n, grid * grid, p * p)
    gy = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs()
    gx = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs()
    grad = F.pad(gy, (0, 0, 0, 1)) + F.pad(gx, (0, 1, 0, 0))
    grad = grad.view(n, grid, p, grid, p).permute(0, 1, 3, 2, 4).reshape(n, grid * grid, p * p).mean(-1, keepdim=True)
    feats = torch.cat([pix, patches.mean(-1, keepdim=True), patches.std(-1, keepdim=True), grad], -1)
    return feats.numpy().astype(np.float32)


class GraphBatcher:
    """node features (B, nodes, F) -> a torch_geometric ``Batch`` of patch graphs (standardised)."""

    def __init__(self, grid: int, mean: np.ndarray, std: np.ndarray):
        self.grid = grid
        self.edge_index, self.edge_attr = grid_edges(grid)
        self.mean = torch.from_numpy(mean).float()
        self.std = torch.from_numpy(np.maximum(std, 1e-6)).float()

    @classmethod
    def fitted(cls, train_features: np.ndarray, grid: int) -> "GraphBatcher":
        flat = train_features.reshape(-1, train_features.shape[-1])
        return cls(grid, flat.mean(0), flat.std(0))

    def __call__(self, feats: np.ndarray):
        from torch_geometric.data import Batch

        x = (torch.from_numpy(np.asarray(feats)) - self.mean) / self.std                   # (B, n, F)
        b, n, f = x.shape
        offsets = (torch.arange(b) * n).repeat_interleave(self.edge_index.shape[1])
        edge_index = self.edge_index.repeat(1, b) + offsets
        return Batch(x=x.reshape(b * n, f), edge_index=edge_index, edge_attr=self.edge_attr.repeat(b, 1),
                     batch=torch.arange(b).repeat_interleave(n), num_graphs=b)
