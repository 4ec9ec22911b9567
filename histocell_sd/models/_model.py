"""The HistoCell model: weakly supervised nucleus types, states and compartments from H&E.

The public facade. Its parts: :mod:`._config` (what defines a model, validated and stored in the card),
:mod:`._network` (the torch network and how it runs on a sample's inputs), :mod:`._trainer` (the fit
loop) with :mod:`._samples` (training targets), and :mod:`._checkpoint` (save and load).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from spatialdata import SpatialData

from .._constants import HISTOCELL_KEY, PROPORTIONS_KEY, STATE_PROPORTIONS_KEY
from .._device import full_float32, resolve_device
from .._docs import inject_docs
from .._errors import InvalidInputError
from .._utils import renamed
from ._checkpoint import load_checkpoint, save_checkpoint
from ._config import DEFAULT_FEATURES, HistoCellConfig
from ._encoder import resolve_encoder
from ._inputs import SampleInputs
from ._network import HistoCellNet
from ._samples import inputs_of
from ._trainer import LEARNING_RATE, Trainer


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

    Attributes
    ----------
    cell_types, states, state_names, compartments, compartment_labels
        The outputs, in order (a type without states is its own single state; ``"mixed"`` last).
    settings
        The :class:`~histocell_sd.models.HistoCellConfig` of the model.
    preprocessing
        Its preprocessing and architecture as a dict, the model card's ``"preprocessing"``.
    net
        The :class:`~histocell_sd.models.HistoCellNet` (torch).
    feature_mean_, feature_std_
        Morphology standardisation learnt by :meth:`fit`.
    history_, training_summary_
        One row per training epoch, and the summary of the last fit (empty: untrained).
    fit_timing_
        Wall-clock seconds of the last :meth:`fit` in this session (``prepare_s``, ``epoch_s`` per
        epoch, ``fit_s``); not saved. None before.
    model_card_
        The card of a loaded checkpoint (None otherwise).
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
        settings = HistoCellConfig(
            cell_types, states=states, compartments=compartments, compartment_threshold=compartment_threshold, crop_px=crop_px,
            canonical_mpp=canonical_mpp, context_mpp=context_mpp, n_neighbors=n_neighbors, radius_um=radius_um, dim=dim,
            feature_names=list(DEFAULT_FEATURES) if use_morphology else [], max_nuclei_per_spot=max_nuclei_per_spot, tile_um=tile_um,
        )  # validated before the encoder is read
        encoder_config, encoder_state = resolve_encoder(encoder, crop_px=settings.crop_px, canonical_mpp=settings.canonical_mpp)
        self._setup(dataclasses.replace(settings, encoder=encoder_config), encoder_state)

    def _setup(self, settings: HistoCellConfig, encoder_state: dict | None, net: HistoCellNet | None = None) -> None:
        self._settings = settings
        self._encoder_state = encoder_state  # the nucleus encoder weights every fit starts from (None: random)
        self.net = HistoCellNet.from_config(settings, encoder_state) if net is None else net
        self.history_: pd.DataFrame | None = None
        self.training_summary_: dict = {}
        self.fit_timing_: dict | None = None
        self.model_card_: dict | None = None  # the card of a loaded checkpoint

    # ------------------------------------------------------------------ structure
    @property
    def settings(self) -> HistoCellConfig:
        """What defines the model (outputs, preprocessing and architecture; validated, frozen)."""
        return self._settings

    @property
    def preprocessing(self) -> dict:
        """Preprocessing and architecture, as in the model card's ``"preprocessing"`` (a copy)."""
        return self._settings.preprocessing

    @property
    def config(self) -> dict:
        """Deprecated name of :attr:`preprocessing`."""
        warnings.warn("HistoCell.config is deprecated; use .preprocessing (the model card's key).", FutureWarning, stacklevel=2)
        return self.preprocessing

    @property
    def cell_types(self) -> list[str]:
        """The cell types, in output order."""
        return self._settings.cell_types

    @property
    def states(self) -> dict[str, list[str]]:
        """``{cell_type: [state, ...]}`` for every type (a type without states is its own single state)."""
        return self._settings.states

    @property
    def state_names(self) -> list[str]:
        """All states in output order (types in order, then their states)."""
        return self._settings.state_names

    @property
    def compartments(self) -> dict[str, list[str]]:
        """``{compartment: [cell_type, ...]}``."""
        return self._settings.compartments

    @property
    def compartment_labels(self) -> list[str]:
        """The compartments, then ``"mixed"``."""
        return self._settings.compartment_labels

    @property
    def feature_mean_(self) -> np.ndarray:
        """Mean of each morphology feature over the training nuclei."""
        return self.net.feature_mean

    @property
    def feature_std_(self) -> np.ndarray:
        """Standard deviation of each morphology feature over the training nuclei."""
        return self.net.feature_std

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
        learning_rate: float = LEARNING_RATE,
        encoder_lr_factor: float | None = None,
        compartment_weight: float = 0.3,
        pseudo_label_weight: float = 0.5,
        val_fraction: float = 0.15,
        holdout: str = "tiles",
        patience: int = 8,
        seed: int = 0,
        progress: bool = True,
        spots_table_key: str | None = None,
        nuclei_table_key: str = HISTOCELL_KEY,
        image_key: str | None = None,
        nucleus_labels_key: str | None = None,
        spot_bags: str | None = None,
        device: str | None = None,
        lr: float | None = None,
    ) -> HistoCell:
        """Train from spot proportions only.

        A new network is trained and replaces ``net`` only when training succeeds: a failed fit
        leaves the model as it was. Its nucleus encoder starts from the model's encoder (``encoder=``
        at construction; for a loaded model, the loaded network's encoder); the other layers start afresh.

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
            Visium capture area of ~3,500 spots trains in under 10 min on 2 CPU cores); see
            :func:`~histocell_sd.models.stage_epochs`.
        learning_rate, compartment_weight, pseudo_label_weight
            AdamW learning rate; weights of the spot compartment loss and of the self-training loss.
        encoder_lr_factor
            The nucleus encoder learns at ``learning_rate × encoder_lr_factor``; 0 freezes it. Default: 0.1 for a
            pretrained encoder (it is fine-tuned gently: a few hundred spots would otherwise wash out
            what it learnt), 1 from scratch.
        val_fraction, patience
            Share of the spots held out for early stopping, and epochs without improvement before stopping.
        holdout
            Which spots are held out: ``"tiles"`` (default), whole squares of ``tile_um`` (as many as hold
            ``val_fraction`` of the spots; with fewer than ``1 / val_fraction`` tiles, ``"spots"``), so a held-out
            spot's neighbours are held out with it and validation sees tissue training did not; ``"spots"``, spots
            scattered over every tile, whose neighbours train. On real H&E (BRCA-M2C train split, 55 µm
            pseudo-spots, scored on the patient-disjoint validation split) whole tiles stopped training earlier and
            gave the better, steadier nucleus F1; on the test split the two were within seed noise (README).
            ``training_summary_["holdout"]`` says which was used.
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
        spot_bags
            Which nuclei form a spot's bag, whose mean nucleus probability is matched to the spot's proportions:
            ``"centroid"``, the nuclei whose centroid the spot holds (``obs["spot_id"]``), each counting once;
            ``"overlap"``, every nucleus whose polygon overlaps the spot, weighted by the share of its area
            inside (a nucleus cut by a bin edge counts in both bins, as its transcripts do). None (default):
            ``"centroid"`` for Visium circles (55 µm spots hold whole nuclei but for their rim) and
            ``"overlap"`` for square bins (Visium HD), where most nuclei cross a bin edge and their transcripts
            are counted in each bin they cover: on the synthetic Visium HD benchmark (8 µm bins) it gave the higher
            nucleus macro-F1 over three seed pairs, 0.642 vs 0.623 (``benchmarks/measured/visium_hd.json``).
        {device}
            Training runs there; the trained network is returned to the CPU.
        lr
            Deprecated name of ``learning_rate`` (as in :func:`~histocell_sd.tl.deconvolve`).

        Returns
        -------
        HistoCell
            ``self``, with ``history_`` (one row per epoch), ``training_summary_`` and ``fit_timing_``;
            ``sdata`` is not modified. From proportions, the summary holds ``val_spot_pearson`` (mean per-type r
            over the held-out spots), and ``val_called_share`` beside ``val_label_share``: the share of those
            spots' nuclei called each type against the type's mean share in their labels (``train_called_share``
            and ``train_label_share``, over the training spots, when ``val_fraction=0``). A type that is at least
            10 % of the labels but under 1 % of the calls is warned about (the model collapsed towards the
            commoner types: without morphology and from scratch, weak training on real H&E did so).
        """
        samples = [sdata] if isinstance(sdata, SpatialData) else list(sdata) if isinstance(sdata, (list, tuple)) else None
        if not samples or not all(isinstance(s, SpatialData) for s in samples):
            raise InvalidInputError(f"fit needs a SpatialData or a non-empty list of them, got {type(sdata).__name__}.")
        trainer = Trainer(
            self._settings, encoder_state=self._encoder_state, epochs=epochs, self_training_epochs=self_training_epochs,
            state_epochs=state_epochs, learning_rate=renamed("HistoCell.fit", "lr", lr, "learning_rate", learning_rate, LEARNING_RATE),
            encoder_lr_factor=encoder_lr_factor, compartment_weight=compartment_weight,
            pseudo_label_weight=pseudo_label_weight, val_fraction=val_fraction, holdout=holdout, patience=patience, seed=seed, progress=progress,
            device=resolve_device(device), spot_bags=spot_bags,
        )
        result = trainer.fit(
            samples, proportions_key=proportions_key, state_proportions_key=state_proportions_key, spots_table_key=spots_table_key,
            nuclei_table_key=nuclei_table_key, image_key=image_key, nucleus_labels_key=nucleus_labels_key,
        )
        self.net, self.history_, self.training_summary_, self.fit_timing_ = result.net, result.history, result.summary, result.timing
        return self

    # ------------------------------------------------------------------ inference
    @inject_docs
    def sample_inputs(
        self,
        sdata: SpatialData,
        *,
        image_key: str | None = None,
        nuclei_table_key: str = HISTOCELL_KEY,
        progress: bool = True,
        crops_on_demand: bool = False,
    ) -> SampleInputs:
        """What the model sees of every nucleus of ``sdata``: crops, context image, morphology, neighbours.

        :func:`histocell_sd.tl.predict` passes them to :meth:`predict_inputs`.

        Parameters
        ----------
        sdata
            A sample with segmented nuclei.
        {image_key}
        {nuclei_table_key}
            Read: centroids, morphology features and ``obs["spot_id"]``.
        {progress}
        crops_on_demand
            Cut each nucleus' crop from the image when the network asks for it instead of holding them all
            (same values, about 3 KB less per nucleus; the image is read twice). :func:`histocell_sd.tl.predict`
            uses it.

        Returns
        -------
        SampleInputs
            One row per nucleus of the nuclei table, in its order.
        """
        return inputs_of(
            self._settings, sdata, image_key=image_key, nuclei_table_key=nuclei_table_key, progress=progress, crops_on_demand=crops_on_demand
        )

    @inject_docs
    def predict_inputs(
        self, inputs: SampleInputs, *, mc_samples: int = 0, progress: bool = True, device: str | None = None
    ) -> dict[str, np.ndarray]:
        """Probabilities of every nucleus of ``inputs`` (eval mode; ``mc_samples`` > 0 adds MC dropout).

        :func:`histocell_sd.tl.predict` calls this and writes the result into the SpatialData.

        Parameters
        ----------
        inputs
            The model inputs of one sample (:meth:`sample_inputs`).
        mc_samples
            Monte-Carlo dropout passes (``type_std``); 0 = off.
        {progress}
        {device}

        Returns
        -------
        dict
            ``type`` (n × types), ``state`` (n × states), ``compartment`` (n × compartments),
            ``embedding`` (n × dim) and, with MC dropout, ``type_std``.
        """
        target = resolve_device(device)
        try:
            with full_float32():
                return self.net.to(target).predict(inputs, mc_samples=mc_samples, progress=progress)
        finally:
            self.net.cpu()  # at rest on the CPU: saving, loading and the next call see the same model

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
        checkpoint = load_checkpoint(path)
        model = cls.__new__(cls)
        # a later fit starts from the loaded nucleus encoder, as a new model starts from the pretrained one
        encoder_state = {key: value.clone() for key, value in checkpoint.net.nucleus.state_dict().items()}
        model._setup(checkpoint.config, encoder_state, checkpoint.net)
        model.history_, model.training_summary_, model.model_card_ = checkpoint.history, checkpoint.training_summary, checkpoint.card
        return model

    def __repr__(self) -> str:
        trained = "trained" if self.training_summary_ else "untrained"
        with_states = [t for t in self.cell_types if self.states[t] != [t]]  # a type without states is its own single state
        states = f"states for {len(with_states)} of them" if with_states else "no states"
        return f"HistoCell({trained}; {len(self.cell_types)} cell types, {states}, compartments {self.compartment_labels})"
