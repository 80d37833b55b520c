// conv_goodness_fwd_{f32,f16}: y = relu(conv3x3(x, W) + b); patch_goodness_{f32,f16}: g = mean (or sum) of y^2
// per cell, summed in f32.
//
// Work split: an implicit GEMM out[M = C_out, N = B*H*W] = W[M, K = C_in*9] * col[K, N], where the column
// operand is gathered from x while the tile is loaded (no im2col buffer exists), through the layer's tap table
// (prelude: tap_fetch). A block of 256 threads owns a 64 x 64 output tile and walks K in steps of 16 through
// shared memory; each thread accumulates a 4 x 4 register tile. Epilogue: bias + ReLU, y stored NCHW. Grid = (ceil(N/64), ceil(C_out/64)).
//
// patch_goodness_f32 then reduces y^2 over each cell: one thread per (sample, channel, cell), each an ordered
// sum, so the goodness is deterministic (atomics in the GEMM epilogue would make two runs of one seed differ in
// the last bits). The cost is one re-read of y: for VGG8's first layer at width 1 and batch 128, 16.8M values,
// 34 MB in fp16, ~10 us at an H100's 3.35 TB/s, as much traffic as the conv's own store of y (that layer, with
// K = 27, is memory-bound); for the deeper, compute-bound layers a few percent. Fusing it deterministically needs
// per-tile partial sums for the cells a tile cuts, reduced in order by a second small pass: not done yet.
//
// conv_goodness_fwd_f16 is the same implicit GEMM on the tensor cores: x and W in fp16, fp32 accumulators
// (mma.sync m16n8k16 fed by ldmatrix, see tc_step in the prelude), block tile 64 (or, for C_out >= 128, 128)
// channels x TC_N = 128 pixels, K walked in steps of TC_K = 32 through two shared stages, the column operand gathered through the
// layer's tap table (prelude: tap_fetch); the epilogue adds the bias in f32, applies ReLU and stores y in
// fp16 (round to nearest even). Grid = (ceil(N/128), ceil(C_out/64 or 128)).
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

// f16 forward, block tile TM = 64 or 128 channels x TC_N = 128 pixels. Per K step each thread loads TM / 64 rows
// of 8 weights of the A tile (16-byte loads where K is a multiple of 8, i.e. C_in is) and 16 consecutive taps of
// one pixel through the tap table (the pixel is fixed for the thread: its window origin and in-map mask are
// computed once); both go to shared memory as 16-byte stores. Two shared stages: the loads for step s + 1 are
// issued before the MMAs of step s and stored into the other stage after them, so a K step costs one barrier.
// The 128-channel tile (conv_goodness_fwd_f16_m128, for C_out >= 128) does twice the MMAs per gathered tap;
// launch bounds (256, 2) hold it to 128 registers, so two blocks share an SM.
template <int TM>
__device__ __forceinline__ void conv_fwd_f16(
    const f16_bits* __restrict__ x, const f16_bits* __restrict__ w, const float* __restrict__ bias,
    const int* __restrict__ taps, f16_bits* __restrict__ y, int B, int Cin, int Cout, int H, int W)
{
    constexpr int MI = TM / 32, RA = TM / 64;
    __shared__ __align__(16) f16_bits As[2][TM][TC_LD];
    __shared__ __align__(16) f16_bits Bs[2][TC_N][TC_LD];
    const int K = Cin * 9, HW = H * W, N = B * HW;
    const int m0 = blockIdx.y * TM, n0 = blockIdx.x * TC_N;
    const int tid = threadIdx.x;
    const int am = tid >> 2, ak = (tid & 3) * 8;          // A tile: rows am (+ 64), columns ak..ak+7
    const int bn = tid % TC_N, bk = (tid / TC_N) * 16;    // B tile: pixel bn, taps bk..bk+15
    // The thread's pixel is the same for the whole K loop: locate it once.
    const int n = n0 + bn;
    const bool n_ok = n < N;
    const int pb = n_ok ? n / HW : 0, pp = n_ok ? n % HW : 0, oh = pp / W, ow = pp % W;
    const int mask = n_ok ? tap_mask(oh, ow, H, W) : 0, xo = pb * Cin * HW + (oh - 1) * W + (ow - 1);
    const bool a_vec = (K & 7) == 0;
    bool m_ok[RA];
    const f16_bits* wrow[RA];
#pragma unroll
    for (int i = 0; i < RA; ++i) {
        const int m = m0 + am + 64 * i;
        m_ok[i] = m < Cout;
        wrow[i] = w + (long)(m_ok[i] ? m : 0) * K;
    }
    float acc[MI][4][4];
    tc_zero<MI>(acc);

    u32x4 ra[RA], rb[2];
    auto load = [&](int k0) {
        const int k = k0 + ak;
#pragma unroll
        for (int i = 0; i < RA; ++i) {
            if (a_vec) {
                // K % 8 == 0 and k % 8 == 0: the 8 weights are all inside the row or all past it.
                ra[i] = (m_ok[i] && k < K) ? ld16(wrow[i] + k) : u32x4{0u, 0u, 0u, 0u};
            } else {
                f16_bits h[8];
#pragma unroll
                for (int j = 0; j < 8; ++j) h[j] = (m_ok[i] && k + j < K) ? wrow[i][k + j] : (f16_bits)0;
                ra[i] = u32x4{pack2(h[0], h[1]), pack2(h[2], h[3]), pack2(h[4], h[5]), pack2(h[6], h[7])};
            }
        }
        // The table holds at least K rounded up to TC_K entries; k0 + bk is a multiple of 16 (64-byte aligned).
        const int* tk = taps + k0 + bk;
#pragma unroll
        for (int q = 0; q < 2; ++q) {
            const u32x4 t0 = ld16(tk + 8 * q), t1 = ld16(tk + 8 * q + 4);
            rb[q] = u32x4{pack2(tap_fetch(x, xo, mask, t0.x), tap_fetch(x, xo, mask, t0.y)),
                          pack2(tap_fetch(x, xo, mask, t0.z), tap_fetch(x, xo, mask, t0.w)),
                          pack2(tap_fetch(x, xo, mask, t1.x), tap_fetch(x, xo, mask, t1.y)),
                          pack2(tap_fetch(x, xo, mask, t1.z), tap_fetch(x, xo, mask, t1.w))};
        }
    };
    auto store = [&](int st) {
#pragma unroll
        for (int i = 0; i < RA; ++i) st16(&As[st][am + 64 * i][ak], ra[i]);
        st16(&Bs[st][bn][bk], rb[0]);
        st16(&Bs[st][bn][bk + 8], rb[1]);
    };

    load(0);
    store(0);
    __syncthreads();
    int st = 0;
    for (int k0 = 0; k0 < K; k0 += TC_K, st ^= 1) {
        const bool more = k0 + TC_K < K;
        if (more) load(k0 + TC_K);
        tc_step<MI>(acc, As[st], Bs[st]);
        // The other stage was last read by step s - 1's MMAs, which every thread finished before the last barrier.
        if (more) store(st ^ 1);
        __syncthreads();
    }

    // The thread's 8 output pixels, located once (not once per accumulator): their offsets b*C_out*HW + p in y
    // (32 bits: the host keeps y under 2^31 values), -1 past N.
    int yo[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        const int n = n0 + tc_col(j);
        yo[j] = n < N ? (n / HW) * Cout * HW + n % HW : -1;
    }
    tc_for_each<MI>(acc, [&](int row, int, int j, float v) {
        const int m = m0 + row;
        if (m < Cout && yo[j] >= 0) y[yo[j] + m * HW] = f2h(fmaxf(v + bias[m], 0.0f));
    });
}

extern "C" __global__ void __launch_bounds__(256) conv_goodness_fwd_f16(
    const f16_bits* __restrict__ x /*[B*Cin*H*W]*/, const f16_bits* __restrict__ w /*[Cout*Cin*9]*/,
    const float* __restrict__ bias /*[Cout]*/, const int* __restrict__ taps /*[TAPS(Cin)]*/,
    f16_bits* __restrict__ y /*[B*Cout*H*W]*/, int B, int Cin, int Cout, int H, int W)
{
    conv_fwd_f16<64>(x, w, bias, taps, y, B, Cin, Cout, H, W);
}

extern "C" __global__ void __launch_bounds__(256, 2) conv_goodness_fwd_f16_m128(
    const f16_bits* __restrict__ x /*[B*Cin*H*W]*/, const f16_bits* __restrict__ w /*[Cout*Cin*9]*/,
    const float* __restrict__ bias /*[Cout]*/, const int* __restrict__ taps /*[TAPS(Cin)]*/,
    f16_bits* __restrict__ y /*[B*Cout*H*W]*/, int B, int Cin, int Cout, int H, int W)
{
    conv_fwd_f16<128>(x, w, bias, taps, y, B, Cin, Cout, H, W);
}

template <typename T>
__device__ __forceinline__ void patch_goodness(
    const T* __restrict__ y, float* __restrict__ g, int B, int C, int H, int W, int P, int reduce_mean)
{
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= B * C * P * P) return;
    int cell = t % (P * P), map = t / (P * P);
    int i = cell / P, j = cell % P;
    int r0 = bin_start(i, H, P), r1 = bin_end(i, H, P), c0 = bin_start(j, W, P), c1 = bin_end(j, W, P);
    const T* m = y + (long)map * H * W;
    float acc = 0.0f;
    for (int r = r0; r < r1; ++r)
        for (int c = c0; c < c1; ++c) {
            float v = ld(&m[r * W + c]);
            acc = fmaf(v, v, acc);
        }
    g[t] = reduce_mean ? acc / (float)((r1 - r0) * (c1 - c0)) : acc;
}

extern "C" __global__ void patch_goodness_f32(
    const float* __restrict__ y /*[B*C*H*W]*/, float* __restrict__ g /*[B*C*P*P]*/, int B, int C, int H, int W, int P,
    int reduce_mean)
{
    patch_goodness(y, g, B, C, H, W, P, reduce_mean);
}

extern "C" __global__ void patch_goodness_f16(
    const f16_bits* __restrict__ y /*[B*C*H*W]*/, float* __restrict__ g /*[B*C*P*P]*/, int B, int C, int H, int W,
    int P, int reduce_mean)
{
    patch_goodness(y, g, B, C, H, W, P, reduce_mean);
}
