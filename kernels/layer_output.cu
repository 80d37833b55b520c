// layer_output_{f32,f16}: from y [B, C, H, W]: optional 2x2 pool (avg or rms, floor like AvgPool2d(2)), optional
// dropout (keep when dropout_uniform(key, b*C*Ho*Wo + i) >= p, scale 1/(1-p): the CPU backend's mask, bit for
// bit), per-sample RMS norm x / (sqrt(mean x^2) + e^-50), and the global average pool into gap [B, C].
// The f16 kernel reads y and stores the output in fp16; every sum, and the pooled features, stay f32.
//
// Work split: one block of 256 threads per sample: a pass that pools, drops and sums squares (block
// reduction), a pass that recomputes each value, divides and stores it (recomputing rather than re-reading the
// output keeps the fp16 store to one rounding), and, when gap is wanted, one thread per channel averaging its
// normalised map in f32. pool: 0 none, 1 avg, 2 rms. The dropout key is read from the device (the step's
// parameters: src/backend/cuda/graph.rs), so that a captured step uses each step's key.
template <typename T>
__device__ __forceinline__ float pooled_dropped(
    const T* __restrict__ yb, int i, int b, int per, int H, int W, int Ho, int Wo, int pool, float p,
    unsigned long long key, int use_dropout)
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
        bool keep = dropout_uniform(key, (unsigned int)(b * per + i)) >= p;
        v = keep ? v * (1.0f / (1.0f - p)) : 0.0f;
    }
    return v;
}

template <typename T>
__device__ __forceinline__ void layer_output(
    const T* __restrict__ y, T* __restrict__ out, float* __restrict__ gap,
    int C, int H, int W, int pool, float p, unsigned long long key, int use_dropout, int use_gap)
{
    __shared__ float scratch[32];
    const int b = blockIdx.x;
    const int Ho = pool ? H / 2 : H, Wo = pool ? W / 2 : W;
    const int per = C * Ho * Wo;
    const T* yb = y + (long)b * C * H * W;
    T* ob = out + (long)b * per;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < per; i += blockDim.x) {
        float v = pooled_dropped(yb, i, b, per, H, W, Ho, Wo, pool, p, key, use_dropout);
        ss += v * v;
    }
    float denom = sqrtf(block_sum(ss, scratch) / (float)per) + 1.9287498479639178e-22f;
    for (int i = threadIdx.x; i < per; i += blockDim.x)
        st(&ob[i], pooled_dropped(yb, i, b, per, H, W, Ho, Wo, pool, p, key, use_dropout) / denom);
    if (use_gap) {
        const int hw = Ho * Wo;
        for (int c = threadIdx.x; c < C; c += blockDim.x) {
            float s = 0.0f;
            for (int i = 0; i < hw; ++i)
                s += pooled_dropped(yb, c * hw + i, b, per, H, W, Ho, Wo, pool, p, key, use_dropout) / denom;
            gap[(long)b * C + c] = s / (float)hw;
        }
    }
}

extern "C" __global__ void __launch_bounds__(256) layer_output_f32(
    const float* __restrict__ y /*[gridDim.x*C*H*W]*/, float* __restrict__ out /*[gridDim.x*C*OUT_HW(H, W, pool)]*/,
    float* __restrict__ gap /*[gridDim.x*C]?*/, int C, int H, int W, int pool, float p,
    const unsigned long long* __restrict__ key /*[1]?*/, int use_dropout, int use_gap)
{
    layer_output(y, out, gap, C, H, W, pool, p, use_dropout ? *key : 0ull, use_dropout, use_gap);
}

extern "C" __global__ void __launch_bounds__(256) layer_output_f16(
    const f16_bits* __restrict__ y /*[gridDim.x*C*H*W]*/,
    f16_bits* __restrict__ out /*[gridDim.x*C*OUT_HW(H, W, pool)]*/, float* __restrict__ gap /*[gridDim.x*C]?*/,
    int C, int H, int W, int pool, float p, const unsigned long long* __restrict__ key /*[1]?*/, int use_dropout,
    int use_gap)
{
    layer_output(y, out, gap, C, H, W, pool, p, use_dropout ? *key : 0ull, use_dropout, use_gap);
}
