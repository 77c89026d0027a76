"""Keep freed memory in the process's heap (glibc malloc only) so that training does not page-fault its
activations back in at every step.

PyTorch's CPU tensors come straight from malloc. By default glibc serves the large ones (tens of MB per layer
at batch 32) with fresh mmap pages or returns the freed top of the heap to the OS after each step, so every
step pays its activations' page faults again (bench/README.md: ~45,000 minor faults per iLLaMA-T train step,
~84,000 for DeiT-T). Raising glibc's trim and mmap thresholds keeps those pages mapped; PyTorch's CPU
performance guide reaches the same end with jemalloc or tcmalloc. The CLI calls this for its own process;
a library import never does.
"""
import ctypes
import ctypes.util
import os

# glibc's mallopt parameter numbers (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
KEEP_BYTES = 2 ** 30
_USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_memory(max_bytes: int = KEEP_BYTES) -> bool:
    """Let glibc keep up to `max_bytes` of freed heap and serve allocations up to that size from the heap.

    Returns True when the thresholds were set; False on a C library without glibc's mallopt, or when the
    user set glibc's own MALLOC_*_ variables (their choice stands).
    """
    if any(name in os.environ for name in _USER_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt, version = libc.mallopt, libc.gnu_get_libc_version
    except (OSError, AttributeError):
        return False
    del version   # present only in glibc: other C libraries' mallopt takes other parameter numbers
    return bool(mallopt(M_TRIM_THRESHOLD, max_bytes)) and bool(mallopt(M_MMAP_THRESHOLD, max_bytes))
