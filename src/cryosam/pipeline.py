"""The CryoSAM pipeline: clicks → 3-D masks → features → matching → masks of every match.

:class:`CryoSAM` holds the loaded models so that several tomograms (or several queries on one
tomogram) reuse them, and runs the stages of :mod:`cryosam.stages` in order, timing each;
:func:`segment` is the one-call form.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

import cryosam
from cryosam import backends, stages
from cryosam.config import CryosamConfig
from cryosam.device import resolve_device, set_threads
from cryosam.encoders.base import SliceEncoder
from cryosam.errors import MissingWeightsError
from cryosam.merge import merge_instances
from cryosam.record import StageTimer, device_record, started_stamp, versions
from cryosam.rescale import from_binned
from cryosam.result import SegmentationResult
from cryosam.segmenters.base import Segmenter

SCORE_RULE = "similarity x segmenter confidence (clicks: similarity 1)"


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

    def segment(
        self,
        tomogram: stages.TomogramLike,
        points: stages.PointsLike,
        *,
        match: bool | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        voxel_size: float | None = None,
        points_unit: str = "voxel",
        tomo_name: str | None = None,
        points_pixel_size: float | None = None,
        points_bin: int | None = None,
    ) -> SegmentationResult:
        """Segment the clicked particles (or membranes) and, with ``match``, all similar ones.

        ``points`` are (z, y, x) voxels when given as an array, or a CSV/STAR file path.
        ``match`` defaults to True for particles and False for membranes (where the clicks
        usually name the membranes wanted; matching finds other sheet-like structures too).
        ``points_pixel_size`` (Å): the clicks are pixels of that size, scaled to the tomogram's;
        ``points_bin``: the clicks were made on a copy binned that many times.
        """
        cfg = self.config
        target = cfg.propagation.target
        if match is None:
            match = target == "particle"
        timer = StageTimer(self.device)
        with timer("models"):  # load (and so check) the models before any work on the data
            self.check_weights(match)
            segmenter = self.segmenter
            encoder = self.encoder if match else None
        with timer("load"):
            inputs = stages.load_inputs(tomogram, points, voxel_size=voxel_size,
                                        points_unit=points_unit, tomo_name=tomo_name,
                                        points_pixel_size=points_pixel_size,
                                        points_bin=points_bin)
        with timer("normalise"):
            volume = stages.normalise(inputs.tomogram, cfg.propagation)
        with timer("probe"):
            found = stages.probe(volume, inputs, cfg)
            work = stages.prepare(
                volume, inputs.tomogram.data, inputs, found, cfg,
                encoder_dark=None if encoder is None else self._wants_dark("encoder"),
                segmenter_dark=self._wants_dark("segmenter"))
            del volume  # the work volumes are all that is needed from here
        prop_cfg = dataclasses.replace(cfg.propagation, normalise=False)
        with timer("segment_prompts"):
            clicks = stages.segment_clicks(work, segmenter, prop_cfg, found)

        features = matches = proposals = None
        if match and encoder is not None and clicks.masks:
            with timer("features"):
                features = stages.compute_features(work, encoder, cfg, self.device, cache_dir)
            with timer("matching"):
                query = stages.build_query(features, clicks, cfg)
                matches = stages.match_query(features, query, clicks, cfg.matching,
                                             self.device)
            if matches.outside_clicks.any():
                with timer("segment_proposals"):
                    proposals = stages.segment_proposals(work, matches, clicks, segmenter,
                                                         cfg, prop_cfg)

        with timer("merge"):
            found_instances = proposals.instances if proposals else []
            instances, labels = merge_instances(clicks.instances + found_instances,
                                                work.segmenter_volume.shape, cfg.merge_iou)
            instances, labels = stages.to_input_grid(instances, labels, work.factor,
                                                     inputs.tomogram.shape)
        proposals_zyx = (from_binned(matches.zyx, work.factor) if matches
                         else np.zeros((0, 3)))
        result = SegmentationResult(
            tomogram=inputs.tomogram, tomo_name=inputs.name, target=target,
            prompt_zyx=inputs.prompts, instances=instances,
            semantic=(labels > 0).astype(np.int8), labels=labels,
            proposals_zyx=proposals_zyx,
            proposal_scores=matches.similarity if matches else np.zeros(0),
        )
        matching_record: dict[str, Any] = {"enabled": bool(match)}
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
            "score": SCORE_RULE,
            **timer.report(),
        }
        return result


def segment(
    tomogram: stages.TomogramLike,
    points: stages.PointsLike,
    config: CryosamConfig | None = None,
    **kwargs: Any,
) -> SegmentationResult:
    """One-call form of :meth:`CryoSAM.segment` (models are loaded for this call only)."""
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
