"""Merging proposals' masks into instances: a leaky mask around a particle found already
must not come back as a second pick of that particle."""

from __future__ import annotations

import numpy as np

from cryosam.instance_mask import InstanceMask
from cryosam.merge import merge_instances
from cryosam.result import Instance


def _ball(shape: tuple[int, int, int], centre: tuple[float, float, float],
          radius: float) -> InstanceMask:
    zz, yy, xx = np.indices(shape)
    d2 = (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2
    return InstanceMask.from_dense(d2 <= radius ** 2)


def _instance(mask: InstanceMask, score: float) -> Instance:
    return Instance(mask, mask.centroid(), score, 0.7)


def test_a_shell_left_around_a_found_particle_is_dropped() -> None:
    shape = (40, 40, 40)
    core = _ball(shape, (20, 20, 20), 5)  # 515 voxels
    leaky = _ball(shape, (20, 20, 21), 8)  # 2,109 voxels: holds the core, < half of it
    assert core.n_voxels < 0.5 * leaky.n_voxels
    kept, labels = merge_instances([_instance(core, 0.3), _instance(leaky, 0.001)], shape, 0.5)
    assert len(kept) == 1 and set(np.unique(labels)) == {0, 1}
    assert kept[0].mask.n_voxels == int((labels == 1).sum()) == core.n_voxels  # no leakage
    # a click is always its own pick, even centred inside another
    kept, _ = merge_instances([Instance(core, core.centroid(), 1.0, 0.7, 0),
                               Instance(leaky, leaky.centroid(), 1.0, 0.7, 1)], shape, 0.5)
    assert len(kept) == 2 and all(i.is_prompt for i in kept)


def test_a_neighbour_touching_a_found_particle_stays_its_own_pick() -> None:
    shape = (40, 40, 60)
    first = _ball(shape, (20, 20, 20), 6)
    second = _ball(shape, (20, 20, 30), 6)  # overlaps the first by a cap, centred outside it
    kept, labels = merge_instances([_instance(first, 0.5), _instance(second, 0.4)], shape, 0.5)
    assert len(kept) == 2 and set(np.unique(labels)) == {0, 1, 2}
    assert np.linalg.norm(kept[1].position() - [20, 20, 30]) < 1.0


def test_a_mask_covered_by_two_found_particles_is_not_a_pick_of_its_own() -> None:
    shape = (40, 40, 60)
    a, b = _ball(shape, (20, 20, 24), 5), _ball(shape, (20, 20, 36), 5)
    between = InstanceMask.from_dense(a.to_dense(shape) | b.to_dense(shape))
    kept, _ = merge_instances([_instance(a, 0.5), _instance(b, 0.4),
                               _instance(between, 0.1)], shape, 0.6)
    assert len(kept) == 2  # each holds half of it (< 0.6), and nothing of it is free
