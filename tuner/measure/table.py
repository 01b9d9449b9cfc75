"""The comparison table `dart-tuner eval` prints (rich), one row per configuration, baseline first."""

from __future__ import annotations

import math
from collections.abc import Sequence

from rich.table import Table

from tuner.config import options_text, processor_text, schedule_text
from tuner.measure.compare import ConfigReport
from tuner.results.tables import Column, Sheet


def describe(report: ConfigReport) -> str:
    """Short label: method, K, amount and options (a schedule: 'fastv@2:0.5>4:0.5')."""
    config = report.config
    if config is None:
        return report.name
    options, processor = options_text(config), processor_text(config)
    options = (f" {options}" if options else "") + (f" [{processor}]" if processor else "")
    if config.stages:
        return schedule_text(config, exact=False) + options
    amount = f"r={config.keep_ratio:g}" if config.keep_ratio is not None else (
        f"b={config.budget}" if config.budget is not None else "all")
    return f"{config.method} K={config.layer} {amount}{options}"


def _fmt(value: float, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


COMPARISON_COLUMNS = (Column("config", "config", "config", "left"), Column("accuracy", "accuracy", "acc"),
                      Column("accuracy_change", "Δ acc", "Δ acc"), Column("kept_vision", "kept vision", "kept"),
                      Column("prefill_ms", "prefill ms", "prefill ms"), Column("prefill_iqr_ms", "IQR"),
                      Column("speedup", "speed-up", "speed-up"), Column("select_ms", "select ms"),
                      Column("decode_ms_per_token", "decode ms/tok", "decode ms"), Column("gflops", "GFLOPs"),
                      Column("kv_mib", "KV MiB"))


def comparison_sheet(reports: Sequence[ConfigReport], title: str) -> Sheet:
    """Accuracy, kept tokens, prefill (median, IQR), speed-up, selection ms, decode ms/token, FLOPs and KV bytes.

    "select ms" is the median time the method's selection took inside each timed prefill (all stages): part
    of the prefill time, shown next to what pruning saved.
    """
    base = reports[0]
    sheet = Sheet(title, COMPARISON_COLUMNS)
    for report in reports:
        acc = report.accuracy.accuracy if report.accuracy else math.nan
        base_acc = base.accuracy.accuracy if base.accuracy else math.nan
        stats = report.accuracy.kept_vision_stats() if report.accuracy else None
        kept = (f"{stats['kept_vision_mean']:.0f}/{stats['vision_mean']:.0f}" if stats and report.accuracy.samples
                else f"{report.cost.n_kept_vision}/{report.cost.n_vision}")
        prefill = report.latency.prefill
        speedup = base.latency.prefill.median_ms / prefill.median_ms
        sheet.add_row([
            describe(report), _fmt(acc, ".3f"), "" if report is base else _fmt(acc - base_acc, "+.3f"), kept,
            f"{prefill.median_ms:.1f}", f"{prefill.iqr_ms:.1f}", f"{speedup:.2f}x", _fmt(report.cost.select_ms, ".2f"),
            f"{report.latency.decode.median_ms:.2f}",
            f"{report.cost.prefill_flops / 1e9:.3g}", f"{report.cost.kv_cache_bytes / 2**20:.3g}"],
            {"name": report.name, "config": None if report.config is None else report.config.to_dict(),
             "accuracy": None if math.isnan(acc) else acc, "prefill_ms": prefill.median_ms, "speedup": speedup})
    return sheet


def comparison_table(reports: Sequence[ConfigReport], title: str, *, wide: bool = True) -> Table:
    """`comparison_sheet` as a rich table (every column unless `wide` is False)."""
    return comparison_sheet(reports, title).table(wide)
