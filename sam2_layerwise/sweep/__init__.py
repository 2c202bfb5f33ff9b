"""`sam2-layerwise sweep`: the compare pipeline over many images (docs/sweep.md).

inputs (directory or manifest -> items) -> worker (both models loaded once; per item a light-mode compare in
memory, generate's metrics, optional attribution) -> engines (local, Ray) -> store (resumable shards, Parquet
tables) -> aggregate (per layer x head over items, Spearman, rankings, plots, page).
"""
