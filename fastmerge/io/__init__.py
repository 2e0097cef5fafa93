"""Checkpoint I/O for untrusted files: validated safetensors reading (pread, or private
mappings for the CPU merge),
sequential hashed safetensors writing, and ``Checkpoint``, one input model (folder,
sharded index, single file, state dict or hub id)."""
from .checkpoint import Checkpoint
from .safetensors_file import DTYPES, SafetensorsFile, SafetensorsWriter, TensorInfo

__all__ = ["Checkpoint", "SafetensorsFile", "SafetensorsWriter", "TensorInfo", "DTYPES"]
