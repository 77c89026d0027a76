"""Seeds derived from several integers: what makes data order, augmentation and every step's random draws
reproducible after a resume (used by the shard reader and the step loop)."""


def mix_seed(*parts: int) -> int:
    """One 31-bit seed from several integers (seed, epoch, index, ...); different tuples, different seeds."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
    return h % (2 ** 31 - 1)
