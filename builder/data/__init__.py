"""Data: sources, formats, filters, dedup, mixture, chunks, splits, the dataset report, preview."""
