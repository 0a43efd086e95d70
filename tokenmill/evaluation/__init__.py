"""Offline evaluations of trained tokenizers (run on an export, not during training)."""

from tokenmill.evaluation.rate_distortion import (
    CSV_COLUMNS,
    codec_at_bytes,
    default_budgets,
    evaluate_rate_distortion,
    format_table,
    plot_rate_distortion,
    reconstruction_grid,
    validation_images,
    write_csv,
)

__all__ = [
    "CSV_COLUMNS",
    "codec_at_bytes",
    "default_budgets",
    "evaluate_rate_distortion",
    "format_table",
    "plot_rate_distortion",
    "reconstruction_grid",
    "validation_images",
    "write_csv",
]
