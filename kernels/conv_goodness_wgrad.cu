// conv_goodness_wgrad_f32: dW = dz * col^T and db = sum dz, where
// dz[b,c,h,w] = 1[y > 0] * 2 y * sum_{cells (i,j) containing (h,w)} dg[b, c*P^2 + i*P + j] (/ |bin_ij| for mean).
// In fp16 the same product runs as a plain GEMM over dz computed once (dz_f16, conv_wgrad_nhwc_f16, below).
//
// Work split: an implicit GEMM dW[M = C_out, K = C_in*9] = sum over n < B*H*W of dz[m, n] * col[k, n]. A block of
// 256 threads owns a 64 x 64 tile of dW and a slice of the reduction (blockIdx.z: `chunk` pixels), walked in
// steps of 16 through shared memory; dz is computed from y and q = dg / |bin| (dg_per_cell_f32, below) while its
// tile is loaded and never stored, each pixel's cell from the grid's cell table (prelude: cells_q); col is
// gathered from x through the layer's tap table (prelude: tap_fetch). Each block stores its partial tile into
// part[z][m][k] (and the blocks of the first K tile the row sums of dz into part_db[z][m]); wgrad_reduce_f32 sums
// the partials over z in order, so the result is deterministic. Grid = (ceil(K/64), ceil(C_out/64), ceil(N/chunk)).
#define WG_TM 64
#define WG_TK 64
#define WG_TN 16

extern "C" __global__ void __launch_bounds__(256, 2) conv_goodness_wgrad_f32(
    const float* __restrict__ x /*[B*Cin*H*W]*/, const float* __restrict__ y /*[B*Cout*H*W]*/,
    const float* __restrict__ q /*[B*Cout*P*P]*/, const int* __restrict__ taps /*[TAPS(Cin)]*/,
    const int* __restrict__ cells /*[H*W]*/, float* __restrict__ part /*[gridDim.z*Cout*Cin*9]*/,
    float* __restrict__ part_db /*[gridDim.z*Cout]*/, int B, int Cin, int Cout, int H, int W, int P, int chunk)
{
    __shared__ float As[WG_TN][WG_TM];  // dz tile, [pixel][channel]
    __shared__ float Bs[WG_TN][WG_TK];  // col tile, [pixel][tap]
    const int K = Cin * 9, HW = H * W, N = B * HW, PP = P * P;
    const int m0 = blockIdx.y * WG_TM, k0 = blockIdx.x * WG_TK;
    const int nbeg = blockIdx.z * chunk, nend = min(N, nbeg + chunk);
    const int tid = threadIdx.x;
    const int tm = (tid / 16) * 4, tk = (tid % 16) * 4;
    const bool bias_block = blockIdx.x == 0;
    // dz: channel dm, pixels dn..dn+3 of the step; col: pixel bn of the step, taps bk, bk + 16, bk + 32, bk + 48
    // (fixed for the kernel: their table entries are read once; the table holds K rounded up to 128).
    const int dm = tid % WG_TM, dn = (tid / WG_TM) * 4, bn = tid % WG_TN, bk = tid / WG_TN;
    const int m = m0 + dm;
    const bool m_ok = m < Cout;
    unsigned tks[WG_TK / 16];
#pragma unroll
    for (int j = 0; j < WG_TK / 16; ++j) tks[j] = (unsigned)taps[k0 + bk + 16 * j];
    // The step's dz pixel (sample, pixel) and tap pixel (sample, row, column): located by division once, then
    // advanced by WG_TN pixels a step.
    int db_ = (nbeg + dn) / HW, dp = (nbeg + dn) % HW;
    int tb = (nbeg + bn) / HW, th = (nbeg + bn) % HW / W, tw = (nbeg + bn) % W;
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
    float db_acc = 0.0f;

    for (int n0 = nbeg; n0 < nend; n0 += WG_TN) {
        {
            int n = n0 + dn, p = dp, map = db_ * Cout + m, yo = map * HW + p, go = map * PP;
#pragma unroll
            for (int j = 0; j < 4; ++j, ++n) {
                As[dn + j][dm] = (n < nend && m_ok) ? dz_of(y[yo], q + go, cells[p], P) : 0.0f;
                ++yo;
                if (++p == HW) { p = 0; yo += (Cout - 1) * HW; go += Cout * PP; }
            }
        }
        {
            const bool n_ok = n0 + bn < nend;
            const int mask = n_ok ? tap_mask(th, tw, H, W) : 0, xo = tb * Cin * HW + (th - 1) * W + (tw - 1);
#pragma unroll
            for (int j = 0; j < WG_TK / 16; ++j) Bs[bn][bk + 16 * j] = tap_fetch(x, xo, mask, tks[j]);
        }
        for (dp += WG_TN; dp >= HW; dp -= HW) ++db_;
        for (tw += WG_TN; tw >= W; tw -= W) ++th;
        for (; th >= H; th -= H) ++tb;
        __syncthreads();
        if (bias_block && tid < WG_TM)
            for (int nn = 0; nn < WG_TN; ++nn) db_acc += As[nn][tid];
#pragma unroll
        for (int nn = 0; nn < WG_TN; ++nn) {
            fma_outer4(acc, &As[nn][tm], &Bs[nn][tk]);
        }
        __syncthreads();
    }
    for (int i = 0; i < 4; ++i) {
        int m = m0 + tm + i;
        if (m >= Cout) continue;
        for (int j = 0; j < 4; ++j) {
            int k = k0 + tk + j;
            if (k < K) part[((long)blockIdx.z * Cout + m) * K + k] = acc[i][j];
        }
    }
    if (bias_block && tid < WG_TM && m0 + tid < Cout) part_db[(long)blockIdx.z * Cout + m0 + tid] = db_acc;
}

// The fp16 weight gradient, channels-last, in three kernels:
//
// dz_f16 computes dz = 1[y > 0] 2 y q once per element (q = dL/dg / |bin| of the pixel's cells, from
// dg_per_cell_f32 and the cell table: prelude, dz_of), multiplies it by `scale` and rounds it to fp16 into
// dz[m][n] (channel-major, pixels n = b*H*W + p contiguous, rows padded to NHWC_MP(C_out) and WG_NP(N) with
// zeros, so that the GEMM copies whole tiles without bound checks); it also writes the bias gradient's partial
// sums of the unscaled f32 dz, part_db[block][m] (a fixed-order block sum). One block per channel and 2048
// pixels, 8 consecutive pixels a thread, stored as one 16-byte write.
//
// Scaling: dz = 2 y dg / |bin| with dg = (softmax - onehot) R^T / B is ~3e-4 |softmax - onehot| for CIFAR shapes at
// batch 128 and ~3e-7 times it at ImageNet scale: in or under fp16's subnormal range (below 6.1e-5 a value keeps
// few bits; below 3e-8 it is zero). The host passes scale = B * max|bin| (mean; B for sum) rounded to a power of
// two (src/backend/mod.rs, dz_scale), which brings dz * scale to ~|y| |R| (fp16 overflows at 65504), and makes both
// scalings exact: the GEMM's f32 partials are multiplied by inv_scale on the way out.
//
// Cost against what it removes: one write and one read of dz (2 bytes per element of y, 34 MB each for VGG8's
// first layer at width 1 and batch 128, ~20 us together at an H100's 3.35 TB/s), where the fused kernel it
// replaces recomputed dz (a cell lookup, a q load, a select, a multiply and a conversion per element) in every
// block of a K column: 9 C_in / 128 or / 256 times over, inside the main loop (64 and 40 instructions per MMA).
extern "C" __global__ void dz_f16(
    const f16_bits* __restrict__ y /*[B*Cout*H*W]*/, const float* __restrict__ q /*[B*Cout*P*P]*/,
    const int* __restrict__ cells /*[H*W]*/, f16_bits* __restrict__ dz /*[NHWC_MP(Cout)*WG_NP(B*H*W)]*/,
    float* __restrict__ part_db /*[gridDim.x*Cout]*/, int B, int Cout, int H, int W, int P, float scale)
{
    __shared__ float scratch[32];
    const int HW = H * W, N = B * HW, Np = WG_NP(N), m = blockIdx.y;
    const int n0 = blockIdx.x * 2048 + threadIdx.x * 8;
    float sum = 0.0f;
    if (n0 < Np) {
        f16_bits h[8];
        int b = n0 / HW, p = n0 % HW;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            float v = 0.0f;
            if (m < Cout && n0 + j < N) {
                const long map = (long)b * Cout + m;
                v = dz_of(h2f(y[map * HW + p]), q + map * P * P, cells[p], P);
            }
            sum += v;
            h[j] = f2h(v * scale);
            if (++p == HW) { p = 0; ++b; }
        }
        st16(dz + (long)m * Np + n0, u32x4{pack2(h[0], h[1]), pack2(h[2], h[3]), pack2(h[4], h[5]), pack2(h[6], h[7])});
    }
    sum = block_sum(sum, scratch);
    if (threadIdx.x == 0 && m < Cout) part_db[(long)blockIdx.x * Cout + m] = sum;
}

// conv_wgrad_nhwc_f16{,_l}: dW[m][k] = sum_n dz[m][n] col[n][k], k = (kh*3 + kw)*Cp + ci over the channels-last
// input (kernels/layout.cu: the copy the layer's forward made, reused: src/backend/cuda/layout.rs), on the
// tensor cores: a plain implicit GEMM with the forward's cp.async pipeline.
// Block tile TM = 32 MI channels x TN = 32 NI columns of K, the pixels walked TK (32 or 64) at a time through S stages of
// dynamic shared memory: A = dz [m][pixel] (pixels contiguous, as the MMA's reduction index: ldmatrix), B = the
// im2col tile stored pixel-major, [pixel][k] (8 channels of one tap contiguous, so one cp.async moves them, the
// halo and the pixels past N zero-filled), read by ldmatrix.trans. A thread's B chunks are one fixed column chunk
// of the block (its table entry read once) at PASS-apart pixel rows; per step only the pixels change: their
// window origin is (n - W - 1) Cp and their in-map mask comes from the pixel table (geometry::pixel_masks).
// A slice of `chunk` pixels per blockIdx.z (split over pixels, so every shape fills the GPU); the f32 partials
// go to part[z][m][k] (k < 9 Cp) and wgrad_reduce_nhwc_f32 sums them in order into PyTorch's layout: the result is
// deterministic.
template <int MI, int NI, int S, int TK>
__device__ __forceinline__ void wgrad_nhwc(
    const f16_bits* __restrict__ dz, const f16_bits* __restrict__ x, const int* __restrict__ taps,
    const unsigned short* __restrict__ pmask, float* __restrict__ part, int B, int Cp, int Cout, int H, int W,
    int chunk, float inv_scale)
{
    constexpr int TM = 32 * MI, TN = 32 * NI, LDA = TK + 8, LDB = TN + 8;
    constexpr int A_PASS = 256 / (TK / 8), CA = TM / A_PASS;      // A: TK / 8 chunks a row
    constexpr int B_CPR = TN / 8, B_PASS = 256 / B_CPR, CB = TK / B_PASS;
    constexpr unsigned A_STAGE = TM * LDA * 2, B_STAGE = TK * LDB * 2;
    const int K9 = 9 * Cp, W1 = W + 1, N = B * H * W, Np = WG_NP(N);
    const int m0 = blockIdx.y * TM, k0 = blockIdx.x * TN;
    const int nbeg = blockIdx.z * chunk, nend = min(Np, nbeg + chunk), steps = (nend - nbeg) / TK;
    const int tid = threadIdx.x;
    const int a_row = tid / (TK / 8), a_kc = (tid % (TK / 8)) * 8;
    const int b_row = tid / B_CPR, b_c = tid % B_CPR;
    const unsigned sA = smem_u32(dyn_smem()), sB = sA + S * A_STAGE;
    const unsigned a_dst = sA + (a_row * LDA + a_kc) * 2, b_dst = sB + (b_row * LDB + b_c * 8) * 2;
    int la, lb_unused;
    tc_lane_rows<MI, NI, TK>(la, lb_unused);
    const unsigned a_ld = sA + la * 2, b_ld = sB + tc_lane_rows_t<NI>() * 2;
    const f16_bits* a_src = dz + (long)(m0 + a_row) * Np + nbeg + a_kc;
    const long a_pass = (long)A_PASS * Np;
    // The thread's column chunk: its offset from a pixel's window origin and its tap bit, for the whole kernel.
    const unsigned t = (unsigned)taps[k0 / 8 + b_c];
    const int t_off = (int)(t >> 9) - W1 * Cp;
    // The next pixel step's copies into the stage at byte offsets (a_off, b_off): the steps are loaded in order,
    // so the sources advance by one step each time.
    int n0 = nbeg;
    auto load_stage = [&](unsigned a_off, unsigned b_off) {
#pragma unroll
        for (int i = 0; i < CA; ++i) cp_async16(a_dst + a_off + i * A_PASS * LDA * 2, a_src + i * a_pass, true);
        a_src += TK;
#pragma unroll
        for (int i = 0; i < CB; ++i) {
            const int n = n0 + b_row + B_PASS * i;
            const bool in = (pmask[n] & t) != 0;
            cp_async16(b_dst + b_off + i * B_PASS * LDB * 2, x + (in ? n * Cp + t_off : 0), in);
        }
        n0 += TK;
    };
#pragma unroll
    for (int s = 0; s < S - 1; ++s) {
        if (s < steps) load_stage(s * A_STAGE, s * B_STAGE);
        cp_async_commit();
    }
    float acc[MI][NI][4];
    tc_zero<MI, NI>(acc);
    unsigned rd_a = 0, rd_b = 0, wr_a = (S - 1) * A_STAGE, wr_b = (S - 1) * B_STAGE;
    for (int s = 0; s < steps; ++s) {
        cp_async_wait<S - 2>();
        __syncthreads();
        if (s + S - 1 < steps) load_stage(wr_a, wr_b);
        cp_async_commit();
        tc_step<MI, NI, TK, true>(acc, a_ld + rd_a, b_ld + rd_b);
        rd_a = rd_a == (S - 1) * A_STAGE ? 0 : rd_a + A_STAGE;
        rd_b = rd_b == (S - 1) * B_STAGE ? 0 : rd_b + B_STAGE;
        wr_a = wr_a == (S - 1) * A_STAGE ? 0 : wr_a + A_STAGE;
        wr_b = wr_b == (S - 1) * B_STAGE ? 0 : wr_b + B_STAGE;
    }
    cp_async_wait<0>();
    tc_for_each<MI, NI>(acc, [&](int row, int col, int, float v) {
        const int m = m0 + row, k = k0 + col;
        if (m < Cout && k < K9) part[((long)blockIdx.z * Cout + m) * K9 + k] = v * inv_scale;
    });
}

// 64 channels x 128 columns, pixel steps of 64, 3 stages (79,872 bytes: opted in at load). (Its 32 x 32 warp
// tiles do 16 MMAs per 16 pixels: the deeper step halves the loop's fixed cost per MMA.)
extern "C" __global__ void __launch_bounds__(256) conv_wgrad_nhwc_f16(
    const f16_bits* __restrict__ dz /*[NHWC_MP(Cout)*WG_NP(B*H*W)]*/, const f16_bits* __restrict__ x /*[B*H*W*Cp]*/,
    const int* __restrict__ taps /*[NHWC_TAPS(Cp)]*/, const unsigned short* __restrict__ pmask /*[WG_NP(B*H*W)]*/,
    float* __restrict__ part /*[gridDim.z*Cout*9*Cp]*/, int B, int Cp, int Cout, int H, int W, int chunk,
    float inv_scale)
{
    wgrad_nhwc<2, 4, 3, 64>(dz, x, taps, pmask, part, B, Cp, Cout, H, W, chunk, inv_scale);
}

// 128 channels x 256 columns (64 x 64 per warp), pixel steps of 32, 4 stages (108,544 bytes: opted in at load).
extern "C" __global__ void __launch_bounds__(256, 1) conv_wgrad_nhwc_f16_l(
    const f16_bits* __restrict__ dz /*[NHWC_MP(Cout)*WG_NP(B*H*W)]*/, const f16_bits* __restrict__ x /*[B*H*W*Cp]*/,
    const int* __restrict__ taps /*[NHWC_TAPS(Cp)]*/, const unsigned short* __restrict__ pmask /*[WG_NP(B*H*W)]*/,
    float* __restrict__ part /*[gridDim.z*Cout*9*Cp]*/, int B, int Cp, int Cout, int H, int W, int chunk,
    float inv_scale)
{
    wgrad_nhwc<4, 8, 4, 32>(dz, x, taps, pmask, part, B, Cp, Cout, H, W, chunk, inv_scale);
}

// dw[m][ci][r] = sum_z part[z][m][r*Cp + ci] (PyTorch's [C_out, C_in, 3, 3] from the channels-last partials) and
// db[m] = sum_z part_db[z][m] over the Zd partials of dz_f16: one thread per weight, z in order.
extern "C" __global__ void wgrad_reduce_nhwc_f32(
    const float* __restrict__ part /*[Z*M*9*Cp]*/, const float* __restrict__ part_db /*[Zd*M]*/,
    float* __restrict__ dw /*[M*C*9]*/, float* __restrict__ db /*[M]*/, int M, int C, int Cp, int Z, int Zd)
{
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t < M * C * 9) {
        const int m = t / (C * 9), ci = t % (C * 9) / 9, r = t % 9;
        const long MK = (long)M * 9 * Cp, at = (long)m * 9 * Cp + r * Cp + ci;
        float s = 0.0f;
        for (int z = 0; z < Z; ++z) s += part[z * MK + at];
        dw[t] = s;
    }
    if (t < M) {
        float s = 0.0f;
        for (int z = 0; z < Zd; ++z) s += part_db[(long)z * M + t];
        db[t] = s;
    }
}

// q[i] = dg[i] / div[i % P^2]: the fp16 weight gradient's per-cell dL/dg, divided by the cell's divisor once per
// step instead of once per pixel and block (the same division as the CPU reference's). One thread per value.
extern "C" __global__ void dg_per_cell_f32(const float* __restrict__ dg /*[n]*/, const float* __restrict__ div /*[PP]*/,
                                           float* __restrict__ q /*[n]*/, int n, int PP)
{
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t < n) q[t] = dg[t] / div[t % PP];
}

// dw[i] = sum_z part[z][i] (i < M*K), db[m] = sum_z part_db[z][m]: one thread per element, z in order.
extern "C" __global__ void wgrad_reduce_f32(
    const float* __restrict__ part /*[Z*MK]*/, const float* __restrict__ part_db /*[Z*M]*/,
    float* __restrict__ dw /*[MK]*/, float* __restrict__ db /*[M]*/, int MK, int M, int Z)
{
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t < MK) {
        float s = 0.0f;
        for (int z = 0; z < Z; ++z) s += part[(long)z * MK + t];
        dw[t] = s;
    }
    if (t < M) {
        float s = 0.0f;
        for (int z = 0; z < Z; ++z) s += part_db[(long)z * M + t];
        db[t] = s;
    }
}
