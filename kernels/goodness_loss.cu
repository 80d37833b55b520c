// goodness_loss_f32: a = g R + r, softmax cross-entropy, [loss, correct] added to stats, and
// dg = (softmax(a) - onehot(label)) R^T / M when with_grad: M is the batch the loss is a mean over, B in one process,
// the global batch when B is one rank's share of it.
//
// Work split: one block of 256 threads per sample. Each class's logit is a block reduction over the D goodness
// values (N reductions; N is 10 or 100 here); thread 0 does the softmax and the loss; then the block writes
// the D entries of dg. Shared memory: 2 * N floats (logits, dL/da), N <= MAX_CLASSES (the host checks). The
// loss and the count are added to `stats` with atomics.
extern "C" __global__ void __launch_bounds__(256) goodness_loss_f32(
    const float* __restrict__ g /*[B*D]*/, const float* __restrict__ pw /*[D*N]*/,
    const float* __restrict__ pb /*[N]*/, const unsigned int* __restrict__ labels /*[B]*/,
    float* __restrict__ logits /*[B*N]*/, float* __restrict__ dg /*[B*D]?*/, float* __restrict__ stats /*[2]*/,
    int B, int D, int N, int M, int with_grad)
{
    __shared__ float sh[2 * MAX_CLASSES];
    float* a = sh;
    float* da = sh + N;
    __shared__ float scratch[32];
    const int b = blockIdx.x;
    const float* gb = g + (long)b * D;
    for (int n = 0; n < N; ++n) {
        float part = 0.0f;
        for (int k = threadIdx.x; k < D; k += blockDim.x) part = fmaf(gb[k], pw[(long)k * N + n], part);
        float s = block_sum(part, scratch);
        if (threadIdx.x == 0) a[n] = s + pb[n];
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int n = 0; n < N; ++n) logits[(long)b * N + n] = a[n];
        softmax_ce_row(a, N, (int)labels[b], 1.0f / (float)M, da, stats);
    }
    __syncthreads();
    if (with_grad)
        for (int k = threadIdx.x; k < D; k += blockDim.x) {
            float s = 0.0f;
            for (int n = 0; n < N; ++n) s = fmaf(pw[(long)k * N + n], da[n], s);
            dg[(long)b * D + k] = s;
        }
}
