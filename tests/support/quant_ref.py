"""A straightforward numpy encoder for quantized outputs (QUANT.md §3-§6), the tests'
reference for ``out_quantization: base``: every block (or group) is taken from the array
one at a time, its scale computed as the section writes it (f32 operations in the order
given), and each value rounded to the nearest code by searching all codes (ties to the even
code, saturating at the largest). Written from the spec, not from the engine."""

from __future__ import annotations

import numpy as np

from support import reference as ref

F32 = np.float32


def e4m3(codes: np.ndarray) -> np.ndarray:
    """QUANT.md §2: s eeee mmm, bias 7; e = 0 subnormal; no infinities."""
    c = np.asarray(codes).astype(np.int64)
    sign = np.where(c & 0x80, -1.0, 1.0)
    e, m = (c >> 3) & 0xF, (c & 7).astype(np.float64)
    mag = np.where(e == 0, m / 8 * 2.0**-6, (1 + m / 8) * 2.0 ** (e - 7))
    return (sign * mag).astype(F32)


E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], F32)
_F8_MAGS = e4m3(np.arange(0x7F))  # codes 0..0x7E: 0 … 448
_FP4_MAGS = E2M1[:8]


def _nearest(y: np.ndarray, mags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The nearest magnitude code of each |y| (ties to the even code) and the signs."""
    a = np.abs(y).astype(np.float64)
    d = np.abs(a[..., None] - mags.astype(np.float64))
    cand = d == d.min(axis=-1, keepdims=True)
    even = cand & (np.arange(mags.size) % 2 == 0)
    pick = np.where(even.any(axis=-1), even.argmax(axis=-1), cand.argmax(axis=-1))
    return pick.astype(np.uint8), np.signbit(y)


def f8_codes(y: np.ndarray) -> np.ndarray:
    pick, sign = _nearest(np.asarray(y, F32), _F8_MAGS)
    return pick | (sign.astype(np.uint8) << 7)


def fp4_codes(y: np.ndarray) -> np.ndarray:
    pick, sign = _nearest(np.asarray(y, F32), _FP4_MAGS)
    return pick | (sign.astype(np.uint8) << 3)


def store(s: np.float32, dtype: str) -> np.float32:
    """A scale rounded to its container (E8M0: an exact power of two)."""
    if dtype in ("BF16", "F16"):
        return F32(ref.round_to(np.array([s], F32), dtype)[0])
    return F32(s)


def pow2_exponent(amax: float, top: float) -> int:
    """The smallest integer ``e`` with ``amax ≤ top · 2^e``."""
    e = int(np.ceil(np.log2(amax / top)))
    while top * 2.0**e < amax:
        e += 1
    while top * 2.0 ** (e - 1) >= amax:
        e -= 1
    return e


def scale_bytes(values: np.ndarray, dtype: str) -> bytes:
    """Stored scale values as their container's bytes (E8M0: the exponent byte; E4M3: the
    codes themselves are passed)."""
    if dtype in ("F32", "BF16", "F16"):
        return ref.from_f32(values, dtype).tobytes()
    if dtype in ("U8", "F8_E8M0"):
        return (np.log2(values.astype(np.float64)).round().astype(np.int64) + 127).astype(np.uint8).tobytes()
    return np.asarray(values, np.uint8).tobytes()


def encode(
    x: np.ndarray,
    rule: str,
    block: tuple[int, int] | None,
    scale_dtype: str,
    bits: int | None = None,
    group_amax: float | None = None,
) -> dict:
    """Encode ``x`` (f32, ``[..., R, C]``): ``codes`` (one per element: FP8/FP4 codes or
    signed integers), ``scales`` (the grid's stored values, or E4M3 codes for NVFP4),
    ``zero`` (asymmetric integers' zero points per group), ``global`` (NVFP4)."""
    x = np.asarray(x, F32)
    *lead, rows, cols = x.shape
    x3 = x.reshape(-1, rows, cols)
    fp4 = rule in ("nvfp4", "nvfp4_modelopt") or (rule == "mx" and bits == 4)
    top = {"int": None, "int_asym": None}.get(rule, 6.0 if fp4 else 448.0)
    codes = np.zeros(x3.shape, np.int64)
    out: dict = {}
    if block is None:
        amax = F32(np.abs(x).max())
        s = store(F32(amax / F32(448)) if amax > 0 else F32(1), scale_dtype)
        out["scales"] = np.array([s], F32)
        out["codes"] = f8_codes((x / s).astype(F32)).astype(np.int64)
        return out
    bm, bn = block
    gr, gc = -(-rows // bm), -(-cols // bn)
    scales = np.zeros((len(x3), gr, gc), F32 if rule not in ("nvfp4", "nvfp4_modelopt") else np.uint8)
    zero = np.zeros((len(x3), gr, gc), np.int64)
    g = None
    if rule in ("nvfp4", "nvfp4_modelopt"):
        a = F32(group_amax if group_amax is not None else np.abs(x).max())
        if a == 0:
            g = F32(1)
        elif rule == "nvfp4":
            g = F32(F32(F32(1) / a) * F32(2688))  # reciprocal, then times 448·6
        else:
            g = F32(a / F32(2688))
        out["global"] = g
    for m in range(len(x3)):
        for br in range(gr):
            for bc in range(gc):
                sl = np.s_[br * bm : (br + 1) * bm, bc * bn : (bc + 1) * bn]
                blk = x3[m][sl]
                amax = F32(np.abs(blk).max())
                if rule in ("amax", "int"):
                    top_v = F32(448) if rule == "amax" else F32((1 << (bits - 1)) - 1)
                    s = store(F32(amax / top_v) if amax > 0 else F32(1), scale_dtype)
                    scales[m, br, bc] = s
                    y = (blk / s).astype(F32)
                    if rule == "amax":
                        codes[m][sl] = f8_codes(y)
                    else:
                        codes[m][sl] = np.clip(np.rint(y), -(1 << (bits - 1)), (1 << (bits - 1)) - 1)
                elif rule == "ue8m0":
                    s = F32(2.0 ** pow2_exponent(float(amax), 448.0)) if amax > 0 else F32(1)
                    scales[m, br, bc] = s
                    codes[m][sl] = f8_codes((blk / s).astype(F32))
                elif rule == "mx":
                    b = 0 if amax == 0 else min(max(127 + pow2_exponent(float(amax), float(top)), 0), 254)
                    s = F32(2.0 ** (b - 127))
                    scales[m, br, bc] = s
                    y = (blk / s).astype(F32)
                    codes[m][sl] = fp4_codes(y) if fp4 else f8_codes(y)
                elif rule == "nvfp4":
                    code = int(f8_codes(np.array([F32(g * F32(amax / F32(6)))]))[0])
                    code = 0x20 if code & 0x7F == 0 else code
                    scales[m, br, bc] = code
                    d = F32(e4m3(np.array([code]))[0] / g)
                    codes[m][sl] = fp4_codes((blk / d).astype(F32))
                elif rule == "nvfp4_modelopt":
                    v = F32(amax / F32(F32(6) * g))
                    v = F32(1) if v == 0 else v
                    code = int(f8_codes(np.array([np.clip(v, F32(2.0**-9), F32(448))]))[0])
                    scales[m, br, bc] = code
                    d = F32(e4m3(np.array([code]))[0] * g)
                    codes[m][sl] = fp4_codes((blk / d).astype(F32))
                elif rule == "int_asym":
                    lo, hi = F32(min(blk.min(), 0)), F32(max(blk.max(), 0))
                    qlo, qhi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
                    if lo == 0 and hi == 0:
                        s, zp = store(F32(1), scale_dtype), 0
                    else:
                        s = store(F32((hi - lo) / F32((1 << bits) - 1)), scale_dtype)
                        zp = int(np.clip(np.rint(F32(F32(qlo) - F32(lo / s))), qlo, qhi))
                    scales[m, br, bc], zero[m, br, bc] = s, zp
                    y = (F32(1) * blk / s).astype(F32) + F32(zp)
                    codes[m][sl] = np.clip(np.rint(y.astype(F32)), qlo, qhi)
                else:
                    raise ValueError(rule)
    out["codes"] = codes.reshape(x.shape)
    out["scales"] = scales.reshape((*lead, gr, gc))
    out["zero"] = zero.reshape((*lead, gr, gc))
    return out


def pack_fp4(codes: np.ndarray) -> bytes:
    c = np.asarray(codes, np.uint8)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).astype(np.uint8).tobytes()


def pack_int(q: np.ndarray, bits: int) -> bytes:
    """Integers stored ``q + 2^(b-1)``, element ``i`` of a row at bit ``i·b`` of LE words."""
    u = (np.asarray(q) + (1 << (bits - 1))).astype(np.uint8)
    raw = (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8) if bits == 4 else u
    return np.ascontiguousarray(raw).tobytes()


def pack_zero_points(zp: np.ndarray, bits: int) -> bytes:
    """Zero points ``[R, G]`` packed down the rows: row ``r`` in word ``r·b // 32``."""
    rows, groups = zp.shape
    per = 32 // bits
    words = np.zeros((-(-rows // per), groups), np.uint32)
    u = (zp + (1 << (bits - 1))).astype(np.uint32)
    for r in range(rows):
        words[r // per] |= u[r] << np.uint32((r % per) * bits)
    return words.astype("<u4").tobytes()
