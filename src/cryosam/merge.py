"""From masks of proposals to the final instances: drop implausible ones, merge duplicates,
paint the label volume.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cryosam.backends import Target
from cryosam.propagation import InstanceMask
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


@dataclass(frozen=True)
class Plausibility:
    """How far a match may differ from the clicked particles (ratios to theirs)."""

    min_size_ratio: float
    max_size_ratio: float
    max_elongation_ratio: float


def plausible(
    masks: Sequence[InstanceMask],
    seeds: np.ndarray,
    references: Sequence[InstanceMask],
    target: Target,
    rule: Plausibility,
) -> tuple[list[int], dict[str, int]]:
    """Indices of proposal masks worth keeping, and counts of why others were dropped.

    A particle proposal must give a non-empty mask centred near its seed, whose volume is
    within [min, max] size ratio × the clicked particles' median volume and whose elongation
    is at most the elongation ratio × theirs: the clicks say what the particle looks like, and
    matches of another size or shape are other things. Membrane proposals need only reach
    the minimum size.
    """
    kept: list[int] = []
    rejected = {"empty": 0, "size": 0, "shape": 0, "off_point": 0}
    refs = [r for r in references if r.n_voxels > 0]
    ref_size = float(np.median([r.n_voxels for r in refs])) if refs else 0.0
    ref_elong = max((elongation(r) for r in refs), default=0.0)
    lo, hi = rule.min_size_ratio * ref_size, rule.max_size_ratio * ref_size
    for i, mask in enumerate(masks):
        n = mask.n_voxels
        if n == 0:
            rejected["empty"] += 1
        elif not refs:
            kept.append(i)
        elif target != "particle":
            # membranes: any sheet the size of the clicked ones, however shaped or large
            if n >= lo:
                kept.append(i)
            else:
                rejected["size"] += 1
        elif not lo <= n <= hi:
            rejected["size"] += 1
        elif elongation(mask) > rule.max_elongation_ratio * ref_elong:
            rejected["shape"] += 1
        elif np.linalg.norm(mask.centroid() - seeds[i]) > max(2.0, 0.5 * max(mask.mask.shape)):
            rejected["off_point"] += 1
        else:
            kept.append(i)
    return kept, rejected


def merge_instances(
    instances: Sequence[Instance], shape: tuple[int, ...], merge_iou: float
) -> tuple[list[Instance], np.ndarray]:
    """Paint instances into a label volume, best first (clicks before matches).

    An instance that overlaps an already painted one by ≥ ``merge_iou`` of its own voxels is
    merged into it (union), a clicked one included (two clicks on one particle make one
    instance); otherwise it only takes the voxels still free. Each surviving instance's mask
    is then exactly its voxels in the label volume, so picks, their voxel counts and
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
        if len(taken):
            ids, counts = np.unique(taken, return_counts=True)
            best = int(np.argmax(counts))
            if counts[best] >= merge_iou * inst.n_voxels:
                owner = int(ids[best])
                region[inst.mask.mask & (region == 0)] = owner
                host = kept[owner - 1]
                kept[owner - 1] = Instance(host.mask.union(inst.mask), host.seed,
                                           host.similarity, host.confidence, host.click_row)
                continue
        kept.append(inst)
        region[inst.mask.mask & (region == 0)] = len(kept)
    return [_painted(inst, labels, k + 1) for k, inst in enumerate(kept)], labels


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
    return Instance(InstanceMask(offset, cropped.mask), inst.seed, inst.similarity,  # type: ignore[arg-type]
                    inst.confidence, inst.click_row)
