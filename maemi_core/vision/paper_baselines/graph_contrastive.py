"""Graph contrastive rows of the paper's Table 8: pretrain a GCN encoder on the training
images' patch graphs without labels, then read its graph embedding (mean + max readout) with a
linear probe. Two views of each batch drop 20% of the edges (torch-geometric's
``dropout_edge``) and mask 20% of the feature columns; the objectives, with PyGCL's losses
(``GCL.losses``; PyGCL's own augmentors and models need DGL and torch-scatter, which do not
install here):

- GRACE (Zhu et al., 2020): node-level InfoNCE between the two views' projected node embeddings
  (the same node in the other view is the positive; temperature 0.2).
- GBT, Graph Barlow Twins (Bielak et al., 2021): Barlow Twins on the two views' node embeddings.
- BGRL (Thakoor et al., 2021): an online encoder and predictor regress a momentum (0.99)
  target encoder's node embeddings of the other view (``2 - 2 cos``, ``BootstrapLatent``).
- InfoGraph (Sun et al., 2019): Jensen-Shannon mutual information between node embeddings and
  the embedding of their own graph (positives) and of the other graphs (negatives).
"""

from __future__ import annotations

import copy
import time
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from maemi_core.vision.paper_baselines.library_modules import import_submodule
from maemi_core.threads import subnormals_flushed

GCL_METHODS = ("GBT", "GRACE", "BGRL", "InfoGraph")


class GCNEncoder(nn.Module):
    def __init__(self, in_dim: int, hidden: int, layers: int = 2):
        super().__init__()
        from torch_geometric.nn import GCNConv

        self.convs = nn.ModuleList(GCNConv(in_dim if i == 0 else hidden, hidden) for i in range(layers))
        self.dim = hidden

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        for i, conv in enumerate(self.convs):
            x = conv(x, edge_index)
            x = F.relu(x) if i < len(self.convs) - 1 else x
        return x

    @torch.no_grad()
    def graph_embeddings(self, batch) -> torch.Tensor:
        from torch_geometric.nn import global_max_pool, global_mean_pool

        self.eval()
        h = self(batch.x, batch.edge_index)
        return torch.cat([global_mean_pool(h, batch.batch), global_max_pool(h, batch.batch)], 1)


def _view(batch, gen: torch.Generator, p_edge: float = 0.2, p_feat: float = 0.2):
    keep = torch.rand(batch.edge_index.shape[1], generator=gen) >= p_edge
    mask = (torch.rand(batch.x.shape[1], generator=gen) >= p_feat).float()
    return batch.x * mask, batch.edge_index[:, keep]


def _proj(d: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d, d), nn.ELU(), nn.Linear(d, d))


@subnormals_flushed()
def pretrain_graphs(method: str, features: np.ndarray, batcher, hidden: int, epochs: int, minutes: float,
                    batch_size: int, lr: float, seed: int,
                    log: Callable[[str], None] = lambda m: None) -> tuple[GCNEncoder, list[dict]]:
    """Pretrain ``method`` on patch-graph node ``features`` (N, nodes, F) without labels."""
    if method not in GCL_METHODS:
        raise KeyError(f"unknown graph contrastive row {method!r}; one of {GCL_METHODS}")
    losses = import_submodule("GCL", "losses")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    enc = GCNEncoder(features.shape[-1], hidden)
    proj = _proj(hidden)
    params = list(enc.parameters()) + list(proj.parameters())
    if method == "BGRL":
        predictor = _proj(hidden)
        params += list(predictor.parameters())
        target = copy.deepcopy(enc).requires_grad_(False)
    if method == "InfoGraph":
        graph_proj = _proj(2 * hidden)
        node_proj = nn.Linear(hidden, 2 * hidden)
        params += list(graph_proj.parameters()) + list(node_proj.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    infonce, barlow, boot, jsd = losses.InfoNCE(tau=0.2), losses.BarlowTwins(), losses.BootstrapLatent(), losses.JSD()
    history, t0, n = [], time.perf_counter(), len(features)
    for epoch in range(1, epochs + 1):
        enc.train()
        order = torch.randperm(n, generator=gen)
        total, seen = 0.0, 0
        for start in range(0, n, batch_size):
            idx = order[start: start + batch_size].numpy()
            if len(idx) < 2:
                continue
            b = batcher(features[idx])
            (x1, e1), (x2, e2) = _view(b, gen), _view(b, gen)
            h1, h2 = enc(x1, e1), enc(x2, e2)
            eye = torch.eye(len(h1))
            if method == "GRACE":
                z1, z2 = proj(h1), proj(h2)
                loss = 0.5 * (infonce(anchor=z1, sample=z2, pos_mask=eye, neg_mask=1 - eye)
                              + infonce(anchor=z2, sample=z1, pos_mask=eye, neg_mask=1 - eye))
            elif method == "GBT":
                loss = barlow(anchor=h1, sample=h2)
            elif method == "BGRL":
                with torch.no_grad():
                    t1, t2 = target(x1, e1), target(x2, e2)
                loss = 2 - (boot(anchor=predictor(h1), sample=t2, pos_mask=eye)
                            + boot(anchor=predictor(h2), sample=t1, pos_mask=eye))
            else:   # InfoGraph: nodes against their own graph (positives) and the others (negatives)
                from torch_geometric.nn import global_max_pool, global_mean_pool

                g = graph_proj(torch.cat([global_mean_pool(h1, b.batch), global_max_pool(h1, b.batch)], 1))
                pos = F.one_hot(b.batch, b.num_graphs).float()
                loss = jsd(anchor=node_proj(h1), sample=g, pos_mask=pos, neg_mask=1 - pos)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if method == "BGRL":
                with torch.no_grad():
                    for t, o in zip(target.parameters(), enc.parameters()):
                        t.mul_(0.99).add_(o.detach(), alpha=0.01)
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
        history.append({"epoch": epoch, "train_loss": total / max(seen, 1), "minutes": (time.perf_counter() - t0) / 60})
        log(f"{method} pretraining epoch {epoch}: loss {total / max(seen, 1):.4f}")
        if (time.perf_counter() - t0) / 60 >= minutes:
            break
    return enc.eval(), history
