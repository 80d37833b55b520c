// conv_goodness_fwd_f32: y = relu(conv3x3(x, W) + b); patch_goodness_f32: g = mean (or sum) of y^2 per cell.
//
// Work split: an implicit GEMM out[M = C_out, N = B*H*W] = W[M, K = C_in*9] * col[K, N], where the column
// operand is gathered from x while the tile is loaded (no im2col buffer exists). A block of 256 threads owns a
// 64 x 64 output tile and walks K in steps of 16 through shared memory; each thread accumulates a 4 x 4
// register tile. Epilogue: bias + ReLU, y stored NCHW. Grid = (ceil(N/64), ceil(C_out/64)).
//
// patch_goodness_f32 then reduces y^2 over each cell: one thread per (sample, channel, cell), each an ordered
// sum, so the goodness is deterministic (atomics in the GEMM epilogue would make two runs of one seed differ in
// the last bits). It re-reads y once; fusing it needs a tile that owns whole maps (the fp16 path's layout).
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
        for (int i = tid; i < FWD_TK * FWD_TN; i += 256) {
            int kk = i / FWD_TN, nn = i % FWD_TN;
            Bs[kk][nn] = im2col_at(x, k0 + kk, n0 + nn, K, N, Cin, H, W);
        }
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

extern "C" __global__ void patch_goodness_f32(
    const float* __restrict__ y, float* __restrict__ g, int B, int C, int H, int W, int P, int reduce_mean)
{
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= B * C * P * P) return;
    int cell = t % (P * P), map = t / (P * P);
    int i = cell / P, j = cell % P;
    int r0 = bin_start(i, H, P), r1 = bin_end(i, H, P), c0 = bin_start(j, W, P), c1 = bin_end(j, W, P);
    const float* m = y + (long)map * H * W;
    float acc = 0.0f;
    for (int r = r0; r < r1; ++r)
        for (int c = c0; c < c1; ++c) acc = fmaf(m[r * W + c], m[r * W + c], acc);
    g[t] = reduce_mean ? acc / (float)((r1 - r0) * (c1 - c0)) : acc;
}
