//! The tensor-core self-test (`kernels/selftest.cu`): one warp through `cp.async` (with zero-filled chunks),
//! `ldmatrix`, `ldmatrix.trans` and `mma.sync` on known inputs, every stage compared value by value with what
//! the PTX ISA's layouts say it must be. It runs in seconds, before anything else on a new GPU
//! (`asge info --self-test`, `tools/gpu-check.sh`), and names the first stage, lane and register that differ: a
//! fragment-order or addressing error shows here as one line instead of as a wrong number deep in a layer.

use super::args::launch::TensorCoreSelftest;
use super::{drv, CudaBackend, Work};
use anyhow::Result;
use cudarc::driver::LaunchConfig;
use half::f16;

/// A's chunks (16 bytes: half a row) that the copy zero-fills instead of reading: every fifth lane's, from 3.
pub const ZERO_MASK: u32 = 0x1084_2108;

/// What the self-test found: the values compared, and a line for each mismatch (the first few).
#[derive(Clone, Debug, Default)]
pub struct SelfTest {
    pub checked: usize,
    pub mismatches: Vec<String>,
    /// How many values differed in all (the lines stop after a few).
    pub wrong: usize,
}

impl SelfTest {
    pub fn passed(&self) -> bool {
        self.wrong == 0
    }

    /// One line: `passed (N values: cp.async, ldmatrix, ldmatrix.trans, mma.sync)` or the first mismatches.
    pub fn verdict(&self) -> String {
        if self.passed() {
            format!(
                "passed ({} values through cp.async with zero fill, ldmatrix, ldmatrix.trans, mma.sync)",
                self.checked
            )
        } else {
            format!("FAILED: {} of {} values differ; {}", self.wrong, self.checked, self.mismatches.join("; "))
        }
    }

    fn check(&mut self, what: impl FnOnce() -> String, want: u32, got: u32, show: impl Fn(u32) -> String) {
        self.checked += 1;
        if want != got {
            self.wrong += 1;
            if self.mismatches.len() < 6 {
                self.mismatches.push(format!("{}: expected {} got {}", what(), show(want), show(got)));
            }
        }
    }
}

/// The inputs: A[i][j] and Bt[k][n] (B stored k-major), multiples of 1/4 in [-8, 8), so that every product and
/// every sum of 16 is exact in f32, from a pattern quadratic in i and j: no row, column or 8 x 8 block repeats
/// another, so that a fragment register read from the wrong row, column or block changes D. (A pattern linear in
/// i and j hid a swap of A's registers 1 and 2: A[g + 8][k] equalled A[g][k + 8] everywhere.)
pub fn inputs() -> (Vec<f16>, Vec<f16>) {
    let v = |i: usize, j: usize, s: usize| {
        f16::from_f32(((i * i * 5 + j * j * 3 + i * j * 7 + i * 11 + j * 13 + s) % 64) as f32 / 4.0 - 8.0)
    };
    let a = (0..256).map(|e| v(e / 16, e % 16, 1)).collect();
    let bt = (0..256).map(|e| v(e / 16, e % 16, 5)).collect();
    (a, bt)
}

fn pack(lo: f16, hi: f16) -> u32 {
    lo.to_bits() as u32 | (hi.to_bits() as u32) << 16
}

/// Compares what the kernel wrote with what each stage must hold: `tiles` (the shared tiles after the copy),
/// `frags` (per lane A's four ldmatrix registers, then Bt's four ldmatrix.trans registers) and `d` (per lane
/// D0's c0..c3, then D1's).
pub fn check(tiles: &[f16], frags: &[u32], d: &[f32]) -> SelfTest {
    let (a, bt) = inputs();
    let mut t = SelfTest::default();
    // 1. cp.async: chunk c = e / 8 of A zero-filled where the mask says.
    let a_s: Vec<f16> = (0..256).map(|e| if ZERO_MASK >> (e / 8) & 1 == 1 { f16::ZERO } else { a[e] }).collect();
    let hx = |v: u32| format!("{:#06x}", v);
    for e in 0..256 {
        let zero = if ZERO_MASK >> (e / 8) & 1 == 1 { ", a zero-filled chunk" } else { "" };
        t.check(
            || format!("cp.async A[{}][{}]{zero}", e / 16, e % 16),
            a_s[e].to_bits() as u32,
            tiles[e].to_bits() as u32,
            hx,
        );
        t.check(
            || format!("cp.async Bt[{}][{}]", e / 16, e % 16),
            bt[e].to_bits() as u32,
            tiles[256 + e].to_bits() as u32,
            hx,
        );
    }
    let at = |i: usize, j: usize| a_s[i * 16 + j];
    let b = |k: usize, n: usize| bt[k * 16 + n];
    let hx8 = |v: u32| format!("{:#010x}", v);
    for lane in 0..32 {
        let (g, q) = (lane / 4, 2 * (lane % 4));
        // 2. ldmatrix: the m16n8k16 A fragment (PTX ISA, "Matrix Fragments for mma.m16n8k16").
        let want_a = [
            pack(at(g, q), at(g, q + 1)),
            pack(at(g + 8, q), at(g + 8, q + 1)),
            pack(at(g, q + 8), at(g, q + 9)),
            pack(at(g + 8, q + 8), at(g + 8, q + 9)),
        ];
        // ldmatrix.trans: matrix m holds k 8 (m % 2).., n 8 (m / 2)..; a lane gets rows 2t, 2t + 1 of column g.
        let want_b: Vec<u32> = (0..4)
            .map(|m| {
                let (k0, n0) = (8 * (m % 2), 8 * (m / 2));
                pack(b(k0 + q, n0 + g), b(k0 + q + 1, n0 + g))
            })
            .collect();
        for r in 0..4 {
            t.check(|| format!("ldmatrix lane {lane} register a{r}"), want_a[r], frags[lane * 8 + r], hx8);
            t.check(|| format!("ldmatrix.trans lane {lane} register b{r}"), want_b[r], frags[lane * 8 + 4 + r], hx8);
        }
        // 3. mma: c0, c1 = D[g][2t], D[g][2t + 1]; c2, c3 = D[g + 8][..], for B's columns 0-7 and 8-15.
        for half in 0..2 {
            for r in 0..4 {
                let (row, col) = (g + 8 * (r / 2), 8 * half + q + r % 2);
                let want: f32 = (0..16).map(|k| at(row, k).to_f32() * b(k, col).to_f32()).sum();
                let got = d[lane * 8 + 4 * half + r];
                t.check(
                    || format!("mma.sync lane {lane} register d{}{r} (D[{row}][{col}])", half),
                    want.to_bits(),
                    got.to_bits(),
                    |v| format!("{}", f32::from_bits(v)),
                );
            }
        }
    }
    t
}

/// Runs the self-test on `be`'s device (`plant`: the planted fragment-order bug, for the test that shows a failure).
pub fn run(be: &CudaBackend, plant: bool) -> Result<SelfTest> {
    let stream = be.stream();
    let (a, bt) = inputs();
    let a_d = drv(stream.clone_htod(&a), "self-test input")?;
    let bt_d = drv(stream.clone_htod(&bt), "self-test input")?;
    let mut tiles = drv(stream.alloc_zeros::<f16>(512), "self-test output")?;
    let mut frags = drv(stream.alloc_zeros::<u32>(256), "self-test output")?;
    let mut d = drv(stream.alloc_zeros::<f32>(256), "self-test output")?;
    let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (32, 1, 1), shared_mem_bytes: 1024 };
    // SAFETY: the buffers hold the extents the kernel's signature states (256 and 512 values); one warp, 1 KB of
    // dynamic shared memory, as the kernel expects.
    be.launch(TensorCoreSelftest::NAME, Work::default(), || {
        Ok(unsafe {
            TensorCoreSelftest {
                a: &a_d,
                bt: &bt_d,
                zero_mask: ZERO_MASK,
                plant: plant as i32,
                tiles: &mut tiles,
                frags: &mut frags,
                d: &mut d,
            }
            .launch(stream, be.f(TensorCoreSelftest::NAME)?, cfg)
        })
    })?;
    let tiles = drv(stream.clone_dtoh(&tiles), "self-test output")?;
    let frags = drv(stream.clone_dtoh(&frags), "self-test output")?;
    let d = drv(stream.clone_dtoh(&d), "self-test output")?;
    Ok(check(&tiles, &frags, &d))
}
