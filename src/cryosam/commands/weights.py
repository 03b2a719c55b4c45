"""``cryosam weights``: list, download and verify model weights (see checkpoints/README.md)."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from cryosam import weights as w
from cryosam.errors import CryosamError
from cryosam.utils import format_bytes


def _where(found: w.Found | None) -> str:
    if found is None:
        return "-"
    return f"{found.path}  [{found.source}]"


def list_weights(verify: bool = typer.Option(
        False, "--verify", help="Re-hash every present model now (slow for big files).")) -> None:
    """Every supported model: size, licence, whether it is here and verified, where."""
    typer.echo("cryosam looks for weights in (first hit wins):")
    typer.echo("  1. an explicit path given to the command")
    env = os.environ.get(w.CHECKPOINTS_ENV)
    typer.echo(f"  2. ${w.CHECKPOINTS_ENV}: {env if env else '(not set)'}")
    typer.echo(f"  3. checkpoints folders: {', '.join(str(d) for d in w.builtin_dirs())}")
    offline = "  (HF_HUB_OFFLINE=1)" if w.hf_offline() else ""
    typer.echo(f"  4. DINOv2 only: the Hugging Face cache {w.hf_cache_dir()}{offline}")
    typer.echo("")
    rows = [w.status(spec, rehash=verify) for spec in w.REGISTRY.values()]
    name_w = max(len(r.spec.name) for r in rows) + 2
    typer.echo(f"{'name':<{name_w}}{'size':>11}  {'licence':<11}{'status':<10}where")
    for r in rows:
        default = " *" if r.spec.name in w.DEFAULT_NAMES else ""
        size = ("~" if r.spec.kind == "dinov2" else "") + format_bytes(r.spec.size_bytes)
        where = _where(r.found) + (f"  ({r.detail})" if r.detail else "")
        typer.echo(f"{r.spec.name + default:<{name_w}}{size:>11}  {r.spec.license:<11}"
                   f"{r.state:<10}{where}")
    typer.echo("(* = the pipeline's defaults, as in the paper)")
    missing = [r for r in rows if r.state in ("missing", "bad")]
    if missing:
        typer.echo("")
        typer.echo("missing or bad (run the command on a machine with internet):")
        for r in missing:
            typer.echo(f"  {r.spec.download_command}")
        for r in missing:
            if r.state == "missing" and r.spec.name in w.DEFAULT_NAMES:
                typer.echo("")
                typer.echo(f"{r.spec.name}: {w.missing_message(r.spec)}")


def download_weights(
    names: list[str] = typer.Argument(
        None, help="Models to fetch (see `cryosam weights list`); default: the paper's two."),
    dir: Path | None = typer.Option(
        None, "--dir", help="Checkpoints folder to download into (default: the first folder "
        "cryosam searches, e.g. ./checkpoints)."),
    all_: bool = typer.Option(False, "--all", help="Fetch every supported model (~15 GiB)."),
    force: bool = typer.Option(False, "--force", help="Download again even if present."),
    base_url: str | None = typer.Option(
        None, "--base-url", help=f"Mirror for the SAM files (env {w.SAM_BASE_URL_ENV})."),
    hf_endpoint: str | None = typer.Option(
        None, "--hf-endpoint", help="Hugging Face hub endpoint, a mirror (env HF_ENDPOINT)."),
    retries: int = typer.Option(3, "--retries", min=0, help="Retries after a cut connection."),
) -> None:
    """Fetch SAM checkpoints (official URLs) and DINOv2 (hub, pinned) with resume and checksums."""
    if all_ and names:
        raise CryosamError("give model names or --all, not both")
    specs = list(w.REGISTRY.values()) if all_ else \
        [w.get_spec(n) for n in (names or w.DEFAULT_NAMES)]
    dest = Path(dir) if dir is not None else w.default_download_dir()
    if dest.exists() and not dest.is_dir():
        raise CryosamError(f"--dir {dest} is a file; give a folder")
    failures: list[str] = []
    for spec in dict.fromkeys(specs):
        typer.echo(f"{spec.name}: {spec.description}, {format_bytes(spec.size_bytes)} -> {dest}")
        try:
            path, what = w.download(spec, dest, base_url=base_url, force=force, retries=retries,
                                    endpoint=hf_endpoint or os.environ.get("HF_ENDPOINT"))
        except CryosamError as exc:
            if len(specs) == 1:
                raise
            typer.echo(f"  FAILED: {exc}", err=True)
            failures.append(spec.name)
            continue
        typer.echo(f"  {what}: {path}")
    if failures:
        raise CryosamError(f"{len(failures)} of {len(specs)} downloads failed "
                           f"({', '.join(failures)}); run the command again to resume")
    if dir is not None and dest.resolve() not in {d.resolve() for d in w.search_dirs()}:
        typer.echo(f"note: cryosam does not search {dest}; copy its contents into a "
                   f"checkpoints folder or set {w.CHECKPOINTS_ENV}={dest.resolve()}")


def verify_weights(
    names: list[str] = typer.Argument(None, help="Models to check (default: all present)."),
    dir: Path | None = typer.Option(
        None, "--dir", help="Check only this checkpoints folder (default: every folder cryosam "
        "searches, and the Hugging Face cache)."),
) -> None:
    """Re-hash present weights against the recorded checksums; report OK or BAD for each."""
    specs = [w.get_spec(n) for n in names] if names else list(w.REGISTRY.values())
    if dir is not None and not Path(dir).is_dir():
        raise CryosamError(f"--dir {dir} is not a folder")
    bad: list[str] = []
    checked = 0
    for spec in specs:
        found = w.find(spec, [Path(dir)] if dir is not None else None,
                       hf_cache=dir is None)
        if found is None:
            if names:
                typer.echo(f"MISSING  {spec.name}")
                bad.append(spec.name)
            continue
        ok, detail = w.verify_found(spec, found)
        checked += 1
        label = "SKIP" if ok is None else "OK" if ok else "BAD"
        typer.echo(f"{label:<5}{spec.name}  {found.path}  ({detail})")
        if ok is False:
            bad.append(spec.name)
    if checked == 0 and not bad:
        typer.echo("no weights found to verify (see `cryosam weights list`)")
    if bad:
        cmds = "; ".join(f"`{w.get_spec(n).download_command}`" for n in bad)
        raise CryosamError(f"{len(bad)} model(s) failed verification ({', '.join(bad)}); "
                           f"fetch them again with {cmds}")


def register(app: typer.Typer) -> None:
    """Add the ``weights`` group: ``list``, ``download``, ``verify``."""
    group = typer.Typer(help="Model weights (SAM, DINOv2): list, download, verify. "
                        "See checkpoints/README.md for offline machines.", no_args_is_help=True)
    group.command("list")(list_weights)
    group.command("download")(download_weights)
    group.command("verify")(verify_weights)
    app.add_typer(group, name="weights")
