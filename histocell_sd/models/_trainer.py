"""Training HistoCell from spot proportions (or nucleus labels): stages, epochs and early stopping.

:class:`Trainer` trains a *new* network and returns it with its history; the model it is trained for
is not touched, so a fit that fails leaves that model as it was. The stages, each with early stopping
on held-out spots (validation loss; the mean per-type Pearson r of spot proportions is reported):

- ``"types"``: the mean type probability of each spot's nuclei is matched to its proportions;
- ``"self-training"``: adds a loss towards each nucleus's posterior given its spot's proportions;
- ``"states"``: the same with state proportions, when the model has states and they are given;
- ``"supervised"`` replaces them all with cross-entropy on labelled nuclei (``nucleus_labels_key``).
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .._errors import InvalidInputError
from .._utils import mean_per_type_pearson, progress_bar
from ._config import HistoCellConfig
from ._losses import bag_mean, spot_posteriors, symmetric_kl
from ._network import HistoCellNet
from ._samples import HOLDOUTS, TrainingSample, check_spot_bags, prepare_labelled_sample, prepare_sample, split_spots, spot_tiles

DEFAULT_EPOCHS = {"types": 40, "self-training": 10, "states": 15}
"""Maximum epochs of each stage for up to :data:`FULL_EPOCH_SPOTS` training spots."""
FULL_EPOCH_SPOTS = 1000
PRETRAINED_ENCODER_LR_FACTOR = 0.1


COLLAPSE_LABEL_SHARE, COLLAPSE_CALLED_SHARE = 0.10, 0.01


def _warn_if_collapsed(called: dict, labelled: dict, split: str = "val") -> None:
    """Warn when a type that is at least 10 % of the spots' labels is called for under 1 % of their nuclei.

    ``split`` names the spots the shares were taken on: ``"val"`` (held out) or ``"train"`` (when none are held out).
    """
    never = {t: v for t, v in labelled.items() if v >= COLLAPSE_LABEL_SHARE and called[t] < COLLAPSE_CALLED_SHARE}
    if never:
        shares = ", ".join(f"{t} {100 * v:.0f} % of the labels, {100 * called[t]:.1f} % of the calls" for t, v in never.items())
        spots = "held-out" if split == "val" else "training"
        warnings.warn(
            f"The fitted model hardly ever calls {sorted(never)} on the {spots} spots' nuclei ({shares}): it may have collapsed "
            f"towards the commoner types. The shares are in training_summary_['{split}_called_share'] and ['{split}_label_share']; "
            "the pretrained encoder, use_morphology=True or more epochs may help.", UserWarning, stacklevel=4)


def stage_epochs(n_train_spots: int, *, epochs: int | None = None, self_training_epochs: int | None = None,
                 state_epochs: int | None = None) -> dict[str, int]:
    """Maximum epochs of the three training stages, as :meth:`HistoCell.fit` chooses them.

    Parameters
    ----------
    n_train_spots
        Training spots (all samples, held-out spots excluded).
    epochs, self_training_epochs, state_epochs
        Epochs given to ``fit``; None: ``DEFAULT_EPOCHS`` of ``models._trainer``, scaled down beyond 1,000 training spots
        (at least 2), so a stage takes about the same number of optimiser steps on any slide.

    Returns
    -------
    dict
        ``{"types": ..., "self-training": ..., "states": ...}``, as in ``training_summary_["max_epochs"]``.
    """
    scale = min(1.0, FULL_EPOCH_SPOTS / max(n_train_spots, 1))
    out = {}
    for (stage, default), value in zip(DEFAULT_EPOCHS.items(), (epochs, self_training_epochs, state_epochs)):
        if value is None:
            value = max(2, round(default * scale))
        elif value < 0:
            raise InvalidInputError(f"Epochs must be non-negative, got {value}.")
        out[stage] = int(value)
    return out


@dataclass
class FitResult:
    """What a fit produces: the trained network (eval mode), one history row per epoch, the summary and
    wall-clock seconds (``prepare_s``, ``epoch_s`` per epoch, ``fit_s``)."""

    net: HistoCellNet
    history: pd.DataFrame
    summary: dict
    timing: dict


LEARNING_RATE = 2e-3
"""Default AdamW learning rate of :meth:`HistoCell.fit`."""


class Trainer:
    """Trains a new :class:`HistoCellNet` for ``config``; the fit settings are those of :meth:`HistoCell.fit`.

    ``encoder_state`` holds the nucleus encoder weights training starts from (None: random).
    """

    def __init__(self, config: HistoCellConfig, *, encoder_state: dict | None = None, epochs=None, self_training_epochs=None,
                 state_epochs=None, learning_rate=LEARNING_RATE, encoder_lr_factor=None, compartment_weight=0.3, pseudo_label_weight=0.5,
                 val_fraction=0.15, holdout="tiles", patience=8, seed=0, progress=True, device=None, spot_bags=None):
        if encoder_lr_factor is None:
            encoder_lr_factor = 1.0 if config.encoder["source"] == "scratch" else PRETRAINED_ENCODER_LR_FACTOR
        if not np.isfinite(encoder_lr_factor) or encoder_lr_factor < 0:
            raise InvalidInputError(f"encoder_lr_factor must be ≥ 0, got {encoder_lr_factor}.")
        if not (np.isfinite(learning_rate) and learning_rate > 0):
            raise InvalidInputError(f"learning_rate must be a positive number, got {learning_rate}.")
        if not 0 <= val_fraction < 1:
            raise InvalidInputError(f"val_fraction is the share of spots held out and must lie in [0, 1), got {val_fraction}.")
        if holdout not in HOLDOUTS:
            raise InvalidInputError(f"holdout must be one of {list(HOLDOUTS)}, got {holdout!r}.")
        if all(e == 0 for e in (epochs, self_training_epochs, state_epochs)):
            raise InvalidInputError("epochs, self_training_epochs and state_epochs are all 0: there is nothing to train.")
        self.config, self.encoder_state = config, encoder_state
        self.epochs = {"epochs": epochs, "self_training_epochs": self_training_epochs, "state_epochs": state_epochs}
        self.learning_rate, self.encoder_lr_factor, self.val_fraction, self.patience = learning_rate, encoder_lr_factor, val_fraction, patience
        self.holdout = holdout
        self.compartment_weight, self.pseudo_label_weight = compartment_weight, pseudo_label_weight
        check_spot_bags(spot_bags)
        self.seed, self.progress, self.spot_bags = seed, progress, spot_bags
        self.device = torch.device("cpu") if device is None else torch.device(device)

    def fit(self, samples: list, *, proportions_key, state_proportions_key, spots_table_key, nuclei_table_key, image_key,
            nucleus_labels_key=None) -> FitResult:
        """Prepare ``samples`` (SpatialData), train every stage and return the result (keys as in :meth:`HistoCell.fit`)."""
        start = time.perf_counter()
        torch.manual_seed(self.seed)
        self.rng = np.random.default_rng(self.seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.net = HistoCellNet.from_config(self.config, self.encoder_state).to(self.device)
        if nucleus_labels_key is not None:
            kwargs = {"labels_key": nucleus_labels_key, "nuclei_table_key": nuclei_table_key, "image_key": image_key, "progress": self.progress}
            self.prepared = [prepare_labelled_sample(self.config, s, **kwargs) for s in samples]
        else:
            kwargs = {"proportions_key": proportions_key, "state_key": state_proportions_key, "spots_table_key": spots_table_key,
                      "nuclei_table_key": nuclei_table_key, "image_key": image_key, "progress": self.progress, "spot_bags": self.spot_bags}
            self.prepared = [prepare_sample(self.config, s, **kwargs) for s in samples]
        if self.config.feature_names:
            features = np.concatenate([p.inputs.features for p in self.prepared])
            self.net.feature_mean = features.mean(0).astype(np.float32)
            self.net.feature_std = (features.std(0) + 1e-6).astype(np.float32)
        self.timing = {"prepare_s": time.perf_counter() - start, "epoch_s": []}
        self._last = time.perf_counter()
        use_states = self.config.has_states and all(p.state_targets is not None for p in self.prepared)
        if self.config.has_states and not use_states:
            warnings.warn(
                f"The model has cell states but obsm[{state_proportions_key!r}] is missing from "
                f"{sum(p.state_targets is None for p in self.prepared)} of {len(self.prepared)} samples: the state heads are not trained "
                "and tl.predict will not write cell states.", UserWarning, stacklevel=3)
        tiles = [(i, spots) for i, p in enumerate(self.prepared) for spots in spot_tiles(p.spot_xy_um, self.config.tile_um)]
        self.train, self.val, holdout = split_spots(tiles, self.val_fraction, self.rng, self.holdout)
        if not self.train:
            raise InvalidInputError(f"val_fraction={self.val_fraction} holds out every one of the {sum(len(s) for _, s in tiles)} spots; lower it.")
        max_epochs = stage_epochs(sum(len(s) for _, s in self.train), **self.epochs)
        self.history: list[dict] = []
        self._stage("supervised" if nucleus_labels_key else "types", max_epochs["types"], self.learning_rate)
        if max_epochs["self-training"] > 0 and not nucleus_labels_key:
            self._stage("self-training", max_epochs["self-training"], self.learning_rate / 2)
        use_states = use_states and max_epochs["states"] > 0
        if use_states:
            self._stage("states", max_epochs["states"], self.learning_rate / 2)
        self.net.eval()
        if not self.history:
            raise InvalidInputError("No training stage ran: give epochs > 0 (or state_epochs > 0 with state proportions).")
        history = pd.DataFrame(self.history)
        last_stage = history[history["stage"] == history["stage"].iloc[-1]]
        last = last_stage.loc[last_stage["val_loss"].idxmin()] if len(self.val) else last_stage.iloc[-1]
        summary = {
            "samples": len(samples),
            "spots_train": int(sum(len(s) for _, s in self.train)),
            "spots_val": int(sum(len(s) for _, s in self.val)),
            "holdout": holdout if self.val else None,
            "nuclei": int(sum(len(p.inputs.obs_names) for p in self.prepared)),
            "epochs_run": int(len(history)),
            "max_epochs": max_epochs,
            "seed": int(self.seed),
            "proportions_key": proportions_key,
            "spot_bags": None if nucleus_labels_key else sorted({p.spot_bags for p in self.prepared}),
            "states_trained": bool(use_states),
            "val_loss": float(last["val_loss"]),
            "val_spot_pearson": float(last["val_spot_pearson"]),  # mean over types of the Pearson r across held-out spots
        }
        if not nucleus_labels_key:  # on the held-out spots, or on the training spots when none are held out
            split = "val" if self.val else "train"
            called, labelled = self._called_shares(self.val or self.train)
            types = self.config.cell_types
            summary[f"{split}_called_share"] = {t: round(float(c), 4) for t, c in zip(types, called)}
            summary[f"{split}_label_share"] = {t: round(float(v), 4) for t, v in zip(types, labelled)}
            _warn_if_collapsed(summary[f"{split}_called_share"], summary[f"{split}_label_share"], split)
        self.timing["fit_s"] = time.perf_counter() - start
        return FitResult(net=self.net.cpu(), history=history, summary=summary, timing=self.timing)

    # ------------------------------------------------------------------ one stage
    def _stage(self, stage: str, epochs: int, lr: float) -> None:
        """Train ``epochs`` epochs at most (cosine learning rate), stop early, keep the best weights."""
        encoder = list(self.net.nucleus.parameters())
        others = [p for name, p in self.net.named_parameters() if not name.startswith("nucleus.")]
        groups = [{"params": others}] + ([{"params": encoder, "lr": lr * self.encoder_lr_factor}] if self.encoder_lr_factor > 0 else [])
        for p in encoder:
            p.requires_grad_(self.encoder_lr_factor > 0)
        optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=1e-4)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
        best, best_state, waited = np.inf, copy.deepcopy(self.net.state_dict()), 0
        bar = progress_bar(range(epochs), desc=f"training ({stage})", disable=not self.progress)
        for epoch in bar:
            self.net.train()
            losses = []
            for t in self.rng.permutation(len(self.train)):
                sample_idx, spots = self.train[t]
                total = self._loss(self.prepared[sample_idx], spots, stage)
                if not torch.isfinite(total.detach()):
                    raise InvalidInputError(f"Training diverged: the loss became {total.item()} in the {stage!r} stage (epoch {epoch}); lower lr (now {lr}).")
                optimizer.zero_grad()
                total.backward()
                optimizer.step()
                losses.append(total.item())
            scheduler.step()
            val_loss, pearson = self._validate(stage)
            now = time.perf_counter()
            self.timing["epoch_s"].append(now - self._last)
            self._last = now
            self.history.append({"stage": stage, "epoch": epoch, "train_loss": float(np.mean(losses)), "val_loss": val_loss, "val_spot_pearson": pearson})
            bar.set_postfix(train=f"{np.mean(losses):.3f}", val=f"{val_loss:.3f}", r=f"{pearson:.2f}")
            if val_loss < best - 1e-4 or not self.val:
                best, best_state, waited = val_loss, copy.deepcopy(self.net.state_dict()), 0
            else:
                waited += 1
                if waited >= self.patience:
                    break
        self.net.load_state_dict(best_state)

    def _batch(self, sample: TrainingSample, spots: np.ndarray, sample_nuclei: bool):
        """Query nuclei of ``spots`` (at most ``max_nuclei_per_spot`` each when sampling), their bag index, their weight in
        the bag (None: 1 each) and every key they attend to. A nucleus overlapping several spots is queried once per spot."""
        cap = self.config.max_nuclei_per_spot
        query, bag, weight = [], [], []
        for b, s in enumerate(spots):
            nuclei = sample.spot_nuclei[s]
            w = None if sample.spot_weights is None else sample.spot_weights[s]
            if len(nuclei) > cap and sample_nuclei:  # training samples; validation uses every nucleus, as prediction does
                pick = self.rng.choice(len(nuclei), cap, replace=False)
                nuclei, w = nuclei[pick], None if w is None else w[pick]
            query.append(nuclei)
            bag.append(np.full(len(nuclei), b))
            weight.append(w)
        query = np.concatenate(query)
        neighbors = sample.inputs.neighbors[query]
        keys = np.unique(np.concatenate([query, neighbors[neighbors >= 0]]))
        weights = None if sample.spot_weights is None else self.net.tensor(np.concatenate(weight))
        return query, self.net.tensor(np.concatenate(bag)), weights, keys

    def _loss(self, sample: TrainingSample, spots: np.ndarray, stage: str) -> torch.Tensor:
        query, bag, weights, keys = self._batch(sample, spots, sample_nuclei=True)
        # Gradients flow through the nuclei of the spots; their other neighbours only give keys/values.
        own = np.unique(query)
        others = np.setdiff1d(keys, own, assume_unique=True)
        h_own = self.net.embed_nuclei(sample.inputs, own, augment=self.generator)
        with torch.no_grad():
            h_others = self.net.embed_nuclei(sample.inputs, others, augment=self.generator) if len(others) else h_own[:0]
        keys = np.concatenate([own, others])
        out = self.net.outputs(sample.inputs, query, keys, torch.cat([h_own, h_others]))
        n_bags = len(spots)
        targets = self.net.tensor(sample.state_targets[spots] if stage == "states" else sample.targets[spots])
        proba = self.net.state_proba(out["type"], out["states"]) if stage == "states" else torch.softmax(out["type"], 1)
        total = symmetric_kl(bag_mean(proba, bag, n_bags, weights), targets)
        if stage == "supervised":
            labels = self.net.tensor(sample.nucleus_labels[query])
            known = labels >= 0
            total = F.cross_entropy(out["type"][known], labels[known]) if known.any() else out["type"].sum() * 0.0
        if stage == "self-training":
            pseudo = spot_posteriors(proba.detach(), bag, targets, weights=weights)
            total = total + self.pseudo_label_weight * -(pseudo * F.log_softmax(out["type"], 1)).sum(1).mean()
        spot_repr = bag_mean(out["mixed"], bag, n_bags, weights)
        compartment = F.cross_entropy(self.net.compartment_head(spot_repr), self.net.tensor(sample.compartments[spots]))
        return total + self.compartment_weight * compartment

    def _held_out(self, tiles: list):
        """Per ``(sample, spots)`` tile: its sample and spots, the queried nuclei with their bag index and weights, and the
        heads' outputs (eval mode, no sampling)."""
        self.net.eval()
        for sample_idx, spots in tiles:
            sample = self.prepared[sample_idx]
            query, bag, weights, keys = self._batch(sample, spots, sample_nuclei=False)
            yield sample, spots, query, bag, weights, self.net.outputs(sample.inputs, query, keys, self.net.embed_nuclei(sample.inputs, keys))

    @torch.no_grad()
    def _called_shares(self, tiles) -> tuple[np.ndarray, np.ndarray]:
        """Share of the spots' nuclei called (argmax) as each type, and each type's mean share in those spots' labels."""
        called, labelled = [], []
        for sample, spots, *_, out in self._held_out(tiles):
            called.append(out["type"].argmax(1).cpu().numpy())
            labelled.append(sample.targets[spots])
        called = np.concatenate(called)
        return np.bincount(called, minlength=len(self.config.cell_types)) / max(len(called), 1), np.concatenate(labelled).mean(0)

    @torch.no_grad()
    def _validate(self, stage: str) -> tuple[float, float]:
        """Loss of the stage and mean per-type Pearson r of the type proportions, over the held-out spots."""
        if not self.val:
            return float("nan"), float("nan")
        losses, predicted, target = [], [], []
        for sample, spots, query, bag, weights, out in self._held_out(self.val):
            p_type = bag_mean(torch.softmax(out["type"], 1), bag, len(spots), weights)
            if stage == "supervised":
                labels = self.net.tensor(sample.nucleus_labels[query])
                losses.append(float(F.cross_entropy(out["type"], labels)) * len(spots))
            elif stage == "states":
                p = bag_mean(self.net.state_proba(out["type"], out["states"]), bag, len(spots), weights)
                losses.append(float(symmetric_kl(p, self.net.tensor(sample.state_targets[spots]))) * len(spots))
            else:
                losses.append(float(symmetric_kl(p_type, self.net.tensor(sample.targets[spots]))) * len(spots))
            predicted.append(p_type.cpu().numpy())
            target.append(sample.targets[spots])
        n = sum(len(s) for _, s in self.val)
        return float(sum(losses) / n), mean_per_type_pearson(np.concatenate(predicted), np.concatenate(target))
