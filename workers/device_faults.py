"""Errors that leave a process's CUDA context broken for good, and how a worker notices them.

After an illegal memory access, a misaligned address, an illegal instruction or a kernel
that faulted, every later CUDA call of the process fails too (the seeds' crash logs: "Cuda
Error in executeInternal: 77 (an illegal memory access was encountered)", "74 (misaligned
address)"). The process lives on, so nothing else tells the fleet: the worker must stop
taking requests at once and be restarted. These are recognized by their message, the one
thing ONNX Runtime, TensorRT, cuda-python and CuPy errors have in common.
"""

from __future__ import annotations

import re

# CUDA runtime error codes and texts that are sticky (cudaError_t: 700 illegal address, 701 launch
# out of resources is not sticky; 702 launch timeout, 709 context destroyed, 710 assert, 714 hardware
# stack error, 715 illegal instruction, 716 misaligned address, 717 invalid address space, 718 invalid
# pc, 719 launch failure; CUDA 10 and older numbered some of them 73-77).
_STICKY = re.compile(
    r"illegal memory access|misaligned address|illegal instruction|unspecified launch failure|"
    r"hardware stack error|invalid program counter|invalid address space|device-side assert|"
    r"cudaErrorIllegalAddress|cudaErrorMisalignedAddress|cudaErrorLaunchFailure|cudaErrorIllegalInstruction|"
    r"CUDA_ERROR_ILLEGAL_ADDRESS|CUDA_ERROR_MISALIGNED_ADDRESS|CUDA_ERROR_LAUNCH_FAILED|"
    r"context is destroyed|ECC error|uncorrectable ECC",
    re.IGNORECASE,
)


def is_sticky_cuda_error(exc: BaseException) -> bool:
    """Whether ``exc`` says the process's CUDA context is broken for good."""
    return bool(_STICKY.search(f"{type(exc).__name__}: {exc}"))
