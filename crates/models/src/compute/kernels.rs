//! Fast f32 CPU compute for the dense Linear (issue #8): y = x·Wᵀ + b with W stored [out, in]
//! as in torch, as a candle custom op with a hand-written backward.
//!
//! * Forward runs one strided GEMM (no copy of the transposed weight view), the bias folded into
//!   the GEMM's accumulator. Decode (one row) runs a hand-written AVX2/FMA gemv over the rows of
//!   W, split over rayon threads, with a portable fallback.
//! * Backward returns grad_x = g·W (one GEMM on W as stored) and grad_W = gᵀ·x (one GEMM on
//!   the transposed view of g), each only when that input is tracked (`track_op()`): a frozen
//!   weight costs no weight-gradient GEMM and gets no gradient entry. grad_b = Σ rows of g.
//!   The backward GEMMs are plain tensors computed with the same kernels (no second order).
//!
//! Anything that is not f32 on the CPU goes through candle's generic matmul unchanged.

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;

/// Which GEMM runs a product (the default [`Backend::Auto`] picks per shape class).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Per shape class, measured on this machine (see BENCHMARKS.md, #8).
    Auto,
    /// The `gemm` crate (what candle's matmul calls), with our strides and thread count.
    Gemm,
    /// faer's matmul.
    Faer,
    /// The hand-written row gemv: one pass over W's rows for up to [`GEMV_MAX_ROWS`] rows of x
    /// (decoding, batched decoding); other products go to Gemm.
    Gemv,
}

/// A strided 2-D f32 matrix: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy, Debug)]
pub struct View<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> View<'a> {
    /// The transposed view (no copy).
    pub fn t(self) -> View<'a> {
        View {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }
    fn check(&self) -> Result<()> {
        if self.rows > 0 && self.cols > 0 {
            let last = (self.rows - 1) * self.rs + (self.cols - 1) * self.cs;
            if last >= self.data.len() {
                bail!(
                    "kernels: view {}x{} strides ({}, {}) out of bounds ({} elements)",
                    self.rows,
                    self.cols,
                    self.rs,
                    self.cs,
                    self.data.len()
                );
            }
        }
        Ok(())
    }
}

/// glibc hands activation-sized blocks (≥ 128 KiB at first) back to the kernel when they are
/// freed, so every forward/backward pass page-faults its temporaries in again: 15% of a
/// fine-tuning step went to clear_page and page-fault handling. Serving every block from the
/// heap (no mmap: blocks over 32 MiB, such as a rebuilt embedding table and its gradient, are
/// common here) and never trimming it keeps those pages mapped. Measured on an mpo-aux MiniLM
/// run: page faults 1.02 M → 0.30 M, peak RSS +6% (1260 → 1332 MB) from heap fragmentation.
///
/// Three more settings make that hold for a whole training step:
/// - One arena for all threads. Any thread but the first allocates from its own arena, made of
///   64 MiB mmap'd heaps that glibc unmaps as soon as one is empty, whatever the trim
///   threshold, and the CLI works on a spawned thread. Our allocations are few and large, so
///   sharing one arena's lock costs nothing measurable.
/// - The trim threshold is an int, so at most 2 GiB: a step that frees more than that at once
///   (a SmolLM2 step frees ~2 GB of activations and gradients) was still trimmed and faulted
///   back in, ~0.5 M faults per step. The top pad is kept after any trim; it is a reservation
///   of address space, not memory, sized to an eighth of RAM so a small machine does not
///   reserve more than it could commit.
///
/// Measured on a SmolLM2 LoRA step (batch 4×256): page faults of a 6-step run 4.95 M → 1.14 M,
/// step 6.5 → 4.9 s, peak RSS unchanged (3.0 GB).
///
/// Call it first thing in `main`, before any thread exists: a thread attaches to an arena at
/// its first allocation.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt and sysconf only read or change allocator/system parameters.
    unsafe {
        let ram = (libc::sysconf(libc::_SC_PHYS_PAGES) as i64)
            .saturating_mul(libc::sysconf(libc::_SC_PAGESIZE) as i64);
        let pad = (ram / 8).clamp(128 << 10, i32::MAX as i64) as i32;
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, pad);
    }
}

fn num_threads() -> usize {
    candle_core::utils::get_num_threads().max(1)
}

/// dst (row-major m×n, contiguous) = [dst +] a (m×k) · b (k×n), with the given backend.
pub fn gemm_into(
    dst: &mut [f32],
    a: View,
    b: View,
    accumulate: bool,
    backend: Backend,
) -> Result<()> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if b.rows != k {
        bail!("kernels: inner dims differ ({m}x{k} · {}x{n})", b.rows);
    }
    if dst.len() != m * n {
        bail!("kernels: dst has {} elements, want {m}x{n}", dst.len());
    }
    a.check()?;
    b.check()?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return Ok(());
    }
    let backend = match backend {
        Backend::Auto => auto_backend(m, k, n, &a, &b),
        x => x,
    };
    match backend {
        Backend::Gemv if (1..=GEMV_MAX_ROWS).contains(&m) && b.rs == 1 => {
            // b = Wᵀ with W's rows contiguous: y[r, j] = <a row r, W[j, :]>. Rows of a must be
            // contiguous for the kernels; a transposed a is gathered first.
            let xbuf;
            let (x, xrs): (&[f32], usize) = if a.cs == 1 {
                (a.data, a.rs)
            } else {
                xbuf = (0..m * k)
                    .map(|i| a.data[(i / k) * a.rs + (i % k) * a.cs])
                    .collect::<Vec<_>>();
                (&xbuf, k)
            };
            if m == 1 {
                gemv_rows(dst, &x[..k], b.data, b.cs, n, k, accumulate);
            } else {
                gemv_multi(dst, x, xrs, m, b.data, b.cs, n, k, accumulate);
            }
        }
        Backend::Faer => faer_gemm(dst, a, b, accumulate),
        _ => gemm_crate(dst, a, b, accumulate),
    }
    Ok(())
}

/// Runs `body(r0, rows)` over W [n, k] in tiles of `tile` rows, each converted to f32 by
/// `fill(r0, buf)` (W's rows r0 .. r0 + buf.len()/k) into one reused buffer.
fn for_each_tile(
    (k, n): (usize, usize),
    tile: usize,
    fill: impl Fn(usize, &mut [f32]) -> Result<()>,
    mut body: impl FnMut(usize, &[f32]) -> Result<()>,
) -> Result<()> {
    let tile = tile.clamp(1, n.max(1));
    let mut w = vec![0f32; tile * k];
    let mut r0 = 0;
    while r0 < n {
        let rt = tile.min(n - r0);
        let w = &mut w[..rt * k];
        fill(r0, w)?;
        body(r0, w)?;
        r0 += rt;
    }
    Ok(())
}

/// y [m, n] = x [m, k] · Wᵀ for a W [n, k] that is not held in f32 (quantized, f16), converted
/// `tile` rows at a time by `fill` (see [`for_each_tile`]), each tile one f32 GEMM. The
/// conversion costs O(n·k) per call against the GEMM's O(m·n·k), and the tile stays in L2
/// while the GEMM streams x past it.
pub fn tiled_x_wt(
    x: &[f32],
    (m, k, n): (usize, usize, usize),
    tile: usize,
    fill: impl Fn(usize, &mut [f32]) -> Result<()>,
) -> Result<Vec<f32>> {
    let mut y = vec![0f32; m * n];
    let mut tmp = vec![0f32; m * tile.clamp(1, n.max(1))];
    let a = View {
        data: x,
        rows: m,
        cols: k,
        rs: k,
        cs: 1,
    };
    for_each_tile((k, n), tile, fill, |r0, w| {
        let rt = w.len() / k;
        // Wᵀ of the tile without a copy: element (i, j) = w[j·k + i].
        let b = View {
            data: w,
            rows: k,
            cols: rt,
            rs: 1,
            cs: k,
        };
        let tmp = &mut tmp[..m * rt];
        gemm_into(tmp, a, b, false, Backend::Auto)?;
        for (orow, trow) in y.chunks_exact_mut(n).zip(tmp.chunks_exact(rt)) {
            orow[r0..r0 + rt].copy_from_slice(trow);
        }
        Ok(())
    })?;
    Ok(y)
}

/// gx [m, k] = g [m, n] · W, the input gradient of [`tiled_x_wt`], with W's rows from `fill`
/// in tiles as there.
pub fn tiled_g_w(
    g: &[f32],
    (m, k, n): (usize, usize, usize),
    tile: usize,
    fill: impl Fn(usize, &mut [f32]) -> Result<()>,
) -> Result<Vec<f32>> {
    let mut gx = vec![0f32; m * k];
    for_each_tile((k, n), tile, fill, |r0, w| {
        let a = View {
            data: &g[r0..],
            rows: m,
            cols: w.len() / k,
            rs: n,
            cs: 1,
        };
        let b = View {
            data: w,
            rows: w.len() / k,
            cols: k,
            rs: k,
            cs: 1,
        };
        gemm_into(&mut gx, a, b, r0 > 0, Backend::Auto)
    })?;
    Ok(gx)
}

/// `MPOLM_GEMM=gemm|faer|gemv` forces one backend for every product (benchmarks, bisecting);
/// unset or `auto` keeps the per-shape choice.
fn forced_backend() -> Option<Backend> {
    static F: std::sync::OnceLock<Option<Backend>> = std::sync::OnceLock::new();
    *F.get_or_init(|| match std::env::var("MPOLM_GEMM").ok().as_deref() {
        Some("gemm") => Some(Backend::Gemm),
        Some("faer") => Some(Backend::Faer),
        Some("gemv") => Some(Backend::Gemv),
        _ => None,
    })
}

/// The per-shape choice, measured with scripts/bench_gemm_pair.py (examples/bench_kernels.rs and
/// PyTorch in alternating rounds) on the 2-core AVX2 EPYC (BENCHMARKS.md, #8): faer's packed GEMM
/// is the fastest of the two crates from 16 rows up (by 5–40% at 16–128 rows and 576–1536 wide,
/// by 0–10% on training-sized products). A transposed left operand (the gᵀ of the weight gradient) measured slower in faer (35–48 vs
/// 45–68 GFLOP/s), so it stays on `gemm`.
///
/// 1 to 15 rows against W's rows (decoding, batched decoding) go to the hand-written gemv: the
/// `gemm` crate packs all of W on every call with 2–15 rows and faer is no better at so few rows,
/// while the gemv streams W once for all rows: 1.6–2.0× the `gemm` crate at 4 and 8 rows, and
/// 1.4–1.7× at one row (session 7, examples/bench_kernels.rs, alternating within each
/// repetition; an earlier session's "no faster at one row" did not hold up).
fn auto_backend(m: usize, _k: usize, _n: usize, a: &View, b: &View) -> Backend {
    if let Some(f) = forced_backend() {
        return f;
    }
    if (1..=GEMV_MAX_ROWS).contains(&m) && b.rs == 1 {
        Backend::Gemv
    } else if m >= 16 && a.cs == 1 {
        Backend::Faer
    } else {
        Backend::Gemm
    }
}

fn gemm_crate(dst: &mut [f32], a: View, b: View, accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let nt = num_threads();
    let par = if nt > 1 && m * n * k >= 32 * 32 * 32 {
        gemm::Parallelism::Rayon(nt)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the views were bounds-checked; dst is m×n row-major.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            par,
        )
    }
}

fn faer_gemm(dst: &mut [f32], a: View, b: View, accumulate: bool) {
    use faer::{Accum, MatMut, MatRef, Par};
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let nt = num_threads();
    let par = if nt > 1 && m * n * k >= 32 * 32 * 32 {
        Par::rayon(nt)
    } else {
        Par::Seq
    };
    // SAFETY: the views were bounds-checked; dst is m×n row-major.
    unsafe {
        let d = MatMut::<f32>::from_raw_parts_mut(dst.as_mut_ptr(), m, n, n as isize, 1);
        let l = MatRef::<f32>::from_raw_parts(a.data.as_ptr(), m, k, a.rs as isize, a.cs as isize);
        let r = MatRef::<f32>::from_raw_parts(b.data.as_ptr(), k, n, b.rs as isize, b.cs as isize);
        let acc = if accumulate {
            Accum::Add
        } else {
            Accum::Replace
        };
        faer::linalg::matmul::matmul(d, acc, l, r, 1.0f32, par);
    }
}

/// Threads for the row gemv: `MPOLM_GEMV_THREADS`, else the matrix-work thread count.
fn gemv_threads() -> usize {
    static T: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        std::env::var("MPOLM_GEMV_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
    })
    .unwrap_or_else(num_threads)
    .max(1)
}

/// y[j] (+)= Σ_i x[i] · w[j * w_rs + i] for j < n: one row of x against the rows of W.
pub fn gemv_rows(y: &mut [f32], x: &[f32], w: &[f32], w_rs: usize, n: usize, k: usize, acc: bool) {
    gemv_rows_with(y, x, w, w_rs, n, k, acc, gemv_threads())
}

/// [`gemv_rows`] on `nt` threads (rows split in chunks over rayon's pool).
#[allow(clippy::too_many_arguments)]
pub fn gemv_rows_with(
    y: &mut [f32],
    x: &[f32],
    w: &[f32],
    w_rs: usize,
    n: usize,
    k: usize,
    acc: bool,
    nt: usize,
) {
    assert!(y.len() == n && x.len() >= k && (n == 0 || (n - 1) * w_rs + k <= w.len()));
    match gemv_chunk(n, k, nt) {
        None => gemv_block(y, x, w, w_rs, 0, k, acc),
        Some(chunk) => y.par_chunks_mut(chunk).enumerate().for_each(|(c, yc)| {
            gemv_block(yc, x, w, w_rs, c * chunk, k, acc);
        }),
    }
}

/// W rows per parallel gemv task, or None when n·k is too small to split over `nt` threads.
/// Several chunks per thread so an unlucky slow core does not hold the rest.
fn gemv_chunk(n: usize, k: usize, nt: usize) -> Option<usize> {
    (nt > 1 && n * k >= 1 << 16).then(|| n.div_ceil(nt * 4).next_multiple_of(8).max(8))
}

/// Most rows of x the multi-row gemv takes (more go to a packed GEMM).
pub const GEMV_MAX_ROWS: usize = 15;

/// A weight element the row gemv reads: f32, or f16 (weights kept in half precision read half
/// the bytes, and decoding is memory-bound).
pub trait WeightElem: Copy + Send + Sync {
    fn to_f32(self) -> f32;
    /// Eight consecutive elements at `p` as f32 lanes.
    ///
    /// # Safety
    /// p must be valid for 8 reads; the CPU must have AVX2, FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl WeightElem for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
}

impl WeightElem for half::f16 {
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const half::f16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
}

/// y[r, j] (+)= Σ_i x[r·xrs + i] · w[j·w_rs + i] for r < m, j < n: every W row is read once
/// from memory and used for all m rows of x while it sits in L1, so m rows of decoding cost
/// about what one does on a memory-bound machine.
#[allow(clippy::too_many_arguments)]
pub fn gemv_multi<W: WeightElem>(
    y: &mut [f32],
    x: &[f32],
    xrs: usize,
    m: usize,
    w: &[W],
    w_rs: usize,
    n: usize,
    k: usize,
    acc: bool,
) {
    assert!(y.len() == m * n && (m == 0 || (m - 1) * xrs + k <= x.len()));
    assert!(n == 0 || (n - 1) * w_rs + k <= w.len());
    // Results land W-row-major ([n, m]) so threads own contiguous chunks, then transpose.
    let mut yt = vec![0f32; n * m];
    match gemv_chunk(n, k, gemv_threads()) {
        None => gemv_multi_block(&mut yt, x, xrs, m, w, w_rs, 0, k),
        Some(chunk) => yt
            .par_chunks_mut(chunk * m)
            .enumerate()
            .for_each(|(c, yc)| gemv_multi_block(yc, x, xrs, m, w, w_rs, c * chunk, k)),
    }
    for (j, col) in yt.chunks_exact(m).enumerate() {
        for (r, &v) in col.iter().enumerate() {
            let d = &mut y[r * n + j];
            *d = if acc { *d + v } else { v };
        }
    }
}

/// yt[jj·m + r] = <x row r, W row (row0 + jj)> for the yt.len()/m rows of this block.
#[allow(clippy::too_many_arguments)]
fn gemv_multi_block<W: WeightElem>(
    yt: &mut [f32],
    x: &[f32],
    xrs: usize,
    m: usize,
    w: &[W],
    w_rs: usize,
    row0: usize,
    k: usize,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            // SAFETY: features checked; gemv_multi checked that every x row and W row read lies
            // inside its slice.
            unsafe { gemv_multi_avx2(yt, x, xrs, m, w, w_rs, row0, k) };
            return;
        }
    }
    for (jj, col) in yt.chunks_exact_mut(m).enumerate() {
        let wr = &w[(row0 + jj) * w_rs..(row0 + jj) * w_rs + k];
        for (r, c) in col.iter_mut().enumerate() {
            let xr = &x[r * xrs..r * xrs + k];
            *c = wr.iter().zip(xr).map(|(a, b)| a.to_f32() * b).sum();
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn gemv_multi_avx2<W: WeightElem>(
    yt: &mut [f32],
    x: &[f32],
    xrs: usize,
    m: usize,
    w: &[W],
    w_rs: usize,
    row0: usize,
    k: usize,
) {
    for (jj, col) in yt.chunks_exact_mut(m).enumerate() {
        let wp = w.as_ptr().add((row0 + jj) * w_rs);
        let mut r = 0;
        // Four x rows per pass: 8 FMA chains per 16 columns; the W row stays in L1 across passes.
        while r + 4 <= m {
            dots::<4, W>(&mut col[r..r + 4], x.as_ptr().add(r * xrs), xrs, wp, k);
            r += 4;
        }
        match m - r {
            3 => dots::<3, W>(&mut col[r..], x.as_ptr().add(r * xrs), xrs, wp, k),
            2 => dots::<2, W>(&mut col[r..], x.as_ptr().add(r * xrs), xrs, wp, k),
            1 => dots::<1, W>(&mut col[r..], x.as_ptr().add(r * xrs), xrs, wp, k),
            _ => {}
        }
    }
}

/// out[r] = <x + r·xrs, w> over k elements, for R rows of x.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
#[allow(clippy::needless_range_loop)] // r indexes two accumulator arrays and a strided pointer
unsafe fn dots<const R: usize, W: WeightElem>(
    out: &mut [f32],
    x: *const f32,
    xrs: usize,
    w: *const W,
    k: usize,
) {
    use std::arch::x86_64::*;
    let mut a0 = [_mm256_setzero_ps(); R];
    let mut a1 = [_mm256_setzero_ps(); R];
    let k16 = k & !15;
    let mut i = 0;
    while i < k16 {
        let w0 = W::load8(w.add(i));
        let w1 = W::load8(w.add(i + 8));
        for r in 0..R {
            let xp = x.add(r * xrs + i);
            a0[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp), a0[r]);
            a1[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp.add(8)), a1[r]);
        }
        i += 16;
    }
    if i + 8 <= k {
        let w0 = W::load8(w.add(i));
        for r in 0..R {
            a0[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x.add(r * xrs + i)), a0[r]);
        }
        i += 8;
    }
    for r in 0..R {
        let mut s = crate::simd::hsum256(_mm256_add_ps(a0[r], a1[r]));
        for c in i..k {
            s += *x.add(r * xrs + c) * (*w.add(c)).to_f32();
        }
        out[r] = s;
    }
}

fn gemv_block(y: &mut [f32], x: &[f32], w: &[f32], w_rs: usize, row0: usize, k: usize, acc: bool) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: features checked; all rows row0..row0+y.len() lie inside w (checked by
            // the caller's View::check) and x has k elements.
            unsafe { gemv_block_avx2(y, x, w, w_rs, row0, k, acc) };
            return;
        }
    }
    gemv_block_scalar(y, x, w, w_rs, row0, k, acc);
}

fn gemv_block_scalar(
    y: &mut [f32],
    x: &[f32],
    w: &[f32],
    w_rs: usize,
    row0: usize,
    k: usize,
    acc: bool,
) {
    for (j, yj) in y.iter_mut().enumerate() {
        let row = &w[(row0 + j) * w_rs..(row0 + j) * w_rs + k];
        // Four partial sums: lets the compiler vectorise without reassociating one chain.
        let mut s = [0f32; 8];
        let mut ch = row.chunks_exact(8);
        let mut xc = x.chunks_exact(8);
        for (r, xx) in (&mut ch).zip(&mut xc) {
            for l in 0..8 {
                s[l] += r[l] * xx[l];
            }
        }
        let mut t = ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
        for (r, xx) in ch.remainder().iter().zip(xc.remainder()) {
            t += r * xx;
        }
        if acc {
            *yj += t
        } else {
            *yj = t
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gemv_block_avx2(
    y: &mut [f32],
    x: &[f32],
    w: &[f32],
    w_rs: usize,
    row0: usize,
    k: usize,
    acc: bool,
) {
    use std::arch::x86_64::*;
    let xp = x.as_ptr();
    let k8 = k & !7;
    let rows = y.len();
    let k32 = k & !31;
    let mut j = 0;
    // One row at a time streams W strictly in order (what the hardware prefetcher follows best);
    // four accumulators hide FMA latency, a software prefetch runs a few lines ahead.
    while j < rows {
        let p0 = w.as_ptr().add((row0 + j) * w_rs);
        let mut a0 = _mm256_setzero_ps();
        let mut a1 = _mm256_setzero_ps();
        let mut a2 = _mm256_setzero_ps();
        let mut a3 = _mm256_setzero_ps();
        let mut i = 0;
        while i < k32 {
            // (a software prefetch 1 KB ahead measured no better)
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(p0.add(i)), _mm256_loadu_ps(xp.add(i)), a0);
            a1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(p0.add(i + 8)),
                _mm256_loadu_ps(xp.add(i + 8)),
                a1,
            );
            a2 = _mm256_fmadd_ps(
                _mm256_loadu_ps(p0.add(i + 16)),
                _mm256_loadu_ps(xp.add(i + 16)),
                a2,
            );
            a3 = _mm256_fmadd_ps(
                _mm256_loadu_ps(p0.add(i + 24)),
                _mm256_loadu_ps(xp.add(i + 24)),
                a3,
            );
            i += 32;
        }
        while i < k8 {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(p0.add(i)), _mm256_loadu_ps(xp.add(i)), a0);
            i += 8;
        }
        let mut s =
            crate::simd::hsum256(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
        while i < k {
            s += *p0.add(i) * *xp.add(i);
            i += 1;
        }
        if acc {
            y[j] += s
        } else {
            y[j] = s
        }
        j += 1;
    }
}

// ---------------------------------------------------------------------------------------------
// candle glue

fn cpu_f32<'a>(s: &'a CpuStorage, what: &str) -> Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => Ok(v.as_slice()),
        _ => bail!("kernels: {what} must be f32"),
    }
}

/// The (rows, cols, row stride, col stride) of a layout seen as [Π leading dims, last dim],
/// or None when the leading dims do not merge into one stride (then the caller copies).
fn as_2d(l: &Layout) -> Option<(usize, usize, usize, usize)> {
    let dims = l.dims();
    let st = l.stride();
    let r = dims.len();
    if r == 0 {
        return None;
    }
    let cols = dims[r - 1];
    let cs = st[r - 1];
    if r == 1 {
        return Some((1, cols, cols * cs.max(1), cs));
    }
    let rows: usize = dims[..r - 1].iter().product();
    // Merge leading dims: stride[i] must equal stride[i+1] * dims[i+1] (size-1 dims are free).
    let mut rs = None;
    let mut expect: Option<usize> = None;
    for i in (0..r - 1).rev() {
        if dims[i] == 1 {
            continue;
        }
        match expect {
            None => {
                rs = Some(st[i]);
                expect = Some(st[i] * dims[i]);
            }
            Some(e) => {
                if st[i] != e {
                    return None;
                }
                expect = Some(st[i] * dims[i]);
            }
        }
    }
    Some((rows, cols, rs.unwrap_or(cols * cs.max(1)), cs))
}

fn view<'a>(data: &'a [f32], l: &Layout) -> Result<View<'a>> {
    let Some((rows, cols, rs, cs)) = as_2d(l) else {
        bail!("kernels: layout {:?} does not flatten to 2-D", l.stride())
    };
    let v = View {
        data: &data[l.start_offset()..],
        rows,
        cols,
        rs,
        cs,
    };
    v.check()?;
    Ok(v)
}

/// An output buffer of `len` f32 that the caller overwrites completely before reading. Not
/// zero-filled: with freed memory kept on the heap (`keep_freed_memory`) zeroing is a memset of
/// the whole output, ~6% of a 2048×576×1536 product. Candle's own CPU matmul allocates its
/// output the same way.
fn output_buffer(len: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    // SAFETY: f32 has no invalid bit patterns, and every caller writes all `len` values before
    // any is read.
    unsafe { v.set_len(len) };
    v
}

fn linear_fwd(
    x: &CpuStorage,
    lx: &Layout,
    w: &CpuStorage,
    lw: &Layout,
    b: Option<(&CpuStorage, &Layout)>,
) -> Result<(CpuStorage, Shape)> {
    let xv = view(cpu_f32(x, "x")?, lx)?;
    if lw.dims().len() != 2 {
        bail!("kernels::linear: weight must be 2-D, got {:?}", lw.dims());
    }
    let wv = view(cpu_f32(w, "weight")?, lw)?;
    let (m, k, n) = (xv.rows, xv.cols, wv.rows);
    if wv.cols != k {
        bail!(
            "kernels::linear: x has {k} features, weight is {:?}",
            lw.dims()
        );
    }
    // Every element is written below: by the bias rows, or by the GEMM (which overwrites when
    // not accumulating, also for k = 0).
    let mut dst = output_buffer(m * n);
    let acc = if let Some((bs, lb)) = b {
        let bd = &cpu_f32(bs, "bias")?[lb.start_offset()..];
        if lb.dims() != [n] {
            bail!("kernels::linear: bias {:?}, want [{n}]", lb.dims());
        }
        let st = lb.stride()[0];
        if n > 0 && (n - 1) * st >= bd.len() {
            bail!("kernels::linear: bias out of bounds");
        }
        for row in dst.chunks_exact_mut(n.max(1)) {
            for (j, d) in row.iter_mut().enumerate() {
                *d = bd[j * st];
            }
        }
        true
    } else {
        false
    };
    gemm_into(&mut dst, xv, wv.t(), acc, Backend::Auto)?;
    let mut out = lx.dims().to_vec();
    *out.last_mut().unwrap() = n;
    Ok((CpuStorage::F32(dst), Shape::from(out)))
}

/// C = A·B for 2-D f32 CPU tensors with any strides; no backward (used inside `bwd`).
struct Mm;

impl CustomOp2 for Mm {
    fn name(&self) -> &'static str {
        "mpolm-mm"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l1.dims().len() != 2 || l2.dims().len() != 2 {
            bail!("kernels::mm: want 2-D operands");
        }
        let a = view(cpu_f32(s1, "lhs")?, l1)?;
        let b = view(cpu_f32(s2, "rhs")?, l2)?;
        let mut dst = output_buffer(a.rows * b.cols);
        gemm_into(&mut dst, a, b, false, Backend::Auto)?; // overwrites every element
        Ok((CpuStorage::F32(dst), Shape::from((a.rows, b.cols))))
    }
}

/// a·b for 2-D f32 CPU tensors (any strides, transposed views included) with this module's
/// GEMM; the result carries no gradient graph.
pub fn mm(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.apply_op2_no_bwd(b, &Mm)
}

/// x as [rows, in] without a copy when its layout allows, detached from the graph.
fn flat2(x: &Tensor) -> Result<Tensor> {
    let x = x.detach();
    let in_f = *x.dims().last().unwrap_or(&1);
    let rows = x.elem_count() / in_f.max(1);
    if as_2d(x.layout()).is_some() && x.rank() == 2 {
        Ok(x)
    } else {
        x.contiguous()?.reshape((rows, in_f))
    }
}

fn linear_bwd(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    grad: &Tensor,
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let n = w.dim(0)?;
    let g = grad
        .contiguous()?
        .reshape(((grad.elem_count() / n.max(1)), n))?;
    let gx = if x.track_op() {
        Some(mm(&g, &w.detach())?.reshape(x.shape())?)
    } else {
        None
    };
    let gw = if w.track_op() {
        let gw = mm(&g.t()?, &flat2(x)?)?;
        Some(gw)
    } else {
        None
    };
    let gb = match b {
        Some(b) if b.track_op() => Some(g.apply_op1_no_bwd(&ColumnSums)?),
        _ => None,
    };
    Ok((gx, gw, gb))
}

/// Σ over rows of a 2-D f32 tensor (the bias gradient). candle's `sum(0)` walks the rows with a
/// strided index per element; this adds whole rows into per-thread column blocks. It was 3.7%
/// of a MiniLM mpo-aux step, whose every Linear has a trained bias.
struct ColumnSums;

impl CustomOp1 for ColumnSums {
    fn name(&self) -> &'static str {
        "mpolm-column-sums"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let v = view(cpu_f32(s, "gradient")?, l)?;
        let (rows, n) = (v.rows, v.cols);
        let mut out = vec![0f32; n];
        // Column blocks of 256: each fits L1 while its rows stream past.
        let add_rows = |j0: usize, acc: &mut [f32]| {
            for i in 0..rows {
                let base = i * v.rs + j0 * v.cs;
                if v.cs == 1 {
                    let row = &v.data[base..base + acc.len()];
                    acc.iter_mut().zip(row).for_each(|(a, x)| *a += x);
                } else {
                    for (j, a) in acc.iter_mut().enumerate() {
                        *a += v.data[base + j * v.cs];
                    }
                }
            }
        };
        if rows * n >= 1 << 16 {
            out.par_chunks_mut(256)
                .enumerate()
                .for_each(|(b, acc)| add_rows(b * 256, acc));
        } else {
            for (b, acc) in out.chunks_mut(256).enumerate() {
                add_rows(b * 256, acc);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }
}

struct LinearOp;

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "mpolm-linear"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        linear_fwd(s1, l1, s2, l2, None)
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (gx, gw, _) = linear_bwd(x, w, None, grad)?;
        Ok((gx, gw))
    }
}

struct LinearBiasOp;

impl CustomOp3 for LinearBiasOp {
    fn name(&self) -> &'static str {
        "mpolm-linear-bias"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        linear_fwd(s1, l1, s2, l2, Some((s3, l3)))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        linear_bwd(x, w, Some(b), grad)
    }
}

/// `MPOLM_LINEAR=candle` sends every [`linear`] through candle's generic matmul (A/B runs).
fn generic_forced() -> bool {
    static F: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *F.get_or_init(|| std::env::var("MPOLM_LINEAR").is_ok_and(|v| v == "candle"))
}

/// Whether [`linear`] takes the fast path for these tensors (all f32 on the CPU).
pub fn fast_path(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> bool {
    let ok = |t: &Tensor| t.dtype() == DType::F32 && matches!(t.device(), Device::Cpu);
    ok(x) && ok(w) && w.rank() == 2 && x.rank() >= 1 && b.is_none_or(|b| ok(b) && b.rank() == 1)
}

/// y = x·Wᵀ (+ b) for x [.., in], W [out, in] (torch layout), b [out]. f32 CPU tensors take the
/// custom op with the hand-written backward; anything else goes through candle's matmul.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    if !fast_path(x, w, b) || generic_forced() {
        return generic_linear(x, w, b);
    }
    let in_f = *x.dims().last().unwrap();
    if w.dim(1)? != in_f {
        bail!(
            "linear: x {:?} does not match weight {:?} (want last dim {})",
            x.dims(),
            w.dims(),
            w.dim(1)?
        );
    }
    if let Some(b) = b {
        if b.dim(0)? != w.dim(0)? {
            bail!(
                "linear: bias {:?} does not match weight {:?}",
                b.dims(),
                w.dims()
            );
        }
    }
    // Leading dims that do not merge into one stride: copy (through candle, so it is tracked).
    let x = if as_2d(x.layout()).is_none() {
        x.contiguous()?
    } else {
        x.clone()
    };
    let tracked = x.track_op() || w.track_op() || b.is_some_and(|b| b.track_op());
    match (b, tracked) {
        (None, false) => x.apply_op2_no_bwd(w, &LinearOp),
        (None, true) => x.apply_op2(w, LinearOp),
        (Some(b), false) => x.apply_op3_no_bwd(w, b, &LinearBiasOp),
        (Some(b), true) => x.apply_op3(w, b, LinearBiasOp),
    }
}

/// a·b for 2-D tensors, differentiable: through [`linear`] (on the transposed view, no copy),
/// so its backward computes a GEMM only for the inputs that are tracked.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    linear(a, &b.t()?, None)
}

/// The generic candle path (what `matmul_t` did before): used for non-f32 / non-CPU tensors and
/// as the reference in tests and benchmarks.
pub fn generic_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims();
    let in_f = *dims.last().unwrap_or(&0);
    let lead: usize = dims[..dims.len().saturating_sub(1)].iter().product();
    let x2 = if x.is_contiguous() {
        x.reshape((lead, in_f))?
    } else {
        x.contiguous()?.reshape((lead, in_f))?
    };
    let y = x2.matmul(&w.t()?)?;
    let mut out_dims = dims[..dims.len() - 1].to_vec();
    out_dims.push(w.dim(0)?);
    let y = y.reshape(out_dims)?;
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}
