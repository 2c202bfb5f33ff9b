"""Where each query and key of a Hiera `MultiScaleAttention` call sits on the token grid.

A block sees tokens on its *input grid* (in_h x in_w). Windowed blocks zero-pad that grid to a multiple of
`window` and run attention per window (groups ordered row-major over (batch, window_row, window_col), tokens
row-major inside a window). Q-pool blocks max-pool the queries by `q_stride` inside each window, so a query
sits on the *output grid* (in_h // q_stride) and covers q_stride x q_stride key tokens.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HieraLayerGeometry:
    batch: int
    in_h: int
    in_w: int
    window: int  # 0 = global attention
    q_stride: int  # 1 = no q-pooling

    @property
    def kind(self) -> str:
        if self.q_stride > 1:
            return "hiera_qpool"
        return "hiera_global" if self.window == 0 else "hiera_windowed"

    # -- grids ---------------------------------------------------------------------------------
    @property
    def padded_hw(self) -> tuple[int, int]:
        if self.window == 0:
            return self.in_h, self.in_w
        w = self.window
        return -(-self.in_h // w) * w, -(-self.in_w // w) * w

    @property
    def out_hw(self) -> tuple[int, int]:
        """Query grid (the block's output grid), without padding."""
        return self.in_h // self.q_stride, self.in_w // self.q_stride

    @property
    def windows_hw(self) -> tuple[int, int]:
        if self.window == 0:
            return 1, 1
        hp, wp = self.padded_hw
        return hp // self.window, wp // self.window

    @property
    def q_window(self) -> int:
        """Queries per window side (window // q_stride); for global attention the whole query grid width."""
        return self.window // self.q_stride if self.window else 0

    @property
    def groups(self) -> int:
        nwy, nwx = self.windows_hw
        return self.batch * nwy * nwx

    @property
    def keys_per_group(self) -> int:
        return self.window**2 if self.window else self.in_h * self.in_w

    @property
    def queries_per_group(self) -> int:
        if self.window:
            return self.q_window**2
        oh, ow = self.out_hw
        return oh * ow

    # -- mappings ------------------------------------------------------------------------------
    def _window_of(self, group: int) -> tuple[int, int]:
        nwy, nwx = self.windows_hw
        return divmod(group % (nwy * nwx), nwx)

    def query_cell(self, group: int, index: int) -> tuple[int, int]:
        """(group, local query index) -> (row, col) on the query (output) grid; may lie in padding."""
        if not self.window:
            return divmod(index, self.out_hw[1])
        wy, wx = self._window_of(group)
        li, lj = divmod(index, self.q_window)
        return wy * self.q_window + li, wx * self.q_window + lj

    def key_cell(self, group: int, index: int) -> tuple[int, int]:
        """(group, local key index) -> (row, col) on the key (input) grid; may lie in padding."""
        if not self.window:
            return divmod(index, self.in_w)
        wy, wx = self._window_of(group)
        li, lj = divmod(index, self.window)
        return wy * self.window + li, wx * self.window + lj

    def query_source_cells(self, group: int, index: int) -> tuple[int, int, int, int]:
        """Key-grid rows/cols [r0, r1) x [c0, c1) a (pooled) query was computed from."""
        if not self.window:
            r, c = self.query_cell(group, index)
            return r * self.q_stride, (r + 1) * self.q_stride, c * self.q_stride, (c + 1) * self.q_stride
        wy, wx = self._window_of(group)
        li, lj = divmod(index, self.q_window)
        r0, c0 = wy * self.window + li * self.q_stride, wx * self.window + lj * self.q_stride
        return r0, r0 + self.q_stride, c0, c0 + self.q_stride

    def locate_query(self, row: int, col: int, batch: int = 0) -> tuple[int, int]:
        """(row, col) on the query grid -> (group, local query index)."""
        if not self.window:
            return batch, row * self.out_hw[1] + col
        nwy, nwx = self.windows_hw
        wy, li = divmod(row, self.q_window)
        wx, lj = divmod(col, self.q_window)
        return batch * nwy * nwx + wy * nwx + wx, li * self.q_window + lj

    def is_padding_key(self, row: int, col: int) -> bool:
        return row >= self.in_h or col >= self.in_w

    def key_rows_cols(self, group: int) -> tuple[int, int, int, int]:
        """The key-grid block [r0, r1) x [c0, c1) a group's keys cover (padding included)."""
        if not self.window:
            return 0, self.in_h, 0, self.in_w
        wy, wx = self._window_of(group)
        return wy * self.window, (wy + 1) * self.window, wx * self.window, (wx + 1) * self.window

    def valid_queries(self):
        """Bool [groups, queries_per_group]: True where a query is a real token, False on window padding
        (None for global attention, which has no padding)."""
        import torch

        if not self.window:
            return None
        oh, ow = self.out_hw
        nwy, nwx = self.windows_hw
        qw = self.q_window
        w = torch.arange(self.groups).view(-1, 1) % (nwy * nwx)  # window index inside its image
        idx = torch.arange(self.queries_per_group).view(1, -1)
        qr = (w // nwx) * qw + idx // qw  # query grid row, col
        qc = (w % nwx) * qw + idx % qw
        return (qr < oh) & (qc < ow)

    @classmethod
    def from_dict(cls, d: dict) -> "HieraLayerGeometry":
        """The geometry `to_dict` wrote (a run summary's `geometry`); ValueError if malformed."""
        try:
            (in_h, in_w), batch, window, q_stride = d["key_grid_hw"], d["batch"], d["window"], d["q_stride"]
            vals = [int(v) for v in (batch, in_h, in_w, window, q_stride)]
        except (KeyError, TypeError, ValueError):
            raise ValueError("not a Hiera geometry") from None
        if min(vals) < 0 or min(vals[:3]) < 1 or vals[4] < 1 or max(vals) > 1 << 16:
            raise ValueError(f"Hiera geometry out of range: {vals}")
        return cls(*vals)

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "batch": self.batch,
            "key_grid_hw": [self.in_h, self.in_w],
            "padded_key_grid_hw": list(self.padded_hw),
            "query_grid_hw": list(self.out_hw),
            "window": self.window,
            "q_stride": self.q_stride,
            "windows_hw": list(self.windows_hw),
            "groups": self.groups,
            "queries_per_group": self.queries_per_group,
            "keys_per_group": self.keys_per_group,
            "order": "groups row-major over (batch, window_row, window_col); tokens row-major in a window",
        }
