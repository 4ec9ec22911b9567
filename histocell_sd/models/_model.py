"""The HistoCell model: weakly supervised nucleus types, states and compartments from H&E."""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from spatialdata import SpatialData
from spatialdata.models import get_table_keys
from tqdm.auto import tqdm

from .._constants import HISTOCELL_KEY, PROPORTIONS_KEY, STATE_PROPORTIONS_KEY, TABLE_KEY
from .._docs import inject_docs
from .._errors import InvalidInputError
from .._stain import stain_jitter, to_optical_density
from .._utils import mean_per_type_pearson
from ..io import check_proportions, get_mpp, resolve_key
from ._encoder import resolve_encoder
from ._inputs import SampleInputs, sample_inputs
from ._losses import bag_mean, spot_posteriors, symmetric_kl
from ._modules import ContextEncoder, HistoCellNet

logger = logging.getLogger(__name__)

MIXED = "mixed"
DEFAULT_FEATURES = [
    "area_um2", "perimeter_um", "eccentricity", "solidity", "major_axis_um", "minor_axis_um",
    "h_mean", "h_std", "e_mean", "e_std", "h_contrast", "h_entropy", "h_skewness",
]  # fmt: skip
_CONTEXT_TILE_PX = 256
_CHUNK = 4096


@dataclass
class _Sample:
    """A training sample: inputs plus spot targets aligned to spot rows."""

    inputs: SampleInputs
    spot_nuclei: list[np.ndarray]  # nuclei rows per spot
    targets: np.ndarray  # (spots, types)
    state_targets: np.ndarray | None  # (spots, states)
    compartments: np.ndarray  # (spots,) int
    spot_xy_um: np.ndarray
    nucleus_labels: np.ndarray | None = None  # (nuclei,) type index, -1 = unknown (supervised twin)


@inject_docs
class HistoCell:
    """Weakly supervised cell types, states and tissue compartments for every nucleus of an H&E.

    Each nucleus is embedded from its crop (``crop_px`` at ``canonical_mpp``), its morphology and the
    surrounding tissue (a convolutional context map at ``context_mpp``); a neighbour-attention layer
    mixes the ``n_neighbors`` nearest nuclei within ``radius_um``; heads give the cell type, the state
    within each type and the tissue compartment. Training needs only spot proportions: the mean
    nucleus probability of each spot is matched to them (symmetric KL).

    Parameters
    ----------
    cell_types
        Ordered cell types (the columns of the spot proportions).
    states
        Optional ``{cell_type: [state, ...]}``; types with one or no state keep their name.
    compartments
        ``{compartment: [cell_type, ...]}``: a spot's compartment is the group holding at least
        ``compartment_threshold`` of its proportions, else ``"mixed"``. Default: one per cell type.
    compartment_threshold
        Share of a spot's proportions that makes a compartment its own (see ``compartments``).
    crop_px, canonical_mpp, context_mpp, n_neighbors, radius_um, dim
        Preprocessing and architecture; stored in the model card.
    use_morphology
        Feed the morphology features of the nuclei table to the model.
    max_nuclei_per_spot
        Nuclei of a spot used for its loss in one step; more are sampled at random each epoch.
    tile_um
        Side of the square tiles of spots that make one training batch, µm.
    encoder
        The nucleus crop encoder fit starts from: ``"pretrained"`` (default; shipped in the package,
        trained on open data by ``scripts/train_encoder.py``, see its card with
        :func:`~histocell_sd.models.encoder_card`), ``"scratch"`` (same architecture, random
        weights) or the path of an encoder folder (``weights.safetensors`` + ``card.json``).
        Weak supervision fine-tunes it.
    """

    def __init__(
        self,
        cell_types: Sequence[str],
        *,
        states: Mapping[str, Sequence[str]] | None = None,
        compartments: Mapping[str, Sequence[str]] | None = None,
        compartment_threshold: float = 0.5,
        crop_px: int = 32,
        canonical_mpp: float = 0.5,
        context_mpp: float = 4.0,
        n_neighbors: int = 12,
        radius_um: float = 30.0,
        dim: int = 64,
        use_morphology: bool = True,
        max_nuclei_per_spot: int = 48,
        tile_um: float = 400.0,
        encoder: str = "pretrained",
    ):
        self.cell_types = _names(cell_types, "cell_types")
        if len(self.cell_types) < 2:
            raise InvalidInputError(f"cell_types must be at least two distinct names, got {self.cell_types}.")
        if states is not None and not isinstance(states, Mapping):
            raise InvalidInputError(f"states must be a mapping {{cell_type: [state, ...]}}, got {type(states).__name__}.")
        states = {str(t): _names(v, f"states[{t!r}]") for t, v in (states or {}).items()}
        unknown = set(states) - set(self.cell_types)
        if unknown:
            raise InvalidInputError(f"states given for unknown cell types {sorted(unknown)}.")
        self.states = {t: states.get(t) or [t] for t in self.cell_types}
        names = [s for t in self.cell_types for s in self.states[t]]
        clash = sorted({n for n in names if names.count(n) > 1} | {s for t, v in states.items() for s in v if s in self.cell_types and s != t})
        if clash:
            raise InvalidInputError(f"State names must be unique and differ from the other cell types; {clash} repeat.")
        if compartments is not None and not isinstance(compartments, Mapping):
            raise InvalidInputError(f"compartments must be a mapping {{compartment: [cell_type, ...]}}, got {type(compartments).__name__}.")
        compartments = compartments or {t: [t] for t in self.cell_types}
        self.compartments = {str(c): _names(v, f"compartments[{c!r}]") for c, v in compartments.items()}
        bad = {t for v in self.compartments.values() for t in v} - set(self.cell_types)
        if bad:
            raise InvalidInputError(f"compartments refer to unknown cell types {sorted(bad)}.")
        if MIXED in self.compartments:
            raise InvalidInputError(f"{MIXED!r} is the label of spots without a dominant compartment; name the compartment otherwise.")
        _check_positive(crop_px=(crop_px, 8), n_neighbors=(n_neighbors, 1), dim=(dim, 4), max_nuclei_per_spot=(max_nuclei_per_spot, 1))
        _check_positive(canonical_mpp=(canonical_mpp, 0), context_mpp=(context_mpp, 0), radius_um=(radius_um, 0), tile_um=(tile_um, 0))
        if int(dim) % 4:
            raise InvalidInputError(f"dim must be a multiple of 4 (the attention heads), got {dim}.")
        if not 0 < float(compartment_threshold) <= 1:
            raise InvalidInputError(f"compartment_threshold is a share of the spot and must lie in (0, 1], got {compartment_threshold}.")
        self.compartment_labels = [*self.compartments, MIXED]
        self.config = {
            "compartment_threshold": float(compartment_threshold),
            "crop_px": int(crop_px),
            "canonical_mpp": float(canonical_mpp),
            "context_mpp": float(context_mpp),
            "n_neighbors": int(n_neighbors),
            "radius_um": float(radius_um),
            "dim": int(dim),
            "feature_names": list(DEFAULT_FEATURES) if use_morphology else [],
            "max_nuclei_per_spot": int(max_nuclei_per_spot),
            "tile_um": float(tile_um),
        }
        self.config["encoder"], self._encoder_state = resolve_encoder(encoder, crop_px=self.config["crop_px"], canonical_mpp=self.config["canonical_mpp"])
        self.feature_mean_ = np.zeros(len(self.config["feature_names"]), np.float32)
        self.feature_std_ = np.ones(len(self.config["feature_names"]), np.float32)
        self.history_: pd.DataFrame | None = None
        self.training_summary_: dict = {}
        self.model_card_: dict | None = None  # the card of a loaded checkpoint
        self.net = self._build()

    # ------------------------------------------------------------------ structure
    @property
    def state_names(self) -> list[str]:
        """All states in output order (types in order, then their states)."""
        return [s for t in self.cell_types for s in self.states[t]]

    def _build(self) -> HistoCellNet:
        multi = [len(self.states[t]) for t in self.cell_types if len(self.states[t]) > 1]
        net = HistoCellNet(
            n_types=len(self.cell_types),
            states_per_type=multi,
            n_compartments=len(self.compartment_labels),
            n_features=len(self.config["feature_names"]),
            dim=self.config["dim"],
            radius_um=self.config["radius_um"],
            encoder_width=self.config["encoder"]["width"],
            encoder_dim=self.config["encoder"]["out_dim"],
        )
        if self._encoder_state is not None:
            net.nucleus.load_state_dict(self._encoder_state)
        return net

    def _inputs(self, sdata: SpatialData, *, image_key=None, nuclei_table_key=HISTOCELL_KEY, progress=True) -> SampleInputs:
        c = self.config
        return sample_inputs(
            sdata,
            crop_px=c["crop_px"],
            canonical_mpp=c["canonical_mpp"],
            context_mpp=c["context_mpp"],
            n_neighbors=c["n_neighbors"],
            radius_um=c["radius_um"],
            feature_names=c["feature_names"] or None,
            image_key=image_key,
            nuclei_table_key=nuclei_table_key,
            progress=progress,
        )

    # ------------------------------------------------------------------ forward
    def _embed(self, inputs: SampleInputs, rows: np.ndarray, *, augment: torch.Generator | None = None) -> torch.Tensor:
        """Embeddings of nuclei ``rows`` (one context window around them all)."""
        crops = to_optical_density(torch.from_numpy(inputs.crops[rows]))
        if augment is not None:
            crops = stain_jitter(crops, augment)
            k = int(torch.randint(0, 4, (1,), generator=augment))
            crops = torch.rot90(crops, k, dims=(2, 3))
            if torch.rand(1, generator=augment) < 0.5:
                crops = crops.flip(3)
        xy = inputs.context_xy[rows]
        margin = ContextEncoder.RECEPTIVE_RADIUS + 1
        x0, y0 = np.maximum(np.floor(xy.min(0)).astype(int) - margin, 0)
        x1, y1 = np.ceil(xy.max(0)).astype(int) + margin + 1
        window = inputs.context[y0:y1, x0:x1]
        context_od = to_optical_density(torch.from_numpy(np.ascontiguousarray(window.transpose(2, 0, 1)))).unsqueeze(0)
        context = self.net.context(context_od, torch.from_numpy(xy - [x0, y0]).float())
        features = None
        if self.config["feature_names"]:
            features = torch.from_numpy((inputs.features[rows] - self.feature_mean_) / self.feature_std_)
        return self.net.embed(crops, context, features)

    def _outputs(self, inputs: SampleInputs, query: np.ndarray, keys: np.ndarray, h_keys: torch.Tensor) -> dict:
        """Heads for ``query`` rows given embeddings of ``keys`` rows (which hold all their neighbours)."""
        lookup = np.full(len(inputs.obs_names) + 1, -1, dtype=np.int64)
        lookup[keys] = np.arange(len(keys))
        neighbors = inputs.neighbors[query]
        local = np.where(neighbors >= 0, lookup[neighbors], -1)
        h_query = h_keys[torch.from_numpy(lookup[query])]
        return self.net.heads(h_query, h_keys, torch.from_numpy(local), torch.from_numpy(inputs.distances[query]))

    def _state_proba(self, type_logits: torch.Tensor, state_logits: list[torch.Tensor]) -> torch.Tensor:
        """Joint P(state) = P(type) · P(state | type), columns in :attr:`state_names` order."""
        p_type = torch.softmax(type_logits, dim=1)
        columns, multi = [], iter(state_logits)
        for i, t in enumerate(self.cell_types):
            if len(self.states[t]) > 1:
                columns.append(p_type[:, i : i + 1] * torch.softmax(next(multi), dim=1))
            else:
                columns.append(p_type[:, i : i + 1])
        return torch.cat(columns, dim=1)

    # ------------------------------------------------------------------ training
    @inject_docs
    def fit(
        self,
        sdata: SpatialData | Sequence[SpatialData],
        *,
        proportions_key: str = PROPORTIONS_KEY,
        state_proportions_key: str | None = STATE_PROPORTIONS_KEY,
        epochs: int | None = None,
        state_epochs: int | None = None,
        self_training_epochs: int | None = None,
        lr: float = 2e-3,
        encoder_lr_factor: float | None = None,
        compartment_weight: float = 0.3,
        pseudo_label_weight: float = 0.5,
        val_fraction: float = 0.15,
        patience: int = 8,
        seed: int = 0,
        progress: bool = True,
        spots_table_key: str | None = None,
        nuclei_table_key: str = HISTOCELL_KEY,
        image_key: str | None = None,
        nucleus_labels_key: str | None = None,
    ) -> HistoCell:
        """Train from spot proportions only.

        Parameters
        ----------
        sdata
            One sample or several, each with segmented nuclei (``nuclei_table_key``) and spot
            proportions in ``tables[spots_table_key].obsm[proportions_key]`` (columns = cell types).
        proportions_key, state_proportions_key
            Spot cell-type proportions; state proportions (columns = :attr:`state_names`) for the
            second stage, used when present.
        epochs, self_training_epochs, state_epochs
            Maximum epochs of the three stages (early stopping on held-out spots): the proportion
            loss; self-training, which adds a loss towards each nucleus's posterior given its
            spot's proportions (EM for learning from label proportions); the state stage. None
            (default) gives 40, 10 and 15 for up to 1,000 training spots and proportionally fewer
            above, so a stage takes about the same number of optimiser steps on any slide (a
            Visium capture area of ~3,500 spots trains in under 10 min on 2 CPU cores).
        lr, compartment_weight, pseudo_label_weight
            AdamW learning rate; weights of the spot compartment loss and of the self-training loss.
        encoder_lr_factor
            The nucleus encoder learns at ``lr × encoder_lr_factor``; 0 freezes it. Default: 0.1 for a
            pretrained encoder (it is fine-tuned gently: a few hundred spots would otherwise wash out
            what it learnt), 1 from scratch.
        val_fraction, patience
            Spots held out for early stopping, and epochs without improvement before stopping.
        seed
            Seeds the split, sampling, augmentation and initialisation: same seed, same model.
        {progress}
        {spots_table_key}
            Read: ``obsm[proportions_key]`` (and ``obsm[state_proportions_key]``) of each sample.
        {nuclei_table_key}
            Read: the nuclei the model learns from.
        {image_key}
        nucleus_labels_key
            Train from annotated nuclei instead of spot proportions: the cell types in
            ``obs[nucleus_labels_key]`` of the nuclei table (missing or unknown = unlabelled), with
            cross-entropy on every labelled nucleus (batched by 55 µm squares; no spots needed). This
            is the supervised twin of the benchmarks; the spot and state stages are skipped.

        Returns
        -------
        HistoCell
            ``self``, with ``history_`` (one row per epoch) and ``training_summary_``; ``sdata`` is not
            modified.
        """
        samples = [sdata] if isinstance(sdata, SpatialData) else list(sdata) if isinstance(sdata, (list, tuple)) else None
        if not samples or not all(isinstance(s, SpatialData) for s in samples):
            raise InvalidInputError(f"fit needs a SpatialData or a non-empty list of them, got {type(sdata).__name__}.")
        if encoder_lr_factor is None:
            encoder_lr_factor = 1.0 if self.config["encoder"]["source"] == "scratch" else PRETRAINED_ENCODER_LR_FACTOR
        if not np.isfinite(encoder_lr_factor) or encoder_lr_factor < 0:
            raise InvalidInputError(f"encoder_lr_factor must be ≥ 0, got {encoder_lr_factor}.")
        if not (np.isfinite(lr) and lr > 0):
            raise InvalidInputError(f"lr must be a positive number, got {lr}.")
        if not 0 <= val_fraction < 1:
            raise InvalidInputError(f"val_fraction is the share of spots held out and must lie in [0, 1), got {val_fraction}.")
        if all(e == 0 for e in (epochs, self_training_epochs, state_epochs)):
            raise InvalidInputError("epochs, self_training_epochs and state_epochs are all 0: there is nothing to train.")
        before = (self.net, self.feature_mean_, self.feature_std_, self.history_, self.training_summary_)
        try:
            return self._fit(samples, proportions_key, state_proportions_key, epochs, state_epochs, self_training_epochs, lr,
                             encoder_lr_factor, compartment_weight, pseudo_label_weight, val_fraction, patience, seed, progress,
                             spots_table_key, nuclei_table_key, image_key, nucleus_labels_key)
        except BaseException:
            # a failed fit leaves the model as it was (a trained model stays trained, an untrained one untrained)
            self.net, self.feature_mean_, self.feature_std_, self.history_, self.training_summary_ = before
            raise

    def _fit(self, samples, proportions_key, state_proportions_key, epochs, state_epochs, self_training_epochs, lr, encoder_lr_factor,
             compartment_weight, pseudo_label_weight, val_fraction, patience, seed, progress, spots_table_key, nuclei_table_key, image_key,
             nucleus_labels_key) -> HistoCell:
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        generator = torch.Generator().manual_seed(seed)
        self.net = self._build()
        prepared = [
            self._prepare(s, proportions_key, state_proportions_key, spots_table_key, nuclei_table_key, image_key, nucleus_labels_key, progress)
            for s in samples
        ]
        self._set_feature_scaling([p.inputs for p in prepared])
        use_states = len(self.state_names) > len(self.cell_types) and all(p.state_targets is not None for p in prepared)
        if len(self.state_names) > len(self.cell_types) and not use_states:
            warnings.warn(
                f"The model has cell states but obsm[{state_proportions_key!r}] is missing from "
                f"{sum(p.state_targets is None for p in prepared)} of {len(prepared)} samples: the state heads are not trained "
                "and tl.predict will not write cell states.", UserWarning, stacklevel=3)
        tiles = [(i, spots) for i, p in enumerate(prepared) for spots in _spot_tiles(p.spot_xy_um, self.config["tile_um"])]
        train, val = _split(tiles, val_fraction, rng)
        if not train:
            raise InvalidInputError(f"val_fraction={val_fraction} holds out every one of the {sum(len(s) for _, s in tiles)} spots; lower it.")
        epochs, self_training_epochs, state_epochs = _stage_epochs(
            sum(len(s) for _, s in train), epochs, self_training_epochs, state_epochs
        )
        history: list[dict] = []
        weights = (compartment_weight, pseudo_label_weight)
        first = "supervised" if nucleus_labels_key else "types"
        self._train_stage(first, prepared, train, val, epochs, lr, encoder_lr_factor, weights, patience, rng, generator, history, progress)
        if self_training_epochs > 0 and not nucleus_labels_key:
            self._train_stage("self-training", prepared, train, val, self_training_epochs, lr / 2, encoder_lr_factor, weights, patience, rng, generator, history, progress)
        use_states = use_states and state_epochs > 0
        if use_states:
            self._train_stage("states", prepared, train, val, state_epochs, lr / 2, encoder_lr_factor, weights, patience, rng, generator, history, progress)
        self.net.eval()
        if not history:
            raise InvalidInputError("No training stage ran: give epochs > 0 (or state_epochs > 0 with state proportions).")
        self.history_ = pd.DataFrame(history)
        last_stage = self.history_[self.history_["stage"] == self.history_["stage"].iloc[-1]]
        last = last_stage.loc[last_stage["val_loss"].idxmin()] if len(val) else last_stage.iloc[-1]
        self.training_summary_ = {
            "samples": len(samples),
            "spots_train": int(sum(len(s) for _, s in train)),
            "spots_val": int(sum(len(s) for _, s in val)),
            "nuclei": int(sum(len(p.inputs.obs_names) for p in prepared)),
            "epochs_run": int(len(self.history_)),
            "max_epochs": {"types": int(epochs), "self-training": int(self_training_epochs), "states": int(state_epochs)},
            "seed": int(seed),
            "proportions_key": proportions_key,
            "states_trained": bool(use_states),
            "val_loss": float(last["val_loss"]),
            "val_spot_pearson": float(last["val_spot_pearson"]),  # mean over types of the Pearson r across held-out spots
        }
        return self

    def _prepare(self, sdata, proportions_key, state_key, spots_table_key, nuclei_table_key, image_key, labels_key, progress) -> _Sample:
        if labels_key is not None:
            return self._prepare_labelled(sdata, nuclei_table_key, image_key, labels_key, progress)
        mpp = get_mpp(sdata)
        spots_table_key = resolve_key(sdata, "tables", key=spots_table_key, default=TABLE_KEY)
        table = sdata.tables[spots_table_key]
        if proportions_key not in table.obsm:
            raise InvalidInputError(f"Spots table {spots_table_key!r} has no obsm[{proportions_key!r}] (spot proportions to learn from).")
        proportions = check_proportions(table.obsm[proportions_key], cell_types=self.cell_types, name=f"obsm[{proportions_key!r}]")
        missing = [t for t in self.cell_types if t not in proportions.columns]
        if missing:
            raise InvalidInputError(f"obsm[{proportions_key!r}] lacks the cell types {missing} of the model.")
        if len(proportions) == 0:
            raise InvalidInputError(f"obsm[{proportions_key!r}] holds zero spots.")
        proportions = proportions[self.cell_types]
        inputs = self._inputs(sdata, image_key=image_key, nuclei_table_key=nuclei_table_key, progress=progress)
        spot_rows = pd.Series(np.arange(len(proportions)), index=proportions.index)
        nucleus_spot = inputs.spot_ids.map(spot_rows)
        groups = pd.Series(np.arange(len(nucleus_spot))).groupby(nucleus_spot.to_numpy()).apply(np.asarray)
        has_nuclei = np.isin(np.arange(len(proportions)), groups.index.astype(int))
        if not has_nuclei.any():
            raise InvalidInputError("No nucleus lies in a spot with proportions; check obs['spot_id'] of the nuclei table.")
        if not has_nuclei.all():
            logger.warning("%d of %d spots hold no nucleus and are skipped.", (~has_nuclei).sum(), len(has_nuclei))
        keep = np.flatnonzero(has_nuclei)
        state_targets = None
        if state_key and state_key in table.obsm and len(self.state_names) > len(self.cell_types):
            states = check_proportions(table.obsm[state_key], cell_types=self.state_names, name=f"obsm[{state_key!r}]")
            states = states.reindex(columns=self.state_names, fill_value=0.0).loc[proportions.index]
            per_type = np.stack([states[self.states[t]].to_numpy().sum(1) for t in self.cell_types], 1)
            gap = np.abs(per_type - proportions.to_numpy()).sum(1)
            if np.median(gap) > 0.1:
                raise InvalidInputError(
                    f"obsm[{state_key!r}] disagrees with obsm[{proportions_key!r}]: the states of a type should add up to that "
                    f"type's proportion, but they differ by {np.median(gap):.2f} (median over spots)."
                )
            state_targets = states.to_numpy(np.float32)[keep]
        spots = sdata.shapes[_annotated_region(table, spots_table_key)]
        xy = np.c_[spots.geometry.x, spots.geometry.y][spots.index.get_indexer(proportions.index)] * mpp
        return _Sample(
            inputs=inputs,
            spot_nuclei=[groups[i] for i in keep],
            targets=proportions.to_numpy(np.float32)[keep],
            state_targets=state_targets,
            compartments=self._compartment_of(proportions.to_numpy()[keep]),
            spot_xy_um=xy[keep],
        )

    def _prepare_labelled(self, sdata, nuclei_table_key, image_key, labels_key, progress) -> _Sample:
        """Every labelled nucleus, in bags of the nuclei of ``_LABELLED_BAG_UM`` squares (no spots needed)."""
        inputs = self._inputs(sdata, image_key=image_key, nuclei_table_key=nuclei_table_key, progress=progress)
        labels = self._nucleus_labels(sdata, nuclei_table_key, labels_key)
        known = np.flatnonzero(labels >= 0)
        if len(known) == 0:
            raise InvalidInputError(f"No nucleus has a label among the model's cell types in obs[{labels_key!r}].")
        xy_um = inputs.context_xy[known].astype(np.float64) * self.config["context_mpp"]
        cell = np.floor(xy_um / _LABELLED_BAG_UM).astype(np.int64)
        _, bag = np.unique(cell, axis=0, return_inverse=True)
        bag = bag.ravel()
        members = [known[bag == b] for b in range(bag.max() + 1)]
        onehot = np.eye(len(self.cell_types), dtype=np.float32)[labels[known]]
        targets = np.stack([onehot[bag == b].mean(0) for b in range(len(members))])
        centres = np.stack([xy_um[bag == b].mean(0) for b in range(len(members))])
        return _Sample(inputs=inputs, spot_nuclei=members, targets=targets, state_targets=None,
                       compartments=self._compartment_of(targets), spot_xy_um=centres, nucleus_labels=labels)

    def _nucleus_labels(self, sdata, nuclei_table_key, labels_key) -> np.ndarray | None:
        if labels_key is None:
            return None
        obs = sdata.tables[resolve_key(sdata, "tables", key=nuclei_table_key, default=HISTOCELL_KEY)].obs
        if labels_key not in obs:
            raise InvalidInputError(f"Nuclei table {nuclei_table_key!r} has no obs[{labels_key!r}].")
        return pd.Categorical(obs[labels_key].astype(str), categories=self.cell_types).codes.astype(np.int64)

    def _compartment_of(self, proportions: np.ndarray) -> np.ndarray:
        shares = np.stack([proportions[:, [self.cell_types.index(t) for t in types]].sum(1) for types in self.compartments.values()], 1)
        label = shares.argmax(1)
        return np.where(shares.max(1) >= self.config["compartment_threshold"], label, len(self.compartments))

    def _set_feature_scaling(self, inputs: list[SampleInputs]) -> None:
        if not self.config["feature_names"]:
            return
        features = np.concatenate([i.features for i in inputs])
        self.feature_mean_ = features.mean(0).astype(np.float32)
        self.feature_std_ = (features.std(0) + 1e-6).astype(np.float32)

    def _batch(self, sample: _Sample, spots: np.ndarray, rng: np.random.Generator | None):
        cap = self.config["max_nuclei_per_spot"]
        query, bag = [], []
        for b, s in enumerate(spots):
            nuclei = sample.spot_nuclei[s]
            if len(nuclei) > cap and rng is not None:  # training samples; validation uses every nucleus, as prediction does
                nuclei = rng.choice(nuclei, cap, replace=False)
            query.append(nuclei)
            bag.append(np.full(len(nuclei), b))
        query = np.concatenate(query)
        neighbors = sample.inputs.neighbors[query]
        keys = np.unique(np.concatenate([query, neighbors[neighbors >= 0]]))
        return query, torch.from_numpy(np.concatenate(bag)), keys

    def _loss(self, sample: _Sample, spots: np.ndarray, stage: str, compartment_weight: float, pseudo_label_weight: float, rng, generator):
        query, bag, keys = self._batch(sample, spots, rng)
        # Gradients flow through the nuclei of the spots; their other neighbours only give keys/values.
        own = np.unique(query)
        others = np.setdiff1d(keys, own, assume_unique=True)
        h_own = self._embed(sample.inputs, own, augment=generator)
        with torch.no_grad():
            h_others = self._embed(sample.inputs, others, augment=generator) if len(others) else h_own[:0]
        keys = np.concatenate([own, others])
        out = self._outputs(sample.inputs, query, keys, torch.cat([h_own, h_others]))
        n_bags = len(spots)
        targets = torch.from_numpy(sample.state_targets[spots] if stage == "states" else sample.targets[spots])
        proba = self._state_proba(out["type"], out["states"]) if stage == "states" else torch.softmax(out["type"], 1)
        loss = symmetric_kl(bag_mean(proba, bag, n_bags), targets)
        total = loss
        if stage == "supervised":
            labels = torch.from_numpy(sample.nucleus_labels[query])
            known = labels >= 0
            total = F.cross_entropy(out["type"][known], labels[known]) if known.any() else out["type"].sum() * 0.0
        if stage == "self-training":
            pseudo = spot_posteriors(proba.detach(), bag, targets)
            total = total + pseudo_label_weight * -(pseudo * F.log_softmax(out["type"], 1)).sum(1).mean()
        spot_repr = bag_mean(out["mixed"], bag, n_bags)
        compartment = F.cross_entropy(self.net.compartment_head(spot_repr), torch.from_numpy(sample.compartments[spots]))
        return total + compartment_weight * compartment, loss

    def _train_stage(self, stage, prepared, train, val, epochs, lr, encoder_lr_factor, weights, patience, rng, generator, history, progress):
        encoder = list(self.net.nucleus.parameters())
        others = [p for name, p in self.net.named_parameters() if not name.startswith("nucleus.")]
        groups = [{"params": others}] + ([{"params": encoder, "lr": lr * encoder_lr_factor}] if encoder_lr_factor > 0 else [])
        for p in encoder:
            p.requires_grad_(encoder_lr_factor > 0)
        optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=1e-4)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
        best, best_state, waited = np.inf, copy.deepcopy(self.net.state_dict()), 0
        bar = tqdm(range(epochs), desc=f"training ({stage})", disable=not progress)
        for epoch in bar:
            self.net.train()
            losses = []
            for t in rng.permutation(len(train)):
                sample_idx, spots = train[t]
                total, _ = self._loss(prepared[sample_idx], spots, stage, *weights, rng, generator)
                if not torch.isfinite(total.detach()):
                    raise InvalidInputError(f"Training diverged: the loss became {total.item()} in the {stage!r} stage (epoch {epoch}); lower lr (now {lr}).")
                optimizer.zero_grad()
                total.backward()
                optimizer.step()
                losses.append(total.item())
            scheduler.step()
            val_loss, pearson = self._validate(prepared, val, stage)
            history.append({"stage": stage, "epoch": epoch, "train_loss": float(np.mean(losses)), "val_loss": val_loss, "val_spot_pearson": pearson})
            bar.set_postfix(train=f"{np.mean(losses):.3f}", val=f"{val_loss:.3f}", r=f"{pearson:.2f}")
            if val_loss < best - 1e-4 or not val:
                best, best_state, waited = val_loss, copy.deepcopy(self.net.state_dict()), 0
            else:
                waited += 1
                if waited >= patience:
                    break
        self.net.load_state_dict(best_state)

    @torch.no_grad()
    def _validate(self, prepared, val, stage: str) -> tuple[float, float]:
        if not val:
            return float("nan"), float("nan")
        self.net.eval()
        losses, predicted, target = [], [], []
        for sample_idx, spots in val:
            sample = prepared[sample_idx]
            query, bag, keys = self._batch(sample, spots, None)
            out = self._outputs(sample.inputs, query, keys, self._embed(sample.inputs, keys))
            p_type = bag_mean(torch.softmax(out["type"], 1), bag, len(spots))
            if stage == "supervised":
                labels = torch.from_numpy(sample.nucleus_labels[query])
                losses.append(float(F.cross_entropy(out["type"], labels)) * len(spots))
            elif stage == "states":
                p = bag_mean(self._state_proba(out["type"], out["states"]), bag, len(spots))
                losses.append(float(symmetric_kl(p, torch.from_numpy(sample.state_targets[spots]))) * len(spots))
            else:
                losses.append(float(symmetric_kl(p_type, torch.from_numpy(sample.targets[spots]))) * len(spots))
            predicted.append(p_type.numpy())
            target.append(sample.targets[spots])
        n = sum(len(s) for _, s in val)
        return float(sum(losses) / n), mean_per_type_pearson(np.concatenate(predicted), np.concatenate(target))

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict_inputs(self, inputs: SampleInputs, *, mc_samples: int = 0, progress: bool = True) -> dict[str, np.ndarray]:
        """Probabilities of every nucleus of ``inputs`` (eval mode; ``mc_samples`` > 0 adds MC dropout).

        :func:`histocell_sd.tl.predict` calls this and writes the result into the SpatialData.

        Parameters
        ----------
        inputs
            The model inputs of one sample (``model._inputs(sdata)``).
        mc_samples
            Monte-Carlo dropout passes (``type_std``); 0 = off.
        progress
            Show progress bars.

        Returns
        -------
        dict
            ``type`` (n × types), ``state`` (n × states), ``compartment`` (n × compartments),
            ``embedding`` (n × dim) and, with MC dropout, ``type_std``.
        """
        self.net.eval()
        n = len(inputs.obs_names)
        if n == 0:
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
        h = torch.zeros(len(key), self.config["dim"])
        for rows in tqdm(groups, desc="embedding nuclei", disable=not progress or len(groups) < 4):
            for chunk in np.array_split(rows, -(-len(rows) // _CHUNK)):
                h[torch.from_numpy(chunk)] = self._embed(inputs, chunk)
        return h

    def _head_pass(self, inputs: SampleInputs, h: torch.Tensor, dropout: bool) -> dict[str, np.ndarray]:
        if dropout:
            for m in self.net.modules():
                if isinstance(m, torch.nn.Dropout):
                    m.train()
        n = h.shape[0]
        all_rows = np.arange(n)
        types, states, mixed = [], [], []
        for chunk in np.array_split(all_rows, -(-n // _CHUNK)):
            out = self._outputs(inputs, chunk, all_rows, h)
            types.append(torch.softmax(out["type"], 1))
            states.append(self._state_proba(out["type"], out["states"]))
            mixed.append(out["mixed"])
        self.net.eval()
        mixed = torch.cat(mixed)
        neighbors = torch.from_numpy(inputs.neighbors)
        valid = (neighbors >= 0).float().unsqueeze(-1)
        pooled = (mixed[neighbors.clamp(min=0)] * valid).sum(1) / valid.sum(1).clamp(min=1)
        return {
            "type": torch.cat(types).numpy(),
            "state": torch.cat(states).numpy(),
            "compartment": torch.softmax(self.net.compartment_head(pooled), 1).numpy(),
            "embedding": mixed.numpy().astype(np.float32),
        }

    def _empty(self) -> dict[str, np.ndarray]:
        return {
            "type": np.zeros((0, len(self.cell_types)), np.float32),
            "state": np.zeros((0, len(self.state_names)), np.float32),
            "compartment": np.zeros((0, len(self.compartment_labels)), np.float32),
            "embedding": np.zeros((0, self.config["dim"]), np.float32),
        }

    # ------------------------------------------------------------------ persistence
    def save(self, path, *, overwrite: bool = False, metadata: dict | None = None):
        """Write safetensors weights and a JSON model card to the folder ``path`` (atomically).

        Parameters
        ----------
        path
            The model folder to write.
        overwrite
            Replace an existing folder at ``path``.
        metadata
            JSON-serialisable notes kept in the card (data, licences, metrics, intended use).

        Returns
        -------
        pathlib.Path
            The folder written.
        """
        from ._checkpoint import save_checkpoint

        return save_checkpoint(self, path, overwrite=overwrite, metadata=metadata)

    @classmethod
    def load(cls, path) -> HistoCell:
        """Load a model saved with :meth:`save`, validating its card; no pickle is executed.

        Parameters
        ----------
        path
            A folder written by :meth:`save`.

        Returns
        -------
        HistoCell
            The trained model.
        """
        from ._checkpoint import load_checkpoint

        return load_checkpoint(cls, path)

    def __repr__(self) -> str:
        trained = "trained" if self.training_summary_ else "untrained"
        with_states = [t for t in self.cell_types if self.states[t] != [t]]  # a type without states is its own single state
        states = f"states for {len(with_states)} of them" if with_states else "no states"
        return f"HistoCell({trained}; {len(self.cell_types)} cell types, {states}, compartments {self.compartment_labels})"


def _names(values, what: str) -> list[str]:
    """Distinct names from a list-like (a lone string is refused: it is not a list of names)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, pd.Index, np.ndarray)):
        raise InvalidInputError(f"{what} must be a list of names, got {values!r}.")
    names = [str(v) for v in values]
    if len(set(names)) != len(names):
        raise InvalidInputError(f"{what} repeats names: {sorted({n for n in names if names.count(n) > 1})}.")
    return names


def _check_positive(**values) -> None:
    """Each ``name=(value, least)``: a finite number above ``least`` (at least ``least`` when it is ≥ 1)."""
    for name, (value, least) in values.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise InvalidInputError(f"{name} must be a number, got {value!r}.") from None
        ok = np.isfinite(number) and (number >= least if least >= 1 else number > least)
        if not ok or isinstance(value, bool):
            bound = f"at least {least}" if least >= 1 else f"above {least}"
            raise InvalidInputError(f"{name} must be {bound}, got {value!r}.")


def _annotated_region(table, table_key: str) -> str:
    region = get_table_keys(table)[0] if "spatialdata_attrs" in table.uns else None
    if not isinstance(region, str):
        raise InvalidInputError(f"Table {table_key!r} must annotate exactly one spots element, got {region!r}.")
    return region


def _spot_tiles(xy_um: np.ndarray, tile_um: float) -> list[np.ndarray]:
    """Group spot rows into square tiles of ``tile_um`` (a training batch is one tile)."""
    tile = np.floor(xy_um / tile_um).astype(int)
    _, inverse = np.unique(tile, axis=0, return_inverse=True)
    return [np.flatnonzero(inverse.ravel() == t) for t in range(inverse.max() + 1)]


def _split(tiles, val_fraction: float, rng: np.random.Generator):
    """Hold out ``val_fraction`` of the spots of every tile (spot-level split)."""
    train, val = [], []
    for sample_idx, spots in tiles:
        held = rng.random(len(spots)) < val_fraction
        if (~held).any():
            train.append((sample_idx, spots[~held]))
        if held.any():
            val.append((sample_idx, spots[held]))
    return train, val


_DEFAULT_EPOCHS = (40, 10, 15)  # types, self-training, states
PRETRAINED_ENCODER_LR_FACTOR = 0.1
_LABELLED_BAG_UM = 55.0  # training from nucleus labels: nuclei are batched by squares of this side
_FULL_EPOCH_SPOTS = 1000


def _stage_epochs(n_train_spots: int, *given: int | None) -> list[int]:
    """Epochs of the three stages: the given ones, or the defaults scaled down beyond 1,000 training spots."""
    scale = min(1.0, _FULL_EPOCH_SPOTS / max(n_train_spots, 1))
    out = []
    for value, default in zip(given, _DEFAULT_EPOCHS):
        if value is None:
            value = max(2, round(default * scale))
        elif value < 0:
            raise InvalidInputError(f"Epochs must be non-negative, got {value}.")
        out.append(int(value))
    return out
