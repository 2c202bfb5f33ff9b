"""The browser viewer: a page that opens from disk (`index.html` + `viewer_data/`, written by `generate` and
`visualize --viewer`) and a local server (`sam2-layerwise view`) that adds the attention of any clicked place.

- `export`: precomputes the page's data from a run (maps placed by the renderer's own code, never the model);
- `source`: opens a compare or single run for the viewer (checked, untrusted input);
- `recompute`: a click -> the query token under it (geometry/) -> both models' rows from the saved q/k;
- `server`: the Starlette app (files of the run directory only, JSON endpoints with checked parameters), and
  the app of a sweep directory (its page, each kept run's viewer under /runs/<name>/);
- `sweep_source`: opens a sweep directory for the server (manifest and Parquet tables checked, untrusted);
- `static/`: index.html, viewer.js, viewer.css; sweep.html, sweep.js, sweep.css for the sweep page (plain, no
  build step, no network).
"""

from sam2_layerwise.viewer.export import write_capture_viewer, write_compare_viewer

__all__ = ["write_capture_viewer", "write_compare_viewer"]
