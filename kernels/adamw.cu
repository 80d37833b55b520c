// adamw_f32: one AdamW step, PyTorch's single-tensor algorithm, one thread per element (grid-stride):
// p *= 1 - lr*wd; m += (1-b1)(g - m); v = b2 v + (1-b2) g^2; p -= step_size * m / (sqrt(v)/bc2_sqrt + eps),
// with step_size = lr / (1 - b1^t) and bc2_sqrt = sqrt(1 - b2^t) computed on the host in double precision.
// The step's scalars are read from the device, hp = {decay, w1, b2, w2, step_size, bc2_sqrt, eps}, which the host
// fills before the step: a captured step graph then reads each step's values at replay, not the ones frozen at
// capture.
// The f32 master p, m and v stay f32; when `copy` is not null, the new p is also stored there in fp16 (the
// weights the fp16 convolution reads), in the same pass.
extern "C" __global__ void adamw_f32(
    float* __restrict__ p /*[n]*/, const float* __restrict__ g /*[n]*/, float* __restrict__ m /*[n]*/,
    float* __restrict__ v /*[n]*/, f16_bits* __restrict__ copy /*[n]?*/, int n, const float* __restrict__ hp /*[7]*/)
{
    const float decay = hp[0], w1 = hp[1], b2 = hp[2], w2 = hp[3], step_size = hp[4], bc2_sqrt = hp[5], eps = hp[6];
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
