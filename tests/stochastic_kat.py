"""Known answers for the stochastic-rounding generator, from its definition.

An independent, plain-integer transcription of the generator
(csrc/include/flocora/affine.h: the lowbias32 mix, a key from the seed and the
upper 32 bits of the element index, u24 from the lower 32 bits), known answers
around the key-block boundaries 2^32 and 2^33, and a probe that reads the
kernel's draws through its codes. Shared by test_quant.py (CPU) and
test_cuda_parity.py (CUDA).
"""

import torch

_M32 = 0xFFFFFFFF


def mix32(x):
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def u24(seed, index):
    k = mix32(((seed >> 32) & _M32) ^ 0x9E3779B9)
    k = mix32((seed & _M32) ^ k)
    key = mix32(k ^ ((index >> 32) & _M32) ^ 0x85EBCA6B)
    return mix32((mix32((index & _M32) ^ key) + key) & _M32) >> 8


# (seed, element index) -> u24.
KNOWN_U24 = {
    (7, 5): 11982779,
    (7, 2**32 - 1): 5132791,
    (7, 2**32): 5251214,
    (7, 2**32 + 1): 14126381,
    (7, 2**33 - 1): 3134877,
    (7, 2**33): 5359581,
    (7, 2**33 + 1): 3758442,
    (2**40 + 3, 2**32 - 1): 7957261,
    (2**40 + 3, 2**32): 10873824,
    (2**40 + 3, 2**33): 15664837,
}


def probe_inputs(want):
    """Two inputs whose 1-bit stochastic codes pin the draws to ``want``.

    One group with offset 0 and scale 1 (bits = 1, min 0, max 1), so an
    element x in [0, 1) codes to [u < x]: x = U/2^24 gives code 0 iff
    u24 >= U, and x = (U+1)/2^24 gives code 1 iff u24 <= U; together they pin
    u24 == U. The first and last elements hold 0 and 1 (they fix the range
    and are not checked). Returns [(x, expected code of x[1:-1]), ...].
    """
    out = []
    for delta, code in ((0, 0), (1, 1)):
        x = torch.tensor([(w + delta) / 2**24 for w in want], dtype=torch.float64).float()
        x[0], x[-1] = 0.0, 1.0
        out.append((x, code))
    return out
