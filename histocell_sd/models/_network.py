"""The HistoCell network and how it runs on the inputs of a sample.

Nucleus crop, sampled context and morphology are fused into one embedding per nucleus; neighbour
attention mixes it with its neighbours'; heads give the cell type, the state within each type and the
compartment. Training embeds the nuclei of a batch of spots (:meth:`HistoCellNet.embed_nuclei`,
:meth:`HistoCellNet.outputs`); inference embeds every nucleus once (:meth:`HistoCellNet.predict`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .._stain import stain_jitter, to_optical_density
from .._utils import progress_bar
from ._config import HistoCellConfig
from ._inputs import SampleInputs
from ._modules import ContextEncoder, NeighbourAttention, NucleusEncoder

_CONTEXT_TILE_PX = 256  # inference embeds the nuclei of one context tile at a time
_CHUNK = 4096  # nuclei per forward pass at inference


class HistoCellNet(nn.Module):
    """Nucleus embedding → neighbour attention → type, state (per type) and compartment heads.

    ``states_per_type`` gives the number of states of each cell type, in order (1: the type is its own
    state, no head). The morphology standardisation (``feature_mean``, ``feature_std``, set by training)
    is kept on the network but not in its ``state_dict``: the model card stores it.
    """

    def __init__(
        self,
        n_types: int,
        states_per_type: list[int],
        n_compartments: int,
        n_features: int,
        dim: int = 64,
        radius_um: float = 30.0,
        dropout: float = 0.1,
        encoder_width: int = 16,
        encoder_dim: int = 64,
    ):
        super().__init__()
        self.states_per_type, self.dim = [int(s) for s in states_per_type], dim
        self.nucleus = NucleusEncoder(width=encoder_width, out_dim=encoder_dim)
        self.context = ContextEncoder(out_dim=32)
        self.morphology = nn.Sequential(nn.Linear(n_features, 32), nn.ReLU()) if n_features else None
        fused = encoder_dim + 32 + (32 if n_features else 0)
        self.fuse = nn.Sequential(nn.Linear(fused, dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(dim, dim), nn.LayerNorm(dim))
        self.graph = NeighbourAttention(dim, radius_um=radius_um)
        self.type_head = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * dim, n_types))
        self.state_heads = nn.ModuleList(nn.Linear(2 * dim, s) for s in self.states_per_type if s > 1)
        self.compartment_head = nn.Linear(dim, max(n_compartments, 1))
        self.feature_mean = np.zeros(n_features, np.float32)
        self.feature_std = np.ones(n_features, np.float32)

    @property
    def device(self) -> torch.device:
        """Where the weights are (``.to(device)`` moves them)."""
        return next(self.parameters()).device

    def tensor(self, array: np.ndarray) -> torch.Tensor:
        """``array`` as a tensor on the network's device (no copy on the CPU)."""
        return torch.from_numpy(array).to(self.device)

    @classmethod
    def from_config(cls, config: HistoCellConfig, encoder_state: dict | None = None) -> HistoCellNet:
        """A network for ``config`` with fresh weights (the nucleus encoder from ``encoder_state`` when given)."""
        net = cls(
            n_types=len(config.cell_types),
            states_per_type=[len(config.states[t]) for t in config.cell_types],
            n_compartments=len(config.compartment_labels),
            n_features=len(config.feature_names),
            dim=config.dim,
            radius_um=config.radius_um,
            encoder_width=config.encoder["width"],
            encoder_dim=config.encoder["out_dim"],
        )
        if encoder_state is not None:
            net.nucleus.load_state_dict(encoder_state)
        return net

    # ------------------------------------------------------------------ tensors in, tensors out
    def embed(self, crops_od: torch.Tensor, context: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        """Per-nucleus embedding before the graph layer from crop, sampled context and morphology."""
        parts = [self.nucleus(crops_od), context]
        if self.morphology is not None:
            parts.append(self.morphology(features))
        return self.fuse(torch.cat(parts, dim=1))

    def heads(self, h_query: torch.Tensor, h_keys: torch.Tensor, neighbors: torch.Tensor, distances: torch.Tensor) -> dict:
        """Type logits, per-type state logits and the neighbourhood representation of each query nucleus."""
        mixed = self.graph(h_query, h_keys, neighbors, distances)
        both = torch.cat([h_query, mixed], dim=1)
        return {
            "type": self.type_head(both),
            "states": [head(both) for head in self.state_heads],
            "mixed": mixed,
        }

    def state_proba(self, type_logits: torch.Tensor, state_logits: list[torch.Tensor]) -> torch.Tensor:
        """Joint P(state) = P(type) · P(state | type), columns in state order (types in order, then their states)."""
        p_type = torch.softmax(type_logits, dim=1)
        columns, multi = [], iter(state_logits)
        for i, n_states in enumerate(self.states_per_type):
            if n_states > 1:
                columns.append(p_type[:, i : i + 1] * torch.softmax(next(multi), dim=1))
            else:
                columns.append(p_type[:, i : i + 1])
        return torch.cat(columns, dim=1)

    # ------------------------------------------------------------------ on the inputs of a sample
    def embed_nuclei(self, inputs: SampleInputs, rows: np.ndarray, *, augment: torch.Generator | None = None) -> torch.Tensor:
        """Embeddings of nuclei ``rows`` (one context window around them all); ``augment`` draws stain, rotation and flip."""
        crops = to_optical_density(torch.from_numpy(inputs.crops[rows]))
        if augment is not None:
            crops = stain_jitter(crops, augment)
            k = int(torch.randint(0, 4, (1,), generator=augment))
            crops = torch.rot90(crops, k, dims=(2, 3))
            if torch.rand(1, generator=augment) < 0.5:
                crops = crops.flip(3)
        crops = crops.to(self.device)  # augmented on the CPU: the same draws whatever the device
        xy = inputs.context_xy[rows]
        margin = ContextEncoder.RECEPTIVE_RADIUS + 1
        x0, y0 = np.maximum(np.floor(xy.min(0)).astype(int) - margin, 0)
        x1, y1 = np.ceil(xy.max(0)).astype(int) + margin + 1
        window = inputs.context[y0:y1, x0:x1]
        context_od = to_optical_density(self.tensor(np.ascontiguousarray(window.transpose(2, 0, 1)))).unsqueeze(0)
        context = self.context(context_od, self.tensor(xy - [x0, y0]).float())
        features = None
        if self.morphology is not None:
            features = self.tensor((inputs.features[rows] - self.feature_mean) / self.feature_std)
        return self.embed(crops, context, features)

    def outputs(self, inputs: SampleInputs, query: np.ndarray, keys: np.ndarray, h_keys: torch.Tensor) -> dict:
        """Heads for ``query`` rows given embeddings ``h_keys`` of ``keys`` rows (which hold all their neighbours)."""
        lookup = np.full(len(inputs.obs_names) + 1, -1, dtype=np.int64)
        lookup[keys] = np.arange(len(keys))
        neighbors = inputs.neighbors[query]
        local = np.where(neighbors >= 0, lookup[neighbors], -1)
        h_query = h_keys[self.tensor(lookup[query])]
        return self.heads(h_query, h_keys, self.tensor(local), self.tensor(inputs.distances[query]))

    @torch.no_grad()
    def predict(self, inputs: SampleInputs, *, mc_samples: int = 0, progress: bool = True) -> dict[str, np.ndarray]:
        """Probabilities of every nucleus (eval mode; ``mc_samples`` > 0 adds ``type_std`` from MC dropout)."""
        self.eval()
        if len(inputs.obs_names) == 0:
            return self._empty()
        h = self._embed_all(inputs, progress)
        passes = [self._head_pass(inputs, h, dropout=False)]
        if mc_samples > 0:
            with torch.random.fork_rng():
                torch.manual_seed(0)
                passes += [self._head_pass(inputs, h, dropout=True) for _ in range(mc_samples)]
        out = passes[0]
        if mc_samples > 0:
            samples = np.stack([p["type"] for p in passes[1:]])
            out["type_std"] = samples.std(0).mean(1)
        return out

    def _embed_all(self, inputs: SampleInputs, progress: bool) -> torch.Tensor:
        tile = np.floor(inputs.context_xy / _CONTEXT_TILE_PX).astype(np.int64)
        key = tile[:, 1] * (tile[:, 0].max() + 1) + tile[:, 0]
        order = np.argsort(key, kind="stable")
        groups = np.split(order, np.flatnonzero(np.diff(key[order])) + 1)
        h = torch.zeros(len(key), self.dim, device=self.device)
        for rows in progress_bar(groups, desc="embedding nuclei", disable=not progress or len(groups) < 4):
            for chunk in np.array_split(rows, -(-len(rows) // _CHUNK)):
                h[self.tensor(chunk)] = self.embed_nuclei(inputs, chunk)
        return h

    def _head_pass(self, inputs: SampleInputs, h: torch.Tensor, dropout: bool) -> dict[str, np.ndarray]:
        if dropout:
            for m in self.modules():
                if isinstance(m, nn.Dropout):
                    m.train()
        n = h.shape[0]
        all_rows = np.arange(n)
        chunks = np.array_split(all_rows, -(-n // _CHUNK))
        types, states, mixed, compartments = [], [], [], []
        for chunk in chunks:
            out = self.outputs(inputs, chunk, all_rows, h)
            types.append(torch.softmax(out["type"], 1))
            states.append(self.state_proba(out["type"], out["states"]))
            mixed.append(out["mixed"])
        self.eval()
        mixed = torch.cat(mixed)
        for chunk in chunks:  # the compartment pools each nucleus' neighbours: (chunk, k, dim) at a time, not (n, k, dim)
            neighbors = self.tensor(inputs.neighbors[chunk])
            valid = (neighbors >= 0).float().unsqueeze(-1)
            pooled = (mixed[neighbors.clamp(min=0)] * valid).sum(1) / valid.sum(1).clamp(min=1)
            compartments.append(torch.softmax(self.compartment_head(pooled), 1))
        return {
            "type": torch.cat(types).cpu().numpy(),
            "state": torch.cat(states).cpu().numpy(),
            "compartment": torch.cat(compartments).cpu().numpy(),
            "embedding": mixed.cpu().numpy().astype(np.float32),
        }

    def _empty(self) -> dict[str, np.ndarray]:
        return {
            "type": np.zeros((0, len(self.states_per_type)), np.float32),
            "state": np.zeros((0, sum(self.states_per_type)), np.float32),
            "compartment": np.zeros((0, self.compartment_head.out_features), np.float32),
            "embedding": np.zeros((0, self.dim), np.float32),
        }
