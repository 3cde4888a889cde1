"""The gather-dot kernel's Triton source (imported only where Triton is installed; see gather_dot.py)."""
import triton.language as tl


def gather_dot(out_ptr, s_ob, s_oc, tgt_ptr, w_ptr, ri_ptr, ci_ptr, K, T,
               r_ptr, s_rb, s_rt, s_rn,
               c_ptr, s_cb, s_ct, s_cn,
               # a convolution's input x (B, C, H, W) read as im2col columns (channel, ky, kx)
               s_xh, s_xw, H, W, OW, KHW, KW, SH, SW, DH, DW, TOP, LEFT,
               # a norm layer's x̂ = (x - shift) · scale, shift and scale broadcast to x (shared strides)
               shift_ptr, scale_ptr, s_ab, s_at, s_an,
               HAS_W: tl.constexpr, UNFOLD: tl.constexpr, AFFINE: tl.constexpr, HAS_SHIFT: tl.constexpr,
               ROUND: tl.constexpr, ATOMIC: tl.constexpr, F64: tl.constexpr, ONES: tl.constexpr,
               BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)  # B times a batch stride can pass 2**31
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = ks < K
    ri = tl.load(ri_ptr + ks, mask=kmask, other=0)
    ci = tl.load(ci_ptr + ks, mask=kmask, other=0)
    if ONES:  # index -1: that factor is ones (a bias: the sum of the other factor over positions)
        r_one = (ri < 0)[None, :]
        c_one = (ci < 0)[None, :]
        ri = tl.where(ri < 0, 0, ri)  # an address inside the factor, never read
        ci = tl.where(ci < 0, 0, ci)
    if UNFOLD:
        ch = ci // KHW
        ky = (ci % KHW) // KW
        kx = ci % KW
    acc_t = tl.float64 if F64 else tl.float32
    acc = tl.zeros([BLOCK_T, BLOCK_K], dtype=acc_t)
    r_base = r_ptr + b * s_rb + ri[None, :] * s_rn
    for t0 in range(0, T, BLOCK_T):
        ts = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)  # positions times a stride can pass 2**31 too
        m = (ts < T)[:, None] & kmask[None, :]
        rv = tl.load(r_base + ts[:, None] * s_rt, mask=m, other=0.0)
        if UNFOLD:
            y = (ts // OW)[:, None] * SH + ky[None, :] * DH - TOP
            x = (ts % OW)[:, None] * SW + kx[None, :] * DW - LEFT
            inside = m & (y >= 0) & (y < H) & (x >= 0) & (x < W)  # outside: the zero margin
            cv = tl.load(c_ptr + b * s_cb + ch[None, :] * s_cn + y * s_xh + x * s_xw, mask=inside, other=0.0)
        else:
            cv = tl.load(c_ptr + b * s_cb + ts[:, None] * s_ct + ci[None, :] * s_cn, mask=m, other=0.0)
        if AFFINE:  # as the layer computes x̂: in the statistics' dtype, rounded to x's where it rounds
            at = b * s_ab + ts[:, None] * s_at + ci[None, :] * s_an
            scale = tl.load(scale_ptr + at, mask=m, other=0.0)
            xhat = cv.to(scale.dtype)
            if HAS_SHIFT:
                xhat = xhat - tl.load(shift_ptr + at, mask=m, other=0.0).to(scale.dtype)
            xhat = xhat * scale
            if ROUND:  # to x's dtype, to nearest even as PyTorch rounds
                if cv.dtype == tl.bfloat16:  # by its bits: Triton's interpreter truncates this cast
                    bits = xhat.to(tl.float32).to(tl.uint32, bitcast=True)
                    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
                    xhat = bits.to(tl.float32, bitcast=True)
                else:
                    xhat = xhat.to(cv.dtype)
            cv = xhat
        rv = rv.to(acc_t)
        cv = cv.to(acc_t)
        if ONES:  # (past T the other factor was read as 0, so the product stays 0 there)
            rv = tl.where(r_one, 1.0, rv)
            cv = tl.where(c_one, 1.0, cv)
        acc += rv * cv
    total = tl.sum(acc, axis=0)
    if HAS_W:
        total = total * tl.load(w_ptr + ks, mask=kmask, other=0.0).to(acc_t)
    dest = out_ptr + b * s_ob + tl.load(tgt_ptr + ks, mask=kmask, other=0) * s_oc
    if ATOMIC:  # targets shared by several kept coordinates (SJLT buckets)
        tl.atomic_add(dest, total, mask=kmask)
    else:       # each target written by one program: deterministic
        tl.store(dest, tl.load(dest, mask=kmask, other=0.0) + total, mask=kmask)
