"""Picking metrics (matching, P/R/F1, best F1, AP), mask metrics, and the evaluate commands."""

from __future__ import annotations

import json
from itertools import permutations

import numpy as np
import pytest

from cryosam.errors import InputError
from cryosam.metrics import dice, iou, mask_metrics, match_points, ranked_metrics


def _grid_points(n: int = 27, spacing: float = 20.0) -> np.ndarray:
    k = round(n ** (1 / 3))
    g = np.stack(np.meshgrid(*[np.arange(k)] * 3, indexing="ij"), -1).reshape(-1, 3)
    return g.astype(float) * spacing + 10.0


def test_truth_against_itself():
    t = _grid_points()
    r = match_points(t, t, 5.0)
    assert (r.tp, r.fp, r.fn) == (27, 0, 0)
    assert r.precision == r.recall == r.f1 == 1.0
    assert r.mean_distance == 0.0
    np.testing.assert_array_equal(r.pick_index, r.truth_index)


@pytest.mark.parametrize("shift, matched", [(3.0, True), (4.99, True), (5.01, False),
                                            (8.0, False)])
def test_shifted_copy_matches_as_the_radius_implies(shift, matched):
    t = _grid_points()
    rng = np.random.default_rng(0)
    direction = rng.normal(size=(len(t), 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    r = match_points(t + shift * direction, t, 5.0)
    n = len(t)
    assert (r.tp, r.fp, r.fn) == ((n, 0, 0) if matched else (0, n, n))
    assert r.f1 == (1.0 if matched else 0.0)
    if matched:
        np.testing.assert_allclose(r.distances, shift)


def test_one_to_one_two_picks_near_one_particle():
    t = np.array([[10.0, 10, 10], [50, 50, 50]])
    p = np.array([[10.0, 10, 11], [10, 11, 10], [50, 50, 52]])
    r = match_points(p, t, 3.0)
    assert (r.tp, r.fp, r.fn) == (2, 1, 0)
    assert r.precision == pytest.approx(2 / 3) and r.recall == 1.0
    assert r.f1 == pytest.approx(2 * 2 / (3 + 2))


def test_matching_is_optimal_not_greedy():
    # pick 0 lies between both particles and is closest to particle 0; a greedy nearest
    # assignment would take particle 0 for it and leave pick 1 unmatched
    t = np.array([[0.0, 0, 0], [0, 0, 6]])
    p = np.array([[0.0, 0, 2.9], [0, 0, -2]])
    r = match_points(p, t, 4.0)
    assert r.tp == 2
    assert dict(zip(r.pick_index.tolist(), r.truth_index.tolist(), strict=True)) == {0: 1, 1: 0}


def test_matching_minimises_distance_among_maximal_pairings():
    t = np.array([[0.0, 0, 0], [0, 0, 4]])
    p = np.array([[0.0, 0, 3.5], [0, 0, 0.5]])
    r = match_points(p, t, 5.0)
    assert dict(zip(r.pick_index.tolist(), r.truth_index.tolist(), strict=True)) == {0: 1, 1: 0}
    assert r.mean_distance == pytest.approx(0.5)


def test_max_pairs_agree_with_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(30):
        p = rng.uniform(0, 10, size=(int(rng.integers(0, 6)), 3))
        t = rng.uniform(0, 10, size=(int(rng.integers(0, 6)), 3))
        radius = 4.0
        ok = np.linalg.norm(p[:, None] - t[None], axis=-1) <= radius if len(p) and len(t) else None
        best = 0
        if ok is not None:
            small, large = (p, t) if len(p) <= len(t) else (t, p)
            okm = ok if len(p) <= len(t) else ok.T
            for perm in permutations(range(len(large)), len(small)):
                best = max(best, int(sum(okm[i, j] for i, j in enumerate(perm))))
        assert match_points(p, t, radius).tp == best
        scores = rng.uniform(size=len(p))
        ranked = ranked_metrics(p, scores, t, radius)
        assert (ranked.tp[-1] if len(ranked.tp) else 0) == best


def test_empty_inputs():
    t = _grid_points(8)
    r = match_points(np.zeros((0, 3)), t, 3.0)
    assert (r.tp, r.fp, r.fn, r.precision, r.recall, r.f1) == (0, 0, 8, 0.0, 0.0, 0.0)
    r = match_points(t, np.zeros((0, 3)), 3.0)
    assert (r.tp, r.fp, r.fn) == (0, 8, 0)
    ranked = ranked_metrics(np.zeros((0, 3)), np.zeros(0), t, 3.0)
    assert ranked.best_f1 == 0.0 and ranked.average_precision == 0.0


def test_bad_inputs():
    with pytest.raises(InputError, match="radius"):
        match_points(np.zeros((1, 3)), np.zeros((1, 3)), 0.0)
    with pytest.raises(InputError):
        match_points(np.zeros((2, 2)), np.zeros((1, 3)), 1.0)
    with pytest.raises(InputError, match="scores"):
        ranked_metrics(np.zeros((2, 3)), np.zeros(3), np.zeros((1, 3)), 1.0)


def _ranking_example():
    """4 particles; 5 picks in score order: hit, miss, hit, hit, miss."""
    t = _grid_points(8)[:4]
    far = np.array([[500.0, 500, 500], [600, 600, 600]])
    p = np.array([t[0] + 1, far[0], t[1] - 1, t[2], far[1]])
    s = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    return p, s, t


def test_best_f1_and_average_precision_by_hand():
    p, s, t = _ranking_example()
    r = ranked_metrics(p, s, t, 3.0)
    # k: P, R = 1: 1, 1/4; 2: 1/2, 1/4; 3: 2/3, 2/4; 4: 3/4, 3/4; 5: 3/5, 3/4
    np.testing.assert_allclose(r.precision, [1, 1 / 2, 2 / 3, 3 / 4, 3 / 5])
    np.testing.assert_allclose(r.recall, [1 / 4, 1 / 4, 2 / 4, 3 / 4, 3 / 4])
    assert r.average_precision == pytest.approx(0.25 * 1 + 0.25 * 2 / 3 + 0.25 * 3 / 4)
    assert r.best_f1 == pytest.approx(0.75)  # 4 picks, 3 hits, 4 particles
    assert r.best_threshold == 0.6
    assert (r.best_precision, r.best_recall) == (0.75, 0.75)
    # the best F1 is what plain matching gives for the picks kept at that threshold
    keep = s >= r.best_threshold
    assert match_points(p[keep], t, 3.0).f1 == pytest.approx(r.best_f1)
    # order of the input rows does not matter, only the scores
    perm = np.array([3, 0, 4, 2, 1])
    r2 = ranked_metrics(p[perm], s[perm], t, 3.0)
    assert r2.average_precision == pytest.approx(r.average_precision)


def test_ties_are_one_threshold():
    p, s, t = _ranking_example()
    s = np.array([0.9, 0.7, 0.7, 0.6, 0.5])  # the miss ties with a hit
    r = ranked_metrics(p, s, t, 3.0)
    np.testing.assert_allclose(r.thresholds, [0.9, 0.7, 0.6, 0.5])
    np.testing.assert_allclose(r.precision, [1, 2 / 3, 3 / 4, 3 / 5])
    assert r.average_precision == pytest.approx(0.25 * 1 + 0.25 * 2 / 3 + 0.25 * 3 / 4)


def test_ranked_rematches_when_a_lower_pick_arrives():
    # the high-score pick could take either particle; the second pick only particle 0
    t = np.array([[0.0, 0, 0], [0, 0, 6]])
    p = np.array([[0.0, 0, 2.9], [0, 0, -2]])
    r = ranked_metrics(p, np.array([0.9, 0.8]), t, 4.0)
    np.testing.assert_array_equal(r.tp, [1, 2])
    assert r.best_f1 == 1.0 and r.average_precision == pytest.approx(1.0)


def test_mask_metrics():
    a = np.zeros((4, 5, 6), dtype=bool)
    b = np.zeros_like(a)
    a[0, 0, :] = True  # 6 voxels
    a[1, 0, :4] = True  # 4 more
    b[0, 0, :] = True  # 6 voxels, all shared
    m = mask_metrics(a, b)
    assert (m.n_pred, m.n_truth, m.n_intersection) == (10, 6, 6)
    assert m.dice == pytest.approx(12 / 16) and m.iou == pytest.approx(6 / 10)
    assert dice(a, b) == m.dice and iou(a, b) == m.iou
    assert mask_metrics(a, a).dice == 1.0
    assert mask_metrics(a, ~a).iou == 0.0
    empty = np.zeros_like(a)
    assert mask_metrics(empty, empty).dice == 1.0 == mask_metrics(empty, empty).iou
    with pytest.raises(InputError, match="shape"):
        mask_metrics(a, b[:3])


# ----------------------------------------------------------------------------------------
# CLI


def _write(path, text):
    path.write_text(text)
    return path


@pytest.fixture()
def pick_files(tmp_path):
    truth = _write(tmp_path / "truth.csv", "id,kind,x,y,z,radius\n"
                   "1,ribosome,10,10,10,5\n2,ribosome,40,10,10,5\n3,ribosome,10,40,10,5\n"
                   "4,ribosome,40,40,10,5\n5,blob,25,25,25,3\n")
    picks = _write(tmp_path / "picks.csv", "x,y,z,score\n"
                   "11,10,10,0.9\n70,70,70,0.8\n40,11,10,0.7\n10,40,11,0.6\n25,25,26,0.5\n")
    return picks, truth


def test_cli_evaluate_json(pick_files, run_cli):
    picks, truth = pick_files
    code, out, err = run_cli("evaluate", picks, truth, "--radius", "3", "--json")
    assert code == 0, err
    assert "holds 2 kinds (blob, ribosome)" in err and "--kind" in err  # all rows counted
    rep = json.loads(out)
    assert (rep["tp"], rep["fp"], rep["fn"]) == (4, 1, 1)
    assert rep["f1"] == pytest.approx(0.8)
    code, out, err = run_cli("evaluate", picks, truth, "--radius", "3", "--kind", "ribosome",
                             "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert (rep["n_truth"], rep["tp"], rep["fp"], rep["fn"]) == (4, 3, 2, 1)
    assert rep["best_f1"] == pytest.approx(0.75) and rep["best_threshold"] == 0.6
    assert rep["average_precision"] == pytest.approx(0.25 + 0.25 * 2 / 3 + 0.25 * 3 / 4)


def test_cli_evaluate_table_and_self(pick_files, run_cli):
    picks, truth = pick_files
    code, out, err = run_cli("evaluate", truth, truth, "--radius", "1")
    assert code == 0, err
    assert "f1" in out and "1.0000" in out and "best_f1" not in out
    code, out, _ = run_cli("evaluate", truth, truth, "--radius", "1", "--kind", "blob",
                           "--json")
    rep = json.loads(out)
    assert rep["n_truth"] == rep["n_picks"] == 1 and rep["f1"] == 1.0
    code, out, _ = run_cli("evaluate", picks, truth, "--radius", "3")
    assert code == 0 and "average_precision" in out


def test_cli_evaluate_errors(pick_files, run_cli, tmp_path):
    picks, truth = pick_files
    code, _, err = run_cli("evaluate", picks, truth, "--radius", "3", "--kind", "proteasome")
    assert code == 2 and "proteasome" in err and "ribosome" in err
    code, _, err = run_cli("evaluate", picks, picks, "--radius", "3", "--kind", "ribosome")
    assert code == 2 and "kind" in err
    code, _, err = run_cli("evaluate", picks, truth, "--radius", "-1")
    assert code == 2 and "--radius" in err
    code, _, err = run_cli("evaluate", tmp_path / "nope.csv", truth, "--radius", "3")
    assert code == 2 and "nope.csv" in err


def test_cli_evaluate_star_picks(pick_files, run_cli, tmp_path):
    from cryosam.io import write_picks_star

    picks, truth = pick_files
    zyx = np.array([[10.0, 10, 11], [10, 11, 40]])
    star = tmp_path / "picks.star"
    write_picks_star(star, zyx, tomo_name="tomo")
    code, out, err = run_cli("evaluate", star, truth, "--radius", "3", "--json")
    assert code == 0, err
    assert json.loads(out)["tp"] == 2


def test_cli_evaluate_mask(tmp_path, run_cli):
    from cryosam.io import write_mrc

    a = np.zeros((8, 8, 8), dtype=np.int8)
    b = np.zeros_like(a)
    a[:4] = 1
    b[2:6] = 3  # a label volume counts as its non-zero voxels
    write_mrc(tmp_path / "a.mrc", a, voxel_size=10)
    write_mrc(tmp_path / "b.mrc", b, voxel_size=10)
    code, out, err = run_cli("evaluate-mask", tmp_path / "a.mrc", tmp_path / "b.mrc", "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["dice"] == pytest.approx(0.5) and rep["iou"] == pytest.approx(1 / 3)
    code, out, err = run_cli("evaluate-mask", tmp_path / "a.mrc", tmp_path / "a.mrc")
    assert code == 0 and "dice" in out and "1.0000" in out
    assert rep["threshold"] == 0.5  # what counted as inside is recorded
    write_mrc(tmp_path / "c.mrc", np.zeros((4, 8, 8), np.int8), voxel_size=10)
    code, _, err = run_cli("evaluate-mask", tmp_path / "a.mrc", tmp_path / "c.mrc")
    assert code == 2 and "shape" in err
    code, out, err = run_cli("evaluate-mask", tmp_path / "a.mrc", tmp_path / "b.mrc",
                             "--threshold", "5", "--json")  # nothing inside either
    assert code == 0 and json.loads(out)["n_pred"] == 0
    assert "no voxel is inside either mask" in err
    code, _, err = run_cli("evaluate-mask", tmp_path / "a.mrc", tmp_path / "b.mrc",
                           "--threshold", "nan")  # counted no voxel: Dice 0, silently
    assert code == 2 and "--threshold nan: give a number" in err
    write_mrc(tmp_path / "b5.mrc", b, voxel_size=5)
    code, _, err = run_cli("evaluate-mask", tmp_path / "a.mrc", tmp_path / "b5.mrc")
    assert code == 0 and "10 Å voxels" in err and "same tomogram" in err


def test_cli_evaluate_mask_scores_one_label(tmp_path, run_cli):
    """--truth-label / --pred-label: only voxels equal to that label are inside; a label no
    voxel holds is one line naming the file and the labels present, exit 2."""
    from cryosam.io import write_mrc

    truth = np.zeros((8, 8, 8), dtype=np.int16)
    truth[:2], truth[3:5], truth[6:] = 1, 2, 3
    write_mrc(tmp_path / "labels.mrc", truth, voxel_size=10)
    write_mrc(tmp_path / "mask.mrc", (truth == 2).astype(np.int8), voxel_size=10)
    relabelled = np.where(truth == 2, 5, np.where(truth == 3, 7, 0)).astype(np.int16)
    write_mrc(tmp_path / "pred.mrc", relabelled, voxel_size=10)

    def dice_of(*args: object) -> float:
        code, out, err = run_cli("evaluate-mask", *args, "--json")
        assert code == 0, err
        return json.loads(out)["dice"]

    # without a label option every labelled voxel is inside: 128 of the 384 are label 2
    assert dice_of(tmp_path / "mask.mrc", tmp_path / "labels.mrc") == pytest.approx(0.5)
    assert dice_of(tmp_path / "mask.mrc", tmp_path / "labels.mrc", "--truth-label", "2") == 1.0
    assert dice_of(tmp_path / "pred.mrc", tmp_path / "labels.mrc", "--pred-label", "5",
                   "--truth-label", "2") == 1.0
    assert dice_of(tmp_path / "pred.mrc", tmp_path / "labels.mrc",
                   "--truth-label", "2") == pytest.approx(2 * 128 / (256 + 128))
    code, out, _ = run_cli("evaluate-mask", tmp_path / "mask.mrc", tmp_path / "labels.mrc",
                           "--truth-label", "2")
    assert code == 0 and "truth label 2" in out and "1.0000" in out
    code, out, err = run_cli("evaluate-mask", tmp_path / "mask.mrc", tmp_path / "labels.mrc",
                             "--truth-label", "9")
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert "labels.mrc" in err and "--truth-label 9" in err
    assert "pass one of its labels: 1, 2, 3" in err
    code, _, err = run_cli("evaluate-mask", tmp_path / "pred.mrc", tmp_path / "labels.mrc",
                           "--pred-label", "2")
    assert code == 2 and err.count("\n") == 1 and "pred.mrc" in err and "5, 7" in err
    code, _, err = run_cli("evaluate-mask", tmp_path / "mask.mrc", tmp_path / "labels.mrc",
                           "--truth-label", "2", "--kind", "ribosome")
    assert code == 2 and err.count("\n") == 1 and "give one of them" in err


def test_cli_evaluate_mask_scores_one_kind_of_a_simulation(small_sim, tmp_path, run_cli):
    """--kind K: TRUTH's voxels labelled with a particle id of kind K in the truth.csv that
    cryosam simulate writes beside labels.mrc."""
    from cryosam.io import write_mrc

    sim, files = small_sim
    ribosomes = sim.ids("ribosome")
    assert len(ribosomes) and len(ribosomes) < len(sim.particles)
    pred = tmp_path / "ribosomes.mrc"
    write_mrc(pred, np.isin(sim.labels, ribosomes).astype(np.int8), voxel_size=10)
    rep = {}
    for name, extra in (("kind", ["--kind", "ribosome"]), ("all", []),
                        ("one", ["--truth-label", str(ribosomes[0])])):
        code, out, err = run_cli("evaluate-mask", pred, files["labels.mrc"], *extra, "--json")
        assert code == 0, err
        rep[name] = json.loads(out)
    assert rep["kind"]["dice"] == 1.0 and rep["kind"]["kind"] == "ribosome"
    assert rep["all"]["dice"] < 0.9 and rep["one"]["dice"] < rep["kind"]["dice"]
    code, _, err = run_cli("evaluate-mask", pred, files["labels.mrc"], "--kind", "virus")
    assert code == 2 and err.count("\n") == 1
    assert "truth.csv" in err and "'virus'" in err and "ribosome" in err
    alone = tmp_path / "alone" / "labels.mrc"  # no truth.csv beside it
    alone.parent.mkdir()
    alone.write_bytes(files["labels.mrc"].read_bytes())
    code, _, err = run_cli("evaluate-mask", pred, alone, "--kind", "ribosome")
    assert code == 2 and err.count("\n") == 1 and "--truth-label" in err
    (alone.parent / "truth.csv").write_bytes(files["truth.csv"].read_bytes())
    write_mrc(alone, np.zeros_like(sim.labels), voxel_size=10)  # not that table's labels
    code, _, err = run_cli("evaluate-mask", pred, alone, "--kind", "ribosome")
    assert code == 2 and err.count("\n") == 1 and "give the labels.mrc" in err
    write_mrc(alone, sim.membrane.astype(np.int8), voxel_size=10)  # 0/1: a mask, not ids
    code, _, err = run_cli("evaluate-mask", pred, alone, "--kind", "ribosome")
    assert code == 2 and err.count("\n") == 1 and "a mask rather than" in err


def test_evaluate_picks_combines_both():
    from cryosam.metrics import evaluate_picks

    p, s, t = _ranking_example()
    ev = evaluate_picks(p, t, 3.0, scores=s)
    assert (ev.tp, ev.fp, ev.fn) == (3, 2, 1) and ev.f1 == pytest.approx(6 / 9)
    assert ev.best_f1 == pytest.approx(0.75)
    assert ev.summary()["average_precision"] == pytest.approx(ev.average_precision)
    plain = evaluate_picks(p, t, 3.0)
    assert plain.best_f1 is None and "best_f1" not in plain.summary()


def test_fraction_picked_counts_points_with_a_pick_nearby() -> None:
    from cryosam.metrics import fraction_picked

    points = np.array([[0.0, 0, 0], [10, 0, 0], [20, 0, 0], [30, 0, 0]])
    picks = np.array([[0.0, 0, 2.9], [0.5, 0, 0], [21, 0, 0]])  # two picks near one point
    assert fraction_picked(points, picks, 3.0) == 0.5
    assert fraction_picked(points, picks, 0.4) == 0.0
    assert fraction_picked(points, np.zeros((0, 3)), 3.0) == 0.0


def test_cli_evaluate_a_run_that_picked_nothing_scores_zero(pick_files, tmp_path, run_cli):
    """picks.csv with only its header (a run that wrote no pick) is P = R = F1 = 0, not an
    error; a truth file without points still is one."""
    _, truth = pick_files
    empty = _write(tmp_path / "none.csv", "x,y,z,score,instance_id\n")
    code, out, err = run_cli("evaluate", empty, truth, "--radius", "3", "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert (rep["n_picks"], rep["tp"], rep["fn"], rep["f1"]) == (0, 0, 5, 0.0)
    code, _, err = run_cli("evaluate", truth, empty, "--radius", "3")
    assert code == 2 and "a header but no points" in err


def test_cli_evaluate_angstrom_csv_score_column_and_relion5(pick_files, run_cli, tmp_path):
    """Å CSVs (TARDIS, the CryoET Data Portal) score with --points-unit angstrom; a chosen
    --score-column that is not there is one line; cryosam's RELION-5 STAR is read with the
    pixel size it states when no --voxel-size is given."""
    from cryosam.io import write_flavour_star

    picks, truth = pick_files
    in_a = tmp_path / "picks_A.csv"
    in_a.write_text("X [A],Y [A],Z [A]\n110,100,100\n400,110,100\n")
    code, _, err = run_cli("evaluate", in_a, truth, "--radius", "3", "--kind", "ribosome")
    assert code == 2 and "--points-unit angstrom" in err
    code, out, err = run_cli("evaluate", in_a, truth, "--radius", "3", "--kind", "ribosome",
                             "--points-unit", "angstrom", "--voxel-size", "10", "--json")
    assert code == 0, err
    assert json.loads(out)["tp"] == 2  # (11, 10, 10) and (40, 11, 10) voxels
    code, _, err = run_cli("evaluate", truth, in_a, "--radius", "3")  # Å as TRUTH
    assert code == 2 and "--truth-unit angstrom" in err
    code, _, err = run_cli("evaluate", picks, truth, "--radius", "3", "--score-column", "fom")
    assert code == 2 and "no column 'fom'" in err and "score" in err
    star = tmp_path / "picks_relion5.star"
    write_flavour_star(star, "relion5", np.array([[10.0, 10, 11], [10, 11, 40]]),
                       tomo_name="tomo", voxel_size=10.0, shape=(50, 60, 60))
    code, out, err = run_cli("evaluate", star, truth, "--radius", "3", "--kind", "ribosome",
                             "--shape", "50,60,60", "--json")
    assert code == 0, err
    assert "rlnPixelSize 10 Å" in err and json.loads(out)["tp"] == 2
    # without --shape: one line naming what is missing, no warning that it is used anyway
    code, out, err = run_cli("evaluate", star, truth, "--radius", "3")
    assert code == 2 and "rlnPixelSize" not in err, err
    assert err.strip().endswith("need the tomogram's size; give the tomogram (and "
                                "--voxel-size if its header has none), or to cryosam evaluate "
                                "--shape z,y,x"), err
