"""Detection and instance-segmentation metrics for nucleus segmentation."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from .._errors import InvalidInputError

__all__ = ["match_points", "detection_scores", "aggregated_jaccard_index"]


def _as_points(xy) -> np.ndarray:
    """Return ``xy`` as a float array of shape (n, 2)."""
    return np.asarray(xy, dtype=float).reshape(-1, 2)


def match_points(pred_xy, true_xy, *, max_dist: float) -> tuple[np.ndarray, np.ndarray]:
    """Match predicted to true points one-to-one within a distance.

    Among all pairs closer than ``max_dist``, the matching maximises the number of
    matched pairs and, among those, minimises the total distance.

    Parameters
    ----------
    pred_xy, true_xy
        Point coordinates, shape (n, 2) and (m, 2), in the same units.
    max_dist
        Largest distance (inclusive) at which two points may be matched.

    Returns
    -------
    pred_idx, true_idx
        Integer arrays of equal length: ``pred_xy[pred_idx[k]]`` matches ``true_xy[true_idx[k]]``.
    """
    pred, true = _as_points(pred_xy), _as_points(true_xy)
    empty = np.zeros(0, dtype=int)
    if len(pred) == 0 or len(true) == 0:
        return empty, empty
    dist = cKDTree(pred).sparse_distance_matrix(cKDTree(true), max_dist, output_type="coo_matrix")
    if dist.nnz == 0:
        return empty, empty
    # Pairs form small clusters: solve each connected cluster on its own (dense costs stay tiny).
    n_pred = len(pred)
    graph = coo_matrix((np.ones(dist.nnz), (dist.row, dist.col + n_pred)), shape=(n_pred + len(true),) * 2)
    component = connected_components(graph, directed=False)[1][dist.row]
    order = np.argsort(component, kind="stable")
    bounds = np.flatnonzero(np.diff(component[order])) + 1
    pairs = [_assign(dist.row[idx], dist.col[idx], dist.data[idx], max_dist) for idx in np.split(order, bounds)]
    return np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])


def _assign(row, col, data, max_dist: float) -> tuple[np.ndarray, np.ndarray]:
    """Maximum-cardinality, minimum-distance matching of one cluster of candidate pairs."""
    rows, row_inv = np.unique(row, return_inverse=True)
    cols, col_inv = np.unique(col, return_inverse=True)
    # Cost: a big constant penalises leaving a pair unmatched, the distance breaks ties.
    unmatched = 1.0 + 2.0 * (max_dist + 1.0) * min(len(rows), len(cols))
    cost = np.full((len(rows), len(cols)), unmatched)
    cost[row_inv, col_inv] = data
    r, c = linear_sum_assignment(cost)
    keep = cost[r, c] < unmatched
    return rows[r[keep]].astype(int), cols[c[keep]].astype(int)


def detection_scores(pred_xy, true_xy, *, max_dist: float) -> dict[str, float]:
    """Precision, recall and F1 of detected points after one-to-one matching.

    Parameters
    ----------
    pred_xy, true_xy
        Point coordinates, shape (n, 2) and (m, 2), in the same units.
    max_dist
        Largest distance at which a prediction counts as a hit.

    Returns
    -------
    dict
        ``precision``, ``recall``, ``f1``, ``n_pred``, ``n_true`` and ``n_matched``.
        Scores are 1.0 when both sets are empty and 0.0 when only one is.
    """
    n_pred, n_true = len(_as_points(pred_xy)), len(_as_points(true_xy))
    n_matched = len(match_points(pred_xy, true_xy, max_dist=max_dist)[0])
    precision = n_matched / n_pred if n_pred else float(n_true == 0)
    recall = n_matched / n_true if n_true else float(n_pred == 0)
    denom = n_pred + n_true
    f1 = 2.0 * n_matched / denom if denom else 1.0
    return {
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "n_pred": n_pred,
        "n_true": n_true,
        "n_matched": n_matched,
    }


def _dense_labels(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Relabel to 0..n with 0 kept as background; return flat labels and n + 1."""
    ids, inv = np.unique(labels.ravel(), return_inverse=True)
    if ids[0] != 0:
        inv = inv + 1
    return inv.ravel(), int(inv.max()) + 1


def aggregated_jaccard_index(true_labels, pred_labels) -> float:
    """Aggregated Jaccard Index (Kumar et al., 2017) of two instance label images.

    Each true nucleus is paired with the predicted nucleus of highest IoU; the index is
    the summed intersections over the summed unions of these pairs, with the areas of
    unpaired true and predicted nuclei added to the denominator.

    Parameters
    ----------
    true_labels, pred_labels
        Integer label images of equal shape; 0 is background.

    Returns
    -------
    float
        AJI in [0, 1]; 1.0 when both images are empty, 0.0 when only one is.
    """
    true_labels, pred_labels = np.asarray(true_labels), np.asarray(pred_labels)
    if true_labels.shape != pred_labels.shape:
        raise InvalidInputError(f"true_labels and pred_labels must have the same shape, got {true_labels.shape} and {pred_labels.shape}.")
    has_true, has_pred = bool(true_labels.any()), bool(pred_labels.any())
    if not (has_true and has_pred):
        return float(has_true == has_pred)
    t, n_t = _dense_labels(true_labels)
    p, n_p = _dense_labels(pred_labels)
    table = np.bincount(t * n_p + p, minlength=n_t * n_p).reshape(n_t, n_p)
    inter = table[1:, 1:]
    area_t, area_p = table.sum(axis=1)[1:], table.sum(axis=0)[1:]
    union = area_t[:, None] + area_p[None, :] - inter
    iou = inter / union
    best = iou.argmax(axis=1)
    paired = iou[np.arange(len(best)), best] > 0
    rows, cols = np.flatnonzero(paired), best[paired]
    unpaired_pred = np.ones(len(area_p), dtype=bool)
    unpaired_pred[cols] = False
    total_inter = inter[rows, cols].sum()
    total_union = union[rows, cols].sum() + area_t[~paired].sum() + area_p[unpaired_pred].sum()
    return float(total_inter / total_union)
