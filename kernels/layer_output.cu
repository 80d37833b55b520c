// layer_output_{f32,f16}: from y [B, C, H, W]: optional 2x2 pool (avg or rms, floor like AvgPool2d(2)), optional
// dropout (keep when dropout_uniform(key, first + b*C*Ho*Wo + i) >= p, scale 1/(1-p): the CPU backend's mask, bit
// for bit; `first` is the element index where this batch starts in the global batch of a data-parallel step, 0 in
// one process), per-sample RMS norm x / (sqrt(mean x^2) + e^-50), and the global average pool into gap [B, C].
// The f16 kernel reads y and stores the output in fp16; every sum, and the pooled features, stay f32.
//
// Work split: blockIdx.x is the sample (gridDim.x the batch: up to 2^31 - 1), and its channels are cut into
// gridDim.y slices of CPB channels (geometry::layer_output_split: enough blocks to fill the GPU at small widths,
// where one block a sample left most SMs idle). Two kernels, two passes over y:
// - layer_output_sumsq_*: each block pools, drops and sums the squares of its slice (a fixed-order block sum)
//   into part[b][slice];
// - layer_output_*: each block adds its sample's slice sums in slice order (every block the same sum, so the
//   same divisor), recomputes each value, divides and stores it (recomputing rather than re-reading the output
//   keeps the fp16 store to one rounding), and adds the stored channel's values for the pooled features in the
//   same pass: a warp per channel (a fixed shuffle tree) where a map has 32 values or more, a thread per channel
//   (in order) below.
// pool: 0 none, 1 avg, 2 rms. The dropout key is read from the device (the step's parameters:
// src/backend/cuda/graph.rs), so that a captured step uses each step's key.
template <typename T>
__device__ __forceinline__ float pooled_dropped(
    const T* __restrict__ yb, int i, int b, int per, int H, int W, int Ho, int Wo, int pool, float p,
    unsigned long long key, unsigned int first, int use_dropout)
{
    int c = i / (Ho * Wo), r = i % (Ho * Wo), oi = r / Wo, oj = r % Wo;
    float v;
    if (pool == 0) {
        v = ld(&yb[i]);
    } else {
        const T* m = yb + (long)c * H * W;
        float q0 = ld(&m[(2 * oi) * W + 2 * oj]), q1 = ld(&m[(2 * oi) * W + 2 * oj + 1]);
        float q2 = ld(&m[(2 * oi + 1) * W + 2 * oj]), q3 = ld(&m[(2 * oi + 1) * W + 2 * oj + 1]);
        v = pool == 1 ? (q0 + q1 + q2 + q3) / 4.0f : sqrtf((q0 * q0 + q1 * q1 + q2 * q2 + q3 * q3) / 4.0f);
    }
    if (use_dropout) {
        bool keep = dropout_uniform(key, first + (unsigned int)(b * per + i)) >= p;
        v = keep ? v * (1.0f / (1.0f - p)) : 0.0f;
    }
    return v;
}

template <typename T>
__device__ __forceinline__ void layer_output_sumsq(
    const T* __restrict__ y, float* __restrict__ part, int C, int H, int W, int pool, float p, unsigned long long key,
    unsigned int first, int use_dropout, int CPB)
{
    __shared__ float scratch[32];
    const int b = blockIdx.x;
    const int Ho = pool ? H / 2 : H, Wo = pool ? W / 2 : W, hw = Ho * Wo, per = C * hw;
    const T* yb = y + (long)b * C * H * W;
    const int i0 = blockIdx.y * CPB * hw, i1 = min(C, ((int)blockIdx.y + 1) * CPB) * hw;
    float ss = 0.0f;
    for (int i = i0 + threadIdx.x; i < i1; i += blockDim.x) {
        float v = pooled_dropped(yb, i, b, per, H, W, Ho, Wo, pool, p, key, first, use_dropout);
        ss += v * v;
    }
    ss = block_sum(ss, scratch);
    if (threadIdx.x == 0) part[(long)b * gridDim.y + blockIdx.y] = ss;
}

template <typename T>
__device__ __forceinline__ void layer_output(
    const T* __restrict__ y, const float* __restrict__ part, T* __restrict__ out, float* __restrict__ gap, int C,
    int H, int W, int pool, float p, unsigned long long key, unsigned int first, int use_dropout, int use_gap,
    int CPB)
{
    const int b = blockIdx.x;
    const int Ho = pool ? H / 2 : H, Wo = pool ? W / 2 : W, hw = Ho * Wo, per = C * hw;
    const T* yb = y + (long)b * C * H * W;
    T* ob = out + (long)b * per;
    float ss = 0.0f;
    for (int s = 0; s < (int)gridDim.y; ++s) ss += part[(long)b * gridDim.y + s];
    const float denom = sqrtf(ss / (float)per) + RMS_EPS;
    const int c0 = blockIdx.y * CPB, c1 = min(C, c0 + CPB);
    auto value = [&](int i) {
        const float v = pooled_dropped(yb, i, b, per, H, W, Ho, Wo, pool, p, key, first, use_dropout) / denom;
        st(&ob[i], v);
        return v;
    };
    if (hw >= 32) {
        const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
        for (int c = c0 + (threadIdx.x >> 5); c < c1; c += warps) {
            float s = 0.0f;
            for (int i = lane; i < hw; i += 32) s += value(c * hw + i);
            s = warp_sum(s);
            if (use_gap && lane == 0) gap[(long)b * C + c] = s / (float)hw;
        }
    } else {
        for (int c = c0 + threadIdx.x; c < c1; c += blockDim.x) {
            float s = 0.0f;
            for (int i = 0; i < hw; ++i) s += value(c * hw + i);
            if (use_gap) gap[(long)b * C + c] = s / (float)hw;
        }
    }
}

extern "C" __global__ void __launch_bounds__(256) layer_output_sumsq_f32(
    const float* __restrict__ y /*[gridDim.x*C*H*W]*/, float* __restrict__ part /*[gridDim.x*gridDim.y]*/, int C,
    int H, int W, int pool, float p, const unsigned long long* __restrict__ key /*[1]?*/, unsigned int first,
    int use_dropout, int CPB)
{
    layer_output_sumsq(y, part, C, H, W, pool, p, use_dropout ? *key : 0ull, first, use_dropout, CPB);
}

extern "C" __global__ void __launch_bounds__(256) layer_output_sumsq_f16(
    const f16_bits* __restrict__ y /*[gridDim.x*C*H*W]*/, float* __restrict__ part /*[gridDim.x*gridDim.y]*/, int C,
    int H, int W, int pool, float p, const unsigned long long* __restrict__ key /*[1]?*/, unsigned int first,
    int use_dropout, int CPB)
{
    layer_output_sumsq(y, part, C, H, W, pool, p, use_dropout ? *key : 0ull, first, use_dropout, CPB);
}

extern "C" __global__ void __launch_bounds__(256) layer_output_f32(
    const float* __restrict__ y /*[gridDim.x*C*H*W]*/, const float* __restrict__ part /*[gridDim.x*gridDim.y]*/,
    float* __restrict__ out /*[gridDim.x*C*OUT_HW(H, W, pool)]*/, float* __restrict__ gap /*[gridDim.x*C]?*/, int C,
    int H, int W, int pool, float p, const unsigned long long* __restrict__ key /*[1]?*/, unsigned int first,
    int use_dropout, int use_gap, int CPB)
{
    layer_output(y, part, out, gap, C, H, W, pool, p, use_dropout ? *key : 0ull, first, use_dropout, use_gap, CPB);
}

extern "C" __global__ void __launch_bounds__(256) layer_output_f16(
    const f16_bits* __restrict__ y /*[gridDim.x*C*H*W]*/, const float* __restrict__ part /*[gridDim.x*gridDim.y]*/,
    f16_bits* __restrict__ out /*[gridDim.x*C*OUT_HW(H, W, pool)]*/, float* __restrict__ gap /*[gridDim.x*C]?*/,
    int C, int H, int W, int pool, float p, const unsigned long long* __restrict__ key /*[1]?*/, unsigned int first,
    int use_dropout, int use_gap, int CPB)
{
    layer_output(y, part, out, gap, C, H, W, pool, p, use_dropout ? *key : 0ull, first, use_dropout, use_gap, CPB);
}

// layer_output_nhwc_f16: layer_output_f16's store pass into channels-last out [B, Ho, Wo, C], the layout the next
// layer's fp16 conv reads as it is (no copy); for C and CPB multiples of 8 (geometry::layer_output_split_nhwc).
// Each value is computed as layer_output_f16 computes it (the same pooled_dropped, one rounding to fp16), with the
// divisor from the slice sums of this kernel's split (whole 8-channel groups, so the squares may be grouped
// otherwise than in the NCHW split: the same sum up to f32 rounding), and dropout stays keyed by the logical
// [B, C, Ho, Wo] index. A thread stores 8 channels of one pixel (one 16-byte store): the block's
// G = CPB / 8 channel groups are fixed per thread, and R = blockDim / G rows of threads walk the pixels. The pooled
// features: each thread sums its 8 channels over its pixels in order, then one thread per channel adds the rows'
// sums in row order (fixed, so deterministic; the order differs from the NCHW kernel's, in f32).
extern "C" __global__ void __launch_bounds__(256) layer_output_nhwc_f16(
    const f16_bits* __restrict__ y /*[gridDim.x*C*H*W]*/, const float* __restrict__ part /*[gridDim.x*gridDim.y]*/,
    f16_bits* __restrict__ out /*[gridDim.x*C*OUT_HW(H, W, pool)]*/, float* __restrict__ gap /*[gridDim.x*C]?*/,
    int C, int H, int W, int pool, float p, const unsigned long long* __restrict__ key /*[1]?*/, unsigned int first,
    int use_dropout, int use_gap, int CPB)
{
    __shared__ float rows[256 * 8];
    const int b = blockIdx.x;
    const int Ho = pool ? H / 2 : H, Wo = pool ? W / 2 : W, hw = Ho * Wo, per = C * hw;
    const f16_bits* yb = y + (long)b * C * H * W;
    const unsigned long long k = use_dropout ? *key : 0ull;
    float ss = 0.0f;
    for (int s = 0; s < (int)gridDim.y; ++s) ss += part[(long)b * gridDim.y + s];
    const float denom = sqrtf(ss / (float)per) + RMS_EPS;
    const int c0 = blockIdx.y * CPB, c1 = min(C, c0 + CPB), G = (c1 - c0) / 8, R = (int)blockDim.x / G;
    const int g = (int)threadIdx.x % G, r = (int)threadIdx.x / G, c = c0 + 8 * g;
    float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    if (r < R) {
        for (int px = r; px < hw; px += R) {
            f16_bits h[8];
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const float v =
                    pooled_dropped(yb, (c + j) * hw + px, b, per, H, W, Ho, Wo, pool, p, k, first, use_dropout) / denom;
                h[j] = f2h(v);
                acc[j] += v;
            }
            st16(out + ((long)b * hw + px) * C + c,
                 u32x4{pack2(h[0], h[1]), pack2(h[2], h[3]), pack2(h[4], h[5]), pack2(h[6], h[7])});
        }
#pragma unroll
        for (int j = 0; j < 8; ++j) rows[r * G * 8 + g * 8 + j] = acc[j];
    }
    if (!use_gap) return;
    __syncthreads();
    for (int i = threadIdx.x; i < G * 8; i += blockDim.x) {
        float s = 0.0f;
        for (int q = 0; q < R; ++q) s += rows[q * G * 8 + i];
        gap[(long)b * C + c0 + i] = s / (float)hw;
    }
}
