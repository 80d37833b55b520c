// The fusion heads: logits s = sum_k f_k W_k^T + b_k, softmax CE, and each head's gradient.
//
// heads_logits_f32: one thread per (sample, class); adds one head's f W^T + b into s (s zeroed first; heads run
//   one after another on the stream, so no two threads write one element at a time).
// heads_softmax_f32: one thread per sample: CE into stats, ds = (softmax(s) - onehot) / M (M: the batch the loss
//   is a mean over; B in one process, the global batch when B is one rank's share).
// heads_grad_f32: one thread per (class, feature) of one head: dW[n, j] = sum_b ds[b, n] f[b, j]; the threads of
//   feature 0 also write db[n] = sum_b ds[b, n]. Deterministic: every element is one thread's ordered sum.
extern "C" __global__ void heads_logits_f32(
    const float* __restrict__ f /*[B*C]*/, const float* __restrict__ w /*[N*C]*/,
    const float* __restrict__ bias /*[N]*/, float* __restrict__ s /*[B*N]*/, int B, int N, int C)
{
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= B * N) return;
    int b = t / N, n = t % N;
    float acc = bias[n];
    for (int j = 0; j < C; ++j) acc = fmaf(f[(long)b * C + j], w[(long)n * C + j], acc);
    s[t] += acc;
}

extern "C" __global__ void heads_softmax_f32(
    const float* __restrict__ s /*[B*N]*/, const unsigned int* __restrict__ labels /*[B]*/,
    float* __restrict__ ds /*[B*N]*/, float* __restrict__ stats /*[2]*/, int B, int N, int M)
{
    int b = blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= B) return;
    softmax_ce_row(s + (long)b * N, N, (int)labels[b], 1.0f / (float)M, ds + (long)b * N, stats);
}

extern "C" __global__ void heads_grad_f32(
    const float* __restrict__ f /*[B*C]*/, const float* __restrict__ ds /*[B*N]*/,
    float* __restrict__ dw /*[N*C]*/, float* __restrict__ db /*[N]*/, int B, int N, int C)
{
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= N * C) return;
    int n = t / C, j = t % C;
    float acc = 0.0f, bacc = 0.0f;
    for (int b = 0; b < B; ++b) {
        float d = ds[(long)b * N + n];
        acc = fmaf(d, f[(long)b * C + j], acc);
        bacc += d;
    }
    dw[t] = acc;
    if (j == 0) db[n] = bacc;
}
