"""How an optimizer stores its state buffers (SPEC.md, "Low-precision optimizer state").

``state_dtype`` picks a *store*, which allocates a buffer, lays it out for the update kernels,
and converts it to and from :meth:`state_dict` entries:

- :class:`FloatStore` (None, "float32", "float64", "bfloat16"): one flat array per buffer, the
  params laid end to end; bfloat16 as uint16 bits (``kernels.quantize.load`` / ``store``).
  A saved entry is one array per param of the param's shape, in the storage dtype (bfloat16:
  uint16 bits, so that a resume is bit-identical).
- :class:`Int8Store` ("int8"): per buffer, uint8 codes and float32 absmax of the tensors whose
  models hold at least ``min_8bit_size`` elements (each model's codes padded to whole blocks of
  ``kernels.quantize.BLOCK``), and one flat float32 array for the smaller tensors. A saved
  entry per param is ``{"codes": uint8 of the param's shape, "absmax": float32 (blocks,) or
  (K, blocks)}``, or a float32 array of the param's shape for a small tensor.

Every store loads what the other stores save: float state into int8 is quantized (each block
on its absmax, to the nearest code), int8 into float is dequantized, float into bfloat16 is
rounded to nearest even.
"""

import numpy as np

from . import _validate
from .device import to_host

STATE_DTYPES = ("float32", "float64", "bfloat16", "int8")
MIN_8BIT_SIZE = 4096
BFLOAT16_BITS = np.dtype(np.uint16)


def state_dtype_name(value, params_dtype):
    """The storage named by ``state_dtype`` (None: the params' dtype); TypeError for a
    non-string or for low precision over float64 params, ValueError for an unknown name."""
    if value is None:
        return np.dtype(params_dtype).name
    if not isinstance(value, str):
        raise TypeError(f"state_dtype must be None or one of the strings {STATE_DTYPES}; got "
                        f"{value!r} of type {type(value).__name__}")
    if value not in STATE_DTYPES:
        raise ValueError(f"state_dtype must be None or one of {STATE_DTYPES}; got {value!r}")
    if value in ("bfloat16", "int8") and np.dtype(params_dtype) != np.float32:
        raise TypeError(f"state_dtype={value!r} needs float32 params (the update math is "
                        f"float32); got {np.dtype(params_dtype)} params")
    return value


def make_store(name, ops, n_models, population, min_8bit_size=MIN_8BIT_SIZE):
    """The store of storage ``name`` for the params of ``ops`` (K = ``n_models``)."""
    if name == "int8":
        return Int8Store(ops, n_models, population, min_8bit_size)
    return FloatStore(ops, n_models, population, name)


class _Store:
    def __init__(self, ops, n_models, population):
        self.ops, self.n_models, self.population = ops, n_models, population


class FloatStore(_Store):
    """Flat arrays of the storage dtype, state at each element's flat offset."""

    quantized = None  # no tensor has 8-bit state

    def __init__(self, ops, n_models, population, name):
        super().__init__(ops, n_models, population)
        self.name = name
        self.dtype = BFLOAT16_BITS if name == "bfloat16" else np.dtype(name)
        # what a saved array may hold: the storage dtype, bfloat16 bits (decoded), and float32
        # for bfloat16 storage (rounded)
        self.accepted = (self.dtype, np.dtype(np.float32)) if name == "bfloat16" \
            else (self.dtype, BFLOAT16_BITS)

    def zeros(self):
        return self.ops.zeros(self.ops.total, self.dtype)

    def parts(self, buffer):
        """Per param, the arrays of ``buffer`` holding its state (each with the param's leading
        model axis for a population)."""
        return [[view] for view in self.ops.views(buffer)]

    def saved(self, buffer):
        return [self.ops.host_copy(view) for view in self.ops.views(buffer)]

    def checked(self, arrays, argument, shapes, signed):
        """Host arrays to write for a saved entry ``arrays`` (from any store); raises before
        anything is written."""
        _list_of(arrays, argument, shapes)
        out = []
        for j, (a, shape) in enumerate(zip(arrays, shapes)):
            name = f"{argument}[{j}]"
            if isinstance(a, dict):
                a = _dequantized(a, name, shape, signed, self.n_models)
            else:
                a = _float_array(a, name, shape, self.accepted)
            if self.dtype == BFLOAT16_BITS and a.dtype != BFLOAT16_BITS:
                a = bfloat16_bits(a)
            elif self.dtype != BFLOAT16_BITS and a.dtype == BFLOAT16_BITS:
                a = bfloat16_values(a)
            out.append(a)
        return out

    def write(self, buffer, arrays):
        for view, a in zip(self.ops.views(buffer), arrays):
            self.ops.write(view, a.astype(self.dtype, copy=False))

    def kernel_arguments(self, buffers):
        return buffers


class Int8Store(_Store):
    """8-bit codes and absmax for the large tensors, float32 for the small ones."""

    name = "int8"

    def __init__(self, ops, n_models, population, min_8bit_size):
        super().__init__(ops, n_models, population)
        from fastdl.kernels.quantize import BLOCK

        self.block = BLOCK
        self.min_8bit_size = min_8bit_size
        per_model = ops.sizes // n_models
        self.per_model = per_model
        self.quantized = per_model >= min_8bit_size  # per tensor
        self.blocks = -(-per_model // BLOCK)  # per model of each tensor
        padded = np.where(self.quantized, self.blocks * BLOCK * n_models, 0)
        small = np.where(self.quantized, 0, ops.sizes)
        self.code_offsets = np.concatenate([[0], np.cumsum(padded)])
        self.small_offsets = np.concatenate([[0], np.cumsum(small)])

    def state_offset(self, j, k):
        """Where model k of tensor j keeps its state: in the codes or the small array."""
        if self.quantized[j]:
            return int(self.code_offsets[j] + k * self.blocks[j] * self.block)
        return int(self.small_offsets[j] + k * self.per_model[j])

    def zeros(self):
        codes = self.ops.zeros(int(self.code_offsets[-1]), np.uint8)
        absmax = self.ops.zeros(int(self.code_offsets[-1]) // self.block, np.float32)
        small = self.ops.zeros(int(self.small_offsets[-1]), np.float32)
        return Int8Buffer(codes, absmax, small)

    def parts(self, buffer):
        out = []
        for j, shape in enumerate(self.ops.shapes):
            if self.quantized[j]:
                lo, hi = int(self.code_offsets[j]), int(self.code_offsets[j + 1])
                codes = buffer.codes[lo:hi].reshape(self.n_models, -1)
                absmax = buffer.absmax[lo // self.block:hi // self.block].reshape(
                    self.n_models, -1)
                out.append([codes, absmax] if self.population else [codes[0], absmax[0]])
            else:
                lo, hi = int(self.small_offsets[j]), int(self.small_offsets[j + 1])
                out.append([buffer.small[lo:hi].reshape(shape)])
        return out

    def saved(self, buffer):
        out = []
        for j, (parts, shape) in enumerate(zip(self.parts(buffer), self.ops.shapes)):
            if not self.quantized[j]:
                out.append(self.ops.host_copy(parts[0]))
                continue
            codes = self.ops.host_copy(parts[0])
            n = int(self.per_model[j])
            codes = codes[..., :n].reshape(shape).copy()
            out.append({"codes": codes, "absmax": self.ops.host_copy(parts[1])})
        return out

    def checked(self, arrays, argument, shapes, signed):
        _list_of(arrays, argument, shapes)
        from fastdl.kernels.quantize import nearest_signed, nearest_unsigned, quantize_rows

        out = []
        for j, (a, shape) in enumerate(zip(arrays, shapes)):
            name = f"{argument}[{j}]"
            if not self.quantized[j]:
                if isinstance(a, dict):
                    raise ValueError(
                        f"{name} holds 8-bit codes, but this optimizer keeps float32 state "
                        f"for params of under min_8bit_size={self.min_8bit_size} elements per "
                        f"model (this one has {int(self.per_model[j])}): a state dict of "
                        "another min_8bit_size")
                out.append(_as_float32(_float_array(a, name, shape, FLOAT32_OR_BITS)))
                continue
            rows, n = self.n_models, int(self.per_model[j])
            padded = int(self.blocks[j]) * self.block
            if isinstance(a, dict):
                codes, absmax = self._checked_codes(a, name, shape, j)
                full = np.zeros((rows, padded), np.uint8)
                full[:, :n] = codes.reshape(rows, n)
                out.append((full, absmax.reshape(rows, -1)))
            else:
                values = _as_float32(_float_array(a, name, shape, FLOAT32_OR_BITS))
                full = np.zeros((rows, padded), np.float32)
                full[:, :n] = values.reshape(rows, n)
                codes = np.empty((rows, padded), np.uint8)
                absmax = np.empty((rows, padded // self.block), np.float32)
                quantize_rows(full, codes, absmax, nearest_signed if signed else nearest_unsigned)
                out.append((codes, absmax))
        return out

    def _checked_codes(self, entry, name, shape, j):
        _validate.entries(entry, name, ("codes", "absmax"))
        codes, absmax = to_host(entry["codes"]), to_host(entry["absmax"])
        for key, a, dtype in (("codes", codes, np.uint8), ("absmax", absmax, np.float32)):
            if not isinstance(a, np.ndarray):
                raise TypeError(f"{name}[{key!r}] must be an array; got "
                                f"{_validate.describe(a)}")
            if a.dtype != dtype:
                raise TypeError(f"{name}[{key!r}] must have dtype {np.dtype(dtype)}; got "
                                f"{a.dtype}")
        if tuple(codes.shape) != tuple(shape):
            raise ValueError(f"{name}['codes'] must have the param's shape {tuple(shape)}; got "
                             f"{tuple(codes.shape)}")
        want = (self.n_models, int(self.blocks[j])) if self.population \
            else (int(self.blocks[j]),)
        if tuple(absmax.shape) != want:
            raise ValueError(f"{name}['absmax'] must have shape {want} (blocks of "
                             f"{self.block} per model); got {tuple(absmax.shape)}: a state "
                             "dict of another block layout")
        return codes, absmax

    def write(self, buffer, arrays):
        for j, (parts, a) in enumerate(zip(self.parts(buffer), arrays)):
            if self.quantized[j]:
                codes, absmax = a
                self.ops.write(parts[0], codes.reshape(tuple(parts[0].shape)))
                self.ops.write(parts[1], absmax.reshape(tuple(parts[1].shape)))
            else:
                self.ops.write(parts[0], a)

    def kernel_arguments(self, buffers):
        """(small float32 arrays, codes tuple, absmax tuple), each in the kernel's state
        order."""
        return ([b.small if isinstance(b, Int8Buffer) else b for b in buffers],
                tuple(b.codes if isinstance(b, Int8Buffer) else self._no_codes for b in buffers),
                tuple(b.absmax if isinstance(b, Int8Buffer) else self._no_absmax
                      for b in buffers))

    @property
    def _no_codes(self):
        return self.ops.zeros(0, np.uint8)

    @property
    def _no_absmax(self):
        return self.ops.zeros(0, np.float32)


class Int8Buffer:
    """One 8-bit state buffer: ``codes`` uint8, ``absmax`` float32 (one per block), and
    ``small`` float32 (the state of the tensors under min_8bit_size)."""

    __slots__ = ("codes", "absmax", "small")

    def __init__(self, codes, absmax, small):
        self.codes, self.absmax, self.small = codes, absmax, small

    def arrays(self):
        return (self.codes, self.absmax, self.small)


def bfloat16_bits(a):
    """float32/float64 values -> bfloat16 bits (round to nearest even; via float32)."""
    x = np.asarray(a, np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), ((u >> 16) | 0x40).astype(np.uint16), rounded)


def bfloat16_values(bits):
    """bfloat16 bits -> float32 values (exact)."""
    return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32)


FLOAT32_OR_BITS = (np.dtype(np.float32), BFLOAT16_BITS)


def _as_float32(a):
    return bfloat16_values(a) if a.dtype == BFLOAT16_BITS else a


def _list_of(arrays, argument, shapes):
    if not isinstance(arrays, (list, tuple)):
        raise TypeError(f"{argument} must be a list with one entry per param; got "
                        f"{_validate.describe(arrays)}")
    if len(arrays) != len(shapes):
        raise ValueError(f"{argument} has {len(arrays)} arrays; expected {len(shapes)}")


def _float_array(a, name, shape, accepted):
    """A saved array as a host array, of one of the ``accepted`` dtypes (nothing else is cast:
    a float64 state into a float32 store is a TypeError, as a wrong dtype is everywhere)."""
    if not isinstance(a, np.ndarray) and not hasattr(a, "__cuda_array_interface__"):
        raise TypeError(f"{name} must be an array; got {_validate.describe(a)}")
    a = to_host(a)
    if a.dtype not in accepted:
        names = " or ".join(str(d) + (" (bfloat16 bits)" if d == BFLOAT16_BITS else "")
                            for d in accepted)
        raise TypeError(f"{name} must have dtype {names}; got {a.dtype}")
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}; got {tuple(a.shape)}")
    return a


def _dequantized(entry, name, shape, signed, n_models):
    """A saved 8-bit entry as float32 values of ``shape``."""
    from fastdl.kernels.quantize import BLOCK, SIGNED_CODES, UNSIGNED_CODES

    _validate.entries(entry, name, ("codes", "absmax"))
    codes, absmax = to_host(entry["codes"]), to_host(entry["absmax"])
    if not (isinstance(codes, np.ndarray) and codes.dtype == np.uint8):
        raise TypeError(f"{name}['codes'] must be a uint8 array; got "
                        f"{_validate.describe(codes)}")
    if not (isinstance(absmax, np.ndarray) and absmax.dtype == np.float32):
        raise TypeError(f"{name}['absmax'] must be a float32 array; got "
                        f"{_validate.describe(absmax)}")
    if tuple(codes.shape) != tuple(shape):
        raise ValueError(f"{name}['codes'] must have shape {tuple(shape)}; got "
                         f"{tuple(codes.shape)}")
    rows = codes.reshape(n_models, -1)
    blocks = -(-rows.shape[1] // BLOCK)
    if absmax.size != n_models * blocks:
        raise ValueError(f"{name}['absmax'] must hold {n_models * blocks} values (blocks of "
                         f"{BLOCK} per model); got {absmax.size}: a state dict of another "
                         "block layout")
    table = SIGNED_CODES if signed else UNSIGNED_CODES
    scale = np.repeat(absmax.reshape(n_models, blocks), BLOCK, axis=1)[:, :rows.shape[1]]
    return (table[rows] * scale).reshape(shape)
