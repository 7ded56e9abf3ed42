"""Writes a suite's results: ``results.json``, ``results.md`` (markdown tables) and PNG plots
(speed-up bars per op, a roofline chart, throughput vs batch size), each file atomically.

The results mapping (built by run_all) has the keys 'environment', 'roofs' ({'copy_bandwidth',
'matmul'}), 'timing', 'grid_sample' (rows of bench_grid_sample), 'detector' (bench_detector.run),
'refine' ({'status', 'rows', ...}), 'metrics' (bench_metrics.run), 'notes' and 'wall_time_s'.
"""
from __future__ import annotations

import io
import json
import math
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from gradad.io_utils import atomic_write_bytes, atomic_write_text  # noqa: E402

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
PLOT_FILES = {
    "speedup_grid_sample": "speedup_grid_sample.png",
    "speedup_detector": "speedup_detector.png",
    "speedup_refine": "speedup_refine.png",
    "roofline": "roofline.png",
    "throughput": "throughput_vs_batch.png",
}
PLOT_DPI = 110


# ---- markdown ------------------------------------------------------------------------------

def _fmt(value, spec: str = ".2f", suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return format(value, spec) + suffix


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table; cells are strings (pipes escaped)."""
    def cell(text) -> str:
        return str(text).replace("|", "\\|")
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _load_remark(env: Dict, results: Dict) -> str:
    loads = [load[0] for load in (env.get("load_average"), results.get("load_average_end")) if load]
    if env.get("device_type") == "cpu" and loads and env.get("cpu_count") and max(loads) > env["cpu_count"]:
        return " (above the CPU count: other processes competed for the CPU, timings are noisy)"
    return ""


def allocator_title(alloc: Dict) -> str:
    """An allocator setting as recorded by benchmarks.allocators.current_allocator, in words:
    its title and the variables that make it."""
    extra = [f"{k}={alloc[k]}" for k in ("GLIBC_TUNABLES", "LD_PRELOAD") if alloc.get(k)]
    return alloc["title"] + (f" ({', '.join(extra)})" if extra else "")


def _allocators_text(results: Dict) -> str:
    """The allocator setting(s) the figures were measured under."""
    runs = results.get("allocators") or [a for a in [results["environment"].get("allocator")] if a]
    if not runs:
        return "not recorded"
    each = ": every case runs under each" if len(runs) > 1 else ""
    return "; ".join(allocator_title(a) for a in runs) + each + ", grad_ext and its reference in the same process"


def _speedup_header(results: Dict) -> str:
    """'speed-up', naming the allocator when a run_all --allocators run measured under several."""
    runs = results.get("allocators") or []
    return f"speed-up, {runs[0]['title']}" if len(runs) > 1 else "speed-up"


def _by_allocator_columns(results: Dict, row: Dict, digits: str) -> Tuple[List[str], List[str]]:
    """(header, cells) of a row's figures under the other allocator settings of a run_all
    --allocators run: their speed-up and ext / reference milliseconds."""
    header, cells = [], []
    for alloc in (results.get("allocators") or [])[1:]:
        other = (row.get("by_allocator") or {}).get(alloc["name"]) or {}
        header += [f"ext / ref ms, {alloc['title']}", f"speed-up, {alloc['title']}"]
        cells += [f"{_fmt(other.get('ext_ms'), digits)} / {_fmt(other.get('reference_ms'), digits)}",
                  _fmt(other.get("speedup"), ".2f", "×")]
    return header, cells


def _environment_md(results: Dict) -> List[str]:
    env = results["environment"]
    git = env.get("git") or {}
    commit = git.get("commit") or "unknown"
    if git.get("dirty"):
        commit += " (with uncommitted changes)"
    roofs = results["roofs"]
    copy, mm = roofs["copy_bandwidth"], roofs["matmul"]
    rows = [
        ("device", f"{env['device_name']} ({env['device']})"),
        ("torch / CUDA", f"{env['torch']} / {env['cuda'] or '—'}"),
        ("torch threads / CPUs", f"{env['torch_threads']} / {env['cpu_count']}"),
        ("git commit", commit),
        ("CPU memory allocator", _allocators_text(results)),
        ("date (UTC)", env["date_utc"]),
        ("measured copy bandwidth", f"{copy['gbps']:.1f} GB/s (copy_ of {copy['bytes'] / 2 / 2**20:.0f} MiB, "
                                    f"read + write counted)"),
        ("measured float32 matmul", f"{mm['gflops']:.1f} GFLOP/s ({mm['side']}² matrices)"),
        ("suite wall time", f"{results.get('wall_time_s', 0):.0f} s ("
                            + ", ".join(f"{k} {v:.0f} s" for k, v in results.get("part_wall_time_s", {}).items())
                            + ")"),
        ("load average 1/5/15 min, start → end", f"{env.get('load_average')} → {results.get('load_average_end')}"
                                                 + _load_remark(env, results)),
    ]
    timing = results.get("timing", {})
    for name, settings in timing.items():
        rows.append((f"timing ({name})", f"warm-up {settings['warmup']}, median of {settings['min_reps']}–"
                                         f"{settings['max_reps']} reps (~{settings['budget_s']} s budget each)"))
    return ["## Environment", "", markdown_table(("", ""), rows), ""]


def _grid_sample_md(results: Dict) -> List[str]:
    rows = results.get("grid_sample", [])
    if not rows:
        return ["## grid_sample", "", "Not run.", ""]
    out = ["## grid_sample: grad_ext vs torch", "",
           "Speed-up = reference time / grad_ext time (median). Bandwidth = bytes that must move "
           "(formula in bench_grid_sample.py) / time; '% copy' = fraction of the measured copy bandwidth. "
           "Forward runs under no_grad; forward+backward computes the table and grid gradients. "
           "Times are medians; the fastest repetition is shown beside them (a wide gap means a busy machine).", ""]
    table, extra_header = [], []
    for r in rows:
        ref = _fmt(r["reference_ms"], ".3f") if not r.get("reference_error") else f"error: {r['reference_error']}"
        extra_header, extra = _by_allocator_columns(results, r, ".3f")
        table.append((r["label"], r["direction"], r["reference"], _fmt(r["ext_ms"], ".3f"), ref,
                      f"{_fmt(r['ext_min_ms'], '.3f')} / {_fmt(r['reference_min_ms'], '.3f')}",
                      _fmt(r["speedup"], ".2f", "×"), *extra, f"{r['bytes'] / 2**20:.3g}", _fmt(r["ext_gbps"], ".3g"),
                      _fmt(r["ext_copy_fraction"] and 100 * r["ext_copy_fraction"], ".0f", "%"),
                      _fmt(r["reference_gbps"], ".3g"), f"{r['ext_reps']}/{r['reference_reps']}"))
    out += [markdown_table(("case", "direction", "reference", "ext ms", "ref ms", "min ms ext / ref",
                            _speedup_header(results), *extra_header, "MiB moved",
                            "ext GB/s", "ext % copy", "ref GB/s", "reps ext/ref"), table), ""]
    det = _deterministic_rows(rows)
    if det:
        out += ["### Deterministic mode vs default (local shape, forward+backward)", "",
                markdown_table(("side", "default ms", "deterministic ms", "deterministic / default"), det), ""]
    return out


def _deterministic_rows(rows: Sequence[Dict]) -> List[Sequence[str]]:
    table = []
    for det in (r for r in rows if r["deterministic"]):
        default = next((r for r in rows if not r["deterministic"] and not r["jitter"]
                        and all(r[k] == det[k] for k in ("direction", "input_shape", "grid_shape", "dtype"))),
                       None)
        if default is None:
            continue
        for side in ("ext", "reference"):
            a, b = default[f"{side}_ms"], det[f"{side}_ms"]
            note = "" if b is not None or not det.get(f"{side}_error") else f" ({det[f'{side}_error']})"
            table.append((f"{side} ({det['label']})", _fmt(a, ".3f"), _fmt(b, ".3f") + note,
                          _fmt(b / a if a and b else None, ".2f", "×")))
    return table


def _detector_md(results: Dict) -> List[str]:
    detector = results.get("detector")
    if not detector:
        return ["## Detector", "", "Not run.", ""]
    out = ["## Detector: kernels='ext' vs 'reference'", ""]
    size_rows = []
    for spec in detector["specs"]:
        s = spec["size"]
        parts = ", ".join(f"{k} {v:,}" for k, v in s["parameter_breakdown"].items() if k != "total")
        size_rows.append((spec["spec"], f"{s['backbone']} ({s['backbone_weights']} weights)",
                          f"{s['input_size']}² → {'×'.join(map(str, s['feature_shape']))}",
                          f"{s['fusion']} × {s['fusion_blocks']}", f"{s['parameters']:,}", parts,
                          f"{s['backbone_parameters']:,}", f"{s['flops_per_image'] / 1e9:.2f}"))
    out += ["### Model size", "", markdown_table(
        ("spec", "backbone", "input → features", "fusion", "GRAD parameters", "breakdown", "backbone parameters",
         "GFLOPs / image (reconstruction)"), size_rows), ""]
    rows, extra_header = [], []
    for r in detector["speedups"]:
        batch = str(r["batch"]) + ("" if r["batch"] == r["requested_batch"] else f" (asked {r['requested_batch']})")
        variant = r["precision"] + (", compiled" if r["compiled"] else "")
        ext = next(x for s in detector["specs"] for x in s["rows"]
                   if x["spec"] == r["spec"] and x["kernels"] == "ext" and x["phase"] == r["phase"]
                   and x["batch"] == r["batch"] and x["precision"] == r["precision"] and x["compiled"] == r["compiled"])
        preset = next(s["preset"] for s in detector["specs"] if s["spec"] == r["spec"])
        extra_header, extra = _by_allocator_columns(results, r, ".1f")
        rows.append((preset, variant, r["phase"], batch, _fmt(r["ext_ms"], ".1f"), _fmt(r["reference_ms"], ".1f"),
                     f"{_fmt(r['ext_min_ms'], '.1f')} / {_fmt(r['reference_min_ms'], '.1f')}",
                     _fmt(r["speedup"], ".2f", "×"), *extra, _fmt(ext["images_per_s"], ".1f"),
                     _fmt(r["ext_peak_increase_mb"], ".0f"), _fmt(r["reference_peak_increase_mb"], ".0f")))
    method = next((x["memory_method"] for s in detector["specs"] for x in s["rows"]), "")
    out += ["### Speed and memory", "",
            f"Peak memory: increase over the memory in use before the measurement ({method}).", "",
            markdown_table(("spec", "variant", "phase", "batch", "ext ms", "ref ms", "min ms ext / ref",
                            _speedup_header(results), *extra_header, "ext images/s",
                            "ext peak MiB", "ref peak MiB"), rows), ""]
    return out


def _refine_md(results: Dict) -> List[str]:
    refine = results.get("refine")
    if not refine or refine.get("status") != "ok":
        note = (refine or {}).get("note", "Not run.")
        return ["## refine", "", note, ""]
    cfg = refine.get("config", {})
    shape = "×".join(str(cfg.get(k, "?")) for k in ("batch", "channels", "height", "width"))
    rows, extra_header = [], []
    for r in refine["rows"]:
        extra_header, extra = _by_allocator_columns(results, r, ".3f")
        rows.append((r["case"], _fmt(r["ext_ms"], ".3f"), _fmt(r["reference_ms"], ".3f"),
                     f"{_fmt(r['ext_min_ms'], '.3f')} / {_fmt(r['reference_min_ms'], '.3f')}",
                     _fmt(r["speedup"], ".2f", "×"), *extra, _fmt(r["bytes"] / 1e6, ".1f"), _fmt(r["ext_gbps"], ".1f"),
                     _fmt(r["ext_copy_fraction"] and 100 * r["ext_copy_fraction"], ".0f", "%")))
    return ["## refine: grad_ext.refine vs grad_ext.reference.refine", "",
            f"Shape {shape}, {cfg.get('dtype', '')}, median of {cfg.get('repeats', '?')} after "
            f"{cfg.get('warmup', '?')} warm-up, both sides interleaved (benchmarks/bench_refine.py).", "",
            markdown_table(("case", "grad_ext ms", "torch ms", "min ms ext / ref", _speedup_header(results),
                            *extra_header, "MB moved", "ext GB/s", "% copy"), rows), ""]


def _metrics_md(scored: Optional[Dict]) -> List[str]:
    if not scored or scored.get("status") != "ok":
        return []
    case = scored["case"]
    rows = [(f"{case['images']}×{case['side']}×{case['side']}", _fmt(scored["pixels"] / 1e6, ".1f"),
             _fmt(scored["ms"], ".0f"), f"{_fmt(scored['min_ms'], '.0f')} / {_fmt(scored['max_ms'], '.0f')}",
             _fmt(scored["mpixels_per_s"], ".1f"), _fmt(scored["input_mb"], ".0f"),
             _fmt(scored["peak_increase_mb"], ".0f"))]
    return ["## metrics: gradad.metrics.compute_metrics", "",
            f"Every image and pixel metric (AUPRO included) of one test split, on the CPU; median of "
            f"{scored['reps']} calls (benchmarks/bench_metrics.py); peak memory: {scored['memory_method']}.", "",
            markdown_table(("maps", "M pixels", "ms", "min / max ms", "M pixels/s", "input MiB",
                            "peak increase MiB"), rows), ""]


def results_markdown(results: Dict) -> str:
    """The whole results.md text."""
    env = results["environment"]
    lines = [f"# grad_ext benchmarks on {env['device_name']}", ""]
    lines += _environment_md(results)
    lines += _grid_sample_md(results)
    lines += _detector_md(results)
    lines += _refine_md(results)
    lines += _metrics_md(results.get("metrics"))
    notes = results.get("notes", [])
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    lines += ["## Plots", ""] + [f"![{name}]({file})" for name, file in PLOT_FILES.items()] + [""]
    return "\n".join(lines)


# ---- plots ---------------------------------------------------------------------------------

def _save(fig, path: str) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=PLOT_DPI, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def _empty(path: str, title: str, message: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 2))
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    ax.set_axis_off()
    _save(fig, path)


def _speedup_bars(path: str, title: str, labels: Sequence[str], values: Sequence[Optional[float]],
                  colors: Sequence[str]) -> None:
    if not labels:
        _empty(path, title, "no results")
        return
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(labels) + 1.2))
    y = range(len(labels))
    shown = [v if v is not None else 0.0 for v in values]
    ax.barh(list(y), shown, color=colors)
    for i, v in enumerate(values):
        ax.text(shown[i], i, f" {v:.2f}×" if v is not None else " n/a", va="center", fontsize=8)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(list(y))
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("speed-up (reference time / grad_ext time), log scale")
    ax.set_title(title)
    _save(fig, path)


DIRECTION_COLORS = {"forward": "tab:blue", "forward+backward": "tab:orange"}


def plot_grid_sample_speedups(rows: Sequence[Dict], path: str, device: str) -> None:
    """Horizontal speed-up bars, one per (case, direction)."""
    _speedup_bars(path, f"grad_ext.grid_sample speed-up on {device}",
                  [f"{r['label']} · {r['direction']}" for r in rows], [r["speedup"] for r in rows],
                  [DIRECTION_COLORS.get(r["direction"], "gray") for r in rows])


def plot_detector_speedups(detector: Optional[Dict], path: str, device: str) -> None:
    """Speed-up bars of the whole detector, one per (spec, variant, phase, batch)."""
    rows = (detector or {}).get("speedups", [])
    presets = {s["spec"]: s["preset"] for s in (detector or {}).get("specs", [])}
    palette = {"infer (features)": "tab:blue", "infer (images)": "tab:green", "train step (features)": "tab:orange"}
    labels = [f"{presets[r['spec']]} · {r['precision']}{' · compiled' if r['compiled'] else ''} · {r['phase']} · "
              f"B={r['batch']}" for r in rows]
    _speedup_bars(path, f"GRAD detector, kernels='ext' vs 'reference', on {device}", labels,
                  [r["speedup"] for r in rows], [palette.get(r["phase"], "gray") for r in rows])


def plot_refine_speedups(refine: Optional[Dict], path: str, device: str) -> None:
    """Speed-up bars of grad_ext.refine (a placeholder image when refine was not run)."""
    if not refine or refine.get("status") != "ok":
        _empty(path, "grad_ext.refine", (refine or {}).get("note", "not run"))
        return
    rows = refine["rows"]
    _speedup_bars(path, f"grad_ext.refine speed-up on {device}", [r["case"] for r in rows],
                  [r["speedup"] for r in rows], ["tab:purple"] * len(rows))


def plot_roofline(rows: Sequence[Dict], roofs: Dict, path: str, device: str) -> None:
    """Left: roofline (GFLOP/s vs FLOP/byte) under the measured copy bandwidth and matmul
    throughput, grad_ext filled, reference hollow. Right: achieved bandwidth per case against
    the measured copy bandwidth. ``rows``: grid_sample and refine rows (label, direction,
    bytes, flops, ext_/reference_ gflops and gbps)."""
    copy_gbps, peak = roofs["copy_bandwidth"]["gbps"], roofs["matmul"]["gflops"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, max(4.5, 0.28 * len(rows) + 1.5)))
    if rows:
        intensity = [r["flops"] / r["bytes"] for r in rows]
        lo, hi = min(intensity) / 2, max(max(intensity) * 2, 2 * peak / copy_gbps)
        xs = [lo * (hi / lo) ** (i / 100) for i in range(101)]
        left.plot(xs, [min(copy_gbps * x, peak) for x in xs], color="black", label="roof (copy bw, matmul)")
        for r, x in zip(rows, intensity):
            color = DIRECTION_COLORS.get(r["direction"], "gray")
            if r["ext_gflops"]:
                left.scatter(x, r["ext_gflops"], color=color, s=18)
            if r["reference_gflops"]:
                left.scatter(x, r["reference_gflops"], facecolors="none", edgecolors=color, s=18)
        left.scatter([], [], color="gray", label="grad_ext")
        left.scatter([], [], facecolors="none", edgecolors="gray", label="reference")
        for direction, color in DIRECTION_COLORS.items():
            left.scatter([], [], color=color, marker="s", label=direction)
        left.set_xscale("log")
        left.set_yscale("log")
        left.legend(fontsize=8)
        labels = [f"{r['label']} · {'fwd' if r['direction'] == 'forward' else 'fwd+bwd'}" for r in rows]
        y = list(range(len(rows)))
        right.barh([i - 0.2 for i in y], [r["ext_gbps"] or 0 for r in rows], height=0.4, label="grad_ext")
        right.barh([i + 0.2 for i in y], [r["reference_gbps"] or 0 for r in rows], height=0.4, label="reference")
        right.axvline(copy_gbps, color="black", linestyle="--", label=f"measured copy {copy_gbps:.1f} GB/s")
        right.set_yticks(y)
        right.set_yticklabels(labels, fontsize=7)
        right.invert_yaxis()
        right.legend(fontsize=8)
    left.set_xlabel("arithmetic intensity (FLOP / byte that must move)")
    left.set_ylabel("achieved GFLOP/s")
    left.set_title(f"grid_sample and refine roofline on {device}")
    right.set_xlabel("achieved bandwidth (GB/s)")
    right.set_title("achieved bandwidth vs measured copy bandwidth")
    _save(fig, path)


def plot_throughput(rows: Sequence[Dict], detector: Optional[Dict], path: str, device: str) -> None:
    """Throughput vs batch size: grid_sample GRAD global/local shapes (images/s, forward and
    forward+backward) and detector inference from features (images/s)."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, group in zip(axes[:2], ("global", "local")):
        picked = [r for r in rows if r["group"] == group and r["batch"]]
        for direction, style in (("forward", "--"), ("forward+backward", "-")):
            for side, color in (("ext", "tab:blue"), ("reference", "tab:red")):
                points = sorted((r["batch"], r["batch"] / (r[f"{side}_ms"] / 1e3)) for r in picked
                                if r["direction"] == direction and r[f"{side}_ms"])
                if points:
                    ax.plot(*zip(*points), style, marker="o", color=color, label=f"{side} {direction}")
        ax.set_title(f"grid_sample, GRAD {group} shape")
        ax.set_xlabel("batch size B")
        ax.set_ylabel("images / s")
        _log_axes(ax)
    ax = axes[2]
    for spec in (detector or {}).get("specs", []):
        for side, style in (("ext", "-"), ("reference", "--")):
            points = sorted({(r["batch"], r["images_per_s"]) for r in spec["rows"]
                             if r["kernels"] == side and r["phase"] == "infer (features)"
                             and r["precision"] == "float32" and not r["compiled"]})
            if points:
                ax.plot(*zip(*points), style, marker="o", label=f"{spec['preset']} {side}")
    ax.set_title("detector inference from features (float32)")
    ax.set_xlabel("batch size")
    ax.set_ylabel("images / s")
    _log_axes(ax)
    fig.suptitle(f"Throughput vs batch size on {device}", y=1.03)
    _save(fig, path)


def _log_axes(ax) -> None:
    if ax.lines:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no results", ha="center", va="center", transform=ax.transAxes)


# ---- all files -----------------------------------------------------------------------------

def write_results(results: Dict, folder: str, plots: bool = True) -> Dict[str, str]:
    """Writes results.json, results.md and (with ``plots``) the plots into ``folder`` (created
    if missing); returns {name: path}."""
    os.makedirs(folder, exist_ok=True)
    device = results["environment"]["device_name"]
    grid_rows = results.get("grid_sample", [])
    refine = results.get("refine") or {}
    refine_rows = refine.get("rows", []) if refine.get("status") == "ok" else []
    paths = {name: os.path.join(folder, file) for name, file in PLOT_FILES.items()}
    plotters: Dict[str, Callable[[], None]] = {
        "speedup_grid_sample": lambda: plot_grid_sample_speedups(grid_rows, paths["speedup_grid_sample"], device),
        "speedup_detector": lambda: plot_detector_speedups(results.get("detector"), paths["speedup_detector"], device),
        "speedup_refine": lambda: plot_refine_speedups(results.get("refine"), paths["speedup_refine"], device),
        "roofline": lambda: plot_roofline(grid_rows + refine_rows, results["roofs"], paths["roofline"], device),
        "throughput": lambda: plot_throughput(grid_rows, results.get("detector"), paths["throughput"], device),
    }
    if plots:
        for plot in plotters.values():
            plot()
    else:
        paths = {}
    paths["json"] = os.path.join(folder, RESULTS_JSON)
    atomic_write_text(paths["json"], json.dumps(results, indent=2, sort_keys=False) + "\n")
    paths["markdown"] = os.path.join(folder, RESULTS_MD)
    atomic_write_text(paths["markdown"], results_markdown(results))
    return paths


def write_report(folder: str, stem: str, results: Dict, markdown: str) -> str:
    """Writes ``<stem>.json`` (``results``) and ``<stem>.md`` (``markdown``) into ``folder``
    (created if missing), each whole or not at all; returns the markdown's path. For the
    benchmarks that report apart from run_all (serve, allocators, export, peers)."""
    os.makedirs(folder, exist_ok=True)
    atomic_write_text(os.path.join(folder, f"{stem}.json"), json.dumps(results, indent=2) + "\n")
    path = os.path.join(folder, f"{stem}.md")
    atomic_write_text(path, markdown)
    return path
