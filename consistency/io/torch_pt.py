"""Torch-free reader for PyTorch zip checkpoints (torch.save since 1.6) into numpy arrays."""

import collections
import io
import pickle
import zipfile
from collections.abc import Callable
from typing import Any

import numpy as np

# torch.<Name>Storage -> numpy dtype name; bfloat16 comes from ml_dtypes (a jax dependency).
_STORAGE_DTYPES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}
# torch.save before 1.6 wrote a bare pickle stream starting with this pickled magic number.
_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


class _StorageType:
    """Stand-in for a torch.<Name>Storage class: only its element dtype matters here."""

    def __init__(self, name: str):
        self.name = name
        if _STORAGE_DTYPES[name] == "bfloat16":
            import ml_dtypes

            self.dtype = np.dtype(ml_dtypes.bfloat16)
        else:
            self.dtype = np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor_v2(
    storage: np.ndarray,
    storage_offset: int,
    size: tuple,
    stride: tuple,
    requires_grad: bool = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> np.ndarray:
    """tensor[idx] = storage[offset + sum_i idx_i stride_i], copied out of the (shared) storage."""
    del requires_grad, backward_hooks, metadata  # autograd bookkeeping; no effect on values
    if not isinstance(storage, np.ndarray):
        raise pickle.UnpicklingError(f"tensor rebuilt from {type(storage).__name__}, not a storage")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride):
        raise pickle.UnpicklingError(f"tensor size {size} and stride {stride} differ in rank")
    if 0 in size:
        return np.zeros(size, storage.dtype)
    if storage_offset < 0 or min(stride, default=0) < 0:
        raise pickle.UnpicklingError(f"negative offset/stride {storage_offset}, {stride}")
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= storage.size:
        raise pickle.UnpicklingError(
            f"tensor (offset {storage_offset}, size {size}, stride {stride}) reads past its "
            f"storage of {storage.size} elements"
        )
    view = np.lib.stride_tricks.as_strided(
        storage[storage_offset:],
        shape=size,
        strides=tuple(s * storage.itemsize for s in stride),
        writeable=False,
    )
    return np.array(view)  # own the memory: views into a shared flat storage stay independent


def _rebuild_parameter(data: np.ndarray, requires_grad: bool, backward_hooks: Any) -> np.ndarray:
    """nn.Parameter(data) -> data."""
    return data


def _rebuild_parameter_with_state(
    data: np.ndarray, requires_grad: bool, backward_hooks: Any, state: Any
) -> np.ndarray:
    """nn.Parameter(data) with extra python state -> data (the state is dropped)."""
    return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Callable] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
}


def _read_storage(raw: bytes, dtype: np.dtype, big_endian: bool) -> np.ndarray:
    """A flat storage file as a native-endian 1-D array of `dtype`."""
    if not big_endian or dtype.itemsize == 1:
        return np.frombuffer(raw, dtype)
    if dtype.kind == "V" or dtype.name == "bfloat16":  # custom dtype: swap its 2 bytes by hand
        return np.frombuffer(raw, ">u2").astype("<u2").view(dtype)
    return np.frombuffer(raw, dtype.newbyteorder(">")).astype(dtype)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler resolving only the globals a state dict needs; storages are read from the zip."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, big_endian: bool):
        super().__init__(io.BytesIO(data))
        self._archive, self._prefix, self._big_endian = archive, prefix, big_endian
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(
            f"refusing global {module}.{name}: a state dict holds only tensors, dicts and plain "
            "values (allowed: collections.OrderedDict, torch._utils._rebuild_tensor_v2 / "
            "_rebuild_parameter[_with_state], torch.<dtype>Storage)"
        )

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}; expected a storage")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"storage {key!r} has unknown type {storage_type!r}")
        if key not in self._storages:
            raw = self._archive.read(f"{self._prefix}/data/{key}")
            arr = _read_storage(raw, storage_type.dtype, self._big_endian)
            if arr.size < numel:
                raise pickle.UnpicklingError(
                    f"storage {key!r} holds {arr.size} elements, the pickle says {numel}"
                )
            self._storages[key] = arr[:numel]
        return self._storages[key]


def _flatten(obj: Any, prefix: str, out: dict[str, np.ndarray]) -> None:
    """Collect arrays from nested dicts/lists under '.'-joined keys; other leaves are dropped."""
    if isinstance(obj, np.ndarray):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            _flatten(v, f"{prefix}.{i}" if prefix else str(i), out)


def _archive_prefix(archive: zipfile.ZipFile, path: str) -> str:
    """The top folder holding data.pkl (torch names it after the file; any name is accepted)."""
    pkls = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkls) != 1:
        raise ValueError(f"{path}: expected one <prefix>/data.pkl in the zip, found {pkls}")
    return pkls[0][: -len("/data.pkl")]


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
    """{name: np.ndarray} from a torch.save zip checkpoint, read without torch.

    Tensors keep their stored dtype (float16 stays float16, bfloat16 is ml_dtypes.bfloat16),
    shape, offset and strides; views into shared storages come back as independent copies.
    Nested containers ({'state_dict': {...}}, {'model': ..., 'ema': ...}, lists) are flattened
    with '.'-joined keys ('model.conv.weight'); non-tensor leaves (step counters, strings) are
    dropped. A bare saved tensor comes back under the key ''. Only the globals a state dict
    needs are resolved; any other global, and the pre-1.6 non-zip format, raise errors naming it.
    """
    path = str(path)
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(16)
        kind = "a legacy (torch < 1.6) torch.save file" if _LEGACY_MAGIC in head else "not a zip"
        raise ValueError(
            f"{path}: {kind}; only the zip format of torch.save (torch >= 1.6) is supported; "
            "re-save it with torch.save(obj, path) on a recent torch"
        )
    with zipfile.ZipFile(path) as archive:
        prefix = _archive_prefix(archive, path)
        names = set(archive.namelist())
        order = f"{prefix}/byteorder"
        big = order in names and archive.read(order).strip() == b"big"
        try:
            obj = _RestrictedUnpickler(
                archive.read(f"{prefix}/data.pkl"), archive, prefix, big
            ).load()
        except pickle.UnpicklingError as e:
            raise pickle.UnpicklingError(f"{path}: {e}") from None
    out: dict[str, np.ndarray] = {}
    _flatten(obj, "", out)
    return out
