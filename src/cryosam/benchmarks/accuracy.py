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
    ) -> None:
        """One-click and five-click F1, distractors picked, membrane Dice, per seed."""
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
