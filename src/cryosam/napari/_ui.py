"""The dock widget's controls and their layout (what :class:`CryosamWidget` shows), kept
apart from what the widget does with them."""

from __future__ import annotations

from typing import Any

from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSlider,
    QVBoxLayout,
)

from cryosam import backends
from cryosam.config import ScoreConfig
from cryosam.napari._jobs import default_backends

SLIDER_STEPS = 1000  # score filter resolution: 0.001
TARGET_CHOICES = {"particles": "particle", "membranes": "membrane"}  # shown: --target


def build_ui(w: Any) -> None:
    """Create the controls of the widget ``w`` (a :class:`CryosamWidget`) as its attributes,
    connect them to its methods and lay them out."""
    w.image_box = QComboBox()
    w.points_box = QComboBox()
    w.new_clicks_button = QPushButton("New clicks layer")
    w.new_clicks_button.setToolTip("Add an empty points layer in add mode on the image")
    w.new_clicks_button.clicked.connect(w.add_clicks_layer)
    w.negatives_box = QComboBox()
    w.negatives_box.setToolTip("Clicks on structures that must not be picked (Find "
                               "similar drops matches more like them than like the "
                               "clicks); optional")
    w.new_negatives_button = QPushButton("New negative clicks layer")
    w.new_negatives_button.setToolTip("Add an empty points layer for clicks on "
                                      "look-alikes that must not be picked")
    w.new_negatives_button.clicked.connect(w.add_negatives_layer)
    encoder, segmenter, why = default_backends()
    w.encoder_box = QComboBox()
    w.encoder_box.addItems(list(backends.names("encoder")))
    w.encoder_box.setCurrentText(encoder)
    w.segmenter_box = QComboBox()
    w.segmenter_box.addItems(list(backends.names("segmenter")))
    w.segmenter_box.setCurrentText(segmenter)
    w.polarity_box = QComboBox()
    w.polarity_box.addItems(["auto", "dark", "bright"])
    w.polarity_box.setToolTip("Particles darker (dark) or brighter than their surroundings "
                              "(--polarity); auto: from the clicks, or the saved query's")
    w.target_box = QComboBox()
    w.target_box.addItems(list(TARGET_CHOICES))
    w.target_box.setToolTip("What the clicks are on (--target): membranes follow the "
                            "bilayer from a few clicks on it (Segment clicks; Find similar "
                            "also looks for other sheets), with no picks")
    w.binning_box = QComboBox()
    w.binning_box.addItems(["auto", "1", "2", "3", "4"])
    w.binning_box.setToolTip("Work on a copy binned N times (--binning); auto: from the "
                             "clicked particle's size (1: never). Masks and picks are always "
                             "on the tomogram's own voxels")
    w.device_box = QComboBox()
    w.device_box.addItems(["auto", "cpu", "cuda"])
    for box, tip in ((w.encoder_box, "feature encoder (Find similar)"),
                     (w.segmenter_box, "2-D promptable segmenter"),
                     (w.device_box, "auto = CUDA when available")):
        box.setToolTip(f"{tip}; default: {why}")
    w.tolerance_box = QDoubleSpinBox()
    w.tolerance_box.setDecimals(3)
    w.tolerance_box.setRange(0.001, 0.2)
    w.tolerance_box.setSingleStep(0.001)
    w.tolerance_box.setValue(ScoreConfig.density_tolerance)
    w.tolerance_box.setToolTip("Density tolerance (cryosam segment --density-tolerance): "
                               "smaller is stricter on look-alikes of the clicked size "
                               "(README: crowded tomograms), at some recall elsewhere")

    w.settings = (w.encoder_box, w.segmenter_box, w.device_box, w.target_box,
                  w.polarity_box, w.binning_box, w.tolerance_box)  # fixed while it works

    w.segment_button = QPushButton("Segment clicks")
    w.segment_button.setToolTip("3-D masks of the clicked particles only (seconds)")
    w.segment_button.clicked.connect(w.segment_clicks)
    w.similar_button = QPushButton("Find similar")
    w.similar_button.setToolTip("The whole pipeline: features, matching, masks of "
                                "every similar particle (features are cached)")
    w.similar_button.clicked.connect(w.find_similar)
    w.save_query_button = QPushButton("Save query…")
    w.save_query_button.setToolTip("Save what matching needs from the clicks, to pick "
                                   "in other tomograms (cryosam segment/batch --query)")
    w.save_query_button.clicked.connect(lambda: w.save_query())
    w.query_button = QPushButton("Pick with query…")
    w.query_button.setToolTip("Every particle like a saved query's in this tomogram "
                              "(its own parameters; no clicks needed)")
    w.query_button.clicked.connect(lambda: w.pick_with_query())
    w.progress = QProgressBar()
    w.progress.setRange(0, 0)  # busy indicator: the pipeline has no fixed step count
    w.progress.setVisible(False)
    w.status = QLabel(f"Backends: {why}.")
    w.status.setWordWrap(True)

    w.score_slider = QSlider(Qt.Orientation.Horizontal)
    w.score_slider.setRange(0, SLIDER_STEPS)
    w.score_slider.setEnabled(False)
    w.score_slider.setToolTip("Hide picks whose score (similarity above the "
                              "threshold × confidence × agreement; starts at the "
                              "automatic cut) is "
                              "below this; clicked particles always stay")
    w.score_slider.valueChanged.connect(w._apply_filter)
    w.score_label = QLabel("min score 0.000")
    w.save_button = QPushButton("Save…")
    w.save_button.setToolTip("Write picks, masks, preview and run.json of the picks "
                             "kept by the score filter")
    w.save_button.setEnabled(False)
    w.save_button.clicked.connect(lambda: w.save())
    w._tick = QTimer(w)
    w._tick.setInterval(500)
    w._tick.timeout.connect(w._show_elapsed)
    w._labels_timer = QTimer(w)
    w._labels_timer.setSingleShot(True)
    w._labels_timer.setInterval(150)
    w._labels_timer.timeout.connect(w._filter_labels)

    form = QFormLayout()
    for label, control in (("Tomogram", w.image_box), ("Clicks", w.points_box),
                           ("", w.new_clicks_button), ("Negative clicks", w.negatives_box),
                           ("", w.new_negatives_button), ("Encoder", w.encoder_box),
                           ("Segmenter", w.segmenter_box), ("Device", w.device_box),
                           ("Target", w.target_box), ("Polarity", w.polarity_box),
                           ("Binning", w.binning_box), ("Density tolerance", w.tolerance_box)):
        form.addRow(label, control)
    buttons = QHBoxLayout()
    buttons.addWidget(w.segment_button)
    buttons.addWidget(w.similar_button)
    queries = QHBoxLayout()
    queries.addWidget(w.save_query_button)
    queries.addWidget(w.query_button)
    layout = QVBoxLayout(w)
    layout.addLayout(form)
    layout.addLayout(buttons)
    layout.addLayout(queries)
    layout.addWidget(w.progress)
    layout.addWidget(w.status)
    layout.addWidget(QLabel("Score filter"))
    layout.addWidget(w.score_slider)
    layout.addWidget(w.score_label)
    layout.addWidget(w.save_button)
    layout.addStretch(1)
