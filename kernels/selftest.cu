// tensor_core_selftest: one warp through the fp16 tensor-core data path the GEMM kernels are built from, on known
// inputs, every stage written out so that the host names the first lane and register that differ (the
// self-test `asge info --self-test` and tools/gpu-check.sh run first, in seconds; src/backend/cuda/selftest.rs
// computes what each value must be from the PTX ISA's layouts):
// 1. cp.async: A (16 x 16 fp16, row-major: 2 chunks of 16 bytes a row) and Bt (B stored k-major, [k][n], 16 x 16)
//    from global to dynamic shared memory, lane l copying chunk l of each; A's chunk l is zero-filled (src-size 0,
//    nothing read) where zero_mask has bit l. The shared tiles are written back to `tiles` (A, then Bt).
// 2. ldmatrix.x4 of A: lanes 8q..8q+7 address the rows of 8 x 8 matrix q (rows 8 (q % 2).., columns 8 (q / 2)..),
//    so that r = the m16n8k16 A fragment; ldmatrix.x4.trans of Bt likewise (matrix q: k 8 (q % 2).., n 8 (q / 2)..),
//    so that r[0], r[1] are the B fragment of columns 0-7 and r[2], r[3] of columns 8-15. The eight registers go
//    to frags[8 lane ..].
// 3. mma.sync twice, D0 = A B[:, 0:8] and D1 = A B[:, 8:16] from zero: d[8 lane ..] = D0's c0..c3, D1's c0..c3.
// The inputs are multiples of 1/4 below 8 in magnitude: every product and sum is exact in f32, so D is exact
// whatever order and rounding the hardware accumulates in, and the host compares bit for bit.
// `plant` != 0 plants a fragment-order bug (A's registers 1 and 2 swapped before the mma), for the test that
// shows the self-test fails on one.
extern "C" __global__ void __launch_bounds__(32) tensor_core_selftest(
    const f16_bits* __restrict__ a /*[256]*/, const f16_bits* __restrict__ bt /*[256]*/, unsigned zero_mask,
    int plant, f16_bits* __restrict__ tiles /*[512]*/, unsigned* __restrict__ frags /*[256]*/,
    float* __restrict__ d /*[256]*/)
{
    const int lane = threadIdx.x & 31;
    f16_bits* as = reinterpret_cast<f16_bits*>(dyn_smem());
    f16_bits* bs = as + 256;
    const unsigned a_s = smem_u32(as), b_s = smem_u32(bs);
    // 1. Chunk `lane` of each tile: row lane / 2, halves 8 (lane % 2)..
    const int chunk = lane * 8;
    cp_async16(a_s + chunk * 2, a + chunk, !((zero_mask >> lane) & 1u));
    cp_async16(b_s + chunk * 2, bt + chunk, true);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    for (int i = lane; i < 256; i += 32) {
        tiles[i] = as[i];
        tiles[256 + i] = bs[i];
    }
    // 2. The row this lane addresses in matrix q = lane / 8.
    const int q = lane >> 3, r = lane & 7;
    const int row = r + 8 * (q & 1), col = 8 * (q >> 1);
    unsigned af[4], bf[4];
    ldsm_x4(af, a_s + (row * 16 + col) * 2);
    ldsm_x4_t(bf, b_s + (row * 16 + col) * 2);
    for (int i = 0; i < 4; ++i) {
        frags[lane * 8 + i] = af[i];
        frags[lane * 8 + 4 + i] = bf[i];
    }
    if (plant) {
        const unsigned t = af[1];
        af[1] = af[2];
        af[2] = t;
    }
    // 3. Both halves of B's columns.
    float c0[4] = {0.f, 0.f, 0.f, 0.f}, c1[4] = {0.f, 0.f, 0.f, 0.f};
    const unsigned b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
    mma_16816(c0, af, b0);
    mma_16816(c1, af, b1);
    for (int i = 0; i < 4; ++i) {
        d[lane * 8 + i] = c0[i];
        d[lane * 8 + 4 + i] = c1[i];
    }
}
