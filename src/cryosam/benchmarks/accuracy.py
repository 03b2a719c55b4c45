"""``cryosam bench accuracy``: picking and membrane accuracy of a configuration on simulated
tomograms, per seed (README's accuracy table is printed by this command).

Weight-free backends by default; every figure is measured against the simulation's truth.
"""

from __future__ import annotations

import typer


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
                                   "among 8 look-alike kinds, P/R/F1/best F1/AP per kind."),
        snr: float = typer.Option(0.5, "--snr", help="crowded: signal-to-noise ratio."),
    ) -> None:
        """One-click and five-click F1, distractors picked, membrane Dice, per seed."""
        if preset == "crowded":
            _crowded(seeds, shape, device, snr)
            return
        import dataclasses

        import numpy as np

        from cryosam import backends
        from cryosam.config import CryosamConfig, EncoderConfig, SegmenterConfig
        from cryosam.metrics import evaluate_picks, fraction_picked, mask_metrics
        from cryosam.pipeline import CryoSAM
        from cryosam.simulate import SimulationConfig, simulate
        from cryosam.utils import parse_shape

        cfg = CryosamConfig(
            encoder=EncoderConfig(name=backends.weight_free("encoder")),
            segmenter=SegmenterConfig(name=backends.weight_free("segmenter")), device=device)
        membrane_cfg = dataclasses.replace(
            cfg, propagation=dataclasses.replace(cfg.propagation, target="membrane"))
        model, membrane_model = CryoSAM(cfg), CryoSAM(membrane_cfg)
        dims = parse_shape(shape)
        typer.echo("seed  F1 1 click  distractors  F1 5 clicks  membrane Dice (5 clicks)")
        rows = []
        for seed in (int(s) for s in seeds.split(",") if s.strip()):
            sim = simulate(SimulationConfig(shape=dims, seed=seed))
            truth = sim.points(sim.target_kind)
            others = np.array([p.zyx for p in sim.particles if p.kind != sim.target_kind])
            row = []
            for k in (1, 5):
                res = model.segment(sim.volume, sim.prompt_points[:k], voxel_size=sim.voxel_size)
                row.append(evaluate_picks(res.picks_zyx, truth, sim.target_radius).f1)
                if k == 1:
                    row.append(fraction_picked(others, res.picks_zyx, sim.target_radius))
            dice = float("nan")
            if membranes and len(sim.membrane_clicks):
                res = membrane_model.segment(sim.volume, sim.membrane_clicks,
                                             voxel_size=sim.voxel_size)
                dice = mask_metrics(res.semantic > 0, sim.membrane).dice
            row.append(dice)
            rows.append(row)
            typer.echo(f"{seed:4d}  {row[0]:11.3f}  {100 * row[1]:10.0f} %  {row[2]:11.3f}  "
                       f"{row[3]:.3f}")
        mean = np.nanmean(np.array(rows, dtype=float), axis=0)
        typer.echo(f"mean  {mean[0]:11.3f}  {100 * mean[1]:10.0f} %  {mean[2]:11.3f}  "
                   f"{mean[3]:.3f}")


def _crowded(seeds: str, shape: str, device: str, snr: float) -> None:
    """Per kind of the crowded preset: one and five clicks, picks as written and ranked."""
    import numpy as np

    from cryosam import backends
    from cryosam.config import CryosamConfig, EncoderConfig, SegmenterConfig
    from cryosam.errors import InputError
    from cryosam.metrics import evaluate_picks
    from cryosam.pipeline import CryoSAM
    from cryosam.simulate import SimulationConfig, simulate
    from cryosam.simulate.crowded import CROWDED_KINDS, kind_clicks
    from cryosam.utils import parse_shape

    model = CryoSAM(CryosamConfig(
        encoder=EncoderConfig(name=backends.weight_free("encoder")),
        segmenter=SegmenterConfig(name=backends.weight_free("segmenter")), device=device))
    rows: dict[tuple[str, int], list[list[float]]] = {}
    for seed in (int(v) for v in seeds.split(",") if v.strip()):
        sim = simulate(SimulationConfig(shape=parse_shape(shape), seed=seed, snr=snr,
                                        preset="crowded"))
        for kind in CROWDED_KINDS:
            truth = sim.points(kind)
            radius = float(np.median([p.radius for p in sim.particles if p.kind == kind]))
            for k in (1, 5):
                try:
                    res = model.segment(sim.volume, kind_clicks(sim, kind, k),
                                        voxel_size=sim.voxel_size)
                except InputError:  # every click empty: nothing picked
                    rows.setdefault((kind, k), []).append([0.0, 0.0, 0.0, 0.0, 0.0])
                    continue
                ev = evaluate_picks(res.picks_zyx, truth, radius, scores=res.pick_scores)
                ranked = ev.ranked
                rows.setdefault((kind, k), []).append([
                    ev.precision, ev.recall, ev.f1, ranked.best_f1 if ranked else ev.f1,
                    ranked.average_precision if ranked else 0.0])
    typer.echo(f"{'kind':12s} clicks  precision  recall     F1  best F1     AP")
    for k in (1, 5):
        means = []
        for kind in CROWDED_KINDS:
            m = np.mean(rows[(kind, k)], axis=0)
            means.append(m)
            typer.echo(f"{kind:12s} {k:6d}  {m[0]:9.3f}  {m[1]:6.3f}  {m[2]:5.3f}  {m[3]:7.3f}  "
                       f"{m[4]:5.3f}")
        m = np.mean(means, axis=0)
        typer.echo(f"{'mean':12s} {k:6d}  {m[0]:9.3f}  {m[1]:6.3f}  {m[2]:5.3f}  {m[3]:7.3f}  "
                   f"{m[4]:5.3f}")
