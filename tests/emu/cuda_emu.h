// A CUDA execution model on the host, for running the real kernel sources in tests without a GPU.
//
// Each block runs as blockDim.x fibers on one OS thread (a register-only context switch on x86-64, ucontext
// elsewhere), scheduled round-robin: __syncthreads()
// parks a fiber until every live fiber of the block has arrived, the warp collectives (__shfl_xor_sync and the
// tensor-core mma) park it until its 32 lanes have. `__shared__` variables become function statics, which is
// right because blocks run one after another. fp16 is GCC's _Float16 (IEEE binary16, round to nearest even, as
// cvt.rn.f16.f32). mma.sync.m16n8k16 is computed from the fragment layout the PTX ISA documents (the same
// table kernels/prelude.cuh states) and ldmatrix.x4 from the ISA's description of which lane addresses which
// row; 16- and 8-byte vector accesses and ldmatrix rows must be aligned as on the GPU, or the emulation aborts.
// The emulation checks everything around them (tile loads, bounds, im2col, epilogues, scaling, reductions) and
// the layouts as documented, not the hardware's reading of them.
#pragma once
#define ASGE_HOST_EMU 1

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>
#include <ucontext.h>

#define __global__
#define __device__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct uint3_ { unsigned x, y, z; };
struct dim3 { unsigned x = 1, y = 1, z = 1; };
static uint3_ threadIdx, blockIdx, blockDim, gridDim;

static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline float atomicAdd(float* p, float v) { float o = *p; *p = o + v; return o; }

namespace emu {
// Where a fault goes (a misaligned vector access, a deadlock): by default the process aborts with the message;
// the driver stand-in (tests/emu/standin.cpp) turns it into the launch's error instead.
static void default_fault(const char* msg) {
    std::fputs(msg, stderr);
    std::abort();
}
static void (*on_fault)(const char*) = default_fault;
static char fault_msg[512];

enum State { RUNNABLE, BLOCK_WAIT, WARP_WAIT, DONE };
constexpr size_t STACK = 256 * 1024;

#if defined(__x86_64__)
// A context switch without a signal-mask syscall (swapcontext makes one per switch): save the callee-saved
// registers on the current stack, store its pointer, load the other stack's, restore and return into it.
extern "C" void asge_emu_swap(void** save_sp, void* load_sp);
__asm__(R"(
    .text
    .globl asge_emu_swap
    .hidden asge_emu_swap
    .type asge_emu_swap, @function
asge_emu_swap:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size asge_emu_swap, .-asge_emu_swap
)");
struct Fiber { void* sp = nullptr; std::vector<char> stack; State state = DONE; };
static void* sched_sp = nullptr;
#else
struct Fiber { ucontext_t ctx; std::vector<char> stack; State state = DONE; };
static ucontext_t sched;
#endif
static std::vector<Fiber> fibers;
static int cur = -1;
static std::function<void()>* body = nullptr;
// Warp exchange areas (per warp): one float per lane for shuffles; whole fragments for mma.
static float shfl_buf[32][32];
static unsigned mma_a[32][32][4], mma_b[32][32][2];
static float mma_c[32][32][4];
// Work counters, for the emulator's rate: tensor-core MMAs (once per warp each) and blocks run.
static unsigned long long mma_count = 0, block_count = 0;

inline void park(State s) {
    fibers[cur].state = s;
#if defined(__x86_64__)
    asge_emu_swap(&fibers[cur].sp, sched_sp);
#else
    swapcontext(&fibers[cur].ctx, &sched);
#endif
}
inline void warp_sync() { park(WARP_WAIT); }

#if defined(__x86_64__)
[[noreturn]] static void fiber_main() {
    (*body)();
    fibers[cur].state = DONE;
    asge_emu_swap(&fibers[cur].sp, sched_sp);
    __builtin_unreachable();
}
#else
static void entry() {
    (*body)();
    fibers[cur].state = DONE;
}  // returns to sched through uc_link
#endif

inline void fault(const char* what) {
    std::snprintf(fault_msg, sizeof fault_msg, "%s (thread %u of block %u,%u,%u)", what, threadIdx.x, blockIdx.x,
                  blockIdx.y, blockIdx.z);
    on_fault(fault_msg);
}

// Runs one block of `threads` fibers to completion.
inline void run_block(int threads) {
    if ((int)fibers.size() < threads) fibers.resize(threads);
    for (int i = 0; i < threads; ++i) {
        Fiber& f = fibers[i];
        if (f.stack.empty()) f.stack.resize(STACK);
#if defined(__x86_64__)
        // A fresh stack whose first switch returns into fiber_main with the ABI's alignment (rsp = 8 mod 16 at
        // entry): [top - 8] a null return address, [top - 16] fiber_main, then six saved registers.
        auto top = (reinterpret_cast<std::uintptr_t>(f.stack.data()) + STACK) & ~std::uintptr_t(15);
        void** sp = reinterpret_cast<void**>(top);
        *--sp = nullptr;
        *--sp = reinterpret_cast<void*>(&fiber_main);
        for (int r = 0; r < 6; ++r) *--sp = nullptr;
        f.sp = sp;
#else
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack.data();
        f.ctx.uc_stack.ss_size = STACK;
        f.ctx.uc_link = &sched;
        makecontext(&f.ctx, entry, 0);
#endif
        f.state = RUNNABLE;
    }
    ++block_count;
    for (;;) {
        bool ran = false;
        for (int i = 0; i < threads; ++i) {
            if (fibers[i].state != RUNNABLE) continue;
            cur = i;
            threadIdx = {(unsigned)i, 0, 0};
#if defined(__x86_64__)
            asge_emu_swap(&sched_sp, fibers[i].sp);
#else
            swapcontext(&sched, &fibers[i].ctx);
#endif
            ran = true;
        }
        int live = 0, at_block = 0;
        for (int i = 0; i < threads; ++i) {
            live += fibers[i].state != DONE;
            at_block += fibers[i].state == BLOCK_WAIT;
        }
        if (live == 0) break;
        bool released = false;
        if (at_block == live) {
            for (int i = 0; i < threads; ++i)
                if (fibers[i].state == BLOCK_WAIT) fibers[i].state = RUNNABLE;
            released = true;
        }
        for (int w = 0; w * 32 < threads; ++w) {
            int wl = 0, ww = 0;
            for (int i = w * 32; i < w * 32 + 32 && i < threads; ++i) {
                wl += fibers[i].state != DONE;
                ww += fibers[i].state == WARP_WAIT;
            }
            if (wl > 0 && ww == wl) {
                for (int i = w * 32; i < w * 32 + 32 && i < threads; ++i)
                    if (fibers[i].state == WARP_WAIT) fibers[i].state = RUNNABLE;
                released = true;
            }
        }
        if (!ran && !released) {
            std::snprintf(fault_msg, sizeof fault_msg,
                          "cuda_emu: deadlock (a barrier some live threads never reach) in block %u,%u,%u",
                          blockIdx.x, blockIdx.y, blockIdx.z);
            on_fault(fault_msg);
        }
    }
}

template <class F>
void launch(dim3 grid, unsigned threads, F f) {
    std::function<void()> fn = f;
    body = &fn;
    gridDim = {grid.x, grid.y, grid.z};
    blockDim = {threads, 1, 1};
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                blockIdx = {x, y, z};
                run_block((int)threads);
            }
    body = nullptr;
}
}  // namespace emu

static inline void __syncthreads() { emu::park(emu::BLOCK_WAIT); }

static inline float __shfl_xor_sync(unsigned, float v, int o) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    emu::shfl_buf[warp][lane] = v;
    emu::warp_sync();
    float r = emu::shfl_buf[warp][lane ^ o];
    emu::warp_sync();
    return r;
}

typedef unsigned short f16_bits;

static inline float h2f(f16_bits h) {
    _Float16 v;
    std::memcpy(&v, &h, 2);
    return (float)v;
}

static inline f16_bits f2h(float f) {
    _Float16 v = (_Float16)f;
    f16_bits h;
    std::memcpy(&h, &v, 2);
    return h;
}

// 16-byte vector accesses (ld16 / st16 in the prelude) and ldmatrix rows: the GPU faults on a misaligned one, so
// the emulation refuses it too.
inline void check_align(const void* p, unsigned size, const char* what) {
    if (reinterpret_cast<std::uintptr_t>(p) % size != 0) {
        char m[160];
        std::snprintf(m, sizeof m, "cuda_emu: %s of a misaligned address %p", what, p);
        emu::fault(m);
    }
}

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: lane l gives the address of row l % 8 of matrix l / 8; every lane
// receives, of each matrix q, the pair at row lane / 4, columns 2 (lane % 4) and +1 (PTX ISA, "ldmatrix").
namespace emu {
static const f16_bits* ldsm_rows[32][32];
}
static inline void ldsm_x4(unsigned r[4], const f16_bits* p) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    check_align(p, 16, "ldmatrix row");
    emu::ldsm_rows[warp][lane] = p;
    emu::warp_sync();
    for (int q = 0; q < 4; ++q) {
        const f16_bits* row = emu::ldsm_rows[warp][q * 8 + lane / 4];
        r[q] = (unsigned)row[2 * (lane % 4)] | ((unsigned)row[2 * (lane % 4) + 1] << 16);
    }
    emu::warp_sync();
}

// mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32, D = A B + C, from the documented fragment layout. Every
// lane deposits its fragments and parks; the warp's lane 0 runs first once all have arrived, decodes the 16x16 A
// and 16x8 B and computes all 32 lanes' D (once per warp, not once per lane), and every lane reads its own after
// the second barrier.
static inline void mma_16816(float c[4], const unsigned a[4], const unsigned b[2]) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int i = 0; i < 4; ++i) emu::mma_a[warp][lane][i] = a[i];
    for (int i = 0; i < 2; ++i) emu::mma_b[warp][lane][i] = b[i];
    for (int i = 0; i < 4; ++i) emu::mma_c[warp][lane][i] = c[i];
    emu::warp_sync();
    if (lane == 0) {
        auto lo = [](unsigned r) { return h2f((f16_bits)(r & 0xffffu)); };
        auto hi = [](unsigned r) { return h2f((f16_bits)(r >> 16)); };
        float A[16][16], B[16][8];
        for (int l = 0; l < 32; ++l) {
            const int g = l >> 2, t = l & 3;
            const unsigned* ra = emu::mma_a[warp][l];
            A[g][2 * t] = lo(ra[0]);      A[g][2 * t + 1] = hi(ra[0]);
            A[g + 8][2 * t] = lo(ra[1]);  A[g + 8][2 * t + 1] = hi(ra[1]);
            A[g][2 * t + 8] = lo(ra[2]);  A[g][2 * t + 9] = hi(ra[2]);
            A[g + 8][2 * t + 8] = lo(ra[3]); A[g + 8][2 * t + 9] = hi(ra[3]);
            const unsigned* rb = emu::mma_b[warp][l];
            B[2 * t][g] = lo(rb[0]);      B[2 * t + 1][g] = hi(rb[0]);
            B[2 * t + 8][g] = lo(rb[1]);  B[2 * t + 9][g] = hi(rb[1]);
        }
        for (int l = 0; l < 32; ++l) {
            const int g = l >> 2, t = l & 3;
            const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
            for (int i = 0; i < 4; ++i) {
                float s = emu::mma_c[warp][l][i];
                for (int k = 0; k < 16; ++k) s = std::fma(A[rows[i]][k], B[k][cols[i]], s);
                emu::mma_c[warp][l][i] = s;
            }
        }
        ++emu::mma_count;
    }
    emu::warp_sync();
    for (int i = 0; i < 4; ++i) c[i] = emu::mma_c[warp][lane][i];
}
