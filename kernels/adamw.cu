// adamw_f32: one AdamW step, PyTorch's single-tensor algorithm, one thread per element (grid-stride):
// p *= 1 - lr*wd; m += (1-b1)(g - m); v = b2 v + (1-b2) g^2; p -= step_size * m / (sqrt(v)/bc2_sqrt + eps),
// with step_size = lr / (1 - b1^t) and bc2_sqrt = sqrt(1 - b2^t) computed on the host in double precision.
// The step's scalars (AdamWScalars, src/kernel_abi.rs) are read from the device, which the host fills before the
// step: a captured step graph then reads each step's values at replay, not the ones frozen at capture.
// The f32 master p, m and v stay f32; when `copy` is not null, the new p is also stored there in fp16 (the
// weights the fp16 convolution reads), in the same pass.
extern "C" __global__ void adamw_f32(
    float* __restrict__ p /*[n]*/, const float* __restrict__ g /*[n]*/, float* __restrict__ m /*[n]*/,
    float* __restrict__ v /*[n]*/, f16_bits* __restrict__ copy /*[n]?*/, int n,
    const AdamWScalars* __restrict__ hp /*[1]*/)
{
    const float decay = hp->decay, w1 = hp->w1, b2 = hp->b2, w2 = hp->w2, step_size = hp->step_size,
                bc2_sqrt = hp->bc2_sqrt, eps = hp->eps;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        float gi = g[i];
        float pi = p[i] * decay;
        float mi = m[i] + w1 * (gi - m[i]);
        float vi = v[i] * b2 + w2 * gi * gi;
        float denom = sqrtf(vi) / bc2_sqrt + eps;
        pi = pi + (-step_size) * (mi / denom);
        p[i] = pi;
        m[i] = mi;
        v[i] = vi;
        if (copy) copy[i] = f2h(pi);
    }
}
