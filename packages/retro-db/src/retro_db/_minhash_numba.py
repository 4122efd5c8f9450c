"""Numba kernel behind :func:`retro_db.minhash.minhash_signatures` (``backend="numba"``).

MinHash signatures of the ``affine32`` scheme, bit-identical to ``datasketch.MinHash``: for every
shingle (``ngram`` consecutive token ids as little-endian uint32 bytes, or the whole document
when it is shorter), SHA-1 of those bytes, the first 4 digest bytes read little-endian
(``datasketch.hashfunc.sha1_hash32``), the MurmurHash3 32-bit finaliser, then
``a_k * h + b_k mod 2**32`` and a running minimum per permutation k.

SHA-1 (FIPS 180-4) is computed on 16 shingles at once (one per SIMD lane) so that LLVM vectorises
the rounds; a tail group repeats its last shingle, which leaves the minimum unchanged. A SHA-1
message word is 4 bytes big-endian, so message word j of a shingle is the byte-swapped token j;
then the 0x80 pad word, zeros, and the 64-bit bit length. Tested against datasketch itself
(tests/test_minhash.py).
"""

import numpy as np
from numba import njit

LANES = 16


# long by design: one numba kernel (SHA-1 over LANES shingles, then the permutations) in the hot loop
@njit(cache=True, nogil=True)
def signatures_affine32(tok, offsets, ngram, pa, pb, out):
    """Fill out[D, P] (uint32) for docs tok[offsets[d]:offsets[d+1]] (uint32 ids), perms pa, pb."""
    W = np.empty((80, LANES), np.uint32)
    A = np.empty(LANES, np.uint32)
    B = np.empty(LANES, np.uint32)
    C = np.empty(LANES, np.uint32)
    D = np.empty(LANES, np.uint32)
    E = np.empty(LANES, np.uint32)
    T = np.empty(LANES, np.uint32)
    H = np.empty((5, LANES), np.uint32)
    HV = np.empty(LANES, np.uint32)
    P = pa.shape[0]
    for d in range(offsets.shape[0] - 1):
        s = offsets[d]
        n = offsets[d + 1] - s
        for k in range(P):
            out[d, k] = np.uint32(0xFFFFFFFF)
        if n == 0:
            continue
        nsh = n - ngram + 1 if n >= ngram else 1
        L = ngram if n >= ngram else n
        total_words = ((4 * L + 8) // 64 + 1) * 16
        bits = 32 * L
        for g in range(0, nsh, LANES):
            for ln in range(LANES):
                H[0, ln] = np.uint32(0x67452301)
                H[1, ln] = np.uint32(0xEFCDAB89)
                H[2, ln] = np.uint32(0x98BADCFE)
                H[3, ln] = np.uint32(0x10325476)
                H[4, ln] = np.uint32(0xC3D2E1F0)
            for blk in range(0, total_words, 16):
                for j in range(16):
                    idx = blk + j
                    if idx < L:
                        for ln in range(LANES):
                            i = min(g + ln, nsh - 1)  # tail lanes repeat the last shingle
                            x = tok[s + i + idx]
                            W[j, ln] = np.uint32(
                                ((x & 0xFF) << 24)
                                | ((x & 0xFF00) << 8)
                                | ((x >> 8) & 0xFF00)
                                | (x >> 24)
                            )
                    else:
                        if idx == L:
                            v = np.uint32(0x80000000)
                        elif idx == total_words - 1:
                            v = np.uint32(bits & 0xFFFFFFFF)
                        elif idx == total_words - 2:
                            v = np.uint32(bits >> 32)
                        else:
                            v = np.uint32(0)
                        for ln in range(LANES):
                            W[j, ln] = v
                for t in range(16, 80):
                    for ln in range(LANES):
                        x = W[t - 3, ln] ^ W[t - 8, ln] ^ W[t - 14, ln] ^ W[t - 16, ln]
                        W[t, ln] = np.uint32((x << 1) | (x >> 31))
                for ln in range(LANES):
                    A[ln] = H[0, ln]
                    B[ln] = H[1, ln]
                    C[ln] = H[2, ln]
                    D[ln] = H[3, ln]
                    E[ln] = H[4, ln]
                for t in range(80):
                    if t < 20:
                        k = np.uint32(0x5A827999)
                        for ln in range(LANES):
                            T[ln] = (B[ln] & C[ln]) | (~B[ln] & D[ln])
                    elif t < 40:
                        k = np.uint32(0x6ED9EBA1)
                        for ln in range(LANES):
                            T[ln] = B[ln] ^ C[ln] ^ D[ln]
                    elif t < 60:
                        k = np.uint32(0x8F1BBCDC)
                        for ln in range(LANES):
                            T[ln] = (B[ln] & C[ln]) | (B[ln] & D[ln]) | (C[ln] & D[ln])
                    else:
                        k = np.uint32(0xCA62C1D6)
                        for ln in range(LANES):
                            T[ln] = B[ln] ^ C[ln] ^ D[ln]
                    for ln in range(LANES):
                        a_ = A[ln]
                        tmp = np.uint32(
                            np.uint32((a_ << 5) | (a_ >> 27)) + T[ln] + E[ln] + k + W[t, ln]
                        )
                        E[ln] = D[ln]
                        D[ln] = C[ln]
                        b_ = B[ln]
                        C[ln] = np.uint32((b_ << 30) | (b_ >> 2))
                        B[ln] = a_
                        A[ln] = tmp
                for ln in range(LANES):
                    H[0, ln] = np.uint32(H[0, ln] + A[ln])
                    H[1, ln] = np.uint32(H[1, ln] + B[ln])
                    H[2, ln] = np.uint32(H[2, ln] + C[ln])
                    H[3, ln] = np.uint32(H[3, ln] + D[ln])
                    H[4, ln] = np.uint32(H[4, ln] + E[ln])
            for ln in range(LANES):
                x = H[0, ln]
                hv = np.uint32(
                    ((x & 0xFF) << 24) | ((x & 0xFF00) << 8) | ((x >> 8) & 0xFF00) | (x >> 24)
                )
                hv = hv ^ (hv >> 16)
                hv = np.uint32(hv * np.uint32(0x85EBCA6B))
                hv = hv ^ (hv >> 13)
                hv = np.uint32(hv * np.uint32(0xC2B2AE35))
                HV[ln] = hv ^ (hv >> 16)
            for k in range(P):
                m = out[d, k]
                ak = pa[k]
                bk = pb[k]
                for ln in range(LANES):
                    v = np.uint32(ak * HV[ln] + bk)
                    m = min(m, v)
                out[d, k] = m
