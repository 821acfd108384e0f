"""QuantizedWeight: a 2-D weight kept as GGML bytes, [out_features, row_bytes] uint8, plus its type and shape."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fuselm.errors import FuselmError
from fuselm.quants.codecs import dequantize
from fuselm.quants.ggml_types import ggml_type, row_bytes


@dataclass(frozen=True)
class QuantizedWeight:
    """A linear layer's weight in GGML's block layout.

    data:  uint8 [out_features, row_bytes], ggml's bytes for each row (may be a view of a memory-mapped file)
    qtype: GGML type name ("Q4_K", "Q8_0", "F16", ...)
    shape: (out_features, in_features) of the float weight
    row_order: optional int64 [out_features]: weight row i is data[row_order[i]]. A GGUF's q/k rows are stored
           in llama.cpp's rope order; with this the file's bytes are used as they are and the repack reads them
           in the model's order, instead of a reordered copy of them living beside the repacked tiles.
    """

    data: torch.Tensor
    qtype: str
    shape: tuple[int, int]
    row_order: torch.Tensor | None = None

    def __post_init__(self) -> None:
        t = ggml_type(self.qtype)  # FuselmError for unknown types
        object.__setattr__(self, "qtype", t.name)
        rows, cols = (int(v) for v in self.shape)
        object.__setattr__(self, "shape", (rows, cols))
        if self.data.dtype != torch.uint8 or self.data.ndim != 2:
            raise FuselmError(
                f"{t.name} weight {self.shape}: expected uint8 data [rows, row_bytes], "
                f"got {self.data.dtype} {tuple(self.data.shape)}"
            )
        expected = (rows, row_bytes(t.name, cols))
        if tuple(self.data.shape) != expected:
            raise FuselmError(
                f"{t.name} weight {self.shape}: expected data of shape {expected}, got {tuple(self.data.shape)}"
            )
        order = self.row_order
        if order is not None and (order.dtype != torch.int64 or tuple(order.shape) != (rows,)
                                  or not torch.equal(order.sort().values, torch.arange(rows))):
            raise FuselmError(f"{t.name} weight {self.shape}: row_order must be a permutation of range({rows})")

    def rows(self, start: int, end: int) -> torch.Tensor:
        """GGML bytes of weight rows [start, end), in the weight's order (a copy when reordered)."""
        if self.row_order is None:
            return self.data[start:end]
        return self.data.index_select(0, self.row_order[start:end])

    def in_order(self) -> QuantizedWeight:
        """The same weight with its bytes in row order (itself when already so; otherwise a copy)."""
        if self.row_order is None:
            return self
        return QuantizedWeight(self.rows(0, self.shape[0]), self.qtype, self.shape)

    def take_rows(self, index: Sequence[int]) -> QuantizedWeight:
        """Weight rows `index` (in the weight's order) as their own weight: a view of these bytes when they are
        one contiguous run of the data (as a head range of rope-ordered q/k rows is), else a copy of them."""
        order = torch.as_tensor(list(index), dtype=torch.int64)
        phys = order if self.row_order is None else self.row_order[order]
        n = len(phys)
        lo = int(phys.min()) if n else 0
        if n and int(phys.max()) - lo + 1 == n:
            local = phys - lo
            identity = bool(torch.equal(local, torch.arange(n)))
            return QuantizedWeight(self.data.narrow(0, lo, n), self.qtype, (n, self.shape[1]),
                                   None if identity else local)
        return QuantizedWeight(self.data.index_select(0, phys), self.qtype, (n, self.shape[1]))

    def column_block_size(self) -> int:
        return ggml_type(self.qtype).block_size

    def take_columns(self, start: int, stop: int) -> QuantizedWeight:
        """Input columns [start, stop) of every row: whole GGML blocks only, as a strided view of these bytes."""
        t = ggml_type(self.qtype)
        if start % t.block_size or stop % t.block_size or not 0 <= start < stop <= self.shape[1]:
            raise FuselmError(f"{t.name} weight {self.shape}: columns [{start}, {stop}) do not fall on "
                              f"{t.block_size}-wide block boundaries")
        rows = self.shape[0]
        begin, end = start // t.block_size * t.type_size, stop // t.block_size * t.type_size
        return QuantizedWeight(self.data[:, begin:end], self.qtype, (rows, stop - start), self.row_order)

    @classmethod
    def from_numpy(cls, array: np.ndarray, qtype: str, shape: tuple[int, int]) -> QuantizedWeight:
        """Wrap GGML bytes without copying, e.g. a read-only np.memmap slice from a GGUF reader."""
        arr = np.asarray(array)
        if arr.dtype != np.uint8:
            arr = arr.view(np.uint8)
        rows = int(shape[0])
        arr = arr.reshape(rows, -1) if arr.size else arr.reshape(rows, 0)
        with warnings.catch_warnings():
            # torch warns that a read-only array gives a tensor one could write to; the kernels only read it
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            data = torch.from_numpy(arr)
        return cls(data, qtype, (rows, int(shape[1])))

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of GGML data (what the weight occupies in the file)."""
        return self.data.numel()

    def dequantize(self) -> torch.Tensor:
        """float32 [out_features, in_features], exactly as ggml / gguf-py dequantize."""
        return dequantize(self.rows(0, self.shape[0]), self.qtype, self.shape)
