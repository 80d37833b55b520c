// Shared device helpers, prepended to every kernel source before NVRTC compiles it (NVRTC has no include
// path, so kernels include no CUDA headers). fp16 is carried as raw bits, converted with PTX.
//
// The few helpers written in PTX are skipped under ASGE_HOST_EMU, where tests/emu/cuda_emu.h supplies host
// versions to run these sources on the CPU (tests/kernel_emulation.rs).
typedef unsigned short f16_bits;

#ifndef ASGE_HOST_EMU
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
#endif

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

// The implicit im2col: col[k, n] = x[b, ci, oh + kh - 1, ow + kw - 1] (zero outside the map), with
// k = ci*9 + kh*3 + kw and n = b*H*W + oh*W + ow; no im2col buffer exists. The GEMM kernels gather it through a
// tap table (built on the host: src/backend/cuda/mod.rs, geometry::tap_table): entry k of a layer with C_in maps of H x W is t = (ci*H*W + kh*W + kw) << 9 | 1 << r with k = ci*9 + r,
// r = kh*3 + kw (t = 0 past K: no tap). A pixel (oh, ow) of sample b carries the index xo = b*C_in*H*W +
// (oh-1)*W + (ow-1) of its 3x3 window's origin in x (32 bits: the host keeps x under 2^31 values) and a mask of
// the window's taps inside the map (bit r), so a tap costs a test, a shift-add, a 32-bit index and the load, not
// divisions by 9 and 3 and four bound checks.
__device__ __forceinline__ int tap_mask(int oh, int ow, int H, int W) {
    int mask = 0;
#pragma unroll
    for (int r = 0; r < 9; ++r) {
        const int ih = oh + r / 3 - 1, iw = ow + r % 3 - 1;
        if (ih >= 0 && ih < H && iw >= 0 && iw < W) mask |= 1 << r;
    }
    return mask;
}

template <typename T>
__device__ __forceinline__ T tap_fetch(const T* __restrict__ x, int xo, int mask, unsigned t) {
    return (t & (unsigned)mask) ? x[xo + (int)(t >> 9)] : (T)0;
}

// 16-byte vectors of fp16 pairs (lower index in the low half), for 128-bit global and shared accesses. The
// address must be aligned to 16 bytes (the host emulation checks).
struct __align__(16) u32x4 { unsigned x, y, z, w; };

__device__ __forceinline__ unsigned pack2(f16_bits lo, f16_bits hi) { return (unsigned)lo | ((unsigned)hi << 16); }

#ifndef ASGE_HOST_EMU
__device__ __forceinline__ u32x4 ld16(const void* p) { return *(const u32x4*)p; }
__device__ __forceinline__ void st16(void* p, u32x4 v) { *(u32x4*)p = v; }
#else
__device__ __forceinline__ u32x4 ld16(const void* p) {
    check_align(p, 16, "16-byte load");
    emu::smem_read(p, 16);
    return *(const u32x4*)p;
}
__device__ __forceinline__ void st16(void* p, u32x4 v) {
    check_align(p, 16, "16-byte store");
    if (emu::in_dyn(p)) {
        emu::Granule& g = emu::smem_write(p, "16-byte store");
        g.state = emu::Granule::WRITTEN;
        g.writer = emu::cur;
        g.written_in = emu::interval;
    }
    *(u32x4*)p = v;
}
#endif

#ifndef ASGE_HOST_EMU

// Dynamic shared memory (its size is the launch's; above 48 KB the kernel needs the opt-in attribute) and the
// asynchronous global-to-shared copies of sm_80+ (PTX ISA, "cp.async"): cp_async16 copies 16 bytes, or writes 16
// zero bytes when `full` is false (src-size 0: nothing is read), into the issuing thread's current group;
// cp_async_commit closes the group; cp_async_wait<N> waits until at most N of the thread's groups are in flight.
// A copy is visible to other threads only after its wait and a __syncthreads(). The emulation (cuda_emu.h)
// checks these rules. Shared addresses are the 32-bit offsets that the shared-memory instructions take
// (smem_u32): a kernel converts its base once and moves it by constants.
extern __shared__ __align__(16) unsigned char asge_dyn_smem[];
__device__ __forceinline__ unsigned char* dyn_smem() { return asge_dyn_smem; }

__device__ __forceinline__ unsigned smem_u32(const void* p) {
    unsigned a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, bool full) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(full ? 16 : 0) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

// ldmatrix.x4: the four 8x8 fp16 matrices whose rows lanes 0-7, 8-15, 16-23, 24-31 address; r[q] is the calling
// lane's pair (row lane / 4, columns 2 (lane % 4), +1) of matrix q: exactly an mma.m16n8k16 fragment register.
__device__ __forceinline__ void ldsm_x4(unsigned r[4], unsigned a) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

// ldmatrix.x4.trans: as ldmatrix.x4, each matrix transposed: r[q] is the pair (rows 2 (lane % 4), +1; column
// lane / 4) of matrix q, the fragment of an operand stored with its reduction index across the rows.
__device__ __forceinline__ void ldsm_x4_t(unsigned r[4], unsigned a) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
#endif

// The weight gradients' goodness term through a cell table (host-built: geometry::cell_table): cells[p]
// packs the bins holding pixel p, r0 | r1 << 8 | c0 << 16 | c1 << 24, and q[i*P + j] is the map's dL/dg of cell
// (i, j) already divided by the cell's divisor (dg_per_cell_f32: its area for the mean, 1 for the sum, the CPU
// reference's division). For a pixel in one cell, dz = q * 2y is the CPU's to the bit; for a pixel in several
// (P does not divide H or W) the kernels sum the q's and then multiply, where the CPU adds each cell's q * 2y:
// equal within rounding. That case takes the out-of-line loop, so the common case is a lookup and a load.
__device__ __noinline__ float cells_q_overlap(const float* __restrict__ q, int cell, int P) {
    const int r0 = cell & 255, r1 = (cell >> 8) & 255, c0 = (cell >> 16) & 255, c1 = (cell >> 24) & 255;
    float s = 0.0f;
    for (int bi = r0; bi <= r1; ++bi)
        for (int bj = c0; bj <= c1; ++bj) s += q[bi * P + bj];
    return s;
}

__device__ __forceinline__ float cells_q(const float* __restrict__ q, int cell, int P) {
    float v = q[(cell & 255) * P + ((cell >> 16) & 255)];  // the first cell: the only one where P divides H, W
    if ((cell & 0x00ff00ff) != ((cell >> 8) & 0x00ff00ff)) v = cells_q_overlap(q, cell, P);
    return v;
}

// dL/dz of one pixel from its fp16-widened y and its cells' q: 0 where ReLU cut (a select, not a branch: q is
// read either way).
__device__ __forceinline__ float dz_of(float yv, const float* __restrict__ q, int cell, int P) {
    const float s = cells_q(q, cell, P);
    return yv > 0.0f ? s * (2.0f * yv) : 0.0f;
}

// Loads and stores that widen from / narrow to the storage type (round to nearest even), so that one template
// body serves the f32 and the f16 kernels.
__device__ __forceinline__ float ld(const float* p) { return *p; }
__device__ __forceinline__ float ld(const f16_bits* p) { return h2f(*p); }
__device__ __forceinline__ void st(float* p, float v) { *p = v; }
__device__ __forceinline__ void st(f16_bits* p, float v) { *p = f2h(v); }


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

// ---- Tensor cores (sm_80+): mma.sync.m16n8k16, fp16 inputs, fp32 accumulators. ----
//
// Fragment layout (PTX ISA, "Matrix Fragments for mma.m16n8k16"), with g = lane / 4 and t = lane % 4:
//   A 16x16 (row-major): reg 0 = A[g][2t..2t+1], reg 1 = A[g+8][2t..2t+1], reg 2 = A[g][2t+8..2t+9],
//                        reg 3 = A[g+8][2t+8..2t+9] (the lower index in the low half);
//   B 16x8 (k x n):      reg 0 = B[2t..2t+1][g], reg 1 = B[2t+8..2t+9][g];
//   C 16x8 (fp32):       c0, c1 = C[g][2t], C[g][2t+1]; c2, c3 = C[g+8][2t], C[g+8][2t+1].
#ifndef ASGE_HOST_EMU
__device__ __forceinline__ void mma_16816(float c[4], const unsigned a[4], const unsigned b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif

// The fp16 forward's padded weights (kernels/layout.cu): [NHWC_MP(C_out)][NHWC_KP(Cp)], rows and K rounded up
// to the largest block tile (PAD_ROWS channels) and K step (PAD_K), zero-filled, so that the pipelined kernels
// load whole tiles without bound checks; its chunk table has NHWC_TAPS(Cp) entries (0 past 9 Cp: no tap). The
// PAD_* constants come from src/kernel_abi.rs, as does everything the host sizes these buffers by.
#define ROUND_UP(n, to) (((n) + (to) - 1) / (to) * (to))
#define NHWC_MP(Cout) ROUND_UP(Cout, PAD_ROWS)
#define NHWC_KP(Cp) ROUND_UP(9 * (Cp), PAD_K)
// The chunk table's length: K rounded up to PAD_TAPS (the weight gradient's widest column tile), in 8-wide chunks.
#define NHWC_TAPS(Cp) (ROUND_UP(9 * (Cp), PAD_TAPS) / 8)
// The weight gradient's dz rows, [NHWC_MP(C_out)][WG_NP(N)]: N pixels rounded up to the largest pixel step.
#define WG_NP(N) ROUND_UP(N, PAD_PIXELS)
// Only in the extents of the signatures' pointers (build.rs; the stand-in checks them): the f32 kernels' tap
// table, K = 9 C_in rounded up to PAD_TAPS and at least PAD_TAPS; a layer output's pixels, pooled or not.
#define TAPS(Cin) (ROUND_UP(9 * (Cin), PAD_TAPS) > PAD_TAPS ? ROUND_UP(9 * (Cin), PAD_TAPS) : PAD_TAPS)
#define OUT_HW(H, W, pool) ((pool) ? ((H) / 2) * ((W) / 2) : (H) * (W))

// The block tile of the fp16 GEMM kernels: OUT[TM x TN] += A[TM x TK] * B[TK x TN] per K step, with TM = 32 MI
// rows and TN = 32 NI columns, both operands in a stage of dynamic shared memory. A is stored [m][k] and, in the
// forward, B [n][k] (the reduction index contiguous), rows padded to TK + 8 halves so that the eight 16-byte rows
// each ldmatrix phase reads hit 32 distinct banks; the weight gradient stores B [k][n] (rows of TN + 8 halves) and
// reads it by ldmatrix.trans. Fragments come in by ldmatrix.x4: MI for A and NI / 2 for B per 16-deep slice, for
// MI NI MMAs a warp.
// 256 threads = 8 warps as 2 (rows) x 4 (columns); each warp owns 16 MI x 8 NI of the tile: MI x NI mma tiles,
// acc[mi][ni][r] holding row warp_m*16 MI + mi*16 + g + 8*(r/2), column warp_n*8 NI + ni*8 + 2t + (r%2)
// (tc_for_each). Larger warp tiles share each fragment among more MMAs: fewer shared loads per MMA.
template <int MI, int NI>
__device__ __forceinline__ void tc_zero(float acc[MI][NI][4]) {
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[mi][ni][r] = 0.0f;
}

// One K step over a stage by address: `a` and `b` are the calling lane's ldmatrix row addresses of the stage's A
// and B tiles for mi = ni = 0 and kk = 0 (tc_lane_rows, tc_lane_rows_t); every other fragment is a constant offset
// from them, so the loop issues the ldmatrix instructions with immediate offsets and no address arithmetic.
// A: matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15) = a[0..3]; B stored
// [n][k]: (n tile ni, k 0-7), (ni, k 8-15), (ni + 1, k 0-7), (ni + 1, k 8-15); with B_T, B stored [k][n], the same
// four matrices transposed.
template <int MI, int NI, int TK, bool B_T = false>
__device__ __forceinline__ void tc_step(float acc[MI][NI][4], unsigned a, unsigned b) {
    constexpr unsigned ROW = (TK + 8) * 2, ROW_T = (32 * NI + 8) * 2;
#pragma unroll
    for (int kk = 0; kk < TK; kk += 16) {
        unsigned af[MI][4], bf[NI][2];
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) ldsm_x4(af[mi], a + mi * 16 * ROW + kk * 2);
#pragma unroll
        for (int ni = 0; ni < NI; ni += 2) {
            unsigned r[4];
            if constexpr (B_T) ldsm_x4_t(r, b + kk * ROW_T + ni * 16);
            else ldsm_x4(r, b + ni * 8 * ROW + kk * 2);
            bf[ni][0] = r[0];
            bf[ni][1] = r[1];
            bf[ni + 1][0] = r[2];
            bf[ni + 1][1] = r[3];
        }
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
            for (int ni = 0; ni < NI; ++ni) mma_16816(acc[mi][ni], af[mi], bf[ni]);
    }
}

// The calling lane's ldmatrix row offsets (in halves) within a stage's A tile and [n][k] B tile.
template <int MI, int NI, int TK>
__device__ __forceinline__ void tc_lane_rows(int& a, int& b) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    a = ((warp >> 2) * 16 * MI + (lane & 15)) * (TK + 8) + (lane >> 4) * 8;
    b = ((warp & 3) * 8 * NI + (lane >> 4) * 8 + (lane & 7)) * (TK + 8) + ((lane >> 3) & 1) * 8;
}

// The calling lane's ldmatrix.trans row offset (in halves) within a stage's [k][n] B tile (rows of 32 NI + 8):
// lanes 0-15 address rows k 0-15 of column tile ni, lanes 16-31 those of ni + 1.
template <int NI>
__device__ __forceinline__ int tc_lane_rows_t() {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    return (lane & 15) * (32 * NI + 8) + (warp & 3) * 8 * NI + (lane >> 4) * 8;
}

// The block-tile column of the calling thread's column slot j (0 <= j < 2 NI): its accumulators cover 2 NI
// columns, each in MI x 2 rows.
template <int NI>
__device__ __forceinline__ int tc_col(int j) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    return (warp & 3) * 8 * NI + 2 * (lane & 3) + (j >> 1) * 8 + (j & 1);
}

// Calls f(row, col, j, value) for each of the calling thread's 4 MI NI accumulators, with the row and column in
// the block tile and the column's slot j (tc_col), so that an epilogue can locate its 2 NI columns once (the
// epilogue of the tensor-core kernels).
template <int MI, int NI, typename F>
__device__ __forceinline__ void tc_for_each(const float acc[MI][NI][4], F f) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int row0 = (warp >> 2) * 16 * MI + (lane >> 2);
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int j = ni * 2 + (r & 1);
                f(row0 + mi * 16 + 8 * (r >> 1), tc_col<NI>(j), j, acc[mi][ni][r]);
            }
}
