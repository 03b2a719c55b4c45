"""The CryoSAM pipeline: clicks → 3-D masks → features → matching → masks of every match.

:class:`CryoSAM` holds the loaded models so that several tomograms (or several queries on one
tomogram) reuse them, and runs the stages of :mod:`cryosam.stages` in order, timing each;
:func:`segment` is the one-call form.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import warnings
from collections.abc import Callable
from typing import Any, ParamSpec

import numpy as np

import cryosam
from cryosam import backends, stages
from cryosam.config import CryosamConfig, PropagationConfig
from cryosam.cut import BACKGROUND, MIN_MATCHES, background_message, choose_cut
from cryosam.device import resolve_device, set_threads
from cryosam.encoders.base import SliceEncoder
from cryosam.errors import (
    CryosamWarning,
    InputError,
    MissingWeightsError,
    collect_warnings,
    keep_warnings,
)
from cryosam.merge import merge_instances, split_at_cut
from cryosam.probe import ClickProbe, looks_polarity
from cryosam.query import SavedQuery, check_query_config
from cryosam.record import StageTimer, device_record, file_info, started_stamp, versions
from cryosam.rescale import bin_volume, from_binned
from cryosam.result import Instance, SegmentationResult
from cryosam.segmenters.base import Segmenter

SCORE_RULE = ("similarity above the matching threshold (rescaled to 0..1) x segmenter "
              "confidence x agreement with the clicked particles' size, shape and density "
              "(clicks: similarity and agreement 1)")


_P = ParamSpec("_P")


def _keeps_warnings(run: Callable[_P, SegmentationResult]) -> Callable[_P, SegmentationResult]:
    """Record the run's warnings in ``run.json`` (``warnings``) as well as showing them: on a
    cluster nobody reads every log, and the record stays beside the picks."""

    @functools.wraps(run)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> SegmentationResult:
        with collect_warnings() as seen:
            result = run(*args, **kwargs)
        keep_warnings(result.record, seen)
        return result

    return wrapper


class CryoSAM:
    """Loaded models plus configuration; call :meth:`segment` once per tomogram.

    ``encoder``/``segmenter`` may be passed ready-built (e.g. tiny models in tests);
    otherwise they are built from ``config`` on first use and kept.
    """

    def __init__(
        self,
        config: CryosamConfig | None = None,
        *,
        encoder: SliceEncoder | None = None,
        segmenter: Segmenter | None = None,
    ) -> None:
        self.config = config or CryosamConfig()
        self.device = resolve_device(self.config.device)
        self.threads = set_threads(self.config.threads)
        self._encoder = encoder
        self._segmenter = segmenter

    @property
    def encoder(self) -> SliceEncoder:
        """The slice feature encoder (built on first use)."""
        if self._encoder is None:
            from cryosam.encoders import build_encoder

            self._encoder = build_encoder(self.config.encoder, self.device)
        return self._encoder

    @property
    def segmenter(self) -> Segmenter:
        """The 2-D promptable segmenter (built on first use)."""
        if self._segmenter is None:
            from cryosam.segmenters import build_segmenter

            self._segmenter = build_segmenter(self.config.segmenter, self.device,
                                              target=self.config.propagation.target)
        return self._segmenter

    def _wants_dark(self, kind: backends.Kind) -> bool:
        """Whether the ``kind`` backend in use sees particles dark (the weight-free ones)."""
        built = self._encoder if kind == "encoder" else self._segmenter
        entry = backends.entry_of(built) if built is not None else None
        if entry is not None:
            return entry.wants_dark
        if built is not None:
            return bool(getattr(built, "wants_dark", False))  # unregistered: as it declares
        name = self.config.encoder.name if kind == "encoder" else self.config.segmenter.name
        return backends.get(name, kind).wants_dark

    def check_weights(self, match: bool = True) -> None:
        """Raise one :class:`MissingWeightsError` naming every model whose weights are not on
        this machine (before any work), with the one command that fetches them all."""
        cfg = self.config
        selected: list[tuple[backends.Kind, str, Any]] = []
        if self._segmenter is None:
            selected.append(("segmenter", cfg.segmenter.name, cfg.segmenter.options))
        if match and self._encoder is None:
            selected.append(("encoder", cfg.encoder.name, cfg.encoder.options))
        missing = backends.missing_weights(selected)
        if len(missing) == 1:
            raise missing[0][1]
        if missing:
            raise MissingWeightsError(combined_missing_message(missing))

    @_keeps_warnings
    def segment(
        self,
        tomogram: stages.TomogramLike,
        points: stages.PointsLike | None = None,
        *,
        query: SavedQuery | str | os.PathLike[str] | None = None,
        match: bool | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        voxel_size: stages.VoxelSizeLike | None = None,
        points_unit: str = "voxel",
        tomo_name: str | None = None,
        points_pixel_size: float | None = None,
        points_bin: int | None = None,
        negative_points: stages.PointsLike | None = None,
    ) -> SegmentationResult:
        """Segment the clicked particles (or membranes) and, with ``match``, all similar ones.

        ``points`` are (z, y, x) voxels when given as an array, or a CSV/STAR file path.
        ``match`` defaults to True for particles and False for membranes (where the clicks
        usually name the membranes wanted; matching finds other sheet-like structures too).
        ``points_pixel_size`` (Å): the clicks are pixels of that size, scaled to the tomogram's;
        ``points_bin``: the clicks were made on a copy binned that many times.
        ``query`` (instead of ``points``): a :class:`~cryosam.query.SavedQuery` (or its
        file) from another tomogram; every similar particle is found here with no clicks.
        ``negative_points``: clicks on structures that must not be picked (also rows flagged
        negative in ``points``). Clicks given as an array or a DataFrame are converted by
        ``points_unit``, ``points_pixel_size`` and ``points_bin`` as a file's are."""
        if isinstance(query, str | os.PathLike):  # a saved query's file
            query = SavedQuery.load(query)
        if query is not None:
            if points is not None or negative_points is not None:
                raise InputError("give clicks or a saved query, not both (a query keeps the "
                                 "negative clicks it was made with)")
            if match is False:
                raise InputError("--no-match with --query: a saved query only matches")
            return self._segment_query(tomogram, query, cache_dir=cache_dir,
                                       voxel_size=voxel_size, tomo_name=tomo_name)
        if points is None:
            raise InputError("no points given; click at least one particle (or give a saved "
                             "query)")
        cfg = self.config
        if match is None:
            match = cfg.propagation.target == "particle"
        timer = StageTimer(self.device)
        with timer("models"):  # load (and so check) the models before any work on the data
            self.check_weights(match)
            segmenter = self.segmenter
            encoder = self.encoder if match else None
        inputs, found, work, clicks = self._clicks(
            timer, tomogram, points, encoder is not None, voxel_size=voxel_size,
            points_unit=points_unit, tomo_name=tomo_name,
            points_pixel_size=points_pixel_size, points_bin=points_bin,
            negative_points=negative_points)
        features = matches = proposals = negatives = None
        if match and encoder is not None and clicks.masks:
            if len(work.negatives):
                with timer("segment_prompts"):
                    negatives = stages.segment_negatives(work, segmenter,
                                                         _prop_cfg(cfg, work.factor))
            with timer("features"):
                features = stages.compute_features(work, encoder, cfg, self.device, cache_dir)
            with timer("matching"):
                query_ = stages.build_query(features, clicks, cfg, negatives, work.factor)
                matches = stages.match_query(features, query_, clicks, cfg.matching,
                                             self.device, negatives)
            if matches.outside_clicks.any():
                with timer("segment_proposals"):
                    proposals = stages.segment_proposals(work, matches, clicks, segmenter,
                                                         cfg, _prop_cfg(cfg, work.factor),
                                                         negatives=negatives)
        return self._result(timer, inputs, found, work, clicks, features, matches, proposals,
                            bool(match), negatives)

    def make_query(
        self,
        tomogram: stages.TomogramLike,
        points: stages.PointsLike,
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        voxel_size: stages.VoxelSizeLike | None = None,
        points_unit: str = "voxel",
        tomo_name: str | None = None,
        points_pixel_size: float | None = None,
        points_bin: int | None = None,
        negative_points: stages.PointsLike | None = None,
    ) -> SavedQuery:
        """Segment the clicks and pool their features into a query that
        :meth:`segment` (``query=``) can use on other tomograms; see :mod:`cryosam.query`."""
        cfg = self.config
        check_query_config(cfg)  # before any work
        timer = StageTimer(self.device)
        with timer("models"):
            self.check_weights(True)
            segmenter = self.segmenter  # noqa: F841 - loaded (and checked) before any work
            encoder = self.encoder
        inputs, found, work, clicks = self._clicks(
            timer, tomogram, points, True, voxel_size=voxel_size, points_unit=points_unit,
            tomo_name=tomo_name, points_pixel_size=points_pixel_size, points_bin=points_bin,
            negative_points=negative_points)
        with timer("segment_prompts"):
            negatives = stages.segment_negatives(work, self.segmenter, _prop_cfg(cfg, work.factor))
        with timer("features"):
            features = stages.compute_features(work, encoder, cfg, self.device, cache_dir)
        with timer("matching"):
            built = stages.build_query(features, clicks, cfg, negatives, work.factor)
            refs = stages.references_of(work, clicks.masks, cfg)
            neg_refs = stages.references_of(work, negatives.masks, cfg,
                                            reach=refs.reach if refs else None)
        tomo = inputs.tomogram
        if tomo.mean_voxel_size is None:
            warnings.warn("the query's tomogram has no voxel size, so the query cannot be "
                          "moved onto tomograms of other voxel sizes; pass --voxel-size",
                          CryosamWarning, stacklevel=2)
        source = {"tomogram": inputs.report()["tomogram"], "name": inputs.name,
                  "shape_zyx": list(tomo.shape), "voxel_size": tomo.mean_voxel_size,
                  "clicks": len(inputs.prompts),
                  "points": file_info(inputs.points_source) if inputs.points_source else None}
        return SavedQuery.build(
            vectors=built.vectors, masks=clicks.masks, encoder_id=features.encoder_id,
            config=cfg, polarity=found.polarity, radius=found.radius, binning=work.factor,
            nms_radius=built.nms_radius, particle_radius=built.particle_radius, source=source,
            negatives=built.negatives, negative_masks=negatives.masks, references=refs,
            negative_references=neg_refs)

    def _clicks(self, timer: StageTimer, tomogram: stages.TomogramLike,
                points: stages.PointsLike, with_encoder: bool, **load: Any
                ) -> tuple[stages.Inputs, ClickProbe, stages.Work, stages.Clicks]:
        """Load, normalise, probe, prepare and segment the clicks (the shared first half)."""
        cfg = self.config
        with timer("load"):
            inputs = stages.load_inputs(tomogram, points, **load)
        with timer("normalise"):
            volume = stages.normalise(inputs.tomogram, cfg.propagation)
        with timer("probe"):
            found = stages.probe(volume, inputs, cfg)
            work = stages.prepare(
                volume, inputs.tomogram.data, inputs, found, cfg,
                encoder_dark=self._wants_dark("encoder") if with_encoder else None,
                segmenter_dark=self._wants_dark("segmenter"))
            del volume  # the work volumes are all that is needed from here
        with timer("segment_prompts"):
            clicks = stages.segment_clicks(work, self.segmenter, _prop_cfg(cfg, work.factor), found,
                                           inputs.points_source, inputs.prompt_rows)
        return inputs, found, work, clicks

    def _segment_query(self, tomogram: stages.TomogramLike, saved: SavedQuery, *,
                       cache_dir: str | os.PathLike[str] | None, voxel_size: float | None,
                       tomo_name: str | None) -> SegmentationResult:
        """Every particle like the saved query's in a tomogram without clicks."""
        cfg = self.config
        saved.check_config(cfg)  # before any work: features must be comparable
        timer = StageTimer(self.device)
        with timer("models"):
            self.check_weights(True)
            segmenter = self.segmenter
            encoder = self.encoder
            saved.check_encoder(encoder.id)
            flips = self._wants_dark("encoder")  # the encoder sees every tomogram dark
        with timer("load"):
            inputs = stages.load_tomogram(tomogram, voxel_size=voxel_size, tomo_name=tomo_name)
        with timer("normalise"):
            volume = stages.normalise(inputs.tomogram, cfg.propagation)
        with timer("probe"):
            vs = inputs.tomogram.mean_voxel_size
            binning = saved.binning_for(vs, cfg.binning)  # onto the query's grid
            found = stages.probe_from_query(saved, inputs, cfg, flips, binning)
            work = stages.prepare(volume, inputs.tomogram.data, inputs, found,
                                  dataclasses.replace(cfg, binning=binning),
                                  encoder_dark=flips,
                                  segmenter_dark=self._wants_dark("segmenter"))
            del volume
        clicks = stages.Clicks([], {})
        with timer("features"):
            features = stages.compute_features(work, encoder, cfg, self.device, cache_dir)
        # the saved negative masks lie on the query's own tomogram: here the negatives act by
        # their vectors and their references only, never by where their masks were
        negatives = stages.Negatives([], len(saved.negative_crops))
        with timer("matching"):
            query_ = stages.query_from_saved(saved, features, cfg, work.factor)
            matches = stages.match_query(features, query_, clicks, cfg.matching, self.device,
                                         negatives if negatives.clicks else None)
        proposals = None
        if len(matches.zyx):
            with timer("segment_proposals"):
                proposals = stages.segment_proposals(
                    work, matches, clicks, segmenter, cfg, _prop_cfg(cfg, work.factor),
                    references=saved.references(cfg.score), negatives=negatives,
                    negative_references=saved.negative_references(cfg.score))
        result = self._result(timer, inputs, found, work, clicks, features, matches, proposals,
                              True, negatives if negatives.clicks else None)
        result.record["inputs"]["points"] = None
        result.record["query"] = saved.report()
        top_k = cfg.matching.top_k
        few = MIN_MATCHES if not top_k else min(MIN_MATCHES, top_k)  # the user's own cap
        if len(result.picks_zyx) < few:  # too few to be the query's kind at all
            off_grid = saved.off_grid(vs, work.factor)
            looks = None  # the tomogram's own contrast, on the work grid (cheaper when binned)
            if found.radius and cfg.polarity == "auto" and not off_grid:
                looks = looks_polarity(bin_volume(inputs.tomogram.data, work.factor),
                                       found.radius / work.factor)[0]
            warnings.warn(saved.nothing_matched(len(result.picks_zyx), cfg.polarity != "auto",
                                                flips, looks, off_grid),
                          CryosamWarning, stacklevel=3)
        return result

    def _result(self, timer: StageTimer, inputs: stages.Inputs, found: ClickProbe,
                work: stages.Work, clicks: stages.Clicks, features: stages.Features | None,
                matches: stages.Matches | None, proposals: stages.ProposalMasks | None,
                match: bool, negatives: stages.Negatives | None = None) -> SegmentationResult:
        """Merge, map back to the input's voxels, and assemble the result and its record."""
        cfg = self.config
        segmenter = self.segmenter
        with timer("merge"):
            found_instances = proposals.instances if proposals else []
            instances, labels = merge_instances(clicks.instances + found_instances,
                                                work.segmenter_volume.shape, cfg.merge_iou)
            cut = None
            below: list[Instance] = []
            if match and cfg.propagation.target == "particle":
                scored = [i for i in instances if not i.is_prompt]
                share = matches.stats.share if matches is not None else 0.0
                cut = choose_cut(scored, share, cfg.score)
                if cut.method == BACKGROUND:
                    warnings.warn(f"{background_message(share, len(scored))}, or give "
                                  "--min-score to write them anyway", CryosamWarning,
                                  stacklevel=3)
                instances, below, labels = split_at_cut(instances, labels, cut.threshold)
            instances, labels = stages.to_input_grid(instances, labels, work.factor,
                                                     inputs.tomogram.shape)
            below = stages.instances_to_input_grid(below, work.factor, inputs.tomogram.shape)
        proposals_zyx = (from_binned(matches.zyx, work.factor) if matches
                         else np.zeros((0, 3)))
        result = SegmentationResult(
            tomogram=inputs.tomogram, tomo_name=inputs.name, target=cfg.propagation.target,
            prompt_zyx=inputs.prompts, instances=instances,
            semantic=(labels > 0).astype(np.int8), labels=labels,
            proposals_zyx=proposals_zyx,
            proposal_scores=matches.similarity if matches else np.zeros(0),
            below_cut=below,
        )
        matching_record: dict[str, Any] = {"enabled": match}
        if matches is not None:
            matching_record = matches.report()
            if proposals is not None:
                matching_record["rejected"] = proposals.rejected
        propagation_record = {"prompts": clicks.report()}
        if proposals is not None:
            propagation_record["proposals"] = proposals.report()
        features_record = features.report() if features else {}
        result.record = {
            "cryosam_version": cryosam.__version__,
            "started": started_stamp(timer.started),
            "inputs": inputs.report(),
            "parameters": cfg.to_dict(),
            "models": {"encoder": features.encoder_id if features else None,
                       "segmenter": segmenter.id},
            "scale": _scale(features_record, segmenter, work.segmenter_volume.shape),
            "device": device_record(self.device),
            "versions": versions(),
            "counts": {
                "prompts": int(len(inputs.prompts)),
                "proposals": int(len(result.proposals_zyx)),
                "instances": int(len(instances)),
                "picks": int(len(result.picks_zyx)),
                "encoder_calls": int(segmenter.encoder_calls),
                "decoder_calls": int(segmenter.decoder_calls),
            },
            "probe": found.report(),
            "work": work.report(),
            "features": features_record,
            "matching": matching_record,
            "propagation": propagation_record,
            "score": {"rule": SCORE_RULE,
                      "cut": cut.report() if cut is not None else None,
                      "above_cut": int(sum(not i.is_prompt for i in instances)),
                      "below_cut": len(below),
                      "outside_density_range": sum(i.outside for i in below),
                      "references": proposals.references if proposals is not None else {}},
            **timer.report(),
        }
        if negatives is not None:
            result.record["negatives"] = negatives.report()
        return result


def _prop_cfg(cfg: CryosamConfig, factor: int) -> PropagationConfig:
    """Propagation on the prepared volumes (already normalised, binned by ``factor``): a
    given ``max_area`` is in the input's voxels, so it shrinks with the binning."""
    prop = dataclasses.replace(cfg.propagation, normalise=False)
    if prop.max_area is not None and factor > 1:
        prop = dataclasses.replace(prop, max_area=max(1, math.ceil(prop.max_area / factor**2)))
    return prop


def segment(
    tomogram: stages.TomogramLike,
    points: stages.PointsLike | None = None,
    config: CryosamConfig | None = None,
    **kwargs: Any,
) -> SegmentationResult:
    """One-call form of :meth:`CryoSAM.segment` (models are loaded for this call only).

    ``kwargs`` are that method's: ``query``, ``match``, ``cache_dir``, ``voxel_size``,
    ``points_unit``, ``tomo_name``, ``points_pixel_size``, ``points_bin`` and
    ``negative_points``."""
    return CryoSAM(config).segment(tomogram, points, **kwargs)


def combined_missing_message(missing: list[tuple[str | None, MissingWeightsError]]) -> str:
    """One line for several missing models: what they are and the command that gets them all."""
    named = [n for n, _ in missing if n]
    if len(named) < len(missing):  # a user-given path is wrong: say each problem
        return " | ".join(str(e) for _, e in missing)
    from cryosam.weights import default_download_dir

    return (f"model weights not on this machine: {', '.join(named)}; on a machine with "
            f"internet run `cryosam weights download {' '.join(named)} --dir checkpoints/`, "
            f"then copy checkpoints/ into {default_download_dir()} here "
            "(`cryosam weights list` shows where cryosam looks)")


def _scale(features: dict[str, Any], segmenter: Segmenter, shape: tuple[int, ...]
           ) -> dict[str, Any]:
    """Voxels per model patch (the scale the models saw): the encoder's per axis from the
    feature volume, SAM's (16-px patches of its input) for the largest slice."""
    out: dict[str, Any] = {}
    if features.get("voxels_per_patch"):
        out["encoder_voxels_per_patch"] = features["voxels_per_patch"]
    geometry = getattr(segmenter, "geometry", None)  # only SAM has an input size
    if callable(geometry):
        long_side = max(shape[1:])
        out["sam_voxels_per_patch"] = round(16.0 * long_side / float(geometry(1, 1).img_size), 3)
    return out
