"""The napari plugin: reader, manifest and the dock widget, driven headless with napari's own
``make_napari_viewer`` fixture (pytest-qt) on a virtual X display (pytest-xvfb + Xvfb).

Skipped, with the reason, where napari or its test plugins are not installed
(``pip install -e ".[napari-test]"``) or where Qt/OpenGL cannot start (no Xvfb or Qt's system
libraries: ``.ci/run`` installs them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

INSTALL = "pip install -e '.[napari-test]'"
pytest.importorskip("napari", reason=f"napari is not installed ({INSTALL})")
pytest.importorskip("pytestqt", reason=f"pytest-qt is not installed ({INSTALL})")

_PROBE = """
from qtpy.QtGui import QOpenGLContext
from qtpy.QtWidgets import QApplication
app = QApplication([])
raise SystemExit(0 if QOpenGLContext().create() else 3)
"""


def _display_problem() -> str | None:
    """Why napari's Qt/OpenGL canvas cannot start here, probed in a child process (a Qt
    platform plugin that fails to load aborts its process), or None when it can."""
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY")
                                                 or os.environ.get("WAYLAND_DISPLAY")):
        return ("no display for napari's OpenGL canvas: install Xvfb (apt-get install xvfb, "
                "as .ci/run does) and pytest-xvfb starts one")
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                              timeout=120)
    except subprocess.TimeoutExpired:
        return "Qt did not start within 120 s"
    if proc.returncode:
        lines = proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"]
        return (f"Qt/OpenGL cannot start here ({lines[-1]}); install Qt's system libraries "
                "as .ci/run does")
    return None


_problem = _display_problem()
if _problem:
    pytest.skip(_problem, allow_module_level=True)

from qtpy.QtCore import Qt  # noqa: E402
from qtpy.QtWidgets import QFileDialog  # noqa: E402

from cryosam import io  # noqa: E402
from cryosam.napari._reader import get_reader  # noqa: E402
from cryosam.napari._results import starting_score  # noqa: E402
from cryosam.napari._widget import (  # noqa: E402
    LABELS_NAME,
    PICKS_NAME,
    SLIDER_STEPS,
    CryosamWidget,
)

WAIT_MS = 120_000


@pytest.fixture(scope="module")
def sim():
    from cryosam.simulate import SimulationConfig, simulate

    return simulate(SimulationConfig(shape=(40, 96, 112), seed=3))


def _widget(viewer, sim) -> tuple[CryosamWidget, object]:
    vs = float(sim.voxel_size)
    image = viewer.add_image(sim.volume, name="tomo", scale=(vs, vs, vs))
    widget = CryosamWidget(viewer)
    viewer.window.add_dock_widget(widget, name="cryosam")
    widget.encoder_box.setCurrentText("filterbank")
    widget.segmenter_box.setCurrentText("threshold")
    widget.device_box.setCurrentText("cpu")
    return widget, image


def _labels_in(layer) -> set[int]:
    return set(np.unique(np.asarray(layer.data)).tolist()) - {0}


def _press(qtbot, widget: CryosamWidget, button) -> None:
    qtbot.mouseClick(button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT_MS)


def test_widget_segments_finds_similar_filters_and_saves(
        make_napari_viewer, qtbot, sim, tmp_path, one_thread, monkeypatch) -> None:
    viewer = make_napari_viewer()
    widget, image = _widget(viewer, sim)
    clicks = widget.add_clicks_layer()
    click = sim.prompt_points[0]
    clicks.add(click)  # same scale as the image: data coordinates are voxels

    _press(qtbot, widget, widget.segment_button)
    assert widget.result is not None, widget.status.text()
    assert len(widget.result.instances) == 1
    labels = viewer.layers[LABELS_NAME]
    assert _labels_in(labels) == {1}
    assert labels.data[tuple(np.round(click).astype(int))] == 1
    assert tuple(labels.scale) == tuple(image.scale)
    assert len(viewer.layers[PICKS_NAME].data) == 1

    widget.tolerance_box.setValue(0.01)  # stricter on look-alikes; reaches the run's record
    _press(qtbot, widget, widget.similar_button)
    result = widget.result
    n = len(result.instances)
    assert n > 1, widget.status.text()
    assert _labels_in(labels) == set(range(1, n + 1))
    picks = viewer.layers[PICKS_NAME]
    assert len(picks.data) == n
    np.testing.assert_allclose(picks.features["score"], result.pick_scores)
    assert list(Path(widget.cache_dir).glob("features-*.pt")), "features are cached"

    # the slider starts at the automatic cut; every match was kept, so it can go lower
    matched = result.pick_scores[~result.pick_is_prompt]
    cut = result.record["score"]["cut"]
    assert cut["method"] == "given" and cut["threshold"] == 0.0  # the widget keeps them all
    assert widget.min_score == pytest.approx(starting_score(result), abs=1e-3)
    widget.score_slider.setValue(0)
    assert int(picks.shown.sum()) == n
    widget.score_slider.setValue(int(np.floor(matched.min() * SLIDER_STEPS)) + 1)  # hides one
    shown = int(picks.shown.sum())
    assert 1 <= shown < n
    assert f"{shown} of {n} picks shown" in widget.score_label.text()
    qtbot.waitUntil(lambda: len(_labels_in(labels)) == shown, timeout=5000)

    out = tmp_path / "out"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(out), ""))
    _press(qtbot, widget, widget.save_button)
    assert str(out) in widget.status.text()
    for name in ("picks.csv", "picks_napari.csv", "instances.mrc", "run.json"):
        assert (out / name).is_file(), name
    assert len(io.read_points(out / "picks.csv")) == shown
    assert int(io.read_tomogram(out / "instances.mrc").data.max()) == shown
    record = json.loads((out / "run.json").read_text())
    assert record["napari_filter"]["kept"] == shown
    assert record["parameters"]["score"]["density_tolerance"] == pytest.approx(0.01)
    assert record["score"]["cut"]["method"] == "napari score filter"
    assert len(io.read_points(out / "picks_below_cut.csv")) == n - shown  # what it hid

    # napari's own CSV reader takes score and instance_id as point properties
    [layer] = viewer.open(out / "picks_napari.csv", plugin="napari", layer_type="points")
    assert len(layer.data) == shown
    assert {"score", "instance_id"} <= set(layer.properties)
    kept = result.pick_instance_ids[picks.shown]
    np.testing.assert_array_equal(np.sort(layer.properties["instance_id"]),
                                  np.arange(1, len(kept) + 1))


def test_widget_saves_a_query_and_picks_with_it(make_napari_viewer, qtbot, sim, tmp_path,
                                                one_thread, monkeypatch) -> None:
    """Save query… writes the clicks' query as cryosam query would; Pick with query… picks
    with it in a tomogram without clicks, as cryosam segment --query does."""
    from cryosam.query import SavedQuery

    viewer = make_napari_viewer()
    widget, _ = _widget(viewer, sim)
    widget.add_clicks_layer().add(sim.prompt_points[0])
    path = tmp_path / "tomo.cryosam-query"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(path), ""))
    _press(qtbot, widget, widget.save_query_button)
    assert path.is_file() and str(path) in widget.status.text(), widget.status.text()
    saved = SavedQuery.load(path)
    assert saved.parameters["encoder"]["name"] == "filterbank"
    assert saved.parameters["score"]["min_score"] is None  # the slider's keep-all stays here

    other = viewer.add_image(sim.volume.copy(), name="another tomo",
                             scale=tuple(viewer.layers["tomo"].scale))
    widget.image_box.setCurrentText(other.name)
    monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a, **k: (str(path), ""))
    _press(qtbot, widget, widget.query_button)
    result = widget.result
    assert result is not None, widget.status.text()
    assert result.record["query"]["sha256"] == saved.meta["sha256"]
    assert not result.pick_is_prompt.any() and len(result.picks_zyx) > 1
    assert len(viewer.layers[PICKS_NAME].data) == len(result.picks_zyx)
    truth = sim.points(sim.target_kind)
    from cryosam.metrics import evaluate_picks

    shown = result.picks_zyx[viewer.layers[PICKS_NAME].shown]  # above the automatic cut
    assert evaluate_picks(shown, truth, sim.target_radius).recall >= 0.5

    # the contrast the other way round: the query's warning reaches the status line, and
    # the Polarity box does what it says
    inverted = viewer.add_image(-sim.volume, name="inverted",
                                scale=tuple(viewer.layers["tomo"].scale))
    widget.image_box.setCurrentText(inverted.name)
    _press(qtbot, widget, widget.query_button)
    assert "warning(s)" in widget.status.text() and "looks bright" in widget.status.text()
    widget.polarity_box.setCurrentText("bright")
    _press(qtbot, widget, widget.query_button)
    assert "warning" not in widget.status.text(), widget.status.text()
    assert widget.result.record["parameters"]["polarity"] == "bright"
    shown = widget.result.picks_zyx[viewer.layers[PICKS_NAME].shown]
    assert evaluate_picks(shown, truth, sim.target_radius).recall >= 0.5
    monkeypatch.setattr(QFileDialog, "getOpenFileName",  # not a query: one line, its name
                        lambda *a, **k: (str(tmp_path / "junk.cryosam-query"), ""))
    (tmp_path / "junk.cryosam-query").write_text("x,y,z\n")
    _press(qtbot, widget, widget.query_button)
    assert widget.status.text().startswith(f"Error: {tmp_path / 'junk.cryosam-query'}: not a")
    assert "Save query…" in widget.status.text()


def test_widget_membranes_and_binning(make_napari_viewer, qtbot, sim, tmp_path, one_thread,
                                     monkeypatch) -> None:
    """Target membranes follows the vesicle from three clicks on it (no picks, no score
    filter) and refuses to save a query; the Binning box is the run's --binning."""
    from cryosam.metrics import dice

    viewer = make_napari_viewer()
    widget, _ = _widget(viewer, sim)
    widget.target_box.setCurrentText("membranes")
    clicks = widget.add_clicks_layer()
    for point in sim.membrane_clicks[:3]:
        clicks.add(point)
    _press(qtbot, widget, widget.segment_button)
    result = widget.result
    assert result is not None, widget.status.text()
    assert result.record["parameters"]["propagation"]["target"] == "membrane"
    assert len(result.picks_zyx) == 0 and not widget.score_slider.isEnabled()
    assert dice(np.asarray(viewer.layers[LABELS_NAME].data) > 0, sim.membrane) > 0.5
    path = tmp_path / "membrane.cryosam-query"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(path), ""))
    _press(qtbot, widget, widget.save_query_button)
    assert not path.exists()
    assert "set Target to particles" in widget.status.text(), widget.status.text()

    widget.target_box.setCurrentText("particles")
    widget.binning_box.setCurrentText("2")
    clicks.data = sim.prompt_points[:1]
    _press(qtbot, widget, widget.segment_button)
    record = widget.result.record
    assert widget.score_slider.isEnabled()
    assert record["parameters"]["binning"] == 2 and record["work"]["binning"] == 2
    assert widget.result.labels.shape == sim.volume.shape  # on the tomogram's own voxels


def test_widget_negative_clicks_drop_what_they_name(make_napari_viewer, qtbot, sim,
                                                    one_thread) -> None:
    """A negative click on a filament drops the look-alike matches and keeps every target
    pick; one on a picked particle removes that pick; the status line says what they did;
    Segment clicks ignores negative clicks."""
    from cryosam.simulate import FILAMENT_KIND

    viewer = make_napari_viewer()
    widget, _ = _widget(viewer, sim)
    widget.add_clicks_layer().add(sim.prompt_points[0])
    _press(qtbot, widget, widget.similar_button)
    first = widget.result
    assert first is not None and "negatives" not in first.record, widget.status.text()
    targets = sim.points(sim.target_kind)

    def on_targets(zyx: np.ndarray) -> int:
        return int(sum(np.linalg.norm(targets - p, axis=1).min() < 3.0 for p in zyx))

    negatives = widget.add_negatives_layer()
    assert widget.negatives_box.currentText() == negatives.name
    assert widget.points_box.currentText() != negatives.name
    filament = next(p for p in sim.particles if p.kind == FILAMENT_KIND)
    negatives.add(np.array(filament.zyx))
    _press(qtbot, widget, widget.similar_button)
    second = widget.result
    report = second.record["negatives"]
    assert report["clicks"] == report["masks"] == 1, widget.status.text()
    assert sum(report["dropped"].values()) >= 1
    assert f"dropped {sum(report['dropped'].values())} candidate match(es)" \
        in widget.status.text()
    assert len(second.picks_zyx) < len(first.picks_zyx)
    assert on_targets(second.picks_zyx) == on_targets(first.picks_zyx) >= 2

    named = first.picks_zyx[~first.pick_is_prompt][0]
    negatives.data = np.array([named])
    _press(qtbot, widget, widget.similar_button)
    assert np.linalg.norm(widget.result.picks_zyx - named, axis=1).min() > 2.0

    negatives.add(np.array([0.0, 0.0, 1e6]))  # Segment clicks does not even look at them
    _press(qtbot, widget, widget.segment_button)
    assert "negatives" not in widget.result.record, widget.status.text()
    assert len(widget.result.instances) == 1


def test_widget_from_manifest_reports_bad_input(make_napari_viewer, qtbot, sim,
                                                monkeypatch) -> None:
    viewer = make_napari_viewer()
    vs = float(sim.voxel_size)
    image = viewer.add_image(sim.volume, name="tomo", scale=(vs, vs, vs))
    _, widget = viewer.window.add_plugin_dock_widget("cryosam", "Segment particles")
    assert isinstance(widget, CryosamWidget)
    widget.add_clicks_layer()
    widget.segment_clicks()  # no clicks yet: a message, no traceback, no worker
    assert not widget.busy
    assert "has no points" in widget.status.text()

    # clicks in another layer's coordinates (scale 1, Å) map onto the image's voxels
    world = sim.prompt_points[:2] * vs
    viewer.add_points(world, name="clicks in Å")
    widget.points_box.setCurrentText("clicks in Å")
    _, _, zyx, negatives = widget._inputs()
    np.testing.assert_allclose(zyx, sim.prompt_points[:2], atol=1e-6)
    assert negatives is None  # no negative-clicks layer chosen
    widget.negatives_box.setCurrentText("clicks in Å")  # the same layer for both: refused
    widget.find_similar()
    assert not widget.busy and "both the clicks and the negative clicks" in widget.status.text()
    widget.negatives_box.setCurrentText("(none)")
    viewer.add_points(np.array([[40.0, 50.0]]), name="flat")  # 2-D points: refused
    widget.points_box.setCurrentText("flat")
    widget.find_similar()
    assert not widget.busy and "holds 2-D points" in widget.status.text()
    widget.points_box.setCurrentText("clicks in Å")
    viewer.layers["clicks in Å"].add(np.array([0.0, 0.0, 1e6]))
    widget.find_similar()
    assert not widget.busy
    assert "outside the tomogram" in widget.status.text()
    assert image.name == widget.image_box.currentText()

    # an unexpected failure in the worker: one line in the widget and a notification
    class Broken:
        def segment(self, *args, **kwargs):
            raise RuntimeError("boom")

    viewer.layers["clicks in Å"].selected_data = {2}
    viewer.layers["clicks in Å"].remove_selected()
    monkeypatch.setattr(widget, "_model", lambda: Broken())
    widget.segment_clicks()
    qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT_MS)
    assert "cryosam failed: RuntimeError: boom" in widget.status.text()


def test_reader_opens_mrc_and_output_folder(make_napari_viewer, sim, tmp_path) -> None:
    from cryosam.config import CryosamConfig, EncoderConfig, SegmenterConfig
    from cryosam.export import write_outputs
    from cryosam.pipeline import CryoSAM

    vs = float(sim.voxel_size)
    tomo_path = tmp_path / "TS_01.mrc"
    io.write_mrc(tomo_path, sim.volume, voxel_size=vs)
    assert get_reader(str(tmp_path / "notes.txt")) is None
    assert get_reader(str(tmp_path)) is None  # a folder without run.json

    viewer = make_napari_viewer()
    [image] = viewer.open(tomo_path, plugin="cryosam")
    assert image.data.shape == sim.volume.shape
    np.testing.assert_allclose(image.scale, (vs, vs, vs), rtol=1e-5)

    cfg = CryosamConfig(encoder=EncoderConfig(name="filterbank"),
                        segmenter=SegmenterConfig(name="threshold"), device="cpu")
    result = CryoSAM(cfg).segment(tomo_path, sim.prompt_points[:2], match=False)
    out = tmp_path / "TS_01_cryosam"
    write_outputs(result, out, preview=False)
    layers = viewer.open(out, plugin="cryosam")
    kinds = {type(ly).__name__: ly for ly in layers}
    assert set(kinds) == {"Image", "Labels", "Points"}
    for layer in layers:
        np.testing.assert_allclose(layer.scale, (vs, vs, vs), rtol=1e-5)
    np.testing.assert_array_equal(kinds["Labels"].data, result.labels)
    np.testing.assert_allclose(kinds["Points"].data, result.picks_zyx, atol=1e-3)
    np.testing.assert_allclose(kinds["Points"].features["score"], result.pick_scores,
                               atol=1e-5)
    # a run that picked nothing still opens: its picks layer is empty
    header = (out / "picks.csv").read_text().splitlines()[0]
    (out / "picks.csv").write_text(header + "\n")
    layers = viewer.open(out, plugin="cryosam")
    points = next(ly for ly in layers if type(ly).__name__ == "Points")
    assert len(points.data) == 0


_AFTER_THE_VIEWER = """
import sys
import napari
from cryosam.napari._triton import mesa_opengl
from cryosam.napari._widget import CryosamWidget
viewer = napari.Viewer(show=False)
CryosamWidget(viewer)
print("mesa", mesa_opengl(), "hidden", "triton" in sys.modules and sys.modules["triton"] is None)
import torch
from transformers import Dinov2Config, Dinov2Model
model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64, image_size=28, patch_size=14))
print("ran", tuple(model(torch.zeros(1, 3, 28, 28)).last_hidden_state.shape))
viewer.close()
"""


def test_dinov2_loads_after_the_viewer_is_open() -> None:
    """The widget's order of events in a fresh process: napari's OpenGL canvas first, then
    transformers (which imports torch._dynamo and, with it, triton). Under Mesa's OpenGL that
    import crashed the process; the widget now keeps triton out before any model is built."""
    pytest.importorskip("transformers", reason="transformers is not installed")
    proc = subprocess.run([sys.executable, "-c", _AFTER_THE_VIEWER], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert "ran (1, 5, 32)" in proc.stdout
    if "mesa True" in proc.stdout:
        assert "hidden True" in proc.stdout
