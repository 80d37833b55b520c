// A test-only kernel for the emulator's cp.async and dynamic shared memory rules (tests/kernel_emulation.rs):
// a 3-stage cp.async pipeline that streams `steps` tiles of 256 16-byte chunks through dynamic shared memory,
// each thread reading back another thread's chunk (so that every read crosses threads). mode 0 is correct; each
// other mode plants one hazard that a GPU may or may not show, and the emulation must fault on every time:
//   1: waits one group too few (cp.async.wait_group 2 instead of 1): reads a stage still in flight;
//   2: no barrier between the wait and the reads: reads what other threads' copies landed unsynchronised;
//   3: issues the next stage before the barrier: overwrites a stage other threads are still reading;
//   4: as 1, but reading through ldmatrix (the tensor-core kernels' path) instead of 16-byte loads;
//   5: the barrier before the wait instead of after it, each thread reading its predecessor's chunk: reads bytes
//      another thread's copy landed with no barrier in between.
#define PROBE_STAGES 3

__global__ void pipeline_probe(const unsigned* __restrict__ src /*[steps*256*4]*/, unsigned* __restrict__ out /*[steps*256*4]*/,
                               int steps, int mode)
{
    u32x4* stage = reinterpret_cast<u32x4*>(dyn_smem());  // [PROBE_STAGES][256]
    const int tid = threadIdx.x;
    auto issue = [&](int s) {
        if (s < steps) cp_async16(smem_u32(&stage[(s % PROBE_STAGES) * 256 + tid]), src + ((long)s * 256 + tid) * 4, true);
    };
    for (int s = 0; s < PROBE_STAGES - 1; ++s) {
        issue(s);
        cp_async_commit();
    }
    for (int t = 0; t < steps; ++t) {
        if (mode == 5) __syncthreads();
        if (mode == 1 || mode == 4) cp_async_wait<PROBE_STAGES - 1>();
        else cp_async_wait<PROBE_STAGES - 2>();
        if (mode == 3) {
            issue(t + PROBE_STAGES - 1);
            cp_async_commit();
        }
        if (mode != 2 && mode != 5) __syncthreads();
        if (mode != 3) {
            issue(t + PROBE_STAGES - 1);
            cp_async_commit();
        }
        const int other = mode == 5 ? (tid == 0 ? 0 : tid - 1) : (tid + 64) % 256;
        unsigned* o = out + ((long)t * 256 + tid) * 4;
        if (mode == 4) {
            // Lane l addresses row l % 8 of matrix l / 8: the 16-byte chunk `other` of the stage; the result is
            // checked only for not faulting (its layout is ldmatrix's, tested with the conv kernels).
            unsigned r[4];
            ldsm_x4(r, reinterpret_cast<const f16_bits*>(&stage[(t % PROBE_STAGES) * 256 + other]));
            o[0] = r[0], o[1] = r[1], o[2] = r[2], o[3] = r[3];
        } else {
            const u32x4 v = ld16(&stage[(t % PROBE_STAGES) * 256 + other]);
            o[0] = v.x, o[1] = v.y, o[2] = v.z, o[3] = v.w;
        }
    }
    cp_async_wait<0>();
}
