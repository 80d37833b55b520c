// conv_goodness_fwd_f32 and conv_fwd_nhwc_f16*: y = relu(conv3x3(x, W) + b); g = mean (or sum) of y^2 per cell,
// summed in f32 (patch_goodness_f32 after the f32 conv, the fp16 kernels' epilogue and goodness_tiles_f32).
//
// Work split: an implicit GEMM out[M = C_out, N = B*H*W] = W[M, K = C_in*9] * col[K, N], where the column
// operand is gathered from x while the tile is loaded (no im2col buffer exists), through the layer's tap table
// (prelude: tap_fetch). A block of 256 threads owns a 64 x 64 output tile and walks K in steps of 16 through
// shared memory; each thread accumulates a 4 x 4 register tile. Epilogue: bias + ReLU, y stored NCHW. Grid = (ceil(N/64), ceil(C_out/64)).
//
// patch_goodness_f32 then reduces y^2 over each cell: one thread per (sample, channel, cell), each an ordered
// sum, so the goodness is deterministic (atomics would make two runs of one seed differ in the last bits). It
// re-reads y; the fp32 path keeps it (the reference path, bound by its CUDA-core FMAs, not by that read).
//
// conv_fwd_nhwc_f16{,_l} are the same implicit GEMM on the tensor cores over channels-last fp16 operands, fed by
// cp.async pipelines (below); fp32 accumulators, y stored in fp16 (round to nearest even). Their goodness is
// summed in the epilogue, still deterministically: each block sums the squares of its own (rounded) outputs per
// cell it cuts into, in a fixed order, and stores one partial per (tile, cell, channel) (tile_goodness);
// goodness_tiles_f32 then adds each cell's partials in tile order. The partials are a few floats per tile row
// (VGG8's first layer at width 1: 8 per 128 pixels), where the separate pass re-read 2 bytes of y per output.
#define FWD_TM 64
#define FWD_TN 64
#define FWD_TK 16

extern "C" __global__ void __launch_bounds__(256) conv_goodness_fwd_f32(
    const float* __restrict__ x /*[B*Cin*H*W]*/, const float* __restrict__ w /*[Cout*Cin*9]*/,
    const float* __restrict__ bias /*[Cout]*/, const int* __restrict__ taps /*[TAPS(Cin)]*/,
    float* __restrict__ y /*[B*Cout*H*W]*/, int B, int Cin, int Cout, int H, int W)
{
    __shared__ float As[FWD_TK][FWD_TM];
    __shared__ float Bs[FWD_TK][FWD_TN];
    const int K = Cin * 9, HW = H * W, N = B * HW;
    const int m0 = blockIdx.y * FWD_TM, n0 = blockIdx.x * FWD_TN;
    const int tid = threadIdx.x;
    const int tm = (tid / 16) * 4, tn = (tid % 16) * 4;
    // B tile: the thread's pixel (tid % 64) is the same for every tap it loads and every K step: locate it once
    // (window origin and in-map mask for tap_fetch).
    const int bn = tid % FWD_TN, n = n0 + bn;
    const bool n_ok = n < N;
    const int pb = n_ok ? n / HW : 0, pp = n_ok ? n % HW : 0, oh = pp / W, ow = pp % W;
    const int mask = n_ok ? tap_mask(oh, ow, H, W) : 0, xo = pb * Cin * HW + (oh - 1) * W + (ow - 1);
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

    for (int k0 = 0; k0 < K; k0 += FWD_TK) {
        for (int i = tid; i < FWD_TM * FWD_TK; i += 256) {
            int mm = i / FWD_TK, kk = i % FWD_TK;
            int m = m0 + mm, k = k0 + kk;
            As[kk][mm] = (m < Cout && k < K) ? w[(long)m * K + k] : 0.0f;
        }
        // The table holds K rounded up to 128 >= FWD_TK entries past k0.
        for (int kk = tid / FWD_TN; kk < FWD_TK; kk += 256 / FWD_TN)
            Bs[kk][bn] = tap_fetch(x, xo, mask, (unsigned)taps[k0 + kk]);
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < FWD_TK; ++kk) {
            fma_outer4(acc, &As[kk][tm], &Bs[kk][tn]);
        }
        __syncthreads();
    }

    // The thread's 4 output pixels, located once: offsets b*C_out*HW + p in y (32 bits), -1 past N.
    int yo[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int n = n0 + tn + j;
        yo[j] = n < N ? (n / HW) * Cout * HW + n % HW : -1;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int m = m0 + tm + i;
        if (m >= Cout) continue;
        const float bv = bias[m];
#pragma unroll
        for (int j = 0; j < 4; ++j)
            if (yo[j] >= 0) y[yo[j] + m * HW] = fmaxf(acc[i][j] + bv, 0.0f);
    }
}

// The goodness partials of output tiles. Cells are grouped in bands: band G = b * P + i holds sample b's P cells
// of row bin i. A tile of TN consecutive pixels n (n = b*H*W + oh*W + ow) covers a run of image rows, so the bands
// it cuts are a run too, starting at tile_band0 (row oh's first bin is oh * P / H: bins may overlap) and at most
// NB long (geometry::goodness_bands, the maximum over the layer's tiles). Tile t's partial of cell (b, i, j) of
// channel m is gpart[((t * NB + G - tile_band0(t)) * P + j) * C_out + m], written only when the tile holds a pixel
// of the cell; goodness_tiles_f32 reads exactly those.
__device__ __forceinline__ int tile_band0(int n0, int H, int W, int P) {
    const int R = n0 / W;
    return (R / H) * P + (R % H) * P / H;
}

// Tile (blockIdx.x, rows m0.. of TM) of a layer: sq[TM][TN + 1] in shared memory holds the squares of the tile's
// stored outputs (odd row stride: the threads of a warp read one column of 32 rows, conflict-free). Each thread
// takes (channel, band, column bin) triples, the channel fastest, and sums its cell's pixels in the tile row by
// row, in order.
template <int TM, int TN>
__device__ __forceinline__ void tile_goodness(
    const float* sq, float* __restrict__ gpart, int m0, int n0, int Cout, int B, int H, int W, int P, int NB)
{
    const int HW = H * W, band0 = tile_band0(n0, H, W, P);
    for (int q = threadIdx.x; q < TM * NB * P; q += blockDim.x) {
        const int ml = q % TM, j = (q / TM) % P, k = q / (TM * P);
        const int m = m0 + ml, G = band0 + k, b = G / P, i = G % P;
        if (m >= Cout || b >= B) continue;
        // The tile's pixels of sample b, as sample-local indices [p_lo, p_hi), and the cell's rows among them.
        const int base = b * HW - n0, p_lo = max(-base, 0), p_hi = min(TN - base, HW);
        if (p_lo >= p_hi) continue;
        const int r_lo = max(bin_start(i, H, P), p_lo / W), r_hi = min(bin_end(i, H, P), (p_hi - 1) / W + 1);
        const int c0 = bin_start(j, W, P), c1 = bin_end(j, W, P);
        const float* row = sq + ml * (TN + 1);
        float acc = 0.0f;
        bool cut = false;
        for (int r = r_lo; r < r_hi; ++r) {
            const int lo = max(base + r * W + c0, 0), hi = min(base + r * W + c1, TN);
            for (int c = lo; c < hi; ++c) acc += row[c];
            cut |= lo < hi;
        }
        if (cut) gpart[((long)(blockIdx.x * NB + k) * P + j) * Cout + m] = acc;
    }
}

// f16 forward, channels-last: x is NHWC with C_in padded to Cp (a multiple of 8: kernels/layout.cu), the weights
// [C_out][3][3][Cp] (rows and K padded further: prelude, NHWC_MP and NHWC_KP), so the GEMM's K index is k = (kh*3 + kw)*Cp + ci and 8 consecutive k are 8 channels of one
// tap of one pixel: 16 contiguous, aligned bytes, which one cp.async moves (src-size 0 writes the halo's and the
// tile edges' zeros). The layer's chunk table (geometry::nhwc_tap_table) gives chunk j = k / 8 its offset from the
// pixel's window origin, ((kh*W + kw)*Cp + ci) << 9, and its tap bit 1 << (kh*3 + kw), tested against the pixel's
// in-map mask (prelude: tap_mask).
//
// Block tile TM = 32 MI channels x TN = 32 NI pixels, K walked TK = 32 at a time through S shared stages in
// dynamic shared memory ([S][TM][40] then [S][TN][40] halves, rows padded to 80 bytes so that ldmatrix reads
// hit distinct banks: prelude, tc_step). Each thread copies MI / 2 chunks of A and NI / 2 of B a stage, all at
// the same 8-wide K slice (tid % 4), so one table entry serves its B chunks; the weights' padding makes every A
// copy a whole one, and shared addresses are computed once (prelude: smem_u32, tc_step). The pipeline: S - 1 stages in flight
// ahead of the MMAs; per K step one wait_group (the oldest stage has landed), one barrier (it is visible to every
// thread, and the stage read one step ago is free), the copies of step kt + S - 1 into that free stage, then the
// stage's MMAs. Epilogue: bias in f32, ReLU, y stored NCHW in fp16 (what the layer-output and weight-gradient
// kernels read), and the squares of the stored values into shared memory (the stages are free by then) for the
// tile's goodness partials (tile_goodness).
//
// With SPLIT (split-K, for the layers whose grid would not fill the GPU), blockIdx.z takes the z-th of gridDim.z
// equal runs of K steps and stores its f32 partial tile in part[z][m][n] (no bias, no ReLU); conv_fwd_splitk_f16
// then sums the partials in z order, adds the bias, applies ReLU, stores y and runs the same goodness epilogue:
// deterministic, as without the split.
template <int MI, int NI, int S, int TK, bool SPLIT = false>
__device__ __forceinline__ void conv_fwd_nhwc(
    const f16_bits* __restrict__ x, const f16_bits* __restrict__ w, const float* __restrict__ bias,
    const int* __restrict__ taps, f16_bits* __restrict__ y, float* __restrict__ part, float* __restrict__ gpart, int B,
    int Cp, int Cout, int H, int W, int P, int NB)
{
    // CPR chunks of 8 halves per tile row and K step; the 256 threads cover PASS rows at a time.
    constexpr int TM = 32 * MI, TN = 32 * NI, LD = TK + 8, CPR = TK / 8, PASS = 256 / CPR;
    constexpr int CA = TM / PASS, CB = TN / PASS;
    constexpr unsigned A_STAGE = TM * LD * 2, B_STAGE = TN * LD * 2, ROWS_PASS = PASS * LD * 2;
    static_assert(TK % 32 == 0 && CA >= 1 && CB >= 1, "tile shape");
    const int Kp = NHWC_KP(Cp), HW = H * W, N = B * HW, KT_ALL = Kp / TK;
    // This block's K steps [kt0, kt0 + KT): all of them, or its split's run (possibly empty: zero partials).
    const int per = SPLIT ? (KT_ALL + gridDim.z - 1) / gridDim.z : KT_ALL;
    const int kt0 = SPLIT ? min(KT_ALL, (int)blockIdx.z * per) : 0, KT = SPLIT ? min(KT_ALL - kt0, per) : KT_ALL;
    const int m0 = blockIdx.y * TM, n0 = blockIdx.x * TN;
    const int tid = threadIdx.x, kc = (tid % CPR) * 8, row = tid / CPR;
    // Shared addresses: the thread's copy destinations and the lane's ldmatrix rows, in stage 0.
    const unsigned sA = smem_u32(dyn_smem()), sB = sA + S * A_STAGE;
    const unsigned a_dst = sA + (row * LD + kc) * 2, b_dst = sB + (row * LD + kc) * 2;
    int a_row, b_row;
    tc_lane_rows<MI, NI, TK>(a_row, b_row);
    const unsigned a_ld = sA + a_row * 2, b_ld = sB + b_row * 2;
    // Global sources: the thread's weight rows (padded: always inside) and its B pixels' window origins and
    // in-map masks, located once.
    const f16_bits* a_src = w + (long)(m0 + row) * Kp + kc + kt0 * TK;
    const long a_pass = (long)PASS * Kp;
    const int* tap = taps + (kc >> 3) + kt0 * (TK / 8);
    int xo[CB], mask[CB];
#pragma unroll
    for (int i = 0; i < CB; ++i) {
        const int n = n0 + row + PASS * i;
        const bool ok = n < N;
        const int pb = ok ? n / HW : 0, pp = ok ? n % HW : 0, oh = pp / W, ow = pp % W;
        mask[i] = ok ? tap_mask(oh, ow, H, W) : 0;
        xo[i] = ((pb * H + oh - 1) * W + (ow - 1)) * Cp;
    }
    // The next K step's copies into the stage at byte offsets (a_off, b_off): the steps are loaded in order, so
    // the sources advance by one step each time.
    auto load_stage = [&](unsigned a_off, unsigned b_off) {
#pragma unroll
        for (int i = 0; i < CA; ++i) cp_async16(a_dst + a_off + i * ROWS_PASS, a_src + i * a_pass, true);
        a_src += TK;
        const unsigned t = (unsigned)*tap;
        tap += TK / 8;
#pragma unroll
        for (int i = 0; i < CB; ++i) {
            const bool in = (t & (unsigned)mask[i]) != 0;
            cp_async16(b_dst + b_off + i * ROWS_PASS, x + (in ? xo[i] + (int)(t >> 9) : 0), in);
        }
    };
#pragma unroll
    for (int s = 0; s < S - 1; ++s) {
        if (s < KT) load_stage(s * A_STAGE, s * B_STAGE);
        cp_async_commit();
    }
    float acc[MI][NI][4];
    tc_zero<MI, NI>(acc);
    // The stage read at step kt (kt % S) and the stage written ((kt + S - 1) % S), as byte offsets.
    unsigned rd_a = 0, rd_b = 0, wr_a = (S - 1) * A_STAGE, wr_b = (S - 1) * B_STAGE;
    for (int kt = 0; kt < KT; ++kt) {
        cp_async_wait<S - 2>();
        __syncthreads();
        if (kt + S - 1 < KT) load_stage(wr_a, wr_b);
        cp_async_commit();
        tc_step<MI, NI, TK>(acc, a_ld + rd_a, b_ld + rd_b);
        rd_a = rd_a == (S - 1) * A_STAGE ? 0 : rd_a + A_STAGE;
        rd_b = rd_b == (S - 1) * B_STAGE ? 0 : rd_b + B_STAGE;
        wr_a = wr_a == (S - 1) * A_STAGE ? 0 : wr_a + A_STAGE;
        wr_b = wr_b == (S - 1) * B_STAGE ? 0 : wr_b + B_STAGE;
    }
    cp_async_wait<0>();

    if constexpr (SPLIT) {
        tc_for_each<MI, NI>(acc, [&](int r, int c, int, float v) {
            const int m = m0 + r, n = n0 + c;
            if (m < Cout && n < N) part[((long)blockIdx.z * Cout + m) * N + n] = v;
        });
        return;
    }
    // The thread's 2 NI output pixels, located once: offsets b*C_out*HW + p in y (32 bits: the host keeps y under
    // 2^31 values), -1 past N.
    int yo[2 * NI];
#pragma unroll
    for (int j = 0; j < 2 * NI; ++j) {
        const int n = n0 + tc_col<NI>(j);
        yo[j] = n < N ? (n / HW) * Cout * HW + n % HW : -1;
    }
    // Other warps may still be reading the last stage: a barrier before the squares overwrite the stages.
    __syncthreads();
    float* sq = (float*)dyn_smem();
    tc_for_each<MI, NI>(acc, [&](int r, int c, int j, float v) {
        const int m = m0 + r;
        float out = 0.0f;
        if (m < Cout && yo[j] >= 0) {
            const f16_bits h = f2h(fmaxf(v + bias[m], 0.0f));
            y[yo[j] + m * HW] = h;
            out = h2f(h);
        }
        sq[r * (TN + 1) + c] = out * out;
    });
    __syncthreads();
    tile_goodness<TM, TN>(sq, gpart, m0, n0, Cout, B, H, W, P, NB);
}

// 64 x 128 tile, K steps of 64, 3 stages (82,944 bytes of shared memory; the epilogue's squares take 33,024): the
// layers too small to fill the GPU with the large tile. (Its 32 x 32 warp tiles do 16 MMAs per 32-deep slice: the deeper step halves the loop's
// fixed cost per MMA.)
extern "C" __global__ void __launch_bounds__(256) conv_fwd_nhwc_f16(
    const f16_bits* __restrict__ x /*[B*H*W*Cp]*/, const f16_bits* __restrict__ w /*[NHWC_MP(Cout)*NHWC_KP(Cp)]*/,
    const float* __restrict__ bias /*[Cout]*/, const int* __restrict__ taps /*[NHWC_TAPS(Cp)]*/,
    f16_bits* __restrict__ y /*[B*Cout*H*W]*/, float* __restrict__ gpart /*[gridDim.x*NB*P*Cout]*/, int B, int Cp,
    int Cout, int H, int W, int P, int NB)
{
    conv_fwd_nhwc<2, 4, 3, 64>(x, w, bias, taps, y, nullptr, gpart, B, Cp, Cout, H, W, P, NB);
}

// 128 x 256 tile (64 x 64 per warp), K steps of 32, 4 stages (122,880 bytes; the epilogue's squares take 131,584,
// which is the launch's shared memory: one block per SM either way). Both tiles need more than the 48 KB a launch
// gets without the opt-in attribute (set at load: src/backend/cuda/mod.rs).
extern "C" __global__ void __launch_bounds__(256, 1) conv_fwd_nhwc_f16_l(
    const f16_bits* __restrict__ x /*[B*H*W*Cp]*/, const f16_bits* __restrict__ w /*[NHWC_MP(Cout)*NHWC_KP(Cp)]*/,
    const float* __restrict__ bias /*[Cout]*/, const int* __restrict__ taps /*[NHWC_TAPS(Cp)]*/,
    f16_bits* __restrict__ y /*[B*Cout*H*W]*/, float* __restrict__ gpart /*[gridDim.x*NB*P*Cout]*/, int B, int Cp,
    int Cout, int H, int W, int P, int NB)
{
    conv_fwd_nhwc<4, 8, 4, 32>(x, w, bias, taps, y, nullptr, gpart, B, Cp, Cout, H, W, P, NB);
}

// The 64 x 128 tile split over K (see SPLIT above): gridDim.z partial tiles per output tile.
extern "C" __global__ void __launch_bounds__(256) conv_fwd_nhwc_f16_sk(
    const f16_bits* __restrict__ x /*[B*H*W*Cp]*/, const f16_bits* __restrict__ w /*[NHWC_MP(Cout)*NHWC_KP(Cp)]*/,
    const int* __restrict__ taps /*[NHWC_TAPS(Cp)]*/, float* __restrict__ part /*[gridDim.z*Cout*B*H*W]*/, int B,
    int Cp, int Cout, int H, int W)
{
    conv_fwd_nhwc<2, 4, 3, 64, true>(x, w, nullptr, taps, nullptr, part, nullptr, B, Cp, Cout, H, W, 1, 1);
}

// y = relu(sum_z part[z] + bias), the z in order, stored NCHW in fp16, and the goodness epilogue: one block per
// output tile of the split kernel (64 x 128, the same grid), pixels fastest.
// (src/backend/cuda/geometry.rs asserts that the small tile is this one.)
#define SPLITK_TM 64
#define SPLITK_TN 128
extern "C" __global__ void __launch_bounds__(256) conv_fwd_splitk_f16(
    const float* __restrict__ part /*[Z*Cout*B*H*W]*/, const float* __restrict__ bias /*[Cout]*/,
    f16_bits* __restrict__ y /*[B*Cout*H*W]*/, float* __restrict__ gpart /*[gridDim.x*NB*P*Cout]*/, int B, int Cout,
    int H, int W, int Z, int P, int NB)
{
    __shared__ float sq[SPLITK_TM * (SPLITK_TN + 1)];
    const int HW = H * W, N = B * HW;
    const int m0 = blockIdx.y * SPLITK_TM, n0 = blockIdx.x * SPLITK_TN;
    for (int e = threadIdx.x; e < SPLITK_TM * SPLITK_TN; e += blockDim.x) {
        const int r = e / SPLITK_TN, c = e % SPLITK_TN, m = m0 + r, n = n0 + c;
        float out = 0.0f;
        if (m < Cout && n < N) {
            const long t = (long)m * N + n;
            float v = 0.0f;
            for (int z = 0; z < Z; ++z) v += part[(long)z * Cout * N + t];
            const f16_bits h = f2h(fmaxf(v + bias[m], 0.0f));
            y[((long)(n / HW) * Cout + m) * HW + n % HW] = h;
            out = h2f(h);
        }
        sq[r * (SPLITK_TN + 1) + c] = out * out;
    }
    __syncthreads();
    tile_goodness<SPLITK_TM, SPLITK_TN>(sq, gpart, m0, n0, Cout, B, H, W, P, NB);
}

// g = mean (or sum) of each cell's tile partials (tile_goodness), added in tile order: one thread per
// (sample, cell, channel), the channel fastest (the partials' fastest index). The tiles that hold a pixel of the
// cell are found row by row: each row of the cell is a run of consecutive pixels, so of consecutive tiles.
extern "C" __global__ void goodness_tiles_f32(
    const float* __restrict__ gpart /*[((B*H*W+TN-1)/TN)*NB*P*C]*/, float* __restrict__ g /*[B*C*P*P]*/, int B, int C,
    int H, int W, int P, int NB,
    int TN, int reduce_mean)
{
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= B * C * P * P) return;
    const int c = t % C, cell = (t / C) % (P * P), b = t / (C * P * P), i = cell / P, j = cell % P;
    const int HW = H * W;
    const int r0 = bin_start(i, H, P), r1 = bin_end(i, H, P), c0 = bin_start(j, W, P), c1 = bin_end(j, W, P);
    float acc = 0.0f;
    int next = 0;  // the first tile not yet added
    for (int r = r0; r < r1; ++r) {
        const int first = b * HW + r * W + c0, last = first + (c1 - c0) - 1;
        for (int tile = max(first / TN, next); tile <= last / TN; ++tile) {
            const int k = b * P + i - tile_band0(tile * TN, H, W, P);
            acc += gpart[((long)(tile * NB + k) * P + j) * C + c];
        }
        next = max(next, last / TN + 1);
    }
    g[(b * C + c) * P * P + cell] = reduce_mean ? acc / (float)((r1 - r0) * (c1 - c0)) : acc;
}

extern "C" __global__ void patch_goodness_f32(
    const float* __restrict__ y /*[B*C*H*W]*/, float* __restrict__ g /*[B*C*P*P]*/, int B, int C, int H, int W, int P,
    int reduce_mean)
{
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= B * C * P * P) return;
    int cell = t % (P * P), map = t / (P * P);
    int i = cell / P, j = cell % P;
    int r0 = bin_start(i, H, P), r1 = bin_end(i, H, P), c0 = bin_start(j, W, P), c1 = bin_end(j, W, P);
    const float* m = y + (long)map * H * W;
    float acc = 0.0f;
    for (int r = r0; r < r1; ++r)
        for (int c = c0; c < c1; ++c) {
            float v = m[r * W + c];
            acc = fmaf(v, v, acc);
        }
    g[t] = reduce_mean ? acc / (float)((r1 - r0) * (c1 - c0)) : acc;
}
