"""The keys of a case item, shared by the readers, the inference engine and the writers."""

from __future__ import annotations

from collections.abc import Mapping

# keys of every case item: the output name, what the reader reads, and why it could not be scored ("" when it
# could); where it came from (its path relative to the input folder) and its DICOM SeriesInstanceUID ("" for NIfTI)
NAME, PATH, ERROR = "name", "image_path", "error"


SOURCE, SERIES_UID = "source", "series_uid"


# what a failed case keeps of its item
IDENTITY = (NAME, PATH, SOURCE, SERIES_UID)


def identity_of(item: Mapping) -> dict:
    """What a failed case keeps of its item: :data:`IDENTITY`, the missing ones empty (an item of a caller that
    gives only ``name`` and ``image_path``)."""
    return {key: item.get(key, "") for key in IDENTITY}
