// conv_goodness_wgrad_f32: dW = dz * col^T and db = sum dz, where
// dz[b,c,h,w] = 1[y > 0] * 2 y * sum_{cells (i,j) containing (h,w)} dg[b, c*P^2 + i*P + j] (/ |bin_ij| for mean).
//
// Work split: an implicit GEMM dW[M = C_out, K = C_in*9] = sum over n < B*H*W of dz[m, n] * col[k, n]. A block of
// 256 threads owns a 64 x 64 tile of dW and a slice of the reduction (blockIdx.z: `chunk` pixels), walked in
// steps of 16 through shared memory; dz is computed from y and dg while its tile is loaded and never stored,
// col is gathered from x. Each block stores its partial tile into part[z][m][k] (and the blocks of the first K
// tile the row sums of dz into part_db[z][m]); wgrad_reduce_f32 sums the partials over z in order, so the
// result is deterministic. Grid = (ceil(K/64), ceil(C_out/64), ceil(N/chunk)).
#define WG_TM 64
#define WG_TK 64
#define WG_TN 16

extern "C" __global__ void __launch_bounds__(256) conv_goodness_wgrad_f32(
    const float* __restrict__ x, const float* __restrict__ y, const float* __restrict__ dg,
    float* __restrict__ part, float* __restrict__ part_db,
    int B, int Cin, int Cout, int H, int W, int P, int reduce_mean, int chunk)
{
    __shared__ float As[WG_TN][WG_TM];  // dz tile, [pixel][channel]
    __shared__ float Bs[WG_TN][WG_TK];  // col tile, [pixel][tap]
    const int K = Cin * 9, HW = H * W, N = B * HW;
    const int m0 = blockIdx.y * WG_TM, k0 = blockIdx.x * WG_TK;
    const int nbeg = blockIdx.z * chunk, nend = min(N, nbeg + chunk);
    const int tid = threadIdx.x;
    const int tm = (tid / 16) * 4, tk = (tid % 16) * 4;
    const bool bias_block = blockIdx.x == 0;
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
    float db_acc = 0.0f;

    for (int n0 = nbeg; n0 < nend; n0 += WG_TN) {
        for (int i = tid; i < WG_TN * WG_TM; i += 256) {
            int nn = i / WG_TM, mm = i % WG_TM;
            int n = n0 + nn, m = m0 + mm;
            float dz = 0.0f;
            if (n < nend && m < Cout) {
                int b = n / HW, p = n % HW, oh = p / W, ow = p % W;
                long map = (long)b * Cout + m;
                float yv = y[map * HW + p];
                if (yv > 0.0f) {
                    int r0, r1, c0, c1;
                    bins_of(oh, H, P, &r0, &r1);
                    bins_of(ow, W, P, &c0, &c1);
                    float s = 0.0f;
                    for (int bi = r0; bi <= r1; ++bi)
                        for (int bj = c0; bj <= c1; ++bj) {
                            float d = dg[map * P * P + bi * P + bj];
                            if (reduce_mean)
                                d /= (float)((bin_end(bi, H, P) - bin_start(bi, H, P)) * (bin_end(bj, W, P) - bin_start(bj, W, P)));
                            s += d;
                        }
                    dz = s * (2.0f * yv);
                }
            }
            As[nn][mm] = dz;
        }
        for (int i = tid; i < WG_TN * WG_TK; i += 256) {
            int nn = i / WG_TK, kk = i % WG_TK;
            int n = n0 + nn;
            Bs[nn][kk] = im2col_at(x, k0 + kk, n < nend ? n : N, K, N, Cin, H, W);
        }
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

// dw[i] = sum_z part[z][i] (i < M*K), db[m] = sum_z part_db[z][m]: one thread per element, z in order.
extern "C" __global__ void wgrad_reduce_f32(
    const float* __restrict__ part, const float* __restrict__ part_db, float* __restrict__ dw,
    float* __restrict__ db, int MK, int M, int Z)
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
