// The channels-last operands of the fp16 forward (kernels/conv_goodness_fwd.cu, conv_fwd_nhwc_f16): a layer's
// input x [B, C, H, W] as xn [B, H, W, Cp] and its weights [C_out, C, 3, 3] as [C_out, 3, 3, Cp] (padded further to
// whole tiles: prelude, NHWC_MP and NHWC_KP), with Cp = C rounded up to a multiple of 8 and the channels past C zero, so that every 16-byte chunk of K holds 8 channels of
// one tap. Both run once per layer and step (the weights change every step).
//
// nhwc_pad_f16: one thread per 8 channels of one pixel, the pixel fastest, so that a warp's loads of one channel
// are consecutive; its 8 values go out as one 16-byte store.
extern "C" __global__ void nhwc_pad_f16(
    const f16_bits* __restrict__ x /*[B*C*H*W]*/, f16_bits* __restrict__ xn /*[B*H*W*Cp]*/, int B, int C, int H, int W,
    int Cp)
{
    const int HW = H * W, C8 = Cp / 8;
    const long t = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long)B * HW * C8) return;
    const int p = (int)(t % HW), c8 = (int)(t / HW % C8), b = (int)(t / ((long)HW * C8));
    f16_bits h[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        const int c = c8 * 8 + j;
        h[j] = c < C ? x[((long)b * C + c) * HW + p] : (f16_bits)0;
    }
    st16(xn + ((long)b * HW + p) * Cp + c8 * 8,
         u32x4{pack2(h[0], h[1]), pack2(h[2], h[3]), pack2(h[4], h[5]), pack2(h[6], h[7])});
}

// krsc_pad_f16: one thread per value of the padded weights [NHWC_MP(C_out)][NHWC_KP(Cp)] (prelude): k = r*Cp + ci
// below 9 Cp, zero in the padding rows, channels and columns.
extern "C" __global__ void krsc_pad_f16(
    const f16_bits* __restrict__ w /*[Cout*C*9]*/, f16_bits* __restrict__ wn /*[NHWC_MP(Cout)*NHWC_KP(Cp)]*/, int Cout,
    int C, int Cp)
{
    const int Kp = NHWC_KP(Cp);
    const long t = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long)NHWC_MP(Cout) * Kp) return;
    const int k = (int)(t % Kp), m = (int)(t / Kp), r = k / Cp, ci = k % Cp;
    wn[t] = (m < Cout && r < 9 && ci < C) ? w[((long)m * C + ci) * 9 + r] : (f16_bits)0;
}
