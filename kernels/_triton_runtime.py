"""Where a Triton kernel runs: compiled on a GPU, interpreted on the CPU.

Triton chooses between compiling and interpreting when each ``@triton.jit``
decorator runs, its own ``triton.language`` helpers included, i.e. when
``triton`` is first imported.  CPU tensors therefore need
``TRITON_INTERPRET=1`` in the environment before anything in the process
imports triton (export it in the test script when there is no GPU).
:func:`kernel_for` refuses CPU tensors with that advice instead of failing
deep inside the interpreter.
"""

from __future__ import annotations

import torch
import triton.language.standard as _tl_standard

__all__ = ["kernel_for", "is_hopper", "interpreter_active"]


def interpreter_active() -> bool:
    """True when triton was imported under TRITON_INTERPRET=1 (kernels run on CPU tensors)."""
    return type(_tl_standard.sum).__name__ == "InterpretedFunction"


def kernel_for(jit_function, device: torch.device):
    """The launchable form of ``jit_function`` for tensors on ``device``."""
    if device.type == "cpu" and not interpreter_active():
        raise RuntimeError(
            "vdit_sparse Triton kernels got CPU tensors but triton is compiling, not interpreting: "
            "set TRITON_INTERPRET=1 in the environment before triton is first imported "
            "(e.g. `export TRITON_INTERPRET=1` before pytest), or pass CUDA tensors"
        )
    return jit_function


def is_hopper(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9
