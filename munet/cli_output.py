"""What the `munet` commands print: JSON for `--json`, rich tables and plain lines otherwise."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text


def jsonable(obj: Any) -> Any:
    """Dataclasses, named tuples, paths, lists and dicts of them -> plain JSON values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple) and hasattr(obj, "_asdict"):
        return {k: jsonable(v) for k, v in obj._asdict().items()}
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, str | int | float | bool):
        return obj
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    return str(obj)


def print_json(obj: Any) -> None:
    """One JSON document on stdout (the only thing a `--json` command writes there)."""
    sys.stdout.write(json.dumps(jsonable(obj), indent=2) + "\n")
    sys.stdout.flush()


def stdout_console() -> Console:
    console = Console(highlight=False, soft_wrap=True)
    if not console.is_terminal:  # piped: never wrap or squeeze a table to 80 columns
        console = Console(highlight=False, soft_wrap=True, width=100_000, no_color=True)
    return console


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False)


def echo(text: str) -> None:
    """A plain line on stdout (no markup, no wrapping)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def print_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> None:
    """A borderless rich table: aligned columns, header first (bold on a terminal)."""
    console = stdout_console()
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for i, h in enumerate(header):  # only the last column wraps when a terminal is too narrow
        last = i == len(header) - 1
        table.add_column(h, no_wrap=not last, overflow="fold" if last else "ellipsis", min_width=len(h) or None)
    for r in rows:
        table.add_row(*(Text(str(c)) for c in r))
    if console.is_terminal:
        console.print(table)
        return
    with console.capture() as cap:
        console.print(table)
    for line in cap.get().splitlines():
        echo(line.rstrip())


@contextmanager
def status(message: str) -> Iterator[None]:
    """A spinner on stderr while a long call runs (only on a terminal)."""
    console = stderr_console()
    with console.status(message) if console.is_terminal else nullcontext():
        yield


def params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def describe_path(p: Any, indent: str = "  ") -> list[str]:
    out = [
        f"{indent}version {p.version} ({p.status}): validation {p.validation_accuracy:.4f}, "
        + f"test {p.test_accuracy:.4f}, score {p.score:.4f}",
        f"{indent}params {params(p.params)} (accounted {params(p.accounted_params)}, "
        + f"added {params(p.added_params)}), trained {p.training_seconds:.1f} s, created {p.created_at}",
    ]
    parents = ", ".join(f"v{v}" for v in p.parents) or "-"
    out.append(f"{indent}from {p.parent_task or '-'} {parents}; mutations: {', '.join(p.mutations) or '-'}")
    for i, m in enumerate(p.modules):
        flags = " frozen" if m.frozen else ""
        out.append(f"{indent}  {i:2d} {m.kind:8s} {m.id[:12]}  {params(m.params):>8s}  "
                   f"shared by {m.shared_by}{flags}")
    return out


def describe_task(t: Any) -> str:
    lines = [f"task {t.name} ({t.status}), source {t.source or '-'}, created {t.created_at}",
             f"  labels ({len(t.labels)}): {', '.join(t.labels)}",
             f"  examples: {t.train_examples} train, {t.validation_examples} validation, {t.test_examples} test",
             f"  root {t.root or '-'}, images resized to {t.image_size}x{t.image_size}",
             f"  current version {t.current_version}"]
    if getattr(t, "policy", None):
        lines.append(f"  policy {t.policy}" + (f"; evolution settings: {_settings(t)}"
                                               if getattr(t, "evolution", None) else ""))
    if t.path is not None:
        lines += describe_path(t.path, "    ")
        if t.path.hyperparameters:
            lines.append("    hyperparameters " + json.dumps(t.path.hyperparameters, sort_keys=True))
    if len(t.lineage) > 1:
        lines.append("  lineage: " + " -> ".join(f"v{p.version} ({p.score:.3f})" for p in t.lineage))
    return "\n".join(lines)


def _settings(t: Any) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in (getattr(t, "evolution", None) or {}).items()) or "the server's"


def describe_policy(t: Any) -> str:
    return f"task {t.name}: policy {t.policy}; evolution settings: {_settings(t)}"


def print_tasks(tasks: Sequence[Any]) -> None:
    if not tasks:
        echo("no tasks")
        return
    rows = []
    for t in tasks:
        p = t.path
        rows.append([t.name, str(t.current_version), str(len(t.labels)),
                     f"{t.train_examples}/{t.validation_examples}/{t.test_examples}",
                     f"{p.validation_accuracy:.4f}" if p else "-", f"{p.test_accuracy:.4f}" if p else "-",
                     f"{p.score:.4f}" if p else "-", params(p.params) if p else "-",
                     params(p.accounted_params) if p else "-", t.source])
    print_table(rows, ["NAME", "VERSION", "LABELS", "TRAIN/VAL/TEST", "VAL ACC", "TEST ACC", "SCORE", "PARAMS",
                       "ACCOUNTED", "SOURCE"])


def print_versions(v: Any) -> None:
    rows = [["*" if p.version == v.current_version else "", str(p.version), p.status,
             f"{p.validation_accuracy:.4f}", f"{p.test_accuracy:.4f}", f"{p.score:.4f}", params(p.params),
             params(p.accounted_params), f"{p.parent_task or '-'} " + ",".join(f"v{x}" for x in p.parents),
             ",".join(p.mutations), p.created_at] for p in v.versions]
    print_table(rows, ["", "VERSION", "STATUS", "VAL ACC", "TEST ACC", "SCORE", "PARAMS", "ACCOUNTED", "PARENT",
                       "MUTATIONS", "CREATED"])


def print_status(s: Any) -> None:
    state = "running" if s.running else "idle"
    if s.running:
        state += f" on {s.current_task or '?'}: {s.candidates_done}/{s.candidates_total} candidates"
    if s.paused_for_load:
        state += " (paused for serving load)"
    sched = f"a generation every {s.interval_seconds:g} s" if s.scheduler_enabled else "on demand only"
    lead = ("this server leads evolution" if getattr(s, "leading", False)
            else f"evolution runs on {s.leader}" if getattr(s, "leader", "") else "no server leads evolution now")
    echo(f"evolution {state}; {s.generations} generations so far; {sched}; {lead}")
    if s.recent:
        rows = [[r.started_at, r.task, str(r.generation), str(r.candidates), f"{r.incumbent_score:.4f}",
                 f"{r.best_score:.4f}", f"v{r.promoted_version}" if r.promoted else "-", f"{r.seconds:.1f}",
                 r.error or ""] for r in s.recent[-10:]]
        print_table(rows, ["STARTED", "TASK", "GEN", "CANDS", "INCUMBENT", "BEST", "PROMOTED", "SECONDS", "ERROR"])


def print_roots(rows: list[dict]) -> None:
    print_table([["*" if r["default"] else "", r["name"], r["family"], f"{r['image_size']}/{r['gpu_image_size']}",
                  "yes" if r["in_store"] else "no", "yes" if r["installed"] else "NO (make setup)", r["description"]]
                 for r in rows], ["", "ROOT", "FAMILY", "PX CPU/GPU", "IN STORE", "INSTALLED", "DESCRIPTION"])
