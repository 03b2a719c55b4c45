"""copick projects in and out, through the ``copick`` package.

:func:`open_copick` resolves, before any work, everything a run needs from a project: the run,
the pickable object, the voxel spacing and tomogram, the clicks (one pick set of that object)
and the session cryosam will write. :meth:`CopickSource.load_tomogram` reads the tomogram;
:func:`write_copick` writes the picks (Å, with ``score`` and ``instance_id``) and the instance
segmentation back, as user ``cryosam``.

Coordinates: copick locations are Å with voxel centres at ``index × voxel size``, so a
(z, y, x) voxel is ``Å / voxel size`` (copick's own convention); a point's position includes
its transform's translation. ``copick`` (and zarr) are imported inside the functions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cryosam.errors import InputError
from cryosam.io._common import as_zyx, third_party_quiet
from cryosam.io.mrc import Tomogram, scan_values
from cryosam.utils import outside_volume

__all__ = ["COPICK_USER", "CopickSource", "open_copick", "write_copick"]

COPICK_USER = "cryosam"  # the user_id of everything cryosam writes into a project


def _listed(names: list[str]) -> str:
    names = sorted(names)
    return ", ".join(names[:12]) + (", ..." if len(names) > 12 else "") if names else "none"


@dataclass
class CopickSource:
    """One copick run's inputs as resolved by :func:`open_copick`, and where outputs go."""

    config: Path
    run_name: str
    object_name: str
    voxel_spacing: float  # Å
    tomo_type: str
    shape: tuple[int, int, int]  # (z, y, x) of the tomogram
    clicks_zyx: np.ndarray  # (P, 3) voxels
    clicks_user: str
    clicks_session: str
    session_id: str  # the session cryosam writes (free, or replaced with overwrite)
    overwrite: bool = False
    _run: Any = field(default=None, repr=False)
    _tomogram: Any = field(default=None, repr=False)

    def load_tomogram(self) -> Tomogram:
        """The tomogram (its full-resolution level) as float32 (z, y, x) in memory."""
        with third_party_quiet():
            data = np.asarray(self._tomogram.numpy(), dtype=np.float32)
        if data.ndim != 3:
            raise InputError(f"{self.config}: run {self.run_name}: tomogram {self.tomo_type!r} "
                             f"has shape {data.shape}; need a 3-D volume")
        where = f"{self.config}: run {self.run_name}: tomogram {self.tomo_type!r}"
        vs = float(self.voxel_spacing)
        return Tomogram(data=data, voxel_size=(vs, vs, vs), origin=(0.0, 0.0, 0.0), path=None,
                        value_range=scan_values(where, data))

    def report(self) -> dict[str, Any]:
        """What the run record keeps about the project (``copick`` in run.json)."""
        return {
            "config": str(self.config), "run": self.run_name, "object": self.object_name,
            "voxel_spacing": self.voxel_spacing, "tomo_type": self.tomo_type,
            "clicks": {"user_id": self.clicks_user, "session_id": self.clicks_session,
                       "n": len(self.clicks_zyx)},
            "output": {"user_id": COPICK_USER, "session_id": self.session_id},
        }


def open_root(config: Path) -> Any:
    """The copick project of ``config`` (one clear error when it is not one)."""
    import copick

    if not config.is_file():
        raise InputError(f"--copick {config}: file not found; give the project's config JSON")
    try:
        with third_party_quiet():
            return copick.from_file(str(config))
    except Exception as exc:
        raise InputError(f"--copick {config}: not a copick config ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}); check the JSON") \
            from None


def _pick_voxel_spacing(where: str, run: Any, voxel_spacing: float | None) -> Any:
    spacings = list(run.voxel_spacings)
    with_tomos = [v for v in spacings if v.tomograms]
    shown = _listed([f"{v.voxel_size:g}" for v in with_tomos])
    if voxel_spacing is not None:
        found = [v for v in spacings if abs(float(v.voxel_size) - voxel_spacing) < 1e-3]
        if not found or not found[0].tomograms:
            raise InputError(f"{where}: no tomogram at --voxel-spacing {voxel_spacing:g} Å; it "
                             f"has tomograms at {shown} Å")
        return found[0]
    if len(with_tomos) == 1:
        return with_tomos[0]
    if not with_tomos:
        raise InputError(f"{where}: has no tomogram; add one to the project first")
    raise InputError(f"{where}: has tomograms at {shown} Å; choose one with --voxel-spacing")


def _pick_tomogram(where: str, spacing: Any, tomo_type: str | None) -> Any:
    tomos = list(spacing.tomograms)
    shown = _listed([t.tomo_type for t in tomos])
    if tomo_type is not None:
        found = [t for t in tomos if t.tomo_type == tomo_type]
        if not found:
            raise InputError(f"{where}: no tomogram of --tomo-type {tomo_type!r} at "
                             f"{spacing.voxel_size:g} Å; it has {shown}")
        return found[0]
    if len(tomos) == 1:
        return tomos[0]
    raise InputError(f"{where}: has {len(tomos)} tomograms at {spacing.voxel_size:g} Å "
                     f"({shown}); choose one with --tomo-type")


def _pick_clicks(where: str, run: Any, object_name: str, user: str | None,
                 session: str | None) -> Any:
    every = list(run.get_picks(object_name=object_name))
    sets = [p for p in every if (p.user_id == user if user is not None
                                 else p.user_id != COPICK_USER)]
    if session is not None:
        sets = [p for p in sets if p.session_id == session]
    with third_party_quiet():
        sets = [p for p in sets if len(p.points)]
    shown = _listed([f"{p.user_id}/{p.session_id} ({len(p.points)} points)" for p in every])
    asked = ", ".join(f"{flag} {v}" for flag, v in (("--clicks-user", user),
                                                    ("--clicks-session", session)) if v)
    if not sets:
        raise InputError(f"{where}: no pick set of {object_name!r} with points "
                         f"{f'for {asked}' if asked else 'by a user other than cryosam'} (it has "
                         f"{shown}); click a few particles in copick first, or choose a set "
                         "with --clicks-user/--clicks-session")
    if len(sets) > 1:
        raise InputError(f"{where}: {len(sets)} pick sets of {object_name!r} could be the "
                         f"clicks ({shown}); choose one with --clicks-user and --clicks-session")
    return sets[0]


def _session_taken(run: Any, object_name: str, session: str) -> bool:
    picks = run.get_picks(object_name=object_name, user_id=COPICK_USER, session_id=session)
    segs = run.get_segmentations(user_id=COPICK_USER, session_id=session, name=object_name,
                                 is_instance=None, is_panoptic=None)
    return bool(picks or segs)


def _output_session(where: str, run: Any, object_name: str, session_id: str | None,
                    overwrite: bool) -> str:
    from copick.util.escape import sanitize_name

    if session_id is None:  # the first free number: "0" (copick's tool session), then 1, 2...
        k = 0
        while _session_taken(run, object_name, str(k)):
            k += 1
        return str(k)
    try:
        clean = sanitize_name(session_id, suppress_warnings=True)
    except ValueError:
        clean = ""
    if clean != session_id:
        raise InputError(f"--copick-session {session_id!r}: copick names may not hold spaces, "
                         f"underscores or any of <>:\"/\\|?*; e.g. {clean or 'cryosam-1'!r}")
    if _session_taken(run, object_name, session_id) and not overwrite:
        raise InputError(f"{where}: already holds cryosam's {object_name!r} in session "
                         f"{session_id}; pass --overwrite to replace it, or choose another "
                         "--copick-session (without one, cryosam takes a new session)")
    return session_id


def open_copick(
    config: str | os.PathLike[str],
    run: str,
    object_name: str,
    *,
    voxel_spacing: float | None = None,
    tomo_type: str | None = None,
    clicks_user: str | None = None,
    clicks_session: str | None = None,
    session_id: str | None = None,
    overwrite: bool = False,
    clicks: bool = True,
) -> CopickSource:
    """Resolve a run's tomogram, clicks and output session without reading the tomogram.

    The clicks are the one pick set of ``object_name`` that has points, by ``clicks_user``
    (default: anyone but cryosam) in ``clicks_session`` (default: any); several candidates
    are an error that lists them. ``voxel_spacing`` and ``tomo_type`` may be left out when the
    run has only one. ``session_id`` None takes the first free number for user ``cryosam``;
    a given one that cryosam already wrote is refused unless ``overwrite``. Every problem is
    one :class:`InputError` naming the option and the fix. ``clicks=False`` reads no pick
    set (a saved query brings what to look for).
    """
    import zarr

    path = Path(config)
    root = open_root(path)
    with third_party_quiet():
        found = root.get_run(run)
        if found is None:
            raise InputError(f"--run {run!r}: not in {path}; it has runs "
                             f"{_listed([r.name for r in root.runs])}")
        where = f"{path}: run {run}"
        if root.get_object(object_name) is None:
            names = [o.name for o in root.pickable_objects]
            raise InputError(f"--object {object_name!r}: not a pickable object of {path}; it "
                             f"has {_listed(names)}")
        spacing = _pick_voxel_spacing(where, found, voxel_spacing)
        tomogram = _pick_tomogram(where, spacing, tomo_type)
        try:
            shape = tuple(int(s) for s in zarr.open(tomogram.zarr(), mode="r")["0"].shape)
        except Exception as exc:  # noqa: BLE001 - zarr's errors differ by version
            raise InputError(f"{where}: tomogram {tomogram.tomo_type!r} at "
                             f"{spacing.voxel_size:g} Å has no readable data ({type(exc).__name__}"
                             f": {exc}); check the project's zarr store, or choose another "
                             "with --tomo-type / --voxel-spacing") from None
        picks = (_pick_clicks(where, found, object_name, clicks_user, clicks_session)
                 if clicks else None)
        positions, transforms = (picks.numpy() if picks is not None
                                 else (np.zeros((0, 3)), np.zeros((0, 4, 4))))
        session = _output_session(where, found, object_name, session_id, overwrite)
    if len(shape) != 3:
        raise InputError(f"{where}: tomogram {tomogram.tomo_type!r} has shape {shape}; need 3-D")
    vs = float(spacing.voxel_size)
    xyz = np.asarray(positions, float).reshape(-1, 3) + np.asarray(transforms)[:, :3, 3]
    zyx = xyz[:, ::-1] / vs
    outside = outside_volume(zyx, shape)
    if outside.any() and picks is not None:
        i = int(np.argmax(outside))
        raise InputError(f"{where}: pick {i + 1} of {object_name} by {picks.user_id}/"
                         f"{picks.session_id} at {np.round(xyz[i], 1).tolist()} Å lies outside "
                         f"the {vs:g} Å tomogram (x, y, z size {list(shape[::-1])} voxels); "
                         "check the pick set and --voxel-spacing")
    return CopickSource(config=path, run_name=found.name, object_name=object_name,
                        voxel_spacing=vs, tomo_type=tomogram.tomo_type, shape=shape,
                        clicks_zyx=zyx, clicks_user=picks.user_id if picks else "",
                        clicks_session=picks.session_id if picks else "", session_id=session,
                        overwrite=overwrite, _run=found, _tomogram=tomogram)


def write_copick(
    source: CopickSource,
    labels: np.ndarray,
    picks_zyx: np.ndarray | None = None,
    scores: np.ndarray | None = None,
    instance_ids: np.ndarray | None = None,
) -> dict[str, Any]:
    """Write the instance segmentation (``labels``, the tomogram's shape, label = instance id)
    and, when ``picks_zyx`` is given, one pick set (Å, with ``scores`` and ``instance_ids``)
    as user ``cryosam`` in ``source.session_id``. On failure whatever this call created is
    removed again and one :class:`InputError` says why. Returns what was written."""
    run, name, session = source._run, source.object_name, source.session_id
    vs = source.voxel_spacing
    if tuple(labels.shape) != source.shape:
        raise ValueError(f"labels have shape {labels.shape}; the tomogram has {source.shape}")
    created: list[Any] = []
    out: dict[str, Any] = {"user_id": COPICK_USER, "session_id": session, "object": name}
    try:
        with third_party_quiet():
            seg_new = not run.get_segmentations(user_id=COPICK_USER, session_id=session,
                                                name=name, voxel_size=vs, is_instance=True)
            seg = run.new_segmentation(voxel_size=vs, name=name, session_id=session,
                                       user_id=COPICK_USER, is_instance=True, exist_ok=True)
            if seg_new:
                created.append(seg)
            seg.from_numpy(np.asarray(labels))
            out["segmentation"] = {"voxel_size": vs, "instances": int(np.max(labels, initial=0))}
            if picks_zyx is not None:
                zyx = as_zyx(picks_zyx)
                picks_new = not run.get_picks(object_name=name, user_id=COPICK_USER,
                                              session_id=session)
                picks = run.new_picks(name, session, user_id=COPICK_USER, exist_ok=True)
                if picks_new:
                    created.append(picks)
                picks.from_numpy(zyx[:, ::-1] * vs, instance_ids=instance_ids, scores=scores)
                out["picks"] = len(zyx)
    except BaseException as exc:  # Ctrl-C and SIGTERM too: no half-written session stays
        for item in created:
            try:
                item.delete()
            except Exception:  # noqa: BLE001 - best effort; the error below is what matters
                pass
        if not isinstance(exc, Exception):
            raise
        raise InputError(f"{source.config}: run {source.run_name}: writing cryosam's results "
                         f"failed ({type(exc).__name__}: {exc}); check that the project's "
                         "overlay is writable") from exc
    return out


def copick_results_missing(source: CopickSource, written: dict[str, Any] | None) -> str | None:
    """What of an earlier :func:`write_copick` (its returned ``written``) is no longer in
    the project, or None when all of it is: a batch rerun redoes a run whose pick set or
    segmentation was deleted from copick."""
    if not written or "session_id" not in written:
        return "no record of what was written to copick"
    run, name, session = source._run, source.object_name, str(written["session_id"])
    with third_party_quiet():
        if "picks" in written and not run.get_picks(object_name=name, user_id=COPICK_USER,
                                                    session_id=session):
            return f"copick pick set {COPICK_USER}/{session}/{name} missing"
        if "segmentation" in written and not run.get_segmentations(
                user_id=COPICK_USER, session_id=session, name=name,
                voxel_size=written["segmentation"]["voxel_size"], is_instance=True):
            return f"copick segmentation {COPICK_USER}/{session}/{name} missing"
    return None
