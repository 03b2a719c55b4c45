"""The cryosam dock widget: clicks on a tomogram → 3-D masks → every similar particle.

Pick the tomogram's image layer and a points layer of clicks, then "Segment clicks" (the
clicked particles only, seconds) or "Find similar" (the whole pipeline). The result is a labels
layer and a points layer whose ``score`` feature the slider filters live; "Save" writes the
usual outputs (picks.csv/.star/_napari.csv, semantic.mrc, instances.mrc, preview.png,
run.json) of what the slider keeps. "Save query…" writes the clicks' query (as ``cryosam
query``) and "Pick with query…" picks with a saved one instead of clicks (as ``segment
--query``). Work runs in a napari worker thread (:mod:`._jobs`); the models and an on-disk
feature cache live as long as the widget, so a second press reuses them. The controls are laid
out in :mod:`._ui`.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any

import napari
import numpy as np
from napari.layers import Image, Labels, Points
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QWidget,
)

from cryosam.config import ScoreConfig
from cryosam.errors import CryosamError, CryosamWarning
from cryosam.napari._jobs import (
    query_model,
    save_job,
    save_query_job,
    segment_job,
)
from cryosam.napari._reader import pick_size, points_kwargs
from cryosam.napari._results import (
    background_note,
    check_clicks,
    filtered_result,
    hidden_labels,
    kept_picks,
    starting_score,
    tomogram_from_array,
)
from cryosam.napari._triton import guard_triton
from cryosam.napari._ui import SLIDER_STEPS, TARGET_CHOICES, build_ui
from cryosam.result import SegmentationResult, negatives_summary

LABELS_NAME = "cryosam instances"
PICKS_NAME = "cryosam picks"
CLICKS_NAME = "clicks"
NEGATIVES_NAME = "negative clicks"
NO_LAYER = "(none)"  # the negative-clicks choice when no layer is used


class CryosamWidget(QWidget):
    """Dock widget: segment clicked particles, find similar ones, filter by score, save."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        guard_triton()  # before any model: triton after Mesa's OpenGL crashes the process
        self.viewer = napari_viewer
        self.result: SegmentationResult | None = None
        self.worker: Any = None
        self.labels_layer: Labels | None = None
        self.picks_layer: Points | None = None
        self._source: Image | None = None  # the image layer the result belongs to
        self._clicks: Points | None = None  # and its clicks
        self._full_labels: np.ndarray | None = None  # labels before the score filter
        self._models: dict[Any, Any] = {}  # by the boxes' settings, or a query's parameters
        self._warnings: list[str] = []  # cryosam's warnings from the last job
        # the feature cache: kept while the widget lives, removed when it is collected
        self.cache_dir = tempfile.mkdtemp(prefix="cryosam-napari-")
        weakref.finalize(self, shutil.rmtree, self.cache_dir, ignore_errors=True)
        self._started = 0.0
        self._task = ""
        self._build_ui()
        self._refresh_layers()
        events = self.viewer.layers.events
        for event in (events.inserted, events.removed, events.reordered):
            event.connect(self._refresh_layers)

    # ------------------------------------------------------------------ interface

    def _build_ui(self) -> None:
        build_ui(self)

    def _refresh_layers(self, *_: Any) -> None:
        """Fill the layer choices, keeping the current ones; skip cryosam's own outputs."""
        own = {id(self.labels_layer), id(self.picks_layer)}
        images = [ly.name for ly in self.viewer.layers
                  if isinstance(ly, Image) and ly.ndim >= 3 and not ly.rgb]
        points = [ly.name for ly in self.viewer.layers
                  if isinstance(ly, Points) and id(ly) not in own]
        negative = [n for n in points if "negative" in n.lower()]
        # prefer a "clicks" layer for the clicks, and never a negative one first
        points.sort(key=lambda n: (n in negative, CLICKS_NAME not in n.lower()))
        for box, names in ((self.image_box, images), (self.points_box, points),
                           (self.negatives_box, [NO_LAYER, *points])):
            current = box.currentText()
            box.blockSignals(True)
            box.clear()
            box.addItems(names)
            if current in names:
                box.setCurrentText(current)
            box.blockSignals(False)

    def _layer(self, box: QComboBox, kind: type, what: str) -> Any:
        name = box.currentText()
        if not name or name not in self.viewer.layers:
            raise CryosamError(f"no {what} layer chosen; add one and pick it in the widget")
        layer = self.viewer.layers[name]
        if not isinstance(layer, kind):
            raise CryosamError(f"layer {name!r} is not a {what} layer")
        return layer

    @property
    def busy(self) -> bool:
        """True while a worker runs."""
        return self.worker is not None

    @property
    def min_score(self) -> float:
        """The score filter's threshold."""
        return self.score_slider.value() / SLIDER_STEPS

    # ------------------------------------------------------------------ actions

    def add_clicks_layer(self) -> Points | None:
        """An empty points layer on the chosen image, in add mode, selected for clicks."""
        return self._add_points_layer(CLICKS_NAME, "red", self.points_box)

    def add_negatives_layer(self) -> Points | None:
        """An empty points layer for negative clicks, in add mode, chosen as the negatives."""
        return self._add_points_layer(NEGATIVES_NAME, "cyan", self.negatives_box)

    def _add_points_layer(self, name: str, colour: str, box: QComboBox) -> Points | None:
        try:
            image = self._layer(self.image_box, Image, "tomogram (image)")
        except CryosamError as exc:
            show_error(str(exc))
            return None
        layer = self.viewer.add_points(np.zeros((0, 3)), ndim=3, name=name,
                                       scale=image.scale[-3:], translate=image.translate[-3:],
                                       units=_units(image), size=5,
                                       face_color=colour, border_color=colour, symbol="cross")
        layer.mode = "add"
        box.setCurrentText(layer.name)
        return layer

    def segment_clicks(self) -> None:
        """Masks of the clicked particles only (no matching)."""
        self._run(match=False)

    def find_similar(self) -> None:
        """The whole pipeline: the clicked particles and every similar one."""
        self._run(match=True)

    def _tomogram(self) -> tuple[Image, Any]:
        """The chosen image layer and its tomogram (voxel size from the layer's scale)."""
        image = self._layer(self.image_box, Image, "tomogram (image)")
        data = image.data[0] if image.multiscale else image.data
        return image, tomogram_from_array(data, image.scale, image.metadata)

    def _inputs(self, negatives: bool = True) -> tuple[Image, Any, np.ndarray, np.ndarray | None]:
        """The image layer, its tomogram, the clicks and the negative clicks (None without
        a layer or a point, or when ``negatives`` is False: Segment clicks ignores them) in
        its voxels (z, y, x)."""
        image, tomo = self._tomogram()
        clicks_layer = self._layer(self.points_box, Points, "points (clicks)")
        self._clicks = clicks_layer
        clicks = check_clicks(_voxels(image, clicks_layer), tomo.shape, clicks_layer.name)
        neg = None
        if negatives and self.negatives_box.currentText() not in ("", NO_LAYER):
            neg_layer = self._layer(self.negatives_box, Points, "points (negative clicks)")
            if neg_layer.name == clicks_layer.name:  # (a plugin's viewer hands out proxies)
                raise CryosamError(f"layer {neg_layer.name!r} is chosen for both the clicks "
                                   "and the negative clicks; pick another or (none)")
            if len(neg_layer.data):
                neg = check_clicks(_voxels(image, neg_layer), tomo.shape, neg_layer.name)
        return image, tomo, clicks, neg

    @property
    def target(self) -> str:
        """The Target box as ``--target`` says it: particle or membrane."""
        return TARGET_CHOICES[self.target_box.currentText()]

    @property
    def binning(self) -> int | None:
        """The Binning box as ``--binning``: None for auto."""
        text = self.binning_box.currentText()
        return None if text == "auto" else int(text)

    def _particles_only(self, what: str) -> None:
        """Saved queries find particles: refuse ``what`` with membranes as the target."""
        if self.target != "particle":
            raise CryosamError(f"{what}: saved queries find particles; set Target to "
                               "particles")

    def _model(self) -> Any:
        from cryosam.config import (
            CryosamConfig,
            EncoderConfig,
            PropagationConfig,
            SegmenterConfig,
        )
        from cryosam.pipeline import CryoSAM

        key = (self.encoder_box.currentText(), self.segmenter_box.currentText(),
               self.device_box.currentText(), round(self.tolerance_box.value(), 3),
               self.polarity_box.currentText(), self.target, self.binning)
        if key not in self._models:
            # every match is kept: the score slider starts at the automatic cut and can go
            # below it; "Save" writes the ones under the slider to picks_below_cut.csv
            cfg = CryosamConfig(encoder=EncoderConfig(name=key[0]),
                                segmenter=SegmenterConfig(name=key[1]), device=key[2],
                                polarity=key[4], binning=key[6],
                                propagation=PropagationConfig(target=key[5]),
                                score=ScoreConfig(min_score=0.0, density_tolerance=key[3]))
            self._models[key] = CryoSAM(cfg)
        return self._models[key]

    def _run(self, match: bool) -> None:
        if self.busy:
            show_info("cryosam is still working; wait for it to finish")
            return
        try:
            image, tomo, clicks, negatives = self._inputs(negatives=match)
            model = self._model()
        except CryosamError as exc:
            self._fail(exc)
            return
        self._source = image
        task = "Finding similar particles" if match else "Segmenting the clicks"
        self._launch(segment_job, (model, tomo, self.cache_dir, image.name, clicks, match,
                                   negatives), task, self._on_result)

    def pick_with_query(self, path: str | Path | None = None) -> None:
        """Every particle like a saved query's (``cryosam query``) in the chosen tomogram,
        with the query's own parameters; the clicks are not used."""
        if self.busy:
            show_info("cryosam is still working; wait for it to finish")
            return
        try:
            self._particles_only("Pick with query")  # before the file dialog
        except CryosamError as exc:
            self._fail(exc)
            return
        if path is None:
            path, _ = QFileDialog.getOpenFileName(self, "Pick with a saved query", "",
                                                  "cryosam query (*.cryosam-query);;All (*)")
            if not path:
                return
        try:
            image, tomo = self._tomogram()
            saved, model = query_model(str(path), self.device_box.currentText(),
                                       self.polarity_box.currentText(), self._models,
                                       self.binning)
        except CryosamError as exc:
            self._fail(exc)
            return
        self._source, self._clicks = image, None
        self._launch(segment_job, (model, tomo, self.cache_dir, image.name, None, True, None,
                                   saved), f"Picking with {Path(path).name}", self._on_result)

    def save_query(self, path: str | Path | None = None) -> None:
        """Save what matching needs from the clicks (and negative clicks) as a query file,
        to pick in other tomograms (``cryosam segment/batch --query``)."""
        if self.busy:
            show_info("cryosam is still working; wait for it to finish")
            return
        try:
            self._particles_only("Save query")
            image, tomo, clicks, negatives = self._inputs()
            model = self._model()
        except CryosamError as exc:
            self._fail(exc)
            return
        if path is None:
            path, _ = QFileDialog.getSaveFileName(self, "Save the query", f"{image.name}"
                                                  ".cryosam-query", "cryosam query "
                                                  "(*.cryosam-query)")
            if not path:
                return
        self._launch(save_query_job, (model, tomo, clicks, self.cache_dir, image.name,
                                      negatives, str(path)), "Saving the query", self._on_saved)

    def save(self, out_dir: str | Path | None = None) -> None:
        """Write the outputs of the picks the score filter keeps into ``out_dir`` (asked for
        when not given); an earlier cryosam folder there is replaced."""
        if self.result is None:
            show_info("nothing to save yet: segment the clicks or find similar first")
            return
        if self.busy:
            show_info("cryosam is still working; wait for it to finish")
            return
        if out_dir is None:
            start = self._default_out_dir()
            chosen, _ = QFileDialog.getSaveFileName(
                self, "Save cryosam outputs into folder", str(start), "",
                options=QFileDialog.Option.DontConfirmOverwrite)
            if not chosen:
                return
            out_dir = chosen
        result = filtered_result(self.result, self.min_score)
        self._launch(save_job, (result, str(out_dir)), "Saving", self._on_saved)

    def _default_out_dir(self) -> Path:
        tomo = self.result.tomogram if self.result is not None else None
        if tomo is not None and tomo.path is not None:
            from cryosam.export import default_out_dir

            return default_out_dir(tomo.path)
        name = self.result.tomo_name if self.result is not None else "tomo"
        return Path.cwd() / f"{name}_cryosam"

    # ------------------------------------------------------------------ worker plumbing

    def _launch(self, func: Any, args: tuple[Any, ...], task: str, on_done: Any) -> None:
        # errors go to _fail (one line); _ignore_errors stops napari re-raising them as well
        worker = create_worker(func, *args, _progress={"desc": f"cryosam: {task}"},
                               _ignore_errors=True)
        # the elapsed-time clock stops before the result or the error takes the status line
        # (a tick between them and `finished` overwrote it under load)
        for signal in (worker.returned, worker.errored):
            signal.connect(lambda *_: self._tick.stop())
        worker.returned.connect(on_done)
        worker.warned.connect(self._warned)
        self._warnings = []
        worker.errored.connect(self._fail)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self._task = task
        self._started = time.perf_counter()
        self._set_busy(True)
        self._show_elapsed()
        worker.start()

    def _warned(self, args: tuple) -> None:
        """A warning from the worker thread: cryosam's own are shown and counted in the
        status line (libraries' deprecation notes are not)."""
        if issubclass(args[1], CryosamWarning):  # (message, category, file, line, ...)
            self._warnings.append(str(args[0]))
            show_warning(str(args[0]))

    def _set_busy(self, busy: bool) -> None:
        for w in (self.segment_button, self.similar_button, self.save_button,
                  self.save_query_button, self.query_button, *self.settings):
            w.setEnabled(not busy)
        self.save_button.setEnabled(not busy and self.result is not None)
        self.progress.setVisible(busy)
        if busy:
            self._tick.start()
        else:
            self._tick.stop()

    def _show_elapsed(self) -> None:
        self.status.setText(f"{self._task}… {time.perf_counter() - self._started:.0f} s")

    def _on_finished(self) -> None:
        self.worker = None
        self._set_busy(False)

    def _fail(self, exc: BaseException) -> None:
        """One line for the user: cryosam's own message, or the exception's."""
        if isinstance(exc, CryosamError):
            message = str(exc)
        else:
            message = f"cryosam failed: {type(exc).__name__}: {exc}"
        self.status.setText(f"Error: {message}")
        show_error(message)

    def _on_saved(self, folder: Path) -> None:
        self.status.setText(f"Saved to {folder}")
        show_info(f"cryosam: saved to {folder}")

    # ------------------------------------------------------------------ results

    def _on_result(self, out: tuple[SegmentationResult, float]) -> None:
        result, seconds = out
        self.result = result
        image = self._source
        scale = tuple(image.scale[-3:]) if image is not None else (1.0, 1.0, 1.0)
        translate = tuple(image.translate[-3:]) if image is not None else (0.0, 0.0, 0.0)
        self._show_labels(result, scale, translate)
        self._show_picks(result, scale, translate)
        self.score_slider.setEnabled(result.target == "particle")  # membranes: no picks
        start = int(np.floor(starting_score(result) * SLIDER_STEPS))
        if self.score_slider.value() != start:
            self.score_slider.setValue(start)  # filters through valueChanged
        else:
            self._apply_filter()
        n = len(result.instances)
        clicked = sum(i.is_prompt for i in result.instances)
        warned = (f" | {len(self._warnings)} warning(s): {self._warnings[-1]}"
                  if self._warnings else "")
        self.status.setText(f"{n} found: {clicked} clicked + {n - clicked} similar, "
                            f"{seconds:.1f} s{negatives_summary(result.record)}{warned}")
        note = background_note(result)
        if note is not None:
            show_info(note)
        if self._clicks is not None and self._clicks in self.viewer.layers:
            self.viewer.layers.selection.active = self._clicks  # ready for more clicks

    def _show_labels(self, result: SegmentationResult, scale: tuple, translate: tuple) -> None:
        labels = np.asarray(result.labels)
        layer = self.labels_layer
        if layer is None or layer not in self.viewer.layers:
            layer = self.viewer.add_labels(labels, name=LABELS_NAME, scale=scale,
                                           translate=translate, opacity=0.5,
                                           units=_units(self._source))
            self.labels_layer = layer
        else:
            layer.scale, layer.translate = scale, translate
            layer.data = labels
        self._full_labels = labels

    def _show_picks(self, result: SegmentationResult, scale: tuple, translate: tuple) -> None:
        features = {"score": result.pick_scores, "instance_id": result.pick_instance_ids,
                    "prompt": result.pick_is_prompt, "similarity": result.pick_similarity,
                    "confidence": result.pick_confidence, "n_voxels": result.pick_n_voxels}
        layer = self.picks_layer
        if layer is not None and layer in self.viewer.layers:
            self.viewer.layers.remove(layer)
        kwargs = points_kwargs(PICKS_NAME, scale, features, pick_size(result.pick_n_voxels))
        self.picks_layer = self.viewer.add_points(result.picks_zyx, ndim=3, translate=translate,
                                                  units=_units(self._source), **kwargs)
        with contextlib.suppress(ValueError):  # napari >= 0.9: rings shrink off their centre
            self.picks_layer.projection_mode = "rescale_spherical"
        self._refresh_layers()

    def _apply_filter(self, *_: Any) -> None:
        """Show only the picks at or above the slider's score now, their labels shortly
        after the slider stops (relabelling a large volume takes a moment)."""
        threshold = self.min_score
        result = self.result
        if result is None:
            self.score_label.setText(f"min score {threshold:.3f}")
            return
        keep = kept_picks(result, threshold)
        if self.picks_layer is not None and self.picks_layer in self.viewer.layers:
            self.picks_layer.shown = keep
            self.picks_layer.refresh()
        self.score_label.setText(f"min score {threshold:.3f}: {int(keep.sum())} of "
                                 f"{len(keep)} picks shown")
        self._labels_timer.start()

    def _filter_labels(self) -> None:
        """Blank the labels of the instances the score filter hides."""
        layer, full, result = self.labels_layer, self._full_labels, self.result
        if layer is None or full is None or result is None or layer not in self.viewer.layers:
            return
        hidden = hidden_labels(result, self.min_score)
        if len(hidden):
            lut = np.arange(len(result.instances) + 1, dtype=full.dtype)
            lut[hidden] = 0
            layer.data = lut[full]
        elif layer.data is not full:
            layer.data = full


def _units(image: Image | None) -> tuple:
    """The tomogram layer's units (Å when it has a voxel size), for the layers cryosam puts
    on it: napari warns when layers' units differ."""
    return tuple(image.units)[-3:] if image is not None else ("pixel",) * 3


def _voxels(image: Image, layer: Points) -> np.ndarray:
    """A points layer's points as (z, y, x) voxels of ``image`` (the layers may differ in
    scale and translation); a layer of fewer than three dimensions is refused in one line."""
    if layer.ndim < 3:
        raise CryosamError(f"layer {layer.name!r} holds {layer.ndim}-D points; click on the "
                           "tomogram in a 3-D points layer (New clicks layer)")
    world = [layer.data_to_world(p) for p in np.asarray(layer.data)]
    return np.array([image.world_to_data(w)[-3:] for w in world], dtype=float).reshape(-1, 3)
