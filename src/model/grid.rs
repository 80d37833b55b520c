//! The goodness patch grid: PyTorch's `adaptive_avg_pool2d` bins.
//!
//! For an axis of length `n` split into `p` bins, bin `i` covers `[floor(i*n/p), ceil((i+1)*n/p))`.
//! When `p` does not divide `n` the bins differ in size and neighbours can overlap (H = 28, P = 8 gives
//! (0,4), (3,7), (7,11), ...); a pixel then contributes to every bin that contains it.

/// The `p x p` grid of spatial bins over an `h x w` feature map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PatchGrid {
    pub p: usize,
    pub h: usize,
    pub w: usize,
    /// `[start, end)` of each row bin.
    pub rows: Vec<(usize, usize)>,
    /// `[start, end)` of each column bin.
    pub cols: Vec<(usize, usize)>,
}

/// Bin `i` of `p` over an axis of length `n`, as `adaptive_avg_pool2d` forms it.
pub fn adaptive_bin(i: usize, n: usize, p: usize) -> (usize, usize) {
    let start = (i * n) / p;
    let end = ((i + 1) * n).div_ceil(p);
    (start, end)
}

impl PatchGrid {
    pub fn new(p: usize, h: usize, w: usize) -> Self {
        assert!(p >= 1 && p <= h && p <= w, "patch grid {p} does not fit a {h}x{w} map");
        PatchGrid {
            p,
            h,
            w,
            rows: (0..p).map(|i| adaptive_bin(i, h, p)).collect(),
            cols: (0..p).map(|j| adaptive_bin(j, w, p)).collect(),
        }
    }

    /// Number of goodness values per channel, `P^2`.
    pub fn cells(&self) -> usize {
        self.p * self.p
    }

    /// `|bin_ij|`, the pixel count of cell (i, j).
    pub fn area(&self, i: usize, j: usize) -> usize {
        (self.rows[i].1 - self.rows[i].0) * (self.cols[j].1 - self.cols[j].0)
    }

    /// True when every pixel lies in exactly one cell (P divides H and W).
    pub fn is_partition(&self) -> bool {
        self.h.is_multiple_of(self.p) && self.w.is_multiple_of(self.p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_match_pytorch_for_h28_p8() {
        let g = PatchGrid::new(8, 28, 28);
        assert_eq!(g.rows, vec![(0, 4), (3, 7), (7, 11), (10, 14), (14, 18), (17, 21), (21, 25), (24, 28)]);
        assert!(!g.is_partition());
    }

    #[test]
    fn bins_match_pytorch_for_h7_p2() {
        let g = PatchGrid::new(2, 7, 7);
        assert_eq!(g.rows, vec![(0, 4), (3, 7)]);
        assert_eq!(g.area(0, 1), 16);
    }

    #[test]
    fn divisible_grid_is_a_partition() {
        let g = PatchGrid::new(4, 32, 32);
        assert_eq!(g.rows, vec![(0, 8), (8, 16), (16, 24), (24, 32)]);
        assert!(g.is_partition());
    }
}
