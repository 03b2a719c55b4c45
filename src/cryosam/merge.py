"""From masks of proposals to the final instances: merge duplicates, paint the label volume
(and the two checks on single masks that the proposal stage uses).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from cryosam.instance_mask import InstanceMask
from cryosam.result import Instance


def outside_instances(zyx: np.ndarray, masks: Sequence[InstanceMask],
                      shape: tuple[int, ...]) -> np.ndarray:
    """True for proposals whose voxel lies outside every mask so far (a proposal inside a
    clicked particle would only segment it again)."""
    keep = np.ones(len(zyx), dtype=bool)
    if not len(zyx):
        return keep
    vox = np.clip(np.rint(zyx).astype(np.int64), 0, np.asarray(shape) - 1)
    for mask in masks:
        if mask.n_voxels == 0:
            continue
        rel = vox - np.asarray(mask.offset)
        inside = ((rel >= 0) & (rel < np.asarray(mask.mask.shape))).all(axis=1)
        idx = np.nonzero(inside & keep)[0]
        if len(idx):
            r = rel[idx]
            hit = mask.mask[r[:, 0], r[:, 1], r[:, 2]]
            keep[idx[hit]] = False
    return keep


def elongation(mask: InstanceMask) -> float:
    """Ratio of the longest to the shortest principal axis of a mask (1 = round)."""
    coords = mask.coords().astype(float)
    if len(coords) < 4:
        return 1.0
    ev = np.linalg.eigvalsh(np.cov(coords.T) + 1e-3 * np.eye(3))
    return float(np.sqrt(ev[-1] / max(ev[0], 1e-6)))


def off_point(mask: InstanceMask, seed: np.ndarray) -> bool:
    """True when a proposal's mask is not centred near its seed: the segmenter grabbed a
    neighbour, not the matched particle."""
    limit = max(2.0, 0.5 * max(mask.mask.shape))
    return bool(np.linalg.norm(mask.centroid() - np.asarray(seed, float)) > limit)


def merge_instances(
    instances: Sequence[Instance], shape: tuple[int, ...], merge_iou: float
) -> tuple[list[Instance], np.ndarray]:
    """Paint instances into a label volume, best first (clicks before matches).

    An instance that overlaps an already painted one by ≥ ``merge_iou`` of its own voxels is
    merged into it (union), a clicked one included (two clicks on one particle make one
    instance), and so is one that overlaps several and has no voxel free. A match whose free
    voxels are centred inside a painted instance is dropped: a leaky mask around a particle
    found already, whose shell would be picked at that particle's centre a second time.
    Otherwise it only takes the voxels still free. Each surviving instance's mask is then
    exactly its voxels in the label volume, so picks, their voxel counts and
    ``instances.mrc`` agree. Returns the instances in label order (ids 1..N) and the labels.
    """
    n = len(instances)
    labels = np.zeros(shape, dtype=np.int16 if n < 32000 else np.int32)
    scores = np.array([i.score for i in instances], dtype=float)
    is_prompt = np.array([i.is_prompt for i in instances], dtype=bool)
    rank = np.lexsort((-scores, ~is_prompt)) if n else np.zeros(0, dtype=int)
    kept: list[Instance] = []
    for i in rank:
        inst = instances[i]
        if inst.n_voxels == 0:
            if inst.is_prompt:
                kept.append(inst)  # a click is always reported, even with an empty mask
            continue
        z0, y0, x0 = (int(v) for v in inst.mask.offset)
        dz, dy, dx = inst.mask.mask.shape
        region = labels[z0:z0 + dz, y0:y0 + dy, x0:x0 + dx]
        under = region[inst.mask.mask]
        taken = under[under > 0]
        free = inst.mask.mask & (region == 0)
        if len(taken):
            ids, counts = np.unique(taken, return_counts=True)
            if counts.max() >= merge_iou * inst.n_voxels or not free.any():
                owner = int(ids[int(np.argmax(counts))])
                region[free] = owner
                host = kept[owner - 1]
                rows = tuple(r for r in inst.click_rows if r not in host.click_rows)
                kept[owner - 1] = dataclasses.replace(host, mask=host.mask.union(inst.mask),
                                                      merged_clicks=host.merged_clicks + rows)
                continue
            if not inst.is_prompt and _centred_in(region, free):  # a shell around one
                continue  # leakage, not a particle: dropped, its voxels stay free
        kept.append(inst)
        region[free] = len(kept)
    return [_painted(inst, labels, k + 1) for k, inst in enumerate(kept)], labels


def _centred_in(region: np.ndarray, free: np.ndarray) -> int:
    """The label under the centroid of the (non-empty) ``free`` voxels of a crop of the
    label volume: 0 when that voxel is free too."""
    centre = tuple(np.rint(np.argwhere(free).mean(axis=0)).astype(int))
    return int(region[centre])


def _painted(inst: Instance, labels: np.ndarray, label: int) -> Instance:
    """``inst`` with its mask reduced to the voxels that carry ``label``."""
    if inst.n_voxels == 0:
        return inst
    z0, y0, x0 = (int(v) for v in inst.mask.offset)
    dz, dy, dx = inst.mask.mask.shape
    own = inst.mask.mask & (labels[z0:z0 + dz, y0:y0 + dy, x0:x0 + dx] == label)
    if own.sum() == inst.n_voxels:
        return inst
    cropped = InstanceMask.from_dense(own)
    offset = tuple(int(a + b) for a, b in zip(cropped.offset, (z0, y0, x0), strict=True))
    return dataclasses.replace(inst, mask=InstanceMask(offset, cropped.mask))  # type: ignore[arg-type]


def split_at_cut(instances: Sequence[Instance], labels: np.ndarray, threshold: float
                 ) -> tuple[list[Instance], list[Instance], np.ndarray]:
    """Keep the clicks and the matches scoring at least ``threshold``; the others leave the
    label volume (their ids are freed and the kept ones renumbered 1..K in the same order).
    Returns (kept, below the cut, labels)."""
    keep = [i.is_prompt or i.score >= threshold for i in instances]
    if all(keep):
        return list(instances), [], labels
    mapping = np.zeros(len(instances) + 1, dtype=labels.dtype)
    mapping[1:][np.asarray(keep)] = np.arange(1, int(sum(keep)) + 1, dtype=labels.dtype)
    kept = [i for i, k in zip(instances, keep, strict=True) if k]
    below = sorted((i for i, k in zip(instances, keep, strict=True) if not k),
                   key=lambda i: -i.score)
    return kept, below, mapping[labels]
