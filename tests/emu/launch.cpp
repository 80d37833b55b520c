// The kernels of kernels/*.cu, compiled for the host through cuda_emu.h, behind one C entry point per kernel:
// `emu_<kernel>(gx, gy, gz, <the kernel's arguments>)` runs the kernel over that grid with 256 threads a block.
// Built and loaded by tests/kernel_emulation.rs.
#include "cuda_emu.h"

#include "../../kernels/prelude.cuh"
#include "../../kernels/conv_goodness_fwd.cu"
#include "../../kernels/conv_goodness_wgrad.cu"
#include "../../kernels/goodness_loss.cu"
#include "../../kernels/layer_output.cu"
#include "../../kernels/fusion_heads.cu"
#include "../../kernels/adamw.cu"
#include "../../kernels/layout.cu"
#include "../../kernels/selftest.cu"
#include "pipeline_probe.cuh"

#include <csetjmp>

#define GRID unsigned gx, unsigned gy, unsigned gz
#define RUN(call) emu::launch(dim3{gx, gy, gz}, 256, [&] { call; }, next_smem())

// The dynamic shared memory of the next launch (set_dynamic_smem), reset by the launch.
static size_t dynamic_smem = 0;
static size_t next_smem() {
    size_t b = dynamic_smem;
    dynamic_smem = 0;
    return b;
}

// A launch whose emulator fault is returned as its message instead of aborting the process (the planted-hazard
// tests): the fault handler jumps back here from the faulting thread.
static sigjmp_buf probe_jump;
static bool probing = false;
static void probe_fault(const char* msg) {
    if (probing) siglongjmp(probe_jump, 1);
    emu::default_fault(msg);
}

extern "C" {
void set_dynamic_smem(unsigned bytes) { dynamic_smem = bytes; }

// pipeline_probe (tests/emu/pipeline_probe.cuh) in `mode` over one block; returns "" or the emulator's fault.
const char* probe_pipeline(const unsigned* src, unsigned* out, int steps, int mode) {
    emu::on_fault = probe_fault;
    probing = true;
    if (sigsetjmp(probe_jump, 1) == 0) {
        emu::launch(dim3{1, 1, 1}, 256, [&] { pipeline_probe(src, out, steps, mode); }, PROBE_STAGES * 256 * 16);
        probing = false;
        emu::on_fault = emu::default_fault;
        return "";
    }
    probing = false;
    emu::on_fault = emu::default_fault;
    return emu::fault_msg;
}

// The self-test is one warp (its launch bounds), not a block of 256.
void emu_tensor_core_selftest(GRID, const f16_bits* a, const f16_bits* bt, unsigned zero_mask, int plant, f16_bits* tiles, unsigned* frags, float* d) {
    emu::launch(dim3{gx, gy, gz}, 32, [&] { tensor_core_selftest(a, bt, zero_mask, plant, tiles, frags, d); }, next_smem());
}
void emu_adamw_f32(GRID, float* p, const float* g, float* m, float* v, f16_bits* copy, int n, const float* hp) {
    RUN(adamw_f32(p, g, m, v, copy, n, hp));
}
void emu_conv_goodness_fwd_f32(GRID, const float* x, const float* w, const float* bias, const int* taps, float* y, int B, int Cin, int Cout, int H, int W) {
    RUN(conv_goodness_fwd_f32(x, w, bias, taps, y, B, Cin, Cout, H, W));
}
void emu_conv_fwd_nhwc_f16(GRID, const f16_bits* x, const f16_bits* w, const float* bias, const int* taps, f16_bits* y, float* gpart, int B, int Cp, int Cout, int H, int W, int P, int NB) {
    RUN(conv_fwd_nhwc_f16(x, w, bias, taps, y, gpart, B, Cp, Cout, H, W, P, NB));
}
void emu_conv_fwd_nhwc_f16_l(GRID, const f16_bits* x, const f16_bits* w, const float* bias, const int* taps, f16_bits* y, float* gpart, int B, int Cp, int Cout, int H, int W, int P, int NB) {
    RUN(conv_fwd_nhwc_f16_l(x, w, bias, taps, y, gpart, B, Cp, Cout, H, W, P, NB));
}
void emu_conv_fwd_nhwc_f16_sk(GRID, const f16_bits* x, const f16_bits* w, const int* taps, float* part, int B, int Cp, int Cout, int H, int W) {
    RUN(conv_fwd_nhwc_f16_sk(x, w, taps, part, B, Cp, Cout, H, W));
}
void emu_conv_fwd_splitk_f16(GRID, const float* part, const float* bias, f16_bits* y, float* gpart, int B, int Cout, int H, int W, int Z, int P, int NB) {
    RUN(conv_fwd_splitk_f16(part, bias, y, gpart, B, Cout, H, W, Z, P, NB));
}
void emu_goodness_tiles_f32(GRID, const float* gpart, float* g, int B, int C, int H, int W, int P, int NB, int TN, int reduce_mean) {
    RUN(goodness_tiles_f32(gpart, g, B, C, H, W, P, NB, TN, reduce_mean));
}
void emu_nhwc_pad_f16(GRID, const f16_bits* x, f16_bits* xn, int B, int C, int H, int W, int Cp) {
    RUN(nhwc_pad_f16(x, xn, B, C, H, W, Cp));
}
void emu_krsc_pad_f16(GRID, const f16_bits* w, f16_bits* wn, int Cout, int C, int Cp) {
    RUN(krsc_pad_f16(w, wn, Cout, C, Cp));
}
void emu_patch_goodness_f32(GRID, const float* y, float* g, int B, int C, int H, int W, int P, int reduce_mean) {
    RUN(patch_goodness_f32(y, g, B, C, H, W, P, reduce_mean));
}
void emu_conv_goodness_wgrad_f32(GRID, const float* x, const float* y, const float* q, const int* taps, const int* cells, float* part, float* part_db, int B, int Cin, int Cout, int H, int W, int P, int chunk) {
    RUN(conv_goodness_wgrad_f32(x, y, q, taps, cells, part, part_db, B, Cin, Cout, H, W, P, chunk));
}
void emu_dz_f16(GRID, const f16_bits* y, const float* q, const int* cells, f16_bits* dz, float* part_db, int B, int Cout, int H, int W, int P, float scale) {
    RUN(dz_f16(y, q, cells, dz, part_db, B, Cout, H, W, P, scale));
}
void emu_conv_wgrad_nhwc_f16(GRID, const f16_bits* dz, const f16_bits* x, const int* taps, const unsigned short* pmask, float* part, int B, int Cp, int Cout, int H, int W, int chunk, float inv_scale) {
    RUN(conv_wgrad_nhwc_f16(dz, x, taps, pmask, part, B, Cp, Cout, H, W, chunk, inv_scale));
}
void emu_conv_wgrad_nhwc_f16_l(GRID, const f16_bits* dz, const f16_bits* x, const int* taps, const unsigned short* pmask, float* part, int B, int Cp, int Cout, int H, int W, int chunk, float inv_scale) {
    RUN(conv_wgrad_nhwc_f16_l(dz, x, taps, pmask, part, B, Cp, Cout, H, W, chunk, inv_scale));
}
void emu_wgrad_reduce_nhwc_f32(GRID, const float* part, const float* part_db, float* dw, float* db, int M, int C, int Cp, int Z, int Zd) {
    RUN(wgrad_reduce_nhwc_f32(part, part_db, dw, db, M, C, Cp, Z, Zd));
}
void emu_dg_per_cell_f32(GRID, const float* dg, const float* div, float* q, int n, int PP) {
    RUN(dg_per_cell_f32(dg, div, q, n, PP));
}
void emu_wgrad_reduce_f32(GRID, const float* part, const float* part_db, float* dw, float* db, int MK, int M, int Z) {
    RUN(wgrad_reduce_f32(part, part_db, dw, db, MK, M, Z));
}
void emu_heads_logits_f32(GRID, const float* f, const float* w, const float* bias, float* s, int B, int N, int C) {
    RUN(heads_logits_f32(f, w, bias, s, B, N, C));
}
void emu_heads_softmax_f32(GRID, const float* s, const unsigned int* labels, float* ds, float* stats, int B, int N) {
    RUN(heads_softmax_f32(s, labels, ds, stats, B, N));
}
void emu_heads_grad_f32(GRID, const float* f, const float* ds, float* dw, float* db, int B, int N, int C) {
    RUN(heads_grad_f32(f, ds, dw, db, B, N, C));
}
void emu_goodness_loss_f32(GRID, const float* g, const float* pw, const float* pb, const unsigned int* labels, float* logits, float* dg, float* stats, int B, int D, int N, int with_grad) {
    RUN(goodness_loss_f32(g, pw, pb, labels, logits, dg, stats, B, D, N, with_grad));
}
void emu_layer_output_sumsq_f32(GRID, const float* y, float* part, int C, int H, int W, int pool, float p, const unsigned long long* key, int use_dropout, int CPB) {
    RUN(layer_output_sumsq_f32(y, part, C, H, W, pool, p, key, use_dropout, CPB));
}
void emu_layer_output_sumsq_f16(GRID, const f16_bits* y, float* part, int C, int H, int W, int pool, float p, const unsigned long long* key, int use_dropout, int CPB) {
    RUN(layer_output_sumsq_f16(y, part, C, H, W, pool, p, key, use_dropout, CPB));
}
void emu_layer_output_f32(GRID, const float* y, const float* part, float* out, float* gap, int C, int H, int W, int pool, float p, const unsigned long long* key, int use_dropout, int use_gap, int CPB) {
    RUN(layer_output_f32(y, part, out, gap, C, H, W, pool, p, key, use_dropout, use_gap, CPB));
}
void emu_layer_output_f16(GRID, const f16_bits* y, const float* part, f16_bits* out, float* gap, int C, int H, int W, int pool, float p, const unsigned long long* key, int use_dropout, int use_gap, int CPB) {
    RUN(layer_output_f16(y, part, out, gap, C, H, W, pool, p, key, use_dropout, use_gap, CPB));
}
void emu_layer_output_nhwc_f16(GRID, const f16_bits* y, const float* part, f16_bits* out, float* gap, int C, int H, int W, int pool, float p, const unsigned long long* key, int use_dropout, int use_gap, int CPB) {
    RUN(layer_output_nhwc_f16(y, part, out, gap, C, H, W, pool, p, key, use_dropout, use_gap, CPB));
}
}
