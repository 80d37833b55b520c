// conv_goodness_fwd_{f32,f16}: y = relu(conv3x3(x, W) + b); patch_goodness_{f32,f16}: g = mean (or sum) of y^2
// per cell, summed in f32.
//
// Work split: an implicit GEMM out[M = C_out, N = B*H*W] = W[M, K = C_in*9] * col[K, N], where the column
// operand is gathered from x while the tile is loaded (no im2col buffer exists). A block of 256 threads owns a
// 64 x 64 output tile and walks K in steps of 16 through shared memory; each thread accumulates a 4 x 4
// register tile. Epilogue: bias + ReLU, y stored NCHW. Grid = (ceil(N/64), ceil(C_out/64)).
//
// patch_goodness_f32 then reduces y^2 over each cell: one thread per (sample, channel, cell), each an ordered
// sum, so the goodness is deterministic (atomics in the GEMM epilogue would make two runs of one seed differ in
// the last bits). The cost is one re-read of y: for VGG8's first layer at width 1 and batch 128, 16.8M values,
// 34 MB in fp16, ~10 us at an H100's 3.35 TB/s, as much traffic as the conv's own store of y (that layer, with
// K = 27, is memory-bound); for the deeper, compute-bound layers a few percent. Fusing it deterministically needs
// per-tile partial sums for the cells a tile cuts, reduced in order by a second small pass: not done yet.
//
// conv_goodness_fwd_f16 is the same implicit GEMM on the tensor cores: x and W in fp16, fp32 accumulators
// (mma.sync m16n8k16, see tc_step in the prelude), block tile TC_M = 64 channels x TC_N = 128 pixels, K walked
// in steps of TC_K = 32 through shared memory; the epilogue adds the bias in f32, applies ReLU and stores y in
// fp16 (round to nearest even). Grid = (ceil(N/128), ceil(C_out/64)).
#define FWD_TM 64
#define FWD_TN 64
#define FWD_TK 16

extern "C" __global__ void __launch_bounds__(256) conv_goodness_fwd_f32(
    const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ bias,
    float* __restrict__ y, int B, int Cin, int Cout, int H, int W)
{
    __shared__ float As[FWD_TK][FWD_TM];
    __shared__ float Bs[FWD_TK][FWD_TN];
    const int K = Cin * 9, HW = H * W, N = B * HW;
    const int m0 = blockIdx.y * FWD_TM, n0 = blockIdx.x * FWD_TN;
    const int tid = threadIdx.x;
    const int tm = (tid / 16) * 4, tn = (tid % 16) * 4;
    // B tile: the thread's pixel (tid % 64) is the same for every tap it loads and every K step: locate it once.
    const int bn = tid % FWD_TN, n = n0 + bn;
    const bool n_ok = n < N;
    const int pb = n_ok ? n / HW : 0, pp = n_ok ? n % HW : 0, oh = pp / W, ow = pp % W;
    const float* xb = x + (long)pb * Cin * HW;
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
        for (int kk = tid / FWD_TN; kk < FWD_TK; kk += 256 / FWD_TN)
            Bs[kk][bn] = n_ok ? tap_at(xb, k0 + kk, K, oh, ow, H, W) : 0.0f;
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < FWD_TK; ++kk) {
            fma_outer4(acc, &As[kk][tm], &Bs[kk][tn]);
        }
        __syncthreads();
    }

    for (int i = 0; i < 4; ++i) {
        int m = m0 + tm + i;
        if (m >= Cout) continue;
        float bv = bias[m];
        for (int j = 0; j < 4; ++j) {
            int n = n0 + tn + j;
            if (n >= N) continue;
            int b = n / HW, p = n % HW;
            float v = fmaxf(acc[i][j] + bv, 0.0f);
            y[((long)b * Cout + m) * HW + p] = v;
        }
    }
}

// f16 forward. Each thread loads 8 weights of one row of the A tile (k contiguous in W) and 16 column values of
// one pixel (the pixel's coordinates are fixed for the thread; the taps vary), so consecutive threads read
// consecutive pixels of x; the loads for step k+1 are issued before the MMAs of step k.
extern "C" __global__ void __launch_bounds__(256) conv_goodness_fwd_f16(
    const f16_bits* __restrict__ x, const f16_bits* __restrict__ w, const float* __restrict__ bias,
    f16_bits* __restrict__ y, int B, int Cin, int Cout, int H, int W)
{
    __shared__ __align__(16) f16_bits As[TC_M][TC_LD];
    __shared__ __align__(16) f16_bits Bs[TC_N][TC_LD];
    const int K = Cin * 9, HW = H * W, N = B * HW;
    const int m0 = blockIdx.y * TC_M, n0 = blockIdx.x * TC_N;
    const int tid = threadIdx.x;
    const int am = tid >> 2, ak = (tid & 3) * 8;       // A tile: row am, columns ak..ak+7
    const int bn = tid % TC_N, bk = tid / TC_N;        // B tile: pixel bn, taps bk, bk+2, ..., bk+30
    // The thread's pixel is the same for the whole K loop: locate it once.
    const int n = n0 + bn;
    const bool n_ok = n < N;
    const int pb = n_ok ? n / HW : 0, pp = n_ok ? n % HW : 0, oh = pp / W, ow = pp % W;
    const f16_bits* xb = x + (long)pb * Cin * HW;
    float acc[2][4][4];
    tc_zero(acc);

    // Register prefetch: the next step's 8 + 16 values are loaded from global memory while the tensor cores
    // work on the current step's tile (one shared buffer, written between the two barriers).
    const int m = m0 + am;
    const f16_bits* wrow = w + (long)m * K;
    f16_bits ra[8], rb[TC_K / 2];
    auto load = [&](int k0) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int k = k0 + ak + j;
            ra[j] = (m < Cout && k < K) ? wrow[k] : (f16_bits)0;
        }
#pragma unroll
        for (int j = 0; j < TC_K / 2; ++j) rb[j] = n_ok ? tap_at(xb, k0 + bk + 2 * j, K, oh, ow, H, W) : (f16_bits)0;
    };
    load(0);
    for (int k0 = 0; k0 < K; k0 += TC_K) {
#pragma unroll
        for (int j = 0; j < 8; ++j) As[am][ak + j] = ra[j];
#pragma unroll
        for (int j = 0; j < TC_K / 2; ++j) Bs[bn][bk + 2 * j] = rb[j];
        __syncthreads();
        if (k0 + TC_K < K) load(k0 + TC_K);
        tc_step(acc, As, Bs);
        __syncthreads();
    }

    tc_for_each(acc, [&](int row, int col, float v) {
        const int m = m0 + row, n = n0 + col;
        if (m >= Cout || n >= N) return;
        const int b = n / HW, p = n % HW;
        y[((long)b * Cout + m) * HW + p] = f2h(fmaxf(v + bias[m], 0.0f));
    });
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
    const float* __restrict__ y, float* __restrict__ g, int B, int C, int H, int W, int P, int reduce_mean)
{
    patch_goodness(y, g, B, C, H, W, P, reduce_mean);
}

extern "C" __global__ void patch_goodness_f16(
    const f16_bits* __restrict__ y, float* __restrict__ g, int B, int C, int H, int W, int P, int reduce_mean)
{
    patch_goodness(y, g, B, C, H, W, P, reduce_mean);
}
