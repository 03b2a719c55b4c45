"""Running a batch: one tomogram's job (with resume), the engines, ``batch.csv`` and ETA.

A :class:`Worker` holds one :class:`~cryosam.pipeline.CryoSAM` (models loaded once) and runs
tasks, writing ``OUT/<name>/`` with :func:`cryosam.export.write_outputs` (atomic, as for
``segment``); any failure becomes a ``failed`` outcome, never an exception.

**Resume rule.** A task is skipped when ``OUT/<name>/run.json`` exists, every output it lists
is there, and its record says the same inputs and parameters: the tomogram's SHA-256 (copick:
its data's), the clicks as voxels (or the saved query's SHA-256), every parameter but the
machine's (``device``, ``threads``) and the batch options. Anything else (no output, a failed
or changed tomogram) is run again; ``force`` runs everything. Each run.json also names the
batch that wrote it (``batch_id``): an interrupted batch lists as done what it completed.

Two engines hand tasks to workers and yield their outcomes:

- :class:`InProcess` (``--workers 0`` / ``--no-ray``): one worker in this process, one task
  after another; what a SLURM array task (``--shard i/n``) or a debugging session wants.
- :class:`RayEngine`: Ray actors, each a worker that loads the models once and keeps them.
  By default Ray runs embedded (started here, stopped at the end): one worker per GPU, or
  ``workers`` on CPU with the CPUs shared out (threads = CPUs / workers, set through the
  configuration's ``threads``). With ``address`` it joins an existing cluster
  (``ray start --head`` on SLURM, Kubernetes, a workstation pool). Ray places the actors;
  this module only keeps each one busy (``ray.wait``) and replaces one that dies.

Ray is imported only here, inside :class:`RayEngine`.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
import traceback
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from cryosam import io, progress
from cryosam.batch import Options, Outcome, Task, failed_before, write_table
from cryosam.config import CryosamConfig, result_parameters
from cryosam.device import resolve_threads
from cryosam.errors import (
    CryosamError,
    CryosamWarning,
    InputError,
    Terminated,
    collect_warnings,
    keep_warnings,
)
from cryosam.query import SavedQuery
from cryosam.utils import sha256_file

CPU_THREADS_PER_WORKER = 8  # default CPU workers: one per this many CPUs (at least one)


class Worker:
    """Holds one CryoSAM (models loaded once) and runs tasks; a Ray actor wraps it as is."""

    def __init__(self, config: dict[str, Any], options: Options,
                 query: SavedQuery | None = None, gpu_share: float = 1.0) -> None:
        from cryosam.device import hold_gpu_share
        from cryosam.pipeline import CryoSAM

        hold_gpu_share(gpu_share)  # workers sharing a GPU share its automatic cache budget
        self.config = CryosamConfig.from_dict(config)
        self.options = options
        self.query = query
        self.runner = CryoSAM(self.config)
        match = query is not None or (options.match if options.match is not None
                                      else self.config.propagation.target == "particle")
        self.runner.check_weights(match)
        _ = self.runner.segmenter, (self.runner.encoder if match else None)  # load once, here

    def ping(self) -> int:
        """For the engine: the worker is up (returns its threads)."""
        return int(self.runner.threads)

    def run(self, task: Task) -> Outcome:
        """Run (or skip) one task; any failure becomes a failed :class:`Outcome`."""
        start = time.perf_counter()
        with warnings.catch_warnings(record=True):  # said in batch.csv, not on a console
            warnings.simplefilter("always", CryosamWarning)
            try:
                with collect_warnings() as seen:  # run.json and batch.csv
                    outcome = self._run(task, seen)
            except CryosamError as exc:
                outcome = Outcome(task.name, "failed", error=str(exc))
            except Exception as exc:  # noqa: BLE001 - one tomogram never stops the others
                line = str(exc).splitlines()[0] if str(exc) else ""
                outcome = Outcome(task.name, "failed", error=f"{type(exc).__name__}: {line}",
                                  detail=traceback.format_exc())
        outcome.seconds = round(time.perf_counter() - start, 3)
        if outcome.status != "skipped":  # a skipped one keeps its earlier run's warnings
            outcome.warnings = list(seen)
        return outcome

    def _run(self, task: Task, seen: list[str]) -> Outcome:
        from cryosam import stages
        from cryosam.export import write_outputs

        if task.missing:
            return Outcome(task.name, "no-clicks", reason=task.missing)
        opts = self.options
        source = self._copick_source(task) if task.copick else None
        tomo = (source.load_tomogram() if source is not None
                else io.read_tomogram(task.tomogram, voxel_size=opts.voxel_size))
        points: Any = None
        if self.query is None:
            points = self._clicks(task, tomo, source)
            prompts = stages.load_inputs(tomo, points, **self._load_options(task)).prompts
        else:
            prompts = np.zeros((0, 3))
        digest = (sha256_file(tomo.path) if tomo.path is not None
                  else hashlib.sha256(np.ascontiguousarray(tomo.data).tobytes()).hexdigest())
        state = {"tomogram_sha256": digest, "prompts_zyx": np.round(prompts, 4).tolist(),
                 "query_sha256": self.query.meta.get("content_sha256") if self.query else None,
                 "query_file_sha256": self.query.meta.get("sha256") if self.query else None,
                 "options": opts.record(), "parameters": _result_parameters(self.config)}
        reason, record = ("--force", {}) if opts.force else changed(Path(task.out), state)
        if reason is None and source is not None:  # its results live in copick too
            reason = io.copick_results_missing(source, record.get("copick", {}).get("written"))
        if reason is None:
            return Outcome(task.name, "skipped", picks=_picks(record),
                           reason="same inputs and parameters",
                           warnings=[str(w) for w in record.get("warnings", [])])
        result = self.runner.segment(
            tomo, points, query=self.query, match=opts.match, cache_dir=opts.cache_dir,
            tomo_name=task.name if task.points_name is None else task.points_name,
            **({} if self.query is not None or isinstance(points, np.ndarray)
               else {k: v for k, v in self._load_options(task).items() if k != "tomo_name"}))
        result.record["batch"] = {"tomogram": task.name, **state, "batch_id": opts.batch_id,
                                  "reason": reason}
        if source is not None:
            particles = result.target == "particle"
            written = io.write_copick(source, result.labels,
                                      result.picks_zyx if particles else None,
                                      result.pick_scores if particles else None,
                                      result.pick_instance_ids if particles else None)
            result.record["copick"] = {**source.report(), "written": written}
        keep_warnings(result.record, seen)  # reading the tomogram and clicks included
        write_outputs(result, task.out, overwrite=True, tomo_name=task.name,
                      star=io.StarOutputs(opts.star, None, opts.tilt_series_pixel_size))
        picks = int(len(result.picks_zyx)) if result.target == "particle" else None
        return Outcome(task.name, "done", picks=picks, reason=reason)  # membranes: no picks

    def _load_options(self, task: Task) -> dict[str, Any]:
        o = self.options
        return {"points_unit": o.points_unit, "tomo_name": task.points_name,
                "points_pixel_size": o.points_pixel_size, "points_bin": o.points_bin}

    def _clicks(self, task: Task, tomo: io.Tomogram, source: Any) -> Any:
        """The clicks as (z, y, x) voxels (copick) or a file path: a combined STAR or CSV
        gives this tomogram's rows (``points_name``) when it is read."""
        if source is not None:
            return source.clicks_zyx
        if task.points is None:
            raise InputError(f"{task.name}: no clicks")
        return task.points

    def _copick_source(self, task: Task) -> Any:
        c = dict(task.copick or {})
        sel = {k: c.get(k) for k in ("voxel_spacing", "tomo_type")}
        if self.query is None:
            return io.open_copick(c["config"], task.name, c["object"], **sel,
                                  clicks_user=c.get("clicks_user"),
                                  clicks_session=c.get("clicks_session"))
        return io.open_copick(c["config"], task.name, c["object"], **sel, clicks=False)


def _result_parameters(cfg: CryosamConfig) -> dict[str, Any]:
    """The parameters that change results, as plain JSON (:func:`config.result_parameters`):
    a batch resumed on another machine, or with smaller batches on a smaller GPU, carries on."""
    return result_parameters(json.loads(json.dumps(cfg.to_dict(), default=list)))


def _difference(before: Any, now: Any, path: str = "") -> str:
    """The first parameter that differs, as ``matching.top_k 512 -> 3``."""
    if isinstance(before, dict) and isinstance(now, dict):
        for key in sorted(set(before) | set(now), key=str):
            if before.get(key) != now.get(key):
                return _difference(before.get(key), now.get(key), f"{path}{key}.")
    return f"{path.rstrip('.')} {json.dumps(before)} -> {json.dumps(now)}"


def changed(out: Path, state: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """Why ``out`` must be (re)made for ``state`` (None when it is complete and the same),
    and its earlier run.json as read here ({} when there is none to read)."""
    record_path = out / "run.json"
    if not record_path.is_file():
        return "new", {}
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        before = record["batch"]
        outputs = list(record["outputs"])
    except (OSError, ValueError, KeyError, TypeError):
        return "earlier output unreadable or not from cryosam batch", {}
    incomplete = _incomplete(out, outputs, record)
    if incomplete:
        return incomplete, record
    # parameters before the query: a query saved with other parameters names the one
    labels = {"tomogram_sha256": "tomogram changed", "prompts_zyx": "clicks changed",
              "parameters": "parameters changed", "options": "options changed",
              "query_sha256": "query changed"}
    if isinstance(before.get("parameters"), dict):  # made before tuning was left out of it
        before = {**before, "parameters": result_parameters(before["parameters"])}
    if before.get("query_sha256") == state.get("query_file_sha256"):  # from before the
        before = {**before, "query_sha256": state["query_sha256"]}  # content digest
    for key, label in labels.items():
        if before.get(key) != state[key]:
            if key in ("parameters", "options"):
                return f"{label} ({_difference(before.get(key), state[key])})", record
            return label, record
    return None, record


def _picks(record: dict[str, Any]) -> int | None:
    """A run record's pick count; None for membranes, which have no picks."""
    target = (record.get("parameters") or {}).get("propagation", {}).get("target", "particle")
    return int(record["counts"]["picks"]) if target == "particle" else None


def _incomplete(out: Path, outputs: list[str], record: dict[str, Any]) -> str | None:
    """Why the output folder ``out`` that run.json (``record``) lists as ``outputs`` is not
    complete: a file missing, or a mask or preview whose size is not the one recorded (a full
    disk, an interrupted copy); None when it is. Text outputs are not compared by size: a
    user may have curated picks.csv or picks_napari.csv, and a redo would replace the edit."""
    missing = [n for n in outputs if not (out / n).is_file()]
    if missing:
        return f"outputs incomplete ({missing[0]} missing)"
    sizes = record.get("output_bytes")
    for name, size in (sizes.items() if isinstance(sizes, dict) else ()):
        if not name.endswith((".mrc", ".png")):
            continue
        try:
            now = (out / name).stat().st_size
        except OSError:
            return f"outputs damaged ({name} unreadable)"
        if now != size:
            return f"outputs damaged ({name} is {now} bytes, was {size})"
    return None


def reachable(address: str, timeout: float = 10.0) -> None:
    """Refuse, in one line and within ``timeout`` seconds, a ``--ray-address`` HOST:PORT (or
    ray://HOST:PORT) that accepts no connection ("auto" is Ray's own to resolve)."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise CryosamError(f"--ray-address {address}: nothing answers there "
                           f"({exc.strerror or exc}); check the head node's address and port "
                           "(`ray status` on it), or drop --ray-address") from None


def finished_here(task: Task, batch_id: str) -> Outcome | None:
    """``task`` as ``done`` when batch ``batch_id`` completed its output folder (its run.json
    says so and lists only files that are there), else None: for an outcome lost to an
    interrupt."""
    out = Path(task.out)
    try:
        record = json.loads((out / "run.json").read_text(encoding="utf-8"))
        ours = record["batch"]["batch_id"] == batch_id
        complete = _incomplete(out, list(record["outputs"]), record) is None
        picks, seconds = _picks(record), float(record.get("total_seconds", 0))
        reason = str(record["batch"]["reason"])
        said = [str(w) for w in record.get("warnings", [])]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not (ours and complete):
        return None
    return Outcome(task.name, "done", picks=picks, seconds=seconds, reason=reason,
                   warnings=said)


class InProcess:
    """One worker in this process, tasks one after another."""

    def __init__(self, config: CryosamConfig, options: Options,
                 query: SavedQuery | None = None) -> None:
        started = time.perf_counter()
        self.options = options
        self.worker = Worker(config.to_dict(), options, query)
        self.workers, self.threads = 1, self.worker.ping()
        self.startup_seconds = time.perf_counter() - started
        self.description = f"in this process, {self.threads} thread(s)"

    def outcomes(self, tasks: list[Task]) -> Iterator[Outcome]:
        """Run ``tasks`` one after another on the one worker, yielding each outcome as it ends."""
        for task in tasks:
            yield self.worker.run(task)

    def close(self) -> None:
        """Nothing to stop."""


def import_ray() -> Any:
    """``ray``, or one :class:`CryosamError` line saying how to get it (or go without)."""
    try:
        import ray
    except ImportError:
        raise CryosamError("cryosam batch runs on Ray, which is not installed here: pip install "
                           "'ray>=2.9' (or run without it: --no-ray)") from None
    return ray


def _reraise_signal(exc: BaseException) -> None:
    """Raise the SIGTERM (:class:`Terminated`) or Ctrl-C found in ``exc``'s chain: a signal
    arriving inside Ray's C code comes back as a ``SystemError`` caused by it, which would
    otherwise read as a worker that could not start (exit 2 instead of 143 or 130)."""
    seen = exc.__cause__ or exc.__context__
    while seen is not None:
        if isinstance(seen, Terminated | KeyboardInterrupt):
            raise seen
        seen = seen.__cause__ or seen.__context__


class RayEngine:
    """Ray actors that each hold a :class:`Worker`; embedded Ray unless ``address``."""

    def __init__(self, config: CryosamConfig, options: Options, query: SavedQuery | None = None,
                 *, workers: int | None = None, address: str | None = None) -> None:
        import logging

        ray = self.ray = import_ray()
        self.options = options
        started = time.perf_counter()
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        gpu_wanted = config.device != "cpu"
        handler = signal.getsignal(signal.SIGTERM)  # ray.init replaces it; ours cleans up
        quiet = {"include_dashboard": False, "logging_level": logging.ERROR,
                 "log_to_driver": False}
        if address:
            try:
                ray.init(address=address, **quiet)
            except Exception as exc:  # a cluster that cannot be reached: one line
                _reraise_signal(exc)
                raise CryosamError(f"--ray-address {address}: cannot connect ({exc}); start "
                                   "the cluster with `ray start --head` or drop --ray-address"
                                   ) from None
            finally:
                _restore(handler)
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            node_cpus = max(int(n["Resources"].get("CPU", 1)) for n in nodes)
            total = int(ray.cluster_resources().get("CPU", 1))
            gpus = int(ray.cluster_resources().get("GPU", 0)) if gpu_wanted else 0
        else:
            import torch

            total = node_cpus = resolve_threads(None)
            gpus = torch.cuda.device_count() if gpu_wanted else 0
        n = workers or (gpus or max(1, total // CPU_THREADS_PER_WORKER))
        threads = config.threads or max(1, min(node_cpus, total // n))
        gpu_share = min(1.0, gpus / n) if gpus else 0.0
        if not address:
            try:
                ray.init(address="local", num_cpus=max(total, n * threads), num_gpus=gpus,
                         object_store_memory=256 * 2**20, **quiet)
            except Exception as exc:  # no shared memory, no ports, a sandbox: one line
                _reraise_signal(exc)
                line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise CryosamError(f"cannot start Ray on this machine ({type(exc).__name__}: "
                                   f"{line[:200]}); run without it: --no-ray") from None
            finally:
                _restore(handler)
        remote = ray.remote(Worker)
        self._new = lambda: remote.options(num_cpus=threads, num_gpus=gpu_share).remote(
            replace(config, threads=threads).to_dict(), options, query, gpu_share or 1.0)
        try:
            self.actors = [self._new() for _ in range(n)]
            ray.get([a.ping.remote() for a in self.actors])  # every worker has its models
        except Exception as exc:  # e.g. weights missing on a cluster node: one line
            ray.shutdown()
            _reraise_signal(exc)  # a SIGTERM or Ctrl-C that Ray's C code wrapped
            text = str(exc).strip().splitlines()
            raise CryosamError(f"a Ray worker could not start ({type(exc).__name__}: "
                               f"{text[-1][:300] if text else ''})") from None
        self.workers, self.threads = n, threads
        self.startup_seconds = time.perf_counter() - started
        where = f"on Ray cluster {address}" if address else "on embedded Ray"
        self.description = (f"{where}, {n} worker(s) x {threads} thread(s)"
                            + (f", {gpu_share:g} GPU each" if gpus else ", CPU"))

    def outcomes(self, tasks: list[Task]) -> Iterator[Outcome]:
        """Keep every actor busy until all tasks are done; yield outcomes as they come."""
        ray = self.ray
        queue, idle = deque(tasks), list(self.actors)
        running: dict[Any, tuple[Any, Task]] = {}
        while queue or running:
            while queue and idle:
                actor, task = idle.pop(), queue.popleft()
                running[actor.run.remote(task)] = (actor, task)
            done, _ = ray.wait(list(running), num_returns=1)
            actor, task = running.pop(done[0])
            try:
                outcome = ray.get(done[0])
            except Exception as exc:  # the worker process died (out of memory, a crash)
                line = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
                outcome = Outcome(task.name, "failed",
                                  error=f"worker died ({type(exc).__name__}: {line[:200]})")
                ray.kill(actor)
                self.actors.remove(actor)
                actor = self._new()
                self.actors.append(actor)
            idle.append(actor)
            yield outcome

    def close(self) -> None:
        """Stop the actors (and embedded Ray); a cluster keeps running."""
        self.ray.shutdown()


def _restore(handler: Any) -> None:
    """Put back the SIGTERM handler ``ray.init`` replaced (main thread only)."""
    import threading

    if threading.current_thread() is threading.main_thread() and handler is not None:
        signal.signal(signal.SIGTERM, handler)


def run_batch(tasks: list[Task], engine: InProcess | RayEngine, table: Path, *,
              say: Callable[[str], None] | None = None) -> list[Outcome]:
    """Run ``tasks`` on ``engine``, rewriting ``table`` after each; ``say`` gets one line per
    tomogram with an ETA. Returns the outcomes in task order.

    Interrupted (Ctrl-C, SIGTERM), it closes ``engine`` (what still runs ends or finishes),
    records as ``done`` the tasks this batch completed on disk whose outcome had not come back
    (:func:`finished_here`), rewrites ``table`` and re-raises; the others stay ``pending``.
    """
    retried = failed_before(table)  # read before the table is rewritten
    rows = {t.name: Outcome(t.name, "pending") for t in tasks}
    write_table(table, rows)
    try:
        _run(tasks, engine, table, rows, say, retried)
    except (KeyboardInterrupt, Terminated):
        engine.close()
        for task in tasks:
            if rows[task.name].status == "pending":
                rows[task.name] = finished_here(task, engine.options.batch_id) or rows[task.name]
        write_table(table, rows)
        raise
    return [rows[t.name] for t in tasks]


def _run(tasks: list[Task], engine: InProcess | RayEngine, table: Path,
         rows: dict[str, Outcome], say: Callable[[str], None] | None,
         retried: set[str]) -> None:
    """The loop of :func:`run_batch`: each outcome into ``rows`` and ``table``, and said;
    a tomogram of ``retried`` (failed in the table before) without outputs is "failed before"
    rather than "new"."""
    started, finished, heavy = time.perf_counter(), 0, 0
    bar = progress.enabled()

    def inner() -> Iterator[Outcome]:
        if bar:  # under the batch bar, the stages of each tomogram stay silent
            progress.set_quiet(True)
        try:
            yield from engine.outcomes(tasks)
        finally:
            if bar:
                progress.set_quiet(False)

    for outcome in progress.track(inner(), "tomograms", total=len(tasks), log=False):
        if outcome.reason in ("new", "") and outcome.tomogram in retried:
            outcome.reason = "failed before"
        rows[outcome.tomogram] = outcome
        write_table(table, rows)
        finished += 1
        heavy += outcome.status in ("done", "failed")
        if say is None:
            continue
        elapsed = time.perf_counter() - started
        left = len(tasks) - finished
        eta = f", ETA {progress.clock(elapsed / heavy * left)}" if left and heavy else ""
        picks = "" if outcome.picks is None else f", {outcome.picks} picks"
        why = f": {outcome.error}" if outcome.error else (
            f" ({outcome.reason})" if outcome.status in ("skipped", "no-clicks") else "")
        say(f"[{finished}/{len(tasks)}] {outcome.tomogram}: {outcome.status}{picks}, "
            f"{outcome.seconds:.1f} s{why}{eta}")
        for line in outcome.warnings if outcome.status != "skipped" else ():
            say(f"  warning: {line}")


