// Shared device helpers, prepended to every kernel source before NVRTC compiles it (NVRTC has no include
// path, so kernels include no CUDA headers). fp16 is carried as raw bits, converted with PTX.
typedef unsigned short f16_bits;

__device__ __forceinline__ float h2f(f16_bits h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ f16_bits f2h(float f) {
    f16_bits h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// Chris Wellons' lowbias32, as src/rng.rs: the dropout masks are bit-identical to the CPU backend's.
__device__ __forceinline__ unsigned int lowbias32(unsigned int x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

__device__ __forceinline__ float dropout_uniform(unsigned long long key, unsigned int i) {
    unsigned int x = lowbias32(lowbias32(i ^ (unsigned int)key) ^ (unsigned int)(key >> 32));
    return (float)(x >> 8) * (1.0f / 16777216.0f);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over the block; every thread gets the result. `scratch` holds 32 floats. blockDim.x % 32 == 0.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = (threadIdx.x < warps) ? scratch[threadIdx.x] : 0.0f;
    if (warp == 0) v = warp_sum(v);
    if (threadIdx.x == 0) scratch[0] = v;
    __syncthreads();
    v = scratch[0];
    __syncthreads();
    return v;
}

// PyTorch adaptive_avg_pool2d bins: bin i of p over n covers [floor(i*n/p), ceil((i+1)*n/p)).
__device__ __forceinline__ int bin_start(int i, int n, int p) { return (i * n) / p; }
__device__ __forceinline__ int bin_end(int i, int n, int p) { return ((i + 1) * n + p - 1) / p; }

// The bins along an axis of length n (p bins) that contain coordinate c: [*lo, *hi] (at most 2, they overlap
// only when p does not divide n).
__device__ __forceinline__ void bins_of(int c, int n, int p, int* lo, int* hi) {
    int i = (c * p) / n;
    int a = i > 0 ? i - 1 : 0, b = i < p - 1 ? i + 1 : p - 1;
    while (a < b && !(bin_start(a, n, p) <= c && c < bin_end(a, n, p))) a++;
    while (b > a && !(bin_start(b, n, p) <= c && c < bin_end(b, n, p))) b--;
    *lo = a;
    *hi = b;
}

// The implicit im2col: col[k, n] = x[b, ci, oh + kh - 1, ow + kw - 1] (zero outside the map), with
// k = ci*9 + kh*3 + kw and n = b*H*W + oh*W + ow, for k < K and n < N (else 0).
__device__ __forceinline__ float im2col_at(const float* __restrict__ x, int k, int n, int K, int N, int Cin, int H, int W) {
    if (k >= K || n >= N) return 0.0f;
    int ci = k / 9, r = k % 9;
    int HW = H * W, b = n / HW, p = n % HW;
    int ih = p / W + r / 3 - 1, iw = p % W + r % 3 - 1;
    if (ih < 0 || ih >= H || iw < 0 || iw >= W) return 0.0f;
    return x[(((long)b * Cin + ci) * H + ih) * W + iw];
}

// Softmax cross-entropy of one row of N logits against `label`: writes da = (softmax(a) - onehot) * scale,
// adds the loss and the hit (argmax, first on ties) to stats[0], stats[1].
__device__ __forceinline__ void softmax_ce_row(const float* a, int N, int label, float scale, float* da, float* stats) {
    float mx = a[0];
    int arg = 0;
    for (int n = 1; n < N; ++n)
        if (a[n] > mx) { mx = a[n]; arg = n; }
    float sum = 0.0f;
    for (int n = 0; n < N; ++n) sum += expf(a[n] - mx);
    float lse = mx + logf(sum);
    for (int n = 0; n < N; ++n) da[n] = (expf(a[n] - lse) - (n == label ? 1.0f : 0.0f)) * scale;
    atomicAdd(&stats[0], lse - a[label]);
    atomicAdd(&stats[1], arg == label ? 1.0f : 0.0f);
}

// The register tile of the GEMM kernels: acc[i][j] += a[i] * b[j] for 4 x 4, with a = a_row[0..4], b = b_row[0..4]
// (two rows of shared-memory tiles).
__device__ __forceinline__ void fma_outer4(float acc[4][4], const float* a_row, const float* b_row) {
    float a[4], b[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) { a[i] = a_row[i]; b[i] = b_row[i]; }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
}
