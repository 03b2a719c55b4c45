"""The pick score (agreement with the clicked particles), the automatic cut, what is written
above and below it, and negative clicks."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest

from cryosam.config import CryosamConfig, ScoreConfig
from cryosam.cut import FLOOR, automatic_cut, otsu
from cryosam.errors import CryosamWarning, InputError
from cryosam.export import write_outputs
from cryosam.instance_mask import InstanceMask
from cryosam.io import PointSet, negative_rows
from cryosam.pipeline import CryoSAM
from cryosam.score import OUTSIDE, describe, learn_references, principal_log_axes

FAST = ("--encoder", "filterbank", "--segmenter", "threshold", "--device", "cpu")


def _ellipsoid(radii: tuple[float, float, float], size: int = 31) -> np.ndarray:
    g = np.indices((size,) * 3) - size // 2
    return sum((g[i] / radii[i]) ** 2 for i in range(3)) <= 1.0


def _mask(dense: np.ndarray, offset=(0, 0, 0)) -> InstanceMask:
    m = InstanceMask.from_dense(dense)
    return InstanceMask(tuple(int(a + b) for a, b in zip(m.offset, offset, strict=True)),
                        m.mask)


# ------------------------------------------------------------------------- agreement


def test_shape_description_tells_round_from_elongated() -> None:
    ball = principal_log_axes(_mask(_ellipsoid((6, 6, 6))))
    rod = principal_log_axes(_mask(_ellipsoid((12, 4, 4))))
    assert np.allclose(ball, 0.0, atol=0.05)
    assert rod[0] < math.log(0.5) and rod[1] < math.log(0.5)


def _scene() -> tuple[np.ndarray, dict[str, list[tuple[int, int, int]]]]:
    """Dark balls, dark hollow shells and dark dumbbells of one size on noise."""
    rng = np.random.default_rng(0)
    vol = rng.normal(0, 0.3, (48, 96, 96)).astype(np.float32)
    g = np.indices((17, 17, 17)) - 8
    r = np.sqrt((g**2).sum(0))
    shapes = {"ball": r <= 6, "shell": (r <= 6.5) & (r >= 4.5),
              "dumbbell": (np.sqrt(((g - [[[[0]]], [[[0]]], [[[3]]]]) ** 2).sum(0)) <= 4)
              | (np.sqrt(((g + [[[[0]]], [[[0]]], [[[3]]]]) ** 2).sum(0)) <= 4)}
    centres: dict[str, list[tuple[int, int, int]]] = {k: [] for k in shapes}
    for i, (z, y) in enumerate([(12, 12), (12, 36), (12, 60), (12, 84), (36, 12), (36, 36),
                                (36, 60), (36, 84), (24, 48)]):
        kind = list(shapes)[i % 3]
        x = 20 + 28 * (i % 3)
        vol[z - 8:z + 9, y - 8:y + 9, x - 8:x + 9][shapes[kind]] -= 1.0
        centres[kind].append((z, y, x))
    return vol, centres


_G = np.indices((17, 17, 17)) - 8
_BALL = np.sqrt((_G**2).sum(0)) <= 6


def _ball_at(c) -> InstanceMask:  # noqa: ANN001
    """The same ball mask centred at ``c``, whatever the kind there: only the density
    can then tell the kinds apart."""
    return InstanceMask(tuple(int(v) - 8 for v in c), _BALL)


def test_density_agreement_ranks_the_clicked_kind_first() -> None:
    """One click on a ball: other balls agree better than shells or dumbbells of its size."""
    vol, centres = _scene()
    refs = learn_references([_ball_at(centres["ball"][0])], vol, ScoreConfig())
    assert refs is not None
    agree = {kind: [refs.agreement(describe(_ball_at(c), vol, refs.reach))[1]["density"]
                    for c in cs[1:]] for kind, cs in centres.items()}
    # size and shape are identical here: only the density can tell them apart
    assert min(agree["ball"]) > max(agree["shell"] + agree["dumbbell"]), agree


def test_density_tolerance_sets_what_a_look_alike_loses() -> None:
    """Density correlations of compact particles all sit near 1; the tolerance turns the
    small gap between the clicked kind and a look-alike into a factor that counts in the
    score, and a wider tolerance forgives more."""
    vol, centres = _scene()

    def worst_ratio(tolerance: float) -> float:  # best look-alike over the worst ball
        refs = learn_references([_ball_at(centres["ball"][0])], vol,
                                ScoreConfig(density_tolerance=tolerance))
        assert refs is not None
        d = {kind: [refs.agreement(describe(_ball_at(c), vol, refs.reach))[1]["density"]
                    for c in cs[1:]] for kind, cs in centres.items()}
        return max(d["shell"] + d["dumbbell"]) / min(d["ball"])

    assert worst_ratio(0.03) < 0.5  # a look-alike loses at least half its score
    assert worst_ratio(0.03) < worst_ratio(0.3) < 1.0
    with pytest.raises(InputError, match="density_tolerance"):
        ScoreConfig(density_tolerance=0.0)


def test_three_clicks_set_the_range_of_their_kinds_density() -> None:
    """Three clicks on balls: a ball is inside their own density range, shells and
    dumbbells of the same size are outside it (their density agreement drops by OUTSIDE);
    fewer clicks, or a range of 0, set no limit."""
    vol, centres = _scene()
    clicks = [_ball_at(c) for c in centres["ball"]]
    refs = learn_references(clicks, vol, ScoreConfig())
    assert refs is not None and refs.density_limit is not None
    assert refs.stats["density_limit"] == pytest.approx(refs.density_limit, abs=1e-5)
    dens = {kind: [refs.agreement(describe(_ball_at(c), vol, refs.reach))[1]["density"]
                   for c in cs] for kind, cs in centres.items()}
    assert min(dens["ball"]) > 0.1
    assert max(dens["shell"] + dens["dumbbell"]) < OUTSIDE
    assert learn_references(clicks[:2], vol, ScoreConfig()).density_limit is None
    assert learn_references(clicks, vol, ScoreConfig(density_range=0)).density_limit is None


def test_three_negative_clicks_set_their_own_density_range() -> None:
    """Negative clicks are learned like clicks: three on shells set the shells' density
    range, so a shell agrees with them (and is dropped: against > agreement) while balls and
    dumbbells lie outside it, their agreement with the negatives OUTSIDE times lower."""
    vol, centres = _scene()
    positive = learn_references([_ball_at(centres["ball"][0])], vol, ScoreConfig())
    assert positive is not None and positive.density_limit is None  # one click: no range
    shells = [_ball_at(c) for c in centres["shell"]]
    ranged = learn_references(shells, vol, ScoreConfig(), reach=positive.reach)
    plain = learn_references(shells, vol, ScoreConfig(density_range=0), reach=positive.reach)
    assert ranged is not None and plain is not None and ranged.density_limit is not None
    for kind, cs in centres.items():
        for c in cs:
            d = describe(_ball_at(c), vol, positive.reach)
            agreement, against = positive.agreement(d)[0], ranged.agreement(d)[0]
            assert (against > agreement) == (kind == "shell"), kind
            if kind != "shell":
                assert against == pytest.approx(plain.agreement(d)[0] * OUTSIDE, rel=1e-3)


def test_size_tolerance_is_learned_from_several_clicks() -> None:
    small, big = _mask(_ellipsoid((4, 4, 4))), _mask(_ellipsoid((7, 7, 7)))
    cfg = ScoreConfig(size_tolerance=0.1)
    one = learn_references([small], None, cfg)
    three = learn_references([small, big, _mask(_ellipsoid((5.5, 5.5, 5.5)))], None, cfg)
    assert one is not None and three is not None
    assert one.size_sigma == pytest.approx(0.1)
    assert three.size_sigma > 0.5  # their own spread, wider than the configured floor
    mid = describe(_mask(_ellipsoid((5, 5, 5))), None, 1.0)
    assert three.agreement(mid)[1]["size"] > one.agreement(mid)[1]["size"]
    assert learn_references([InstanceMask((0, 0, 0), np.zeros((2, 2, 2), bool))], None,
                            cfg) is None


# ------------------------------------------------------------------------- the cut


def test_automatic_cut_separates_two_groups() -> None:
    rng = np.random.default_rng(1)
    good = np.exp(rng.normal(math.log(0.3), 0.5, 20))
    junk = np.exp(rng.normal(math.log(0.003), 0.6, 60))
    cut = automatic_cut(np.concatenate([good, junk]))
    assert cut.method == "widest gap" and cut.separation > 3
    assert (good >= cut.threshold).mean() >= 0.95
    assert (junk >= cut.threshold).mean() <= 0.05


def test_one_group_or_few_matches_keep_all_above_the_floor() -> None:
    rng = np.random.default_rng(2)
    one = np.exp(rng.normal(math.log(0.3), 0.3, 40))
    assert automatic_cut(one).method == "one group"
    assert automatic_cut(one).threshold == FLOOR
    assert automatic_cut(np.array([0.5, 0.2])).method == "few matches"
    assert otsu(np.array([1.0, 1.1, 5.0, 5.2])) == pytest.approx(3.05)


# ------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def scored_run(small_sim, weight_free):
    sim, files = small_sim
    return CryoSAM(weight_free).segment(files["tomo.mrc"], files["prompt.csv"])


def test_written_picks_are_the_ones_at_or_above_the_cut(scored_run, tmp_path: Path) -> None:
    res = scored_run
    cut = res.record["score"]["cut"]
    assert cut["method"] in ("widest gap", "one group", "few matches")
    matches = ~res.pick_is_prompt
    assert (res.pick_scores[matches] >= cut["threshold"]).all()
    assert all(i.score < cut["threshold"] for i in res.below_cut)
    assert res.record["score"]["above_cut"] == int(matches.sum())
    assert res.record["score"]["below_cut"] == len(res.below_cut)
    # the label volume holds exactly the written picks
    assert int(res.labels.max()) == len(res.instances)
    found = res.pick_scores[~res.pick_is_prompt]  # the matches, after the clicks
    assert list(found) == sorted(found, reverse=True)
    out = tmp_path / "o"
    written = write_outputs(res, out, preview=False)
    if res.below_cut:
        rows = list(csv.DictReader(open(written["picks_below_cut.csv"])))
        assert len(rows) == len(res.below_cut)
        scores = [float(r["score"]) for r in rows]
        assert scores == sorted(scores, reverse=True) and max(scores) < cut["threshold"]
        head = open(written["picks.csv"]).readline()
        assert open(written["picks_below_cut.csv"]).readline() == head  # one header for both
        assert all(r["instance_id"] == "0" and r["prompt"] == "0" for r in rows)
    picks = list(csv.DictReader(open(written["picks.csv"])))
    assert len(picks) == len(res.picks_zyx) and "agreement" in picks[0]


def test_matches_outside_the_density_range_stay_below_and_out_of_the_cut(weight_free) -> None:
    """Five clicks: the matches beyond the clicks' own density range are counted, kept
    below the cut, and the cut is the automatic cut of the other matches alone (with them,
    this scene's cut would be a "widest gap" at ~0.016 instead of "few matches")."""
    from cryosam.simulate import SimulationConfig, simulate

    sim = simulate(SimulationConfig(shape=(40, 96, 112), seed=0))
    res = CryoSAM(weight_free).segment(sim.volume, sim.prompt_points[:5])
    outside = [i for i in res.below_cut if i.outside]
    assert len(outside) >= 1
    assert res.record["score"]["outside_density_range"] == len(outside)
    assert not any(i.outside for i in res.instances)
    assert max(i.score for i in outside) < FLOOR
    inside = [i.score for i in res.instances + res.below_cut if not i.is_prompt and not i.outside]
    assert res.record["score"]["cut"]["threshold"] == pytest.approx(
        automatic_cut(np.array(inside)).threshold, abs=1e-6)
    off = CryoSAM(dataclasses.replace(
        weight_free, score=ScoreConfig(density_range=0))).segment(sim.volume,
                                                                  sim.prompt_points[:5])
    assert off.record["score"]["outside_density_range"] == 0
    assert off.record["score"]["references"]["density_limit"] is None
    # napari keeps every match (min_score 0) and starts its slider at the CLI's cut
    from cryosam.napari._results import starting_score

    every = CryoSAM(dataclasses.replace(
        weight_free, score=ScoreConfig(min_score=0.0))).segment(sim.volume,
                                                                sim.prompt_points[:5])
    assert any(i.outside for i in every.instances)
    assert starting_score(every) == pytest.approx(res.record["score"]["cut"]["threshold"],
                                                  abs=1e-6)


def test_min_score_overrides_the_cut(small_sim, weight_free, scored_run) -> None:
    sim, files = small_sim
    keep_all = CryoSAM(CryosamConfig.from_dict({**weight_free.to_dict(),
                                                "score": {"min_score": 0.0}}))
    res = keep_all.segment(files["tomo.mrc"], files["prompt.csv"])
    assert res.record["score"]["cut"]["method"] == "given" and not res.below_cut
    assert len(res.picks_zyx) == len(scored_run.picks_zyx) + len(scored_run.below_cut)


def test_retired_ratio_parameters_are_read_with_a_warning(weight_free) -> None:
    old = {**weight_free.to_dict(), "min_size_ratio": 0.33, "max_elongation_ratio": 1.5}
    old.pop("score")
    with pytest.warns(CryosamWarning, match="min_size_ratio"):
        cfg = CryosamConfig.from_dict(old)
    assert cfg.score == ScoreConfig()
    with pytest.raises(InputError, match="score.min_score"):
        ScoreConfig(min_score=2.0)


# ------------------------------------------------------------------------- negatives


def test_negative_rows_by_column_or_label() -> None:
    ps = PointSet(np.zeros((4, 3)), {"negative": np.array([0.0, 1.0, 0.0, 1.0])})
    assert negative_rows(ps).tolist() == [False, True, False, True]
    ps = PointSet(np.zeros((3, 3)), {"label": np.array(["positive", "negative", "pos"])})
    assert negative_rows(ps).tolist() == [False, True, False]
    with pytest.raises(InputError, match="row 2 has label 'maybe'"):
        negative_rows(PointSet(np.zeros((2, 3)), {"label": np.array(["pos", "maybe"])}))


def test_negative_click_removes_what_it_names(small_sim, weight_free) -> None:
    """A negative click on a distractor: no pick lands on that distractor's kind any more,
    and the record counts what the negatives removed."""
    sim, _ = small_sim
    model = CryoSAM(CryosamConfig.from_dict({**weight_free.to_dict(),
                                             "score": {"min_score": 0.0}}))
    plain = model.segment(sim.volume, sim.prompt_points[:1], voxel_size=sim.voxel_size)
    blobs = [p for p in sim.particles if p.kind != sim.target_kind]
    assert blobs
    neg = np.asarray([blobs[0].zyx])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryosamWarning)
        res = model.segment(sim.volume, sim.prompt_points[:1], voxel_size=sim.voxel_size,
                            negative_points=neg)
    rec = res.record["negatives"]
    assert rec["clicks"] == 1 and rec["masks"] == 1
    near = np.linalg.norm(res.picks_zyx - neg[0], axis=1).min()
    assert near > blobs[0].radius  # the negative particle itself is not picked
    assert sum(rec["dropped"].values()) >= 1
    assert len(res.picks_zyx) <= len(plain.picks_zyx)
    assert res.record["inputs"]["negatives_zyx"] == neg.tolist()


def test_cli_negative_column_and_file(run_cli, small_sim, tmp_path: Path) -> None:
    sim, files = small_sim
    blob = next(p for p in sim.particles if p.kind != sim.target_kind)
    z, y, x = sim.prompt_points[0]
    clicks = tmp_path / "clicks.csv"
    clicks.write_text(f"x,y,z,negative\n{x},{y},{z},0\n{blob.zyx[2]},{blob.zyx[1]},"
                      f"{blob.zyx[0]},1\n")
    code, out, err = run_cli("segment", files["tomo.mrc"], "--points", clicks, "--out",
                             tmp_path / "a", "-q", *FAST)
    assert code == 0, err
    rec = json.loads((tmp_path / "a" / "run.json").read_text())
    assert rec["negatives"]["clicks"] == 1 and rec["counts"]["prompts"] == 1
    only_neg = tmp_path / "neg.csv"
    only_neg.write_text(f"x,y,z,negative\n{x},{y},{z},1\n")
    code, out, err = run_cli("segment", files["tomo.mrc"], "--points", only_neg, "--out",
                             tmp_path / "b", "-q", *FAST)
    assert code == 2 and "every row is a negative click" in err
    assert not (tmp_path / "b").exists()
    on_blob = tmp_path / "blob.csv"  # (a negative on the click itself is refused)
    on_blob.write_text(f"x,y,z\n{blob.zyx[2]},{blob.zyx[1]},{blob.zyx[0]}\n")
    code, out, err = run_cli("segment", files["tomo.mrc"], "--points", files["prompt.csv"],
                             "--negative-points", on_blob, "--min-score", "0.2", "--out",
                             tmp_path / "c", "-q", *FAST)
    assert code == 0, err
    rec = json.loads((tmp_path / "c" / "run.json").read_text())
    assert rec["negatives"]["clicks"] == 1
    assert rec["score"]["cut"] == {"threshold": 0.2, "method": "given", "separation": None}
    assert rec["parameters"]["score"]["min_score"] == 0.2


def test_negatives_summary_says_what_they_did() -> None:
    """The one line the CLI's summary and napari's status share."""
    from cryosam.result import negatives_summary

    assert negatives_summary({}) == ""
    rec = {"negatives": {"clicks": 2, "masks": 1,
                         "dropped": {"inside": 1, "similarity": 2, "agreement": 0}}}
    line = negatives_summary(rec)
    assert "2 negative click(s) dropped 3 candidate match(es)" in line and "1 gave no mask" in line
    rec["negatives"]["masks"] = 2
    assert "no mask" not in negatives_summary(rec)


def test_retired_membrane_level_is_read_with_a_warning(weight_free) -> None:
    old = weight_free.to_dict()
    old["segmenter"]["backends"]["threshold"]["membrane_level"] = 0.7
    old["segmenter"]["backends"]["threshold"].pop("membrane_cut", None)
    with pytest.warns(CryosamWarning, match="membrane_level"):
        cfg = CryosamConfig.from_dict(old)
    assert cfg.segmenter.backends["threshold"] == CryosamConfig().segmenter.backends["threshold"]


def test_background_share_is_a_share() -> None:
    assert ScoreConfig().background_share == 0.5
    assert ScoreConfig(background_share=1.0).background_share == 1.0
    for bad in (0.0, -0.2, 1.5):
        with pytest.raises(InputError, match="background_share"):
            ScoreConfig(background_share=bad)
