"""What machine a benchmark ran on: the CPU model and its SIMD flags, read from /proc/cpuinfo."""
import platform
from typing import List


def _cpuinfo_field(name: str) -> str:
    """The first `name : value` line of /proc/cpuinfo -> value ('' when unreadable or absent)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(name)), "")
    except OSError:
        return ""


def cpu_model() -> str:
    """The CPU model name (platform.processor() where /proc/cpuinfo is missing)."""
    return _cpuinfo_field("model name") or platform.processor() or "unknown"


def cpu_flags() -> List[str]:
    """The SIMD-related flags of the CPU (avx*, amx*, fma), sorted; [] when unknown."""
    return sorted(fl for fl in _cpuinfo_field("flags").split() if fl.startswith(("avx", "amx", "fma")))


def bf16_native() -> bool:
    """Whether the CPU has bf16 dot-product instructions (AVX512-BF16 or AMX), or its flags are unknown."""
    flags = cpu_flags()
    return not flags or "avx512_bf16" in flags or "amx_bf16" in flags
