// layer_output_f32: from y [B, C, H, W]: optional 2x2 pool (avg or rms, floor like AvgPool2d(2)), optional
// dropout (keep when dropout_uniform(key, b*C*Ho*Wo + i) >= p, scale 1/(1-p): the CPU backend's mask, bit for
// bit), per-sample RMS norm x / (sqrt(mean x^2) + e^-50), and the global average pool into gap [B, C].
//
// Work split: one block of 256 threads per sample: a pass that pools, drops and sums squares (block
// reduction), a pass that divides, and, when gap is wanted, one thread per channel averaging its map.
// pool: 0 none, 1 avg, 2 rms.
extern "C" __global__ void __launch_bounds__(256) layer_output_f32(
    const float* __restrict__ y, float* __restrict__ out, float* __restrict__ gap,
    int C, int H, int W, int pool, float p, unsigned long long key, int use_dropout, int use_gap)
{
    __shared__ float scratch[32];
    const int b = blockIdx.x;
    const int Ho = pool ? H / 2 : H, Wo = pool ? W / 2 : W;
    const int per = C * Ho * Wo;
    const float* yb = y + (long)b * C * H * W;
    float* ob = out + (long)b * per;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < per; i += blockDim.x) {
        int c = i / (Ho * Wo), r = i % (Ho * Wo), oi = r / Wo, oj = r % Wo;
        float v;
        if (pool == 0) {
            v = yb[i];
        } else {
            const float* m = yb + (long)c * H * W;
            float q0 = m[(2 * oi) * W + 2 * oj], q1 = m[(2 * oi) * W + 2 * oj + 1];
            float q2 = m[(2 * oi + 1) * W + 2 * oj], q3 = m[(2 * oi + 1) * W + 2 * oj + 1];
            v = pool == 1 ? (q0 + q1 + q2 + q3) / 4.0f : sqrtf((q0 * q0 + q1 * q1 + q2 * q2 + q3 * q3) / 4.0f);
        }
        if (use_dropout) {
            bool keep = dropout_uniform(key, (unsigned int)(b * per + i)) >= p;
            v = keep ? v * (1.0f / (1.0f - p)) : 0.0f;
        }
        ob[i] = v;
        ss += v * v;
    }
    float denom = sqrtf(block_sum(ss, scratch) / (float)per) + 1.9287498479639178e-22f;
    for (int i = threadIdx.x; i < per; i += blockDim.x) ob[i] /= denom;
    if (use_gap) {
        __syncthreads();
        const int hw = Ho * Wo;
        for (int c = threadIdx.x; c < C; c += blockDim.x) {
            float s = 0.0f;
            for (int i = 0; i < hw; ++i) s += ob[c * hw + i];
            gap[(long)b * C + c] = s / (float)hw;
        }
    }
}
