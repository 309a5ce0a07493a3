"""The graph neural networks of the paper's Table 8, each built from torch-geometric's layer of
that name, as a graph classifier over patch graphs (patch_graphs.py):

input linear -> ``layers`` x (the row's layer, ReLU, residual) -> mean + max readout -> linear.

Layers that are propagation rules rather than learned transforms keep their design: APPNP
(Klicpera et al.) propagates an MLP's output (K = 10, alpha = 0.1); GCN2Conv (Chen et al.) mixes
in the initial representation (alpha = 0.1, theta = 0.5); DNA (Fey) attends over every earlier
layer's output; GGConv (Li et al.) is one gated graph convolution of ``layers`` steps; GraphUNet
(Gao & Ji) is one U-Net of depth 2 (top-k pooling and unpooling); MPNN (Gilmer et al.) is an
edge-conditioned convolution (NNConv) on the edge offsets; SuperGAT (Kim & Oh) adds its
self-supervised attention loss (weight 4, as torch-geometric's example).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

GNN_METHODS = ("APPNP", "AGNN", "ARMA", "DNA", "GAT", "GGConv", "GraphConv", "GCN2Conv", "ChebConv", "GraphUNet",
               "MPNN", "RGGConv", "SuperGAT", "TAGConv")


class GraphClassifier(nn.Module):
    def __init__(self, method: str, in_dim: int, hidden: int, layers: int, num_classes: int):
        super().__init__()
        import torch_geometric.nn as g

        if method not in GNN_METHODS:
            raise KeyError(f"unknown graph row {method!r}; one of {GNN_METHODS}")
        self.method, self.num_classes, self.layers = method, num_classes, layers
        self.lin_in = nn.Linear(in_dim, hidden)
        h = hidden
        if method == "APPNP":
            self.convs = nn.ModuleList(nn.Linear(h, h) for _ in range(layers))
            self.prop = g.APPNP(K=10, alpha=0.1)
        elif method == "GGConv":
            self.convs = nn.ModuleList([g.GatedGraphConv(h, num_layers=layers)])
        elif method == "GraphUNet":
            self.convs = nn.ModuleList([g.GraphUNet(h, h, h, depth=2, pool_ratios=0.5)])
        else:
            make = {
                "AGNN": lambda i: g.AGNNConv(requires_grad=True),
                "ARMA": lambda i: g.ARMAConv(h, h, num_stacks=2, num_layers=1),
                "DNA": lambda i: g.DNAConv(h, heads=2 if h % 2 == 0 else 1),
                "GAT": lambda i: g.GATConv(h, h // 4, heads=4),
                "GraphConv": lambda i: g.GraphConv(h, h),
                "GCN2Conv": lambda i: g.GCN2Conv(h, alpha=0.1, theta=0.5, layer=i + 1),
                "ChebConv": lambda i: g.ChebConv(h, h, K=3),
                "MPNN": lambda i: g.NNConv(h, h, nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, h * h)),
                                           aggr="mean"),
                "RGGConv": lambda i: g.ResGatedGraphConv(h, h),
                "SuperGAT": lambda i: g.SuperGATConv(h, h // 4, heads=4, attention_type="MX"),
                "TAGConv": lambda i: g.TAGConv(h, h, K=3),
            }[method]
            self.convs = nn.ModuleList(make(i) for i in range(layers))
        self.head = nn.Linear(2 * h, num_classes)

    def node_embeddings(self, batch) -> torch.Tensor:
        x = F.relu(self.lin_in(batch.x))
        ei, m = batch.edge_index, self.method
        if m == "APPNP":
            for lin in self.convs:
                x = F.relu(lin(x))
            return self.prop(x, ei)
        if m in ("GGConv", "GraphUNet"):
            return F.relu(self.convs[0](x, ei)) + x
        x0, history = x, [x]
        for conv in self.convs:
            if m == "GCN2Conv":
                out = conv(x, x0, ei)
            elif m == "DNA":
                out = conv(torch.stack(history, 1), ei)
            elif m == "MPNN":
                out = conv(x, ei, batch.edge_attr)
            else:
                out = conv(x, ei)
            x = F.relu(out) + x
            history.append(x)
        return x

    def forward(self, batch) -> torch.Tensor:
        from torch_geometric.nn import global_max_pool, global_mean_pool

        x = self.node_embeddings(batch)
        pooled = torch.cat([global_mean_pool(x, batch.batch), global_max_pool(x, batch.batch)], 1)
        return self.head(pooled)

    def extra_loss(self) -> torch.Tensor:
        """SuperGAT's self-supervised attention loss of the last forward pass (0 for the others)."""
        if self.method != "SuperGAT" or not self.training:
            return torch.zeros(())
        return 4.0 * sum(conv.get_attention_loss() for conv in self.convs)
