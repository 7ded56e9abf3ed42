"""``report.html`` of the torch-side commands (test, demo, predict of a checkpoint): draws the
image-level ROC curves and dumps the config, then builds the page with
:func:`gradad.html_page.write_page` (which the torch-free predict uses directly)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import yaml

from ..evaluation import MEAN_KEY
from ..html_page import REPORT_HTML, Threshold, write_page
from ..operating_points import ALL_KEY
from .figures import roc_curves_png

__all__ = ["REPORT_HTML", "write_report_html"]


def _config_text(config: Union[None, str, Mapping[str, object]]) -> Optional[str]:
    if config is None or isinstance(config, str):
        return config
    if isinstance(config, Mapping):
        return yaml.safe_dump(dict(config), sort_keys=False, default_flow_style=False)
    raise TypeError(f"config must be None, YAML text or a mapping, got {type(config).__name__}")


def write_report_html(
    out_dir: str | os.PathLike,
    *,
    title: str = "gradad report",
    metrics: Optional[Mapping[str, Mapping[str, Optional[float]]]] = None,
    roc: Optional[Mapping[str, tuple]] = None,
    threshold: Threshold = None,
    threshold_source: Optional[str] = None,
    gallery: Sequence[Mapping[str, object]] = (),
    config: Union[None, str, Mapping[str, object]] = None,
    notes: Sequence[str] = (),
    operating_points: Optional[Mapping[str, Mapping[str, object]]] = None,
) -> Path:
    """Write ``<out_dir>/report.html`` and return its path (see :func:`gradad.html_page.write_page`
    for the page, the gallery entries and the errors).

    Args:
        metrics: {class: {metric key: float in [0, 1] or None}}; the class 'mean' is shown last.
        roc: {class: (labels, scores)} with labels a (N,) array of 0/1 and scores a (N,) float
            array; each class needs both labels. None or empty: no ROC plot.
        config: the run's config as YAML text, or a mapping (dumped as YAML); None: omitted.
        threshold: as write_page's; the ROC plot also marks each class's point at it.
        operating_points: {class: record, ..., 'all': record} of
            :func:`gradad.operating_points.operating_points`, shown in the section "Operating
            points"; None: no such section.
        title, threshold_source, gallery, notes: as write_page's.
    """
    roc_png = None
    if roc is not None and not (isinstance(roc, Mapping) and not roc):
        try:
            roc_png = roc_curves_png(roc, threshold)
        except ValueError as error:
            raise ValueError(f"roc: {error}") from error
    return write_page(out_dir, title=title, metrics=metrics, mean_row=MEAN_KEY, roc_png=roc_png,
                      threshold=threshold, threshold_source=threshold_source, gallery=gallery,
                      config_text=_config_text(config), notes=notes, operating_points=operating_points,
                      pooled_key=ALL_KEY)
