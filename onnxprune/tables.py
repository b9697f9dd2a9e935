"""What the command line prints: rich tables and the progress bar (imported only once a
command has work to show, so that ``--help`` and argument errors stay fast)."""

from __future__ import annotations

import math
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from onnxprune.coupling import BlockKind, BlockReason
from onnxprune.depgraph import ChannelGroup
from onnxprune.pipeline import PruneReport

console = Console(stderr=True, soft_wrap=True)  # an error stays one line, whatever the width
out = Console()


@contextmanager
def progress():
    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        tasks = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)
        yield update


def human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.4g}{unit}"
        n /= 1000
    return f"{n:.4g}P"


def summary_table(report: PruneReport, latency: tuple[float, float, float] | None = None) -> Table:
    b, a = report.before, report.after
    aim = f"target {report.target}, ratio {report.ratio:.3g}" if "=" in report.target else \
        f"ratio {report.ratio:g}" + (f", budget {report.target}" if report.target != "channels" else "")
    method = f"{report.method} (auto)" if report.chosen_by else report.method
    table = Table(title=f"onnxprune: {method}, {aim}", title_justify="left")
    for col, just in (("", "left"), ("before", "right"), ("after", "right"), ("kept", "right")):
        table.add_column(col, justify=just)

    def row(name, x, y, fmt=human):
        table.add_row(name, fmt(x), fmt(y), f"{y / x:.1%}" if x else "-")
    row("parameters", b.params, a.params)
    row("MACs", b.macs, a.macs)
    row("size (bytes)", b.bytes, a.bytes)
    row("nodes", b.nodes, a.nodes, str)
    for op in sorted(set(b.ops) | set(a.ops)):
        if b.ops.get(op, 0) != a.ops.get(op, 0):
            row(f"  {op}", b.ops.get(op, 0), a.ops.get(op, 0), str)
    if latency:
        table.add_row("latency (ms)", f"{latency[0]:.3f}", f"{latency[1]:.3f}", f"{latency[2]:.1%}")
    if report.latency:
        check = report.latency
        for m in check.measured:
            name = "all threads" if m.threads == 0 else f"{m.threads} thread" + ("s" if m.threads > 1 else "")
            table.add_row(f"latency, {name} (ms)", f"{m.before_ms:.3f}", f"{m.after_ms:.3f}", f"{m.share:.1%}")
        if check.predicted_share is not None:
            table.add_row("latency, predicted", "", "", f"{check.predicted_share:.1%}")
    table.add_section()
    table.add_row("groups pruned", f"{report.groups_pruned}/{report.groups_total}",
                  f"{report.channels_removed} ch", f"of {report.channels_prunable} prunable")
    recalibrated = report.plan.details.get("recalibrated") if report.plan is not None else None
    if recalibrated and recalibrated.get("layers"):
        table.add_row("layers re-fitted", str(recalibrated["layers"]), f"on {recalibrated['inputs']} inputs",
                      "planning's")
    if recalibrated and recalibrated.get("batchnorms"):
        table.add_row("BatchNorms re-estimated", str(recalibrated["batchnorms"]), f"on {recalibrated['inputs']} inputs",
                      "planning's")
    if report.fidelity:
        f = report.fidelity
        top1 = f"{f.top1:.1%}" if f.top1 is not None else "-"
        def shown(value: float) -> str:  # every original output one-hot or not finite: no number
            return "n/a" if not math.isfinite(value) or f.samples and f.saturated >= f.samples else f"{value:.4f}"

        table.add_row(f"fidelity ({f.probes} held-out)", f"cos {shown(f.cosine)}", f"relL2 {shown(f.rel_l2)}",
                      f"top1 {top1}")
    table.add_row("time", "", f"{sum(report.seconds.values()):.2f} s", "")
    return table


def blocked_table(report: PruneReport) -> Table | None:
    if not report.blocked:
        return None
    table = Table(title="groups left alone", title_justify="left")
    table.add_column("groups", justify="right")
    table.add_column("why")
    for reason, count in sorted(report.blocked.items(), key=lambda kv: -kv[1])[:12]:
        table.add_row(str(count), reason)
    if len(report.blocked) > 12:
        table.add_row("…", f"{len(report.blocked) - 12} more reasons (onnxprune inspect lists all)")
    return table


def kinds_table(groups: list[ChannelGroup]) -> Table | None:
    """Blocked groups by kind of refusal, most frequent first, each with its first example.
    A group blocked for reasons of several kinds counts under each of them."""
    examples: dict[BlockKind, BlockReason] = {}
    counts: dict[BlockKind, int] = {}
    for g in groups:
        for reason in g.reasons:
            if reason.kind not in examples:
                examples[reason.kind] = reason
        for kind in {r.kind for r in g.reasons}:
            counts[kind] = counts.get(kind, 0) + 1
    if not counts:
        return None
    table = Table(title="blocked groups by kind (a group counts under each kind it meets)", title_justify="left")
    for col in ("kind", "groups", "example", "node"):
        table.add_column(col, justify="right" if col == "groups" else "left")
    order = list(BlockKind)
    for kind in sorted(counts, key=lambda k: (-counts[k], order.index(k))):
        example = examples[kind]
        table.add_row(kind.value, str(counts[kind]), example.message, example.node or "-")
    return table


def inspect_table(title: str, rows: list[dict]) -> Table:
    """``onnxprune inspect``: one row per channel group."""
    table = Table(title=f"{title}: {len(rows)} channel groups, {sum(r['prunable'] for r in rows)} prunable",
                  title_justify="left")
    for col in ("id", "producers", "channels", "nodes", "status"):
        table.add_column(col, justify="right" if col in ("id", "channels", "nodes") else "left")
    for r in rows:
        status = "[green]prunable[/]" if r["prunable"] else f"[yellow]blocked[/]: {r['why'][0]}"
        table.add_row(str(r["id"]), r["name"], str(r["size"]), str(r["members"]), status)
    return table


def eval_table(title: str, reports: dict, agreement: tuple[float, float] | None) -> Table:
    """``onnxprune eval``: accuracy and robustness per model; ``agreement``: (top-1, cosine)."""
    table = Table(title=title, title_justify="left")
    table.add_column("")
    for name in reports:
        table.add_column(name, justify="right")
    first = next(iter(reports.values()))
    table.add_row("accuracy", *[f"{r.accuracy:.4f}" for r in reports.values()])
    for eps in first.fgsm:
        table.add_row(f"FGSM ε={eps:g}", *[f"{r.fgsm[eps]:.4f}" for r in reports.values()])
    for eps in first.pgd:
        table.add_row(f"PGD-{first.pgd_steps} ε={eps:g}", *[f"{r.pgd[eps]:.4f}" for r in reports.values()])
    if agreement is not None:
        table.add_section()
        table.add_row("top-1 agreement", "", f"{agreement[0]:.4f}")
        table.add_row("output cosine", "", f"{agreement[1]:.4f}")
    table.add_row("gradient", *[r.gradient for r in reports.values()])
    return table


def calib_table(path: str, name: str, built, pre, found: int, held: int) -> Table:
    """What ``onnxprune calib`` wrote: how many images, at what shape, with what values per
    channel (a mean far from what the model was trained on says the normalisation is off)."""
    import numpy as np

    x = built.array
    table = Table(title=f"onnxprune calib: {path}, input {name!r}", title_justify="left", show_header=False)
    table.add_column("")
    table.add_column("")
    table.add_row("images", f"{len(built.used)} of {found} found" + (f", {len(built.skipped)} unreadable skipped"
                                                                    if built.skipped else ""))
    table.add_row("array", f"{x.dtype} {list(x.shape)} ({pre.layout}, {pre.channels})")
    table.add_row("resize", f"{pre.height}x{pre.width}, " + ("stretched" if pre.fit == "stretch" else
                                                            f"aspect kept, padded with {pre.pad_value:g}"))
    table.add_row("normalised", f"(pixel * {pre.scale:.6g} - mean {_values(pre.mean)}) / std {_values(pre.std)}")
    axis = {"nchw": 1, "nhwc": 3}.get(pre.layout)
    values = np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis]) if axis is not None else x.reshape(-1, 1)
    values = values.astype(np.float64)
    table.add_row("range", f"{values.min():.4g} .. {values.max():.4g}")
    table.add_row("mean per channel", _values(values.mean(axis=0)))
    table.add_row("std per channel", _values(values.std(axis=0)))
    table.add_row("use", f"--calibration {path}: the last {held} held out for the fidelity check, "
                         f"the first {len(x) - held} for planning")
    return table


def _values(values) -> str:
    return ",".join(f"{float(v):.4g}" for v in values)
