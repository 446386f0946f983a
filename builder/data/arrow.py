"""Arrow arrays built from numpy buffers, without pyarrow's pandas shim.

`pa.array()` on any Python or numpy value imports pandas the first time (half a second per
process, in every dataset worker too). Building arrays from buffers does not, so the dataset
stage never pays for pandas. Values are copied once into contiguous numpy buffers. numpy and
pyarrow are imported where they are used, so importing this module (as `tunefile validate` does,
through the dataset code) costs nothing.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa


def numbers(values, dtype: object = "int64") -> pa.Array:
    """An int32/int64 Arrow array (no nulls) from a sequence or numpy array."""
    import numpy as np
    import pyarrow as pa

    array = np.ascontiguousarray(values, dtype=dtype)
    arrow_type = {np.dtype(np.int32): pa.int32(), np.dtype(np.int64): pa.int64()}[array.dtype]
    return pa.Array.from_buffers(arrow_type, len(array), [None, pa.py_buffer(array)])


def strings(values: list[str | None]) -> pa.Array:
    """A UTF-8 string array; None becomes null. Text that is not valid UTF-8 (lone surrogates) is
    refused by the encoder, as pa.array would refuse it."""
    import numpy as np
    import pyarrow as pa

    encoded = [b"" if v is None else v.encode("utf-8") for v in values]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    validity = None
    if any(v is None for v in values):
        validity = pa.py_buffer(np.packbits(np.asarray([v is not None for v in values]), bitorder="little"))
    if offsets[-1] < 2**31:
        buffers = [validity, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(b"".join(encoded))]
        return pa.Array.from_buffers(pa.string(), len(encoded), buffers)
    return pa.Array.from_buffers(pa.large_string(), len(encoded),
                                 [validity, pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded))])


def lists(offsets, values: pa.Array) -> pa.Array:
    """A list array: row k holds values[offsets[k]:offsets[k + 1]]."""
    import pyarrow as pa

    return pa.ListArray.from_arrays(numbers(offsets, "int32"), values)


def integers(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """An int32/int64 column without nulls as an int64 numpy array (to_numpy goes through the
    pandas shim)."""
    import numpy as np
    import pyarrow as pa

    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    dtype = {pa.int32(): np.int32, pa.int64(): np.int64}[array.type]
    return np.frombuffer(array.buffers()[1], dtype=dtype)[array.offset:array.offset + len(array)].astype(np.int64)
