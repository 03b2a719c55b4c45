"""``cryosam bench accuracy``: picking and membrane accuracy of a configuration on simulated
tomograms, per seed (README's accuracy table is printed by this command).

Weight-free backends by default (``--encoder dinov2 --segmenter sam`` measures the paper's
models where their weights are); every figure is measured against the simulation's truth.
"""

from __future__ import annotations

import typer

from cryosam.backends import weight_free
from cryosam.config import CryosamConfig, ScoreConfig


def register(app: typer.Typer) -> None:
    """Add ``accuracy`` to the ``cryosam bench`` group."""

    @app.command("accuracy")
    def bench_accuracy(
        seeds: str = typer.Option("0,1,2", "--seeds", help="Simulation seeds, comma-separated."),
        shape: str = typer.Option("64,160,160", "--shape", help="Simulated volume z,y,x."),
        membranes: bool = typer.Option(True, "--membranes/--no-membranes",
                                       help="Also segment membranes from five clicks."),
        device: str = typer.Option("cpu", "--device", help="auto | cpu | cuda"),
        preset: str = typer.Option("default", "--preset",
                                   help="default, or crowded: one and five clicks per kind "
                                   "among 8 look-alike kinds, P/R/F1/best F1/AP per kind, "
                                   "and the share of the kind among every scored match."),
        snr: float = typer.Option(0.5, "--snr", help="crowded: signal-to-noise ratio."),
        query_mode: str = typer.Option("both", "--query-mode",
                                       help="crowded: mean, max or both (each is reported)."),
        negatives: bool = typer.Option(True, "--negatives/--no-negatives",
                                       help="crowded: also rerun each kind with one negative "
                                       "click on the kind it confuses most."),
        turns: bool = typer.Option(True, "--turns/--no-turns",
                                   help="Also match the query turned about the beam axis "
                                   "(cryosam segment's default)."),
        density_tolerance: float = typer.Option(
            ScoreConfig.density_tolerance, "--density-tolerance", min=0.001,
            help="As cryosam segment's: 1 - density correlation that divides a match's score "
            "by e (smaller: stricter on look-alikes)."),
        encoder: str = typer.Option(weight_free("encoder"), "--encoder",
                                    help="filterbank (weight-free) or dinov2 (needs weights)."),
        segmenter: str = typer.Option(weight_free("segmenter"), "--segmenter",
                                      help="threshold (weight-free) or sam (needs weights)."),
    ) -> None:
        """Picks as written (precision, recall, F1) and ranked, per seed or per kind."""
        if preset == "crowded":
            from cryosam.config import QUERY_MODES

            modes = QUERY_MODES if query_mode == "both" else (query_mode,)
            _crowded(seeds, shape, device, snr, modes, negatives, turns, density_tolerance,
                     (encoder, segmenter))
            return
        import dataclasses
        import warnings

        import numpy as np

        from cryosam.config import (
            CryosamConfig,
            EncoderConfig,
            MatchingConfig,
            SegmenterConfig,
        )
        from cryosam.metrics import evaluate_picks, fraction_picked, mask_metrics
        from cryosam.pipeline import CryoSAM
        from cryosam.simulate import SimulationConfig, simulate
        from cryosam.utils import parse_shape

        cfg = CryosamConfig(
            encoder=EncoderConfig(name=encoder),
            segmenter=SegmenterConfig(name=segmenter), device=device,
            matching=MatchingConfig(turns=turns),
            score=ScoreConfig(density_tolerance=density_tolerance))
        membrane_cfg = dataclasses.replace(
            cfg, propagation=dataclasses.replace(cfg.propagation, target="membrane"))
        model, membrane_model = CryoSAM(cfg), CryoSAM(membrane_cfg)
        dims = parse_shape(shape)
        typer.echo(_settings(cfg, preset="default", shape=shape, seeds=seeds,
                             membranes="on" if membranes else "off"))
        typer.echo("seed  1 click: P     R     F1  distractors  5 clicks: P     R     F1  "
                   "membrane Dice: 3 clicks  5 clicks")
        rows = []
        for seed in (int(s) for s in seeds.split(",") if s.strip()):
            sim = simulate(SimulationConfig(shape=dims, seed=seed))
            truth = sim.points(sim.target_kind)
            others = np.array([p.zyx for p in sim.particles if p.kind != sim.target_kind])
            row = []
            for k in (1, 5):
                res = model.segment(sim.volume, sim.prompt_points[:k], voxel_size=sim.voxel_size)
                ev = evaluate_picks(res.picks_zyx, truth, sim.target_radius)
                row += [ev.precision, ev.recall, ev.f1]
                if k == 1:
                    row.append(fraction_picked(others, res.picks_zyx, sim.target_radius))
            for n in (3, 5):  # membranes from the first 3 and from all (up to 5) clicks
                dice = float("nan")
                if membranes and len(sim.membrane_clicks):
                    res = membrane_model.segment(sim.volume, sim.membrane_clicks[:n],
                                                 voxel_size=sim.voxel_size)
                    dice = mask_metrics(res.semantic > 0, sim.membrane).dice
                row.append(dice)
            rows.append(row)
            typer.echo(_default_row(f"{seed:4d}", row))
        with warnings.catch_warnings():  # a column of NaN (no membranes) has no mean
            warnings.simplefilter("ignore", RuntimeWarning)
            means = np.nanmean(np.array(rows, dtype=float), axis=0)
        typer.echo(_default_row("mean", list(means)))


def _settings(cfg: CryosamConfig, **run: object) -> str:
    """One line naming what the figures were made with: the bench's own settings (``run``),
    the backends and the score settings."""
    sc = cfg.score
    head = "".join(f"{k.replace('_', ' ')} {v}, " for k, v in run.items())
    return (f"{head}encoder {cfg.encoder.name}, segmenter {cfg.segmenter.name}, turns "
            f"{'on' if cfg.matching.turns else 'off'}, density tolerance "
            f"{sc.density_tolerance:g}, density range {sc.density_range:g}")


def _default_row(head: str, row: list[float]) -> str:
    """precision, recall, F1 (1 click), distractors, the same for 5 clicks, membrane Dice
    from 3 and from 5 clicks."""
    dice = [f"{v:.3f}" if v == v else "-" for v in row[7:9]]  # NaN: membranes not run
    return (f"{head:4s}  {row[0]:13.3f} {row[1]:5.3f} {row[2]:5.3f}  {100 * row[3]:9.0f} %  "
            f"{row[4]:14.3f} {row[5]:5.3f} {row[6]:5.3f}  {dice[0]:>22s}  {dice[1]:>8s}")


def _crowded(seeds: str, shape: str, device: str, snr: float, modes: tuple[str, ...],
             negatives: bool, turns: bool = True,
             density_tolerance: float = ScoreConfig.density_tolerance,
             names: tuple[str, str] | None = None) -> None:
    """Per kind of the crowded preset: one and five clicks, picks as written and ranked, for
    each query mode; then one negative click on the most confused kind. ``names``: the
    encoder and segmenter (weight-free by default)."""
    names = names or (weight_free("encoder"), weight_free("segmenter"))
    import tempfile

    import numpy as np

    from cryosam.config import (
        CryosamConfig,
        EncoderConfig,
        MatchingConfig,
        SegmenterConfig,
    )
    from cryosam.pipeline import CryoSAM
    from cryosam.simulate import SimulationConfig, simulate
    from cryosam.simulate.crowded import CROWDED_KINDS
    from cryosam.utils import parse_shape

    models = {mode: CryoSAM(CryosamConfig(
        encoder=EncoderConfig(name=names[0]),
        segmenter=SegmenterConfig(name=names[1]), device=device,
        matching=MatchingConfig(query=mode, turns=turns),  # type: ignore[arg-type]
        score=ScoreConfig(density_tolerance=density_tolerance)))
        for mode in modes}
    typer.echo(_settings(next(iter(models.values())).config, preset="crowded", shape=shape,
                         seeds=seeds, snr=f"{snr:g}", query="/".join(modes),
                         negatives="on" if negatives else "off"))
    rows: dict[tuple[str, int, str], list[list[float]]] = {}
    neg_rows: dict[str, list[list[float]]] = {}
    cache = tempfile.TemporaryDirectory(prefix="cryosam-bench-")  # features once per seed
    try:
        for seed in (int(v) for v in seeds.split(",") if v.strip()):
            sim = simulate(SimulationConfig(shape=parse_shape(shape), seed=seed, snr=snr,
                                            preset="crowded"))
            for kind in CROWDED_KINDS:
                for mode, model in models.items():
                    for k in (1, 5):
                        row, kinds = _crowded_run(model, sim, kind, k, cache_dir=cache.name)
                        rows.setdefault((kind, k, mode), []).append(row)
                        wrong = [x for x in kinds if x not in (kind, None)]
                        if negatives and k == 1 and mode == modes[0] and wrong:
                            other = max(sorted(set(wrong)), key=wrong.count)
                            after, kinds_after = _crowded_run(model, sim, kind, 1, negative=other,
                                                              cache_dir=cache.name)
                            neg_rows.setdefault(kind, []).append(
                                [row[0], after[0], _share(kinds, other),
                                 _share(kinds_after, other)])
    finally:  # also when a run fails or is interrupted
        cache.cleanup()
    typer.echo(f"{'kind':12s} query clicks  precision  recall     F1  best F1     AP  found")
    for mode in modes:
        for k in (1, 5):
            means = []
            for kind in CROWDED_KINDS:
                m = np.mean(rows[(kind, k, mode)], axis=0)
                means.append(m)
                typer.echo(f"{kind:12s} {mode:5s} {k:6d}  {m[0]:9.3f}  {m[1]:6.3f}  {m[2]:5.3f}  "
                           f"{m[3]:7.3f}  {m[4]:5.3f}  {m[5]:5.3f}")
            m = np.mean(means, axis=0)
            typer.echo(f"{'mean':12s} {mode:5s} {k:6d}  {m[0]:9.3f}  {m[1]:6.3f}  {m[2]:5.3f}  "
                       f"{m[3]:7.3f}  {m[4]:5.3f}  {m[5]:5.3f}")
    if neg_rows:
        typer.echo("one negative click on the kind picked most wrongly (1 click, "
                   f"{modes[0]} query):")
        typer.echo(f"{'kind':12s} precision before  after   share of that kind before  after")
        for kind, vals in neg_rows.items():
            m = np.mean(vals, axis=0)
            typer.echo(f"{kind:12s} {m[0]:16.3f}  {m[1]:5.3f}  {m[2]:25.3f}  {m[3]:5.3f}")


def _share(kinds: list[str | None], other: str) -> float:
    """Share of the picks that landed on ``other`` particles."""
    return sum(x == other for x in kinds) / max(len(kinds), 1)


def _crowded_run(model, sim, kind: str, k: int, negative: str | None = None,  # noqa: ANN001
                 cache_dir: str | None = None) -> tuple[list[float], list[str | None]]:
    """One run: [precision, recall, F1 as written, best F1 over cuts, AP, found] and the kind
    each written pick landed on (None: background). *found* is the recall of every scored
    match, written or not: what no score or cut can raise. ``negative``: one negative click on that
    kind."""
    import warnings

    import numpy as np

    from cryosam.errors import CryosamWarning, InputError
    from cryosam.metrics import evaluate_picks
    from cryosam.simulate.crowded import kind_clicks

    truth = sim.points(kind)
    radius = float(np.median([p.radius for p in sim.particles if p.kind == kind]))
    neg = None if negative is None else kind_clicks(sim, negative, 1)
    run = (f"seed {sim.config.seed}, {kind}, {k} click(s)"
           + (f", a negative click on a {negative}" if negative else ""))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", CryosamWarning)
            res = model.segment(sim.volume, kind_clicks(sim, kind, k), voxel_size=sim.voxel_size,
                                negative_points=neg, cache_dir=cache_dir)
    except InputError:  # every click empty: nothing picked
        return [0.0, 0.0, 0.0, 0.0, 0.0, 0.0], []
    finally:  # the warnings say which run they come from
        for w in caught:
            warnings.warn(f"{run}: {w.message}", w.category, stacklevel=2)
    ev = evaluate_picks(res.picks_zyx, truth, radius)
    every, ranking = res.every_scored_pick()  # written or below the cut, clicks first
    everything = evaluate_picks(every, truth, radius, scores=ranking)
    ranked = everything.ranked
    return ([ev.precision, ev.recall, ev.f1, ranked.best_f1 if ranked else ev.f1,
             ranked.average_precision if ranked else 0.0, everything.recall],
            _kinds_of(sim, res.picks_zyx))


def _kinds_of(sim, picks) -> list[str | None]:  # noqa: ANN001
    """The kind of the particle each pick lands on (within its radius), None for none."""
    import numpy as np

    centres = np.asarray([p.zyx for p in sim.particles])
    radii = np.asarray([p.radius for p in sim.particles])
    out: list[str | None] = []
    for p in np.asarray(picks).reshape(-1, 3):
        d = np.linalg.norm(centres - p, axis=1)
        i = int(np.argmin(d))
        out.append(sim.particles[i].kind if d[i] <= radii[i] else None)
    return out
