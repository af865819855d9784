"""Which columns each anchor's negatives' log-sum-exp runs over, and which of them it excludes.

Rows and columns index stacked views. The columns are the global batch of N images,
``[view 1 of images 0..N-1; view 2 of them]``: column ``c`` is view ``c // N`` of image ``c % N``.
The rows are one rank's anchors, ``[view 1 of its n images; view 2 of them]``, whose images are
global images ``first_image .. first_image + n - 1`` (in one process n = N and the rows are the
columns). A row of view ``v`` sees a contiguous range of columns: the other view
(``negatives="cross_view"``, N columns) or both views (``"all"``, 2N). Inside that range the row
of global image ``g`` excludes the offsets ``g`` and, with ``"all"``, ``g + N``: its own view and
its positive. This is the only place the rule is written; the blockwise, gathered and Triton
paths take their column ranges, tiles and excluded offsets from here.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowBlock:
    """A block of rows of one view, the columns they see, and the global image of the first row."""

    rows: slice
    columns: slice
    first_image: int


@dataclass(frozen=True)
class Tile:
    """A range of columns inside one view's copy of the columns, seen by a block of rows.

    Attributes:
        columns: The global columns of the tile.
        excluded_diagonal: Entry ``(i, j)`` of the (rows x columns) tile is excluded exactly when
            ``j - i`` equals it (at most one entry per row); None if the tile excludes nothing.
    """

    columns: slice
    excluded_diagonal: int | None

    def fill_excluded(self, similarities: torch.Tensor, value: float) -> torch.Tensor:
        """Writes ``value`` into the excluded entries of the tile's similarities, in place.

        Examples:
            >>> similarities = torch.zeros(2, 3)
            >>> _ = Tile(slice(4, 7), 1).fill_excluded(similarities, 1.0)
            >>> similarities.nonzero().tolist()
            [[0, 1], [1, 2]]
        """
        if self.excluded_diagonal is not None:
            similarities.diagonal(offset=self.excluded_diagonal).fill_(value)
        return similarities


@dataclass(frozen=True)
class PairTile:
    """A tile of a symmetric similarity matrix that may also stand for its transpose.

    Attributes:
        rows: The rows of the tile.
        tile: Its columns and excluded diagonal.
        mirrored: Whether the tile also holds the entries of ``tile.columns`` against ``rows``
            (its transpose); False for a square on the diagonal, which holds them already.
    """

    rows: slice
    tile: Tile
    mirrored: bool


@dataclass(frozen=True)
class NegativeGeometry:
    """The negative set of one rank's rows against the global columns.

    Attributes:
        local_images: n, the images whose two views are the rows.
        global_images: N, the images whose two views are the columns.
        first_image: The global image of the first row (``rank * n``; 0 in one process).
        negatives: ``"cross_view"`` or ``"all"``.

    Examples:
        >>> geometry = NegativeGeometry(2, 4, 2, "all")
        >>> geometry.columns(1), geometry.excluded_offsets(3)
        (slice(0, 8, None), (3, 7))
    """

    local_images: int
    global_images: int
    first_image: int
    negatives: str

    @classmethod
    def single_process(cls, num_images: int, negatives: str) -> NegativeGeometry:
        """The geometry of N images against themselves."""
        return cls(num_images, num_images, 0, negatives)

    @property
    def views_seen(self) -> int:
        """How many views' columns a row sees: 1 (cross-view) or 2 (all)."""
        return 1 if self.negatives == "cross_view" else 2

    @property
    def num_columns(self) -> int:
        """The length of every row's column range."""
        return self.views_seen * self.global_images

    def columns(self, view: int) -> slice:
        """The global columns that the rows of ``view`` (0 or 1) see."""
        if self.negatives == "cross_view":
            start = (1 - view) * self.global_images
            return slice(start, start + self.global_images)
        return slice(0, 2 * self.global_images)

    def excluded_offsets(self, image: int) -> tuple[int, ...]:
        """The offsets, inside its column range, that the row of global ``image`` excludes."""
        return tuple(image + copy * self.global_images for copy in range(self.views_seen))

    def row_blocks(self, chunk_size: int) -> Iterator[RowBlock]:
        """Blocks of at most ``chunk_size`` rows of one view each, in row order."""
        n = self.local_images
        for view in (0, 1):
            for first in range(0, n, chunk_size):
                last = min(first + chunk_size, n)
                rows = slice(view * n + first, view * n + last)
                yield RowBlock(rows, self.columns(view), self.first_image + first)

    def tiles(self, block: RowBlock, width: int) -> Iterator[Tile]:
        """The column range of ``block`` as tiles of at most ``width`` columns, in column order.

        No tile straddles two views' copies of the columns, so each excludes one diagonal.

        Examples:
            >>> geometry = NegativeGeometry.single_process(3, "all")
            >>> block = next(geometry.row_blocks(2))
            >>> [(t.columns.start, t.columns.stop, t.excluded_diagonal)
            ...  for t in geometry.tiles(block, 2)]
            [(0, 2, 0), (2, 3, None), (3, 5, 0), (5, 6, None)]
        """
        for copy_start in range(block.columns.start, block.columns.stop, self.global_images):
            yield from self._copy_tiles(block, copy_start, 0, width)

    def _copy_tiles(
        self, block: RowBlock, copy_start: int, first: int, width: int
    ) -> Iterator[Tile]:
        """Columns ``first .. N - 1`` of the copy at ``copy_start``, as tiles of ``width``."""
        n, rows = self.global_images, block.rows.stop - block.rows.start
        for start in range(first, n, width):
            last = min(start + width, n)
            diagonal = block.first_image - start
            excludes = -rows < diagonal < last - start
            yield Tile(slice(copy_start + start, copy_start + last), diagonal if excludes else None)

    def symmetric_tiles(self, chunk_size: int, width: int) -> Iterator[PairTile]:
        """Tiles that hold every seen (row, column) entry once, directly or mirrored.

        In one process the rows are the columns and the negative set is symmetric, so the
        similarities of rows I against columns K are those of K against I, transposed. With
        ``"all"`` every block gets its square on the diagonal and then its own view's columns
        after the square; with either set a block of view 1 also gets all of view 2's columns.
        Every tile but the squares is mirrored: about half the entries of :meth:`tiles`.

        Raises:
            ValueError: If the rows are not the columns (more than one process).

        Examples:
            >>> geometry = NegativeGeometry.single_process(3, "all")
            >>> [(p.rows.start, p.tile.columns.start, p.tile.columns.stop, p.mirrored)
            ...  for p in geometry.symmetric_tiles(2, 4)]  # doctest: +NORMALIZE_WHITESPACE
            [(0, 0, 2, False), (0, 2, 3, True), (0, 3, 6, True), (2, 2, 3, False),
             (2, 3, 6, True), (3, 3, 5, False), (3, 5, 6, True), (5, 5, 6, False)]
        """
        n = self.global_images
        if self.local_images != n or self.first_image != 0:
            raise ValueError("symmetric tiles need the rows to be the columns (one process)")
        for block in self.row_blocks(chunk_size):
            view_start = block.rows.start - block.first_image
            if self.negatives == "all":
                yield PairTile(block.rows, Tile(block.rows, 0), mirrored=False)
                rest = block.rows.stop - view_start
                for tile in self._copy_tiles(block, view_start, rest, width):
                    yield PairTile(block.rows, tile, mirrored=True)
            if view_start == 0:
                for tile in self._copy_tiles(block, n, 0, width):
                    yield PairTile(block.rows, tile, mirrored=True)


def excluded_entries(block: torch.Tensor, first_image: int, global_images: int) -> torch.Tensor:
    """A view of the excluded entries of a block of rows of one view against their column range.

    Row ``i`` of the (rows, views seen x N) block is global image ``first_image + i``; writing
    into the view (e.g. ``fill_(-inf)``) writes into ``block``, with no mask.

    Examples:
        >>> block = torch.zeros(2, 8)
        >>> _ = excluded_entries(block, 1, 4).fill_(1.0)
        >>> block.nonzero().tolist()
        [[0, 1], [0, 5], [1, 2], [1, 6]]
    """
    rows, num_columns = block.shape
    return block.view(rows, num_columns // global_images, global_images).diagonal(
        offset=first_image, dim1=0, dim2=2
    )


def to_global_layout(gathered: torch.Tensor, ranks: int) -> torch.Tensor:
    """Reorders a rank-major gather of each rank's (2n, ...) stack into the global layout.

    ``[rank 0: view 1, view 2; rank 1: view 1, view 2; ...]`` becomes ``[view 1 of every rank;
    view 2 of every rank]``, the order of the columns.

    Examples:
        >>> to_global_layout(torch.tensor([0, 1, 10, 11, 2, 3, 12, 13]), 2).tolist()
        [0, 1, 2, 3, 10, 11, 12, 13]
    """
    per_rank = gathered.shape[0] // (2 * ranks)
    shape = (ranks, 2, per_rank, *gathered.shape[1:])
    return gathered.reshape(shape).transpose(0, 1).reshape(gathered.shape)
