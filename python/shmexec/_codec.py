"""How an item becomes a skeleton plus arrays, and back.

An item is any picklable object; its numpy arrays (of any dtype without Python objects,
structured ones included, at any depth: a tuple, a dict, a dataclass) travel as raw bytes
beside a small pickle of everything else (the *skeleton*), in which each array is a
reference ``(index, dtype, shape)``. A lone array needs no pickle at all, and an array paired
with a scalar (``(out, count)``, the commonest result) only the scalar's. The receiver makes
each array with ``numpy.frombuffer`` over the frame: a read-only view in shared memory.

Arrays that are not C-contiguous are made contiguous first (a copy); arrays of Python
objects and numpy subclasses (masked arrays, matrices) are pickled with the skeleton.
"""

from __future__ import annotations

import io
import pickle
import struct

import numpy as np

_LONE = b"A"
_PAIR = b"T"
_PICKLE = b"P"
_HEAD = struct.Struct("<B")
#: What the second half of a pair may be: objects that hold no array, pickled alone fast.
_SCALARS = (int, float, bool, complex, str, bytes, type(None), np.generic)
_DTYPES: dict[bytes, np.dtype] = {}


def _bytes_of(a: np.ndarray) -> np.ndarray:
    """The array's bytes as a flat uint8 array, without a copy where the array is C-contiguous."""
    if not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)
    if a.dtype.itemsize == 0 or a.size == 0:
        return np.empty(0, np.uint8)
    return a.reshape(-1).view(np.uint8)


def _plain(dtype: np.dtype) -> bool:
    """Whether ``dtype.str`` says all there is to say about the dtype."""
    return dtype.fields is None and dtype.subdtype is None and not dtype.hasobject


class _Pickler(pickle.Pickler):
    def __init__(self, file, arrays):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.arrays = arrays

    def persistent_id(self, obj):
        if type(obj) is np.ndarray and not obj.dtype.hasobject:
            self.arrays.append(_bytes_of(obj))
            return (len(self.arrays) - 1, obj.dtype, obj.shape)
        return None


def _lone(shape, dtype: np.dtype) -> bytes:
    """The skeleton of a lone array of a plain dtype."""
    head = _LONE + _HEAD.pack(len(shape)) + struct.pack(f"<{len(shape)}q", *shape)
    return head + dtype.str.encode()


def _pair(a: np.ndarray, scalar) -> bytes:
    """The skeleton of ``(a, scalar)``: ``a``'s shape and dtype, then the scalar pickled."""
    code = a.dtype.str.encode()
    head = _PAIR + _HEAD.pack(a.ndim) + struct.pack(f"<{a.ndim}q", *a.shape)
    return head + _HEAD.pack(len(code)) + code + pickle.dumps(scalar, pickle.HIGHEST_PROTOCOL)


def _is_pair(obj) -> bool:
    """Whether ``obj`` is ``(array of a plain dtype, scalar)``: a skeleton without a pickler."""
    return (type(obj) is tuple and len(obj) == 2 and type(obj[0]) is np.ndarray
            and _plain(obj[0].dtype) and isinstance(obj[1], _SCALARS)
            and not (isinstance(obj[1], np.generic) and obj[1].dtype.hasobject))


def _dtype(code: bytes) -> np.dtype:
    dtype = _DTYPES.get(code)
    if dtype is None:
        dtype = _DTYPES.setdefault(code, np.dtype(code.decode()))
    return dtype


def _shape(skeleton: bytes) -> tuple[tuple, int]:
    """The shape of a lone or paired skeleton, and where the bytes after it start."""
    (ndim,) = _HEAD.unpack_from(skeleton, 1)
    return struct.unpack_from(f"<{ndim}q", skeleton, 2), 2 + 8 * ndim


def size(encoded: tuple[bytes, list[np.ndarray]]) -> int:
    """The bytes an encoded item takes in a ring (its skeleton and its arrays)."""
    skeleton, arrays = encoded
    return len(skeleton) + sum(a.nbytes for a in arrays)


def encode(obj) -> tuple[bytes, list[np.ndarray]]:
    """The skeleton and the arrays (flat uint8) of ``obj``."""
    if type(obj) is np.ndarray and _plain(obj.dtype):
        return _lone(obj.shape, obj.dtype), [_bytes_of(obj)]
    if _is_pair(obj):
        return _pair(obj[0], obj[1]), [_bytes_of(obj[0])]
    arrays: list[np.ndarray] = []
    buf = io.BytesIO()
    buf.write(_PICKLE)
    _Pickler(buf, arrays).dump(obj)
    return buf.getvalue(), arrays


class _AroundPickler(_Pickler):
    """The pickler of a result written in place: ``out`` is array 0, already in the frame."""

    def __init__(self, file, out):
        super().__init__(file, [])
        self.out = out

    def persistent_id(self, obj):
        if obj is self.out:
            return (0, obj.dtype, obj.shape)
        return None


def encode_around(obj, out: np.ndarray) -> bytes:
    """The skeleton of ``obj``, whose one array in the frame is ``out`` (written in place);
    any other array in it is pickled with the skeleton."""
    if obj is out and _plain(out.dtype):
        return _lone(out.shape, out.dtype)
    if _is_pair(obj) and obj[0] is out:
        return _pair(out, obj[1])
    buf = io.BytesIO()
    buf.write(_PICKLE)
    _AroundPickler(buf, out).dump(obj)
    return buf.getvalue()


def _expand(dtype: np.dtype, shape) -> tuple[np.dtype, tuple]:
    """A subarray dtype (``('f8', (3,))``) as its base and a longer shape, as numpy makes
    arrays of it."""
    if dtype.subdtype is not None:
        base, sub = dtype.subdtype
        return base, tuple(shape) + tuple(sub)
    return dtype, tuple(shape)


def room(frame, dtype: np.dtype, shape) -> np.ndarray:
    """A writable array of ``shape`` and ``dtype`` over ``frame`` (the room of a result)."""
    dtype, shape = _expand(dtype, shape)
    count = 1
    for n in shape:
        count *= n
    if count == 0 or dtype.itemsize == 0:
        return np.empty(shape, dtype)
    return np.frombuffer(frame, dtype=dtype, count=count).reshape(shape)


def _view(frame, dtype: np.dtype, shape, at: tuple, copy: bool) -> np.ndarray:
    # (offset, length) in the frame, or (offset, length, region) for an input array that lies
    # in the pool's shared region.
    offset, nbytes = at[0], at[1]
    if len(at) == 3:
        frame = at[2]
    dtype, shape = _expand(dtype, shape)
    count = 1
    for n in shape:
        count *= n
    if count == 0 or dtype.itemsize == 0:
        a = np.empty(shape, dtype)
        a.flags.writeable = copy
        return a
    if count * dtype.itemsize != nbytes:
        raise ValueError(f"an array of {shape} {dtype} has {nbytes} bytes in the frame")
    a = np.frombuffer(frame, dtype=dtype, count=count, offset=offset).reshape(shape)
    return a.copy() if copy else a


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, frame, arrays, copy):
        super().__init__(file)
        self.frame = frame
        self.arrays = arrays
        self.copy = copy

    def persistent_load(self, pid):
        index, dtype, shape = pid
        return _view(self.frame, dtype, shape, self.arrays[index], self.copy)


def decode(frame, skeleton: bytes, arrays: list[tuple[int, int]], copy: bool = False):
    """The item whose skeleton is ``skeleton`` and whose arrays lie in ``frame`` at
    ``arrays`` (offset, length), or in a shared region (offset, length, region): arrays are
    read-only views of the frame (``copy``: arrays of their own)."""
    tag = skeleton[:1]
    if tag == _LONE:
        shape, at = _shape(skeleton)
        return _view(frame, _dtype(skeleton[at:]), shape, arrays[0], copy)
    if tag == _PAIR:
        shape, at = _shape(skeleton)
        (n,) = _HEAD.unpack_from(skeleton, at)
        dtype = _dtype(skeleton[at + 1 : at + 1 + n])
        return _view(frame, dtype, shape, arrays[0], copy), pickle.loads(skeleton[at + 1 + n :])
    if tag == _PICKLE:
        return _Unpickler(io.BytesIO(skeleton[1:]), frame, arrays, copy).load()
    raise ValueError("not a shmexec item")
