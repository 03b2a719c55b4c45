"""Slice maps stored as one background vector per slice plus the cells that differ from it.

The filter bank gives every cell without a structure the same vector of its slice (a slice's
standardised zero code), and that is over 90 % of the cells of a tomogram. A
:class:`SparseStack` keeps that vector once per slice, the other cells' vectors, and an int32
index per cell into them: the same values as the dense (n, h, w, C) stack
(every read gives them bit for bit), in a tenth of the memory for the filter bank.

Any stack of :class:`cryosam.features.FeatureVolume` may be a dense tensor or a SparseStack;
:func:`take_rows`, :func:`dense_slices` and :func:`stack_nbytes` read either.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class SparseStack:
    """A (n, h, w, C) stack of maps as a ``table`` of vectors and an int32 ``index`` (n, h, w)
    of each cell's row in it. The first n rows of the table are the slices' background
    vectors (row s: slice s), the rest the vectors of the cells that differ from theirs."""

    ndim = 4

    def __init__(self, table: torch.Tensor, index: torch.Tensor) -> None:
        if table.ndim != 2 or index.ndim != 3 or table.shape[0] < index.shape[0]:
            raise ValueError(f"a sparse stack needs a table (m, C) of at least n rows and an "
                             f"index (n, h, w); got {tuple(table.shape)} and "
                             f"{tuple(index.shape)}")
        self.table, self.index = table, index

    @property
    def shape(self) -> torch.Size:
        """(n, h, w, C): the shape of the dense stack this one stands in for."""
        n, h, w = self.index.shape
        return torch.Size((n, h, w, self.table.shape[1]))

    @property
    def dtype(self) -> torch.dtype:
        """The vectors' dtype, the table's (fp16 when built by :class:`SparseStackBuilder`)."""
        return self.table.dtype

    @property
    def device(self) -> torch.device:
        """Where the table and the index live (:meth:`to` moves both)."""
        return self.table.device

    @property
    def background(self) -> torch.Tensor:
        """(n, C): the vector of every cell of slice s that is not stored on its own."""
        return self.table[: self.index.shape[0]]

    @property
    def nbytes(self) -> int:
        """Bytes held by the table and the index (what :func:`stack_nbytes` reports for it)."""
        return sum(t.element_size() * t.nelement() for t in (self.table, self.index))

    def to(self, device: torch.device | str) -> SparseStack:
        """This stack with its table and index on ``device`` (one already there is not copied)."""
        return SparseStack(self.table.to(device), self.index.to(device))

    def take(self, flat: torch.Tensor) -> torch.Tensor:
        """The vectors (N, C) of cells ``flat`` = ``(slice * h + row) * w + col``."""
        return self.table.index_select(0, self.index.view(-1)[flat])

    def dense(self, start: int, stop: int) -> torch.Tensor:
        """Slices ``start:stop`` as a dense (stop - start, h, w, C) tensor."""
        index = self.index[start:stop]
        rows = self.table.index_select(0, index.reshape(-1))
        return rows.view(*index.shape, self.table.shape[1])

    def group_sums(self, starts: Sequence[int], ends: Sequence[int]) -> torch.Tensor:
        """(G, h, w, C) fp32 sums of slices ``starts[g]:ends[g]``, added one slice after the
        other (as the dense stack's would be): the background vector to every cell, the
        stored vectors to their cells, without expanding the slices."""
        n, h, w = self.index.shape
        out = torch.zeros((len(starts), h * w, self.table.shape[1]), dtype=torch.float32,
                          device=self.device)
        background = self.background.float()
        for g, (start, end) in enumerate(zip(starts, ends, strict=True)):
            acc = out[g]
            for s in range(int(start), int(end)):
                cells = torch.nonzero(self.index[s].view(-1) >= n).view(-1)
                own = acc[cells] + self.table.index_select(
                    0, self.index[s].view(-1)[cells]).float()
                acc += background[s]
                acc[cells] = own
        return out.view(len(starts), h, w, -1)

    def to_payload(self) -> dict[str, torch.Tensor]:
        """Plain tensors for ``torch.save`` (read back by :meth:`from_payload`)."""
        return {"table": self.table.detach().cpu().contiguous(),
                "index": self.index.detach().cpu().contiguous()}

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> SparseStack:
        """The stack that :meth:`to_payload` saved (how ``FeatureVolume.load`` reads it back)."""
        return cls(payload["table"], payload["index"])


class SparseStackBuilder:
    """Fills a SparseStack batch by batch, as slices are encoded."""

    def __init__(self, shape: tuple[int, int, int, int], dtype: torch.dtype = torch.float16
                 ) -> None:
        n, h, w, c = shape
        self.background = torch.zeros((n, c), dtype=dtype)
        # every cell starts as its slice's background row
        self.index = torch.arange(n, dtype=torch.int32)[:, None, None].repeat(1, h, w)
        self.rows: list[torch.Tensor] = []
        self.count = n

    def add(self, start: int, background: torch.Tensor, coded: torch.Tensor,
            rows: torch.Tensor) -> None:
        """Slices ``start:start + B``: background (B, C), coded (B, h, w) bool, rows (m, C)
        of the coded cells in C order."""
        stop = start + background.shape[0]
        self.background[start:stop] = background.to("cpu", self.background.dtype)
        coded = coded.to("cpu")
        m = int(coded.sum())
        if m != rows.shape[0]:
            raise RuntimeError(f"encoder returned {rows.shape[0]} rows for {m} coded cells")
        self.index[start:stop][coded] = torch.arange(self.count, self.count + m,
                                                     dtype=torch.int32)
        self.rows.append(rows.to("cpu", self.background.dtype))
        self.count += m

    def build(self) -> SparseStack:
        """The finished stack: background rows, then the coded cells' rows in the order added.
        Call it once: the stack takes over the builder's index, and the builder drops its rows."""
        table = torch.cat([self.background, *self.rows])
        self.rows = []
        return SparseStack(table, self.index)


def take_rows(stack: torch.Tensor | SparseStack, flat: torch.Tensor) -> torch.Tensor:
    """Vectors (N, C) of a dense or sparse stack at flat cell indices."""
    if isinstance(stack, SparseStack):
        return stack.take(flat)
    return stack.reshape(-1, stack.shape[-1])[flat]


def dense_slices(stack: torch.Tensor | SparseStack, start: int, stop: int) -> torch.Tensor:
    """Slices ``start:stop`` of a dense or sparse stack as a dense tensor."""
    if isinstance(stack, SparseStack):
        return stack.dense(start, stop)
    return stack[start:stop]


def stack_nbytes(stack: torch.Tensor | SparseStack) -> int:
    """Bytes held by a dense or sparse stack."""
    if isinstance(stack, SparseStack):
        return stack.nbytes
    return stack.element_size() * stack.nelement()
