"""Every file a run writes, from the plain results of training, testing and predicting:
tables (:mod:`.tables`), figures (:mod:`.figures`), and the files of a test or predict run
(:mod:`.runs`)."""

from .figures import save_heatmap_overlays, save_roc_curves
from .runs import write_predictions, write_test_report
from .tables import format_table, pixel_notes, write_metrics

__all__ = ["format_table", "pixel_notes", "save_heatmap_overlays", "save_roc_curves", "write_metrics",
           "write_predictions", "write_test_report"]
