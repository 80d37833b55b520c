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
//
// Dynamic shared memory (`dyn_smem()` in the prelude, `extern __shared__` on the GPU) is a buffer of exactly the
// launch's size that ends at a PROT_NONE page (an access past it faults), filled with 0xff bytes (fp16 NaN) at
// every block's start. `cp.async` has its real semantics, adversarially: a copy lands only at the issuing
// thread's `cp.async.wait_group` that retires its group (the latest the hardware may), and its destination reads
// as NaN until then. A 16-byte shadow per granule of the buffer records who wrote it, who read it and in which
// barrier interval, so that the rules of a multi-stage pipeline are checked, not left to luck: a read (ldmatrix,
// 16-byte load) of bytes whose copy is in flight, or that another thread's copy or store completed since the last
// __syncthreads(), or that no thread of the block has written, faults; so does a copy or store over bytes that another thread read since the last barrier (a
// stage reused too early) or that a copy still has in flight, and a thread that exits with copies not waited for.
#pragma once
#define ASGE_HOST_EMU 1

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <string>
#include <sys/mman.h>
#include <unistd.h>
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
// A fiber's stack: its own mapping with a PROT_NONE page below it, so that an overflow faults (a fault the driver
// stand-in reports as the kernel's) instead of writing over the heap.
struct FiberStack {
    char* map = nullptr;
    char* data() const { return map + 4096; }
    bool empty() const { return map == nullptr; }
    void allocate() {
        void* m = mmap(nullptr, STACK + 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) {
            std::fputs("cuda_emu: cannot map a fiber stack\n", stderr);
            std::abort();
        }
        map = static_cast<char*>(m);
        mprotect(map, 4096, PROT_NONE);
    }
};
struct Fiber { void* sp = nullptr; FiberStack stack; State state = DONE; };
static void* sched_sp = nullptr;
#else
struct Fiber { ucontext_t ctx; FiberStack stack; State state = DONE; };
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
// ASGE_STANDIN_MMA_ROUNDING=truncate: the MMA's f32 accumulation rounds every addition toward zero, a pessimistic
// model of tensor cores that accumulate by truncation (Hopper's do: each product is added with its low bits cut
// off, never rounded up). One truncation per product and step bounds what the hardware, which truncates once per
// group of products, can lose. The parity tests are rerun under it so that their tolerances are shown to cover it.
static const bool mma_truncate = [] {
    const char* v = getenv("ASGE_STANDIN_MMA_ROUNDING");
    return v && std::string(v) == "truncate";
}();

// fma(a, b, c) rounded toward zero: the exact a*b + c in double (a and b are fp16 values, so a*b is exact), then
// to the f32 of no larger magnitude.
static inline float fma_rz(float a, float b, float c) {
    const double exact = (double)a * (double)b + (double)c;
    float r = (float)exact;
    if (std::fabs((double)r) > std::fabs(exact)) r = std::nextafterf(r, 0.0f);
    return r;
}

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
inline void thread_exit_check();
[[noreturn]] static void fiber_main() {
    (*body)();
    thread_exit_check();
    fibers[cur].state = DONE;
    asge_emu_swap(&fibers[cur].sp, sched_sp);
    __builtin_unreachable();
}
#else
inline void thread_exit_check();
static void entry() {
    (*body)();
    thread_exit_check();
    fibers[cur].state = DONE;
}  // returns to sched through uc_link
#endif

inline void check_align_(const void* p, unsigned size, const char* what);
inline void fault(const char* what) {
    std::snprintf(fault_msg, sizeof fault_msg, "%s (thread %u of block %u,%u,%u)", what, threadIdx.x, blockIdx.x,
                  blockIdx.y, blockIdx.z);
    on_fault(fault_msg);
}

// ---- dynamic shared memory and cp.async (see the header comment) ----
struct Granule {
    enum : uint8_t { READY, PENDING, WRITTEN } state = READY;
    bool many_readers = false;
    int writer = -1, reader = -1;
    uint64_t written_in = 0, read_in = 0;  // barrier intervals (0: never)
};
struct Copy {
    unsigned char* dst;
    unsigned char data[16];
};
struct AsyncState {
    std::vector<Copy> open;                 // issued, not committed yet
    std::deque<std::vector<Copy>> groups;   // committed, oldest first
};
static unsigned char* dyn_base = nullptr;   // the current launch's buffer (ends at a PROT_NONE page)
static size_t dyn_bytes = 0;
static unsigned char* dyn_map = nullptr;
static size_t dyn_map_len = 0;
static std::vector<Granule> shadow;
static std::vector<AsyncState> async_of;    // per thread of the running block
static uint64_t interval = 1;               // bumped at every block barrier and block start

// Maps a buffer of `bytes` (rounded up to 16) that ends where a PROT_NONE page begins.
inline void dyn_alloc(size_t bytes) {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE), len = (bytes + 15) / 16 * 16;
    const size_t need = (len + page - 1) / page * page + page;
    if (need > dyn_map_len) {
        if (dyn_map) munmap(dyn_map, dyn_map_len);
        void* m = mmap(nullptr, need, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) {
            std::fputs("cuda_emu: cannot map dynamic shared memory\n", stderr);
            std::abort();
        }
        dyn_map = static_cast<unsigned char*>(m);
        dyn_map_len = need;
        mprotect(dyn_map + need - page, page, PROT_NONE);
    }
    dyn_base = dyn_map + dyn_map_len - page - len;
    dyn_bytes = len;
    shadow.assign(len / 16, Granule{});
}

inline bool in_dyn(const void* p) {
    auto a = reinterpret_cast<const unsigned char*>(p);
    return dyn_base && a >= dyn_base && a < dyn_base + dyn_bytes;
}

inline void block_start_smem(int threads) {
    if (dyn_base) std::memset(dyn_base, 0xff, dyn_bytes);
    for (auto& g : shadow) g = Granule{};
    async_of.assign(threads, AsyncState{});
    ++interval;
}

inline void smem_fault(const char* fmt, int other, const void* p) {
    char m[400];
    std::snprintf(m, sizeof m, fmt, other, (long)(reinterpret_cast<const unsigned char*>(p) - dyn_base));
    fault(m);
}

// A read of [p, p + bytes) by the running thread.
inline void smem_read(const void* p, unsigned bytes) {
    if (!in_dyn(p)) return;
    const size_t g0 = (size_t)(reinterpret_cast<const unsigned char*>(p) - dyn_base) / 16;
    const size_t g1 = ((size_t)(reinterpret_cast<const unsigned char*>(p) - dyn_base) + bytes + 15) / 16;
    for (size_t i = g0; i < g1 && i < shadow.size(); ++i) {
        Granule& g = shadow[i];
        if (g.state == Granule::READY)
            smem_fault("cuda_emu: a shared-memory read of bytes no thread has written in this block (thread %d "
                       "is the reader; offset %ld): it would read another block's leftovers", cur, p);
        if (g.state == Granule::PENDING)
            smem_fault("cuda_emu: a shared-memory read of bytes whose cp.async (thread %d) is still in flight "
                       "(offset %ld): cp.async.wait_group must retire its group first", g.writer, p);
        if (g.state == Granule::WRITTEN && g.written_in == interval && g.writer != cur)
            smem_fault("cuda_emu: a shared-memory read of bytes that thread %d's cp.async or store completed "
                       "since the last barrier (offset %ld): __syncthreads() after the wait_group", g.writer, p);
        if (g.read_in != interval) {
            g.read_in = interval;
            g.reader = cur;
            g.many_readers = false;
        } else if (g.reader != cur) {
            g.many_readers = true;
        }
    }
}

// A write (cp.async issue or plain store) of the 16-byte granule at p by the running thread.
inline Granule& smem_write(const void* p, const char* what) {
    check_align_(p, 16, what);
    if (!in_dyn(p)) {
        char m[200];
        std::snprintf(m, sizeof m, "cuda_emu: %s outside the launch's dynamic shared memory (%zu bytes)", what, dyn_bytes);
        fault(m);
    }
    Granule& g = shadow[(size_t)(reinterpret_cast<const unsigned char*>(p) - dyn_base) / 16];
    if (g.state == Granule::PENDING)
        smem_fault("cuda_emu: a shared-memory write over bytes that thread %d's cp.async still has in flight "
                   "(offset %ld)", g.writer, p);
    if (g.read_in == interval && (g.reader != cur || g.many_readers))
        smem_fault("cuda_emu: a shared-memory write over bytes that thread %d read since the last barrier "
                   "(offset %ld): a stage reused before every thread has finished reading it", g.reader, p);
    if (g.state == Granule::WRITTEN && g.written_in == interval && g.writer != cur)
        smem_fault("cuda_emu: two threads write the same shared bytes between barriers (thread %d first, offset %ld)",
                   g.writer, p);
    return g;
}

inline void thread_exit_check() {
    if (cur < 0 || cur >= (int)async_of.size()) return;
    size_t n = async_of[cur].open.size();
    for (auto& grp : async_of[cur].groups) n += grp.size();
    if (n) {
        char m[160];
        std::snprintf(m, sizeof m, "cuda_emu: a thread exits with %zu cp.async copies not waited for", n);
        fault(m);
    }
}

// Runs one block of `threads` fibers to completion.
inline void run_block(int threads) {
    if ((int)fibers.size() < threads) fibers.resize(threads);
    for (int i = 0; i < threads; ++i) {
        Fiber& f = fibers[i];
        if (f.stack.empty()) f.stack.allocate();
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
    block_start_smem(threads);
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
            ++interval;
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

// Runs the grid; `smem` bytes of dynamic shared memory per block (dyn_smem()).
template <class F>
void launch(dim3 grid, unsigned threads, F f, size_t smem = 0) {
    dyn_alloc(smem);
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
inline void emu::check_align_(const void* p, unsigned size, const char* what) {
    if (reinterpret_cast<std::uintptr_t>(p) % size != 0) {
        char m[160];
        std::snprintf(m, sizeof m, "cuda_emu: %s of a misaligned address %p", what, p);
        emu::fault(m);
    }
}
inline void check_align(const void* p, unsigned size, const char* what) { emu::check_align_(p, size, what); }

// The launch's dynamic shared memory (`extern __shared__` on the GPU).
static inline unsigned char* dyn_smem() { return emu::dyn_base; }

// A shared address of the dynamic shared memory as the prelude's 32-bit form: here its offset in the buffer.
static inline unsigned smem_u32(const void* p) {
    if (!emu::in_dyn(p)) emu::fault("cuda_emu: smem_u32 of an address outside the launch's dynamic shared memory");
    return (unsigned)(reinterpret_cast<const unsigned char*>(p) - emu::dyn_base);
}

// cp.async.cg.shared.global [dst], [src], 16, src_bytes: src_bytes (0 or 16) copied, the rest zero-filled; the
// copy lands at the wait_group that retires its group.
static inline void cp_async16(unsigned dst_addr, const void* src, bool full) {
    if ((size_t)dst_addr + 16 > emu::dyn_bytes) emu::fault("cuda_emu: cp.async destination outside the launch's dynamic shared memory");
    unsigned char* dst = emu::dyn_base + dst_addr;
    emu::Granule& g = emu::smem_write(dst, "cp.async destination");
    emu::Copy c;
    c.dst = static_cast<unsigned char*>(dst);
    std::memset(c.data, 0, 16);
    if (full) {
        check_align(src, 16, "cp.async source");
        std::memcpy(c.data, src, 16);
    }
    std::memset(dst, 0xff, 16);
    g.state = emu::Granule::PENDING;
    g.writer = emu::cur;
    emu::async_of[emu::cur].open.push_back(c);
}
static inline void cp_async_commit() {
    auto& a = emu::async_of[emu::cur];
    a.groups.push_back(std::move(a.open));
    a.open.clear();
}
// cp.async.wait_group N: every committed group but the newest N has landed.
template <int N>
static inline void cp_async_wait() {
    auto& a = emu::async_of[emu::cur];
    while (a.groups.size() > (size_t)N) {
        for (const emu::Copy& c : a.groups.front()) {
            std::memcpy(c.dst, c.data, 16);
            emu::Granule& g = emu::shadow[(size_t)(c.dst - emu::dyn_base) / 16];
            g.state = emu::Granule::WRITTEN;
            g.writer = emu::cur;
            g.written_in = emu::interval;
        }
        a.groups.pop_front();
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
    emu::smem_read(p, 16);
    emu::ldsm_rows[warp][lane] = p;
    emu::warp_sync();
    for (int q = 0; q < 4; ++q) {
        const f16_bits* row = emu::ldsm_rows[warp][q * 8 + lane / 4];
        r[q] = (unsigned)row[2 * (lane % 4)] | ((unsigned)row[2 * (lane % 4) + 1] << 16);
    }
    emu::warp_sync();
}
// ldmatrix.x4.trans: every lane receives, of each matrix q, the pair at rows 2 (lane % 4) and +1, column lane / 4.
// The row an ldmatrix lane addresses by its shared address (the dynamic shared memory's offset).
static inline const f16_bits* ldsm_row(unsigned addr) {
    if ((size_t)addr + 16 > emu::dyn_bytes) emu::fault("cuda_emu: ldmatrix row outside the launch's dynamic shared memory");
    return reinterpret_cast<const f16_bits*>(emu::dyn_base + addr);
}
static inline void ldsm_x4_t(unsigned r[4], unsigned addr) {
    const f16_bits* p = ldsm_row(addr);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    check_align(p, 16, "ldmatrix row");
    emu::smem_read(p, 16);
    emu::ldsm_rows[warp][lane] = p;
    emu::warp_sync();
    for (int q = 0; q < 4; ++q) {
        const f16_bits* r0 = emu::ldsm_rows[warp][q * 8 + 2 * (lane % 4)];
        const f16_bits* r1 = emu::ldsm_rows[warp][q * 8 + 2 * (lane % 4) + 1];
        r[q] = (unsigned)r0[lane / 4] | ((unsigned)r1[lane / 4] << 16);
    }
    emu::warp_sync();
}
static inline void ldsm_x4(unsigned r[4], unsigned addr) { ldsm_x4(r, ldsm_row(addr)); }

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
                if (emu::mma_truncate) {
                    for (int k = 0; k < 16; ++k) s = emu::fma_rz(A[rows[i]][k], B[k][cols[i]], s);
                } else {
                    for (int k = 0; k < 16; ++k) s = std::fma(A[rows[i]][k], B[k][cols[i]], s);
                }
                emu::mma_c[warp][l][i] = s;
            }
        }
        ++emu::mma_count;
    }
    emu::warp_sync();
    for (int i = 0; i < 4; ++i) c[i] = emu::mma_c[warp][lane][i];
}
