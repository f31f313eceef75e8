"""Visibility-map pages: two bits per heap block (all-visible, all-frozen) after a standard page header."""

from __future__ import annotations

from walredod.native.synthesized import ClearVisibilityMapFlags, TruncateVisibilityMap
from walredod.pg15 import BLCKSZ, SIZE_OF_PAGE_HEADER, init_page

PAGE_HEADER = SIZE_OF_PAGE_HEADER  # MAXALIGN(SizeOfPageHeaderData): the map starts here
HEAPBLOCKS_PER_BYTE = 4
HEAPBLOCKS_PER_PAGE = (BLCKSZ - PAGE_HEADER) * HEAPBLOCKS_PER_BYTE
VALID_BITS = 0x03


def new_page() -> bytearray:
    """What PostgreSQL makes of a missing map page it has to touch: PageInit, LSN 0."""
    return init_page()


def map_block_of(heap_block: int) -> int:
    return heap_block // HEAPBLOCKS_PER_PAGE


def clear(page: bytearray, map_block: int, record: ClearVisibilityMapFlags) -> None:
    """visibilitymap_clear for each heap block on this map page; the page LSN does not change."""
    mask = record.flags & VALID_BITS
    for heap_block in record.heap_blocks:
        if heap_block // HEAPBLOCKS_PER_PAGE != map_block:
            continue
        index = heap_block % HEAPBLOCKS_PER_PAGE
        byte = PAGE_HEADER + index // HEAPBLOCKS_PER_BYTE
        page[byte] &= ~(mask << (2 * (index % HEAPBLOCKS_PER_BYTE))) & 0xFF


def truncate(page: bytearray, map_block: int, record: TruncateVisibilityMap) -> bool:
    """visibilitymap_prepare_truncate: clear the bits of heap blocks at and past the new heap end on the map page
    that keeps some; map pages wholly past it are cut off with the file. True when this page is cut off."""
    cut_block, start = divmod(record.heap_nblocks, HEAPBLOCKS_PER_PAGE)
    if map_block < cut_block:
        return False
    if map_block > cut_block or start == 0:
        return True
    byte = PAGE_HEADER + start // HEAPBLOCKS_PER_BYTE
    page[byte + 1:BLCKSZ] = bytes(BLCKSZ - byte - 1)
    page[byte] &= (1 << (2 * (start % HEAPBLOCKS_PER_BYTE))) - 1
    return False
