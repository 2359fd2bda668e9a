//! Fused candle operations with hand-written backward passes for time-parallel training.
//!
//! Candle builds the autograd graph; these ops replace the long chains of small element-wise
//! operations that RWKV is made of (each of which would allocate and sweep memory once), and
//! the WKV recurrences, which are scans that no tensor library expresses well. Every op works in
//! f32 and f64 (f64 is what the finite-difference tests use), on the CPU; the structure keeps
//! room for a `cuda_fwd` beside each `cpu_fwd`.

// Index loops over several parallel per-channel arrays read more clearly than zipped iterators.
#![allow(clippy::needless_range_loop)]

use crate::common::{dispatch, WKV_CHUNK};
use candle_core::{
    backend::BackendStorage, bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout,
    Result, Shape, Storage, Tensor, WithDType,
};
use rayon::prelude::*;
use rwkv_core::model::consts::{NORMALIZE_EPS, V7_DECAY_SCALE as W_SCALE};
use std::sync::Mutex;

/// The scalar types the kernels run in.
pub trait Real:
    WithDType
    + Copy
    + Send
    + Sync
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::AddAssign
    + std::ops::SubAssign
    + std::ops::MulAssign
    + std::ops::DivAssign
    + std::ops::Neg<Output = Self>
    + PartialOrd
{
    /// `e^x`.
    fn exp(self) -> Self;
    /// `ln x`.
    fn ln(self) -> Self;
    /// `√x`.
    fn sqrt(self) -> Self;
    /// From f64.
    fn of(x: f64) -> Self;
    /// The larger of two.
    fn maxr(self, o: Self) -> Self {
        if self > o {
            self
        } else {
            o
        }
    }
}

macro_rules! impl_real {
    ($($t:ty),*) => {$(
        impl Real for $t {
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            fn of(x: f64) -> Self {
                x as $t
            }
        }
    )*};
}

impl_real!(f32, f64);

fn sigm<T: Real>(x: T) -> T {
    T::one() / (T::one() + (-x).exp())
}

/// The contiguous slice behind a CPU storage and layout.
fn slice<'a, T: Real>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let v = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => bail!("fused op input is not contiguous"),
    }
}

fn out<T: Real>(v: Vec<T>, shape: impl Into<Shape>, like: &Tensor) -> Result<Tensor> {
    Tensor::from_vec(v, shape, like.device())
}

/// Dispatches a generic body over the two supported dtypes.
macro_rules! by_dtype {
    ($dt:expr, $T:ident => $body:expr) => {
        match $dt {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::F64 => {
                type $T = f64;
                $body
            }
            d => bail!("fused ops support f32 and f64, not {d:?}"),
        }
    };
}

/// A read lock on a contiguous tensor's CPU data.
struct Lock<G> {
    g: G,
    lo: usize,
    hi: usize,
}

fn lock(t: &Tensor) -> Result<Lock<impl std::ops::Deref<Target = Storage> + '_>> {
    let (g, l) = t.storage_and_layout();
    let Some((lo, hi)) = l.contiguous_offsets() else {
        bail!("fused op input is not contiguous")
    };
    Ok(Lock { g, lo, hi })
}

impl<G: std::ops::Deref<Target = Storage>> Lock<G> {
    fn get<T: Real>(&self) -> Result<&[T]> {
        match &*self.g {
            Storage::Cpu(cs) => Ok(&cs.as_slice::<T>()?[self.lo..self.hi]),
            _ => bail!("fused ops run on the CPU"),
        }
    }
}

/// Binds contiguous copies (or the tensors themselves) and locks their data as slices.
macro_rules! slices {
    ($T:ty; $($name:ident = $t:expr),+ $(,)?) => {
        $( let $name = $t.contiguous()?; )+
        $( let $name = lock(&$name)?; )+
        $( let $name: &[$T] = $name.get::<$T>()?; )+
    };
}

fn store<T: Real>(v: Vec<T>) -> CpuStorage {
    T::to_cpu_storage_owned(v)
}

// ---------------------------------------------------------------------------------------------
// Token shift and mix.

/// Token shift and mix: from `x [B, T, C]` and `mix [K, C]` makes `[K, B, T, C]` with
/// `out_k[t] = x[t] + (x[t-1] - x[t]) · mix_k` (RWKV-5 to 7) or, with `v4`, the RWKV-4
/// convention `x[t] · mix_k + x[t-1] · (1 - mix_k)`. The token before the first is zero (each
/// training window starts from a fresh state).
pub struct ShiftMix {
    /// Tokens per sequence.
    pub t: usize,
    /// Channels.
    pub c: usize,
    /// RWKV-4 convention.
    pub v4: bool,
}

impl ShiftMix {
    fn eff<T: Real>(&self, m: T) -> T {
        if self.v4 {
            T::one() - m
        } else {
            m
        }
    }
    fn prev<'a, T: Real>(&self, x: &'a [T], row: usize) -> Option<&'a [T]> {
        let c = self.c;
        (!row.is_multiple_of(self.t)).then(|| &x[(row - 1) * c..row * c])
    }
    fn fwd<T: Real>(&self, x: &[T], mix: &[T]) -> Vec<T> {
        let c = self.c;
        let n = x.len();
        let mut o = vec![T::zero(); mix.len() / c * n];
        o.par_chunks_mut(n).enumerate().for_each(|(ki, ok)| {
            let m = &mix[ki * c..(ki + 1) * c];
            for (row, orow) in ok.chunks_mut(c).enumerate() {
                let cur = &x[row * c..(row + 1) * c];
                match self.prev(x, row) {
                    Some(p) => {
                        for j in 0..c {
                            orow[j] = cur[j] + (p[j] - cur[j]) * self.eff(m[j]);
                        }
                    }
                    None => {
                        for j in 0..c {
                            orow[j] = cur[j] - cur[j] * self.eff(m[j]);
                        }
                    }
                }
            }
        });
        o
    }
    fn bwd_t<T: Real>(&self, x: &[T], mix: &[T], g: &[T]) -> (Vec<T>, Vec<T>) {
        let c = self.c;
        let n = x.len();
        let k = mix.len() / c;
        let rows = n / c;
        let mut dx = vec![T::zero(); n];
        dx.par_chunks_mut(c).enumerate().for_each(|(row, d)| {
            let next = row + 1 < rows && (row + 1) % self.t != 0;
            for ki in 0..k {
                let m = &mix[ki * c..(ki + 1) * c];
                let gk = &g[ki * n..(ki + 1) * n];
                for j in 0..c {
                    let e = self.eff(m[j]);
                    d[j] += gk[row * c + j] * (T::one() - e);
                    if next {
                        d[j] += gk[(row + 1) * c + j] * e;
                    }
                }
            }
        });
        let mut dm = vec![T::zero(); k * c];
        dm.par_chunks_mut(c).enumerate().for_each(|(ki, d)| {
            let gk = &g[ki * n..(ki + 1) * n];
            for row in 0..rows {
                let cur = &x[row * c..(row + 1) * c];
                let gr = &gk[row * c..(row + 1) * c];
                let p = self.prev(x, row);
                for j in 0..c {
                    let pj = p.map_or(T::zero(), |p| p[j]);
                    d[j] += gr[j] * (pj - cur[j]);
                }
            }
            if self.v4 {
                d.iter_mut().for_each(|z| *z = -*z);
            }
        });
        (dx, dm)
    }
}

impl CustomOp2 for ShiftMix {
    fn name(&self) -> &'static str {
        "shift-mix"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let k = l2.shape().elem_count() / self.c;
        let mut dims = vec![k];
        dims.extend_from_slice(l1.shape().dims());
        by_dtype!(s1.dtype(), T => {
            let o = self.fwd(slice::<T>(s1, l1)?, slice::<T>(s2, l2)?);
            Ok((store(o), Shape::from(dims)))
        })
    }
    fn bwd(
        &self,
        x: &Tensor,
        mix: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        by_dtype!(x.dtype(), T => {
            slices!(T; xs = x, ms = mix, gs = g);
            let (dx, dm) = self.bwd_t(xs, ms, gs);
            Ok((Some(out(dx, x.shape(), x)?), Some(out(dm, mix.shape(), x)?)))
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Layer norm (and group norm).

/// Layer normalisation of `x [.., C]` with `weight [C]` and `bias [C]`, each row split into
/// `groups` groups normalised separately (1 for LayerNorm, the head count for RWKV's GroupNorm).
pub struct Norm {
    /// Channels.
    pub c: usize,
    /// Groups per row.
    pub groups: usize,
    /// Added to the variance.
    pub eps: f64,
}

/// Mean and reciprocal standard deviation of one group.
fn moments<T: Real>(x: &[T], eps: f64) -> (T, T) {
    let n = T::of(x.len() as f64);
    let mut mu = T::zero();
    x.iter().for_each(|&v| mu += v);
    mu /= n;
    let mut var = T::zero();
    x.iter().for_each(|&v| var += (v - mu) * (v - mu));
    (mu, T::one() / (var / n + T::of(eps)).sqrt())
}

/// The gradient through one group's normalisation: `dy` from `dn = d(normalised)`.
fn norm_back<T: Real>(xn: &[T], dn: &[T], rstd: T, dy: &mut [T]) {
    let n = T::of(xn.len() as f64);
    let (mut s1, mut s2) = (T::zero(), T::zero());
    for (a, b) in dn.iter().zip(xn) {
        s1 += *a;
        s2 += *a * *b;
    }
    let (m1, m2) = (s1 / n, s2 / n);
    for i in 0..xn.len() {
        dy[i] = (dn[i] - m1 - xn[i] * m2) * rstd;
    }
}

impl Norm {
    fn fwd<T: Real>(&self, x: &[T], w: &[T], b: &[T]) -> Vec<T> {
        let (c, gs) = (self.c, self.c / self.groups);
        let mut o = vec![T::zero(); x.len()];
        o.par_chunks_mut(c * 16)
            .zip(x.par_chunks(c * 16))
            .for_each(|(oc, xc)| {
                for (orow, xrow) in oc.chunks_mut(c).zip(xc.chunks(c)) {
                    for gi in 0..self.groups {
                        let s = gi * gs..(gi + 1) * gs;
                        let (mu, rstd) = moments(&xrow[s.clone()], self.eps);
                        for j in s {
                            orow[j] = (xrow[j] - mu) * rstd * w[j] + b[j];
                        }
                    }
                }
            });
        o
    }
    fn bwd_t<T: Real>(&self, x: &[T], w: &[T], g: &[T]) -> (Vec<T>, Vec<T>, Vec<T>) {
        let (c, gs) = (self.c, self.c / self.groups);
        let mut dx = vec![T::zero(); x.len()];
        let parts: Vec<Vec<T>> = dx
            .par_chunks_mut(c * 16)
            .zip(x.par_chunks(c * 16).zip(g.par_chunks(c * 16)))
            .map(|(dc, (xc, gc))| {
                let mut acc = vec![T::zero(); 2 * c];
                let mut xn = vec![T::zero(); gs];
                let mut dn = vec![T::zero(); gs];
                for ((drow, xrow), grow) in dc.chunks_mut(c).zip(xc.chunks(c)).zip(gc.chunks(c)) {
                    for gi in 0..self.groups {
                        let o = gi * gs;
                        let (mu, rstd) = moments(&xrow[o..o + gs], self.eps);
                        for j in 0..gs {
                            xn[j] = (xrow[o + j] - mu) * rstd;
                            dn[j] = grow[o + j] * w[o + j];
                            acc[o + j] += grow[o + j] * xn[j];
                            acc[c + o + j] += grow[o + j];
                        }
                        norm_back(&xn, &dn, rstd, &mut drow[o..o + gs]);
                    }
                }
                acc
            })
            .collect();
        let mut dw = vec![T::zero(); c];
        let mut db = vec![T::zero(); c];
        for p in parts {
            for j in 0..c {
                dw[j] += p[j];
                db[j] += p[c + j];
            }
        }
        (dx, dw, db)
    }
}

impl CustomOp3 for Norm {
    fn name(&self) -> &'static str {
        "norm"
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
        by_dtype!(s1.dtype(), T => {
            let o = self.fwd(slice::<T>(s1, l1)?, slice::<T>(s2, l2)?, slice::<T>(s3, l3)?);
            Ok((store(o), l1.shape().clone()))
        })
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        by_dtype!(x.dtype(), T => {
            slices!(T; xs = x, ws = w, gs = g);
            let (dx, dw, db) = self.bwd_t(xs, ws, gs);
            Ok((
                Some(out(dx, x.shape(), x)?),
                Some(out(dw, w.shape(), x)?),
                Some(out(db, b.shape(), x)?),
            ))
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Element-wise activations.

/// Element-wise activations whose backward needs only the input or the output.
#[derive(Clone, Copy, Debug)]
pub enum Act {
    /// `1 / (1 + e^-x)`.
    Sigmoid,
    /// `max(x, 0)²` (RWKV's channel mixing).
    ReluSq,
}

impl Act {
    fn f<T: Real>(self, x: T) -> T {
        match self {
            Act::Sigmoid => sigm(x),
            Act::ReluSq => {
                let r = x.maxr(T::zero());
                r * r
            }
        }
    }
    /// The derivative from the input `x` and the output `y`.
    fn df<T: Real>(self, x: T, y: T) -> T {
        match self {
            Act::Sigmoid => y * (T::one() - y),
            Act::ReluSq => T::of(2.0) * x.maxr(T::zero()),
        }
    }
}

impl CustomOp1 for Act {
    fn name(&self) -> &'static str {
        match self {
            Act::Sigmoid => "sigmoid",
            Act::ReluSq => "relu-sq",
        }
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype!(s.dtype(), T => {
            let x = slice::<T>(s, l)?;
            let mut o = vec![T::of(0.0); x.len()];
            o.par_chunks_mut(4096).zip(x.par_chunks(4096)).for_each(|(o, x)| {
                for (a, b) in o.iter_mut().zip(x) {
                    *a = self.f(*b);
                }
            });
            Ok((store(o), l.shape().clone()))
        })
    }
    fn bwd(&self, x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        by_dtype!(x.dtype(), T => {
            slices!(T; xs = x, ys = y, gs = g);
            let mut d = vec![T::of(0.0); xs.len()];
            d.par_chunks_mut(4096).enumerate().for_each(|(ci, d)| {
                let o = ci * 4096;
                for (i, z) in d.iter_mut().enumerate() {
                    *z = gs[o + i] * self.df(xs[o + i], ys[o + i]);
                }
            });
            Ok(Some(out(d, x.shape(), x)?))
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy with L2Wrap.

/// Mean cross-entropy of `logits [M, V]` against `targets`, as a scalar. Its backward also adds
/// RWKV-LM's L2Wrap term (`train_temp/src/model.py`, `class L2Wrap`): for each row,
/// `l2wrap / M · max(logits)` on the largest logit, which keeps logits from drifting upwards.
pub struct CrossEntropy {
    /// Target token of each row.
    pub targets: Vec<u32>,
    /// L2Wrap factor (RWKV-LM uses 1e-4; 0 turns it off).
    pub l2wrap: f64,
}

impl CrossEntropy {
    fn fwd<T: Real>(&self, x: &[T]) -> Result<T> {
        let m = self.targets.len();
        if m == 0 || !x.len().is_multiple_of(m) {
            bail!("cross-entropy: {} logits for {m} targets", x.len());
        }
        let v = x.len() / m;
        if let Some(t) = self.targets.iter().find(|&&t| t as usize >= v) {
            bail!("cross-entropy: target {t} outside the vocabulary of {v}");
        }
        let total: f64 = x
            .par_chunks(v)
            .zip(self.targets.par_iter())
            .map(|(row, &t)| {
                let mx = row.iter().fold(T::of(f64::NEG_INFINITY), |a, &b| a.maxr(b));
                let mut s = T::zero();
                row.iter().for_each(|&z| s += (z - mx).exp());
                (s.ln() + mx - row[t as usize]).to_f64()
            })
            .sum();
        Ok(T::of(total / m as f64))
    }
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype!(s.dtype(), T => {
            let loss = self.fwd(slice::<T>(s, l)?)?;
            Ok((store(vec![loss]), Shape::from(())))
        })
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let m = self.targets.len();
        by_dtype!(x.dtype(), T => {
            slices!(T; xs = x, gs = g);
            let v = xs.len() / m;
            let scale = gs[0] / T::of(m as f64);
            let l2 = T::of(self.l2wrap / m as f64);
            let mut d = vec![T::of(0.0); xs.len()];
            d.par_chunks_mut(v)
                .zip(xs.par_chunks(v).zip(self.targets.par_iter()))
                .for_each(|(d, (row, &t))| {
                    let (mut mx, mut arg) = (row[0], 0);
                    for (i, &z) in row.iter().enumerate() {
                        if z > mx {
                            mx = z;
                            arg = i;
                        }
                    }
                    let mut s = T::of(0.0);
                    for (dz, &z) in d.iter_mut().zip(row) {
                        *dz = (z - mx).exp();
                        s += *dz;
                    }
                    for dz in d.iter_mut() {
                        *dz = *dz / s * scale;
                    }
                    d[t as usize] -= scale;
                    d[arg] += l2 * mx;
                });
            Ok(Some(out(d, x.shape(), x)?))
        })
    }
}

// ---------------------------------------------------------------------------------------------
// RWKV-7 WKV.

/// Shapes of a batch of sequences split into heads.
#[derive(Clone, Copy, Debug)]
pub struct Heads {
    /// Sequences.
    pub b: usize,
    /// Tokens per sequence.
    pub t: usize,
    /// Heads.
    pub h: usize,
    /// Head size.
    pub n: usize,
}

impl Heads {
    fn c(&self) -> usize {
        self.h * self.n
    }
    fn plane(&self) -> usize {
        self.b * self.t * self.c()
    }
    fn check(&self, acts: usize, params: usize, what: &str) -> Result<()> {
        if acts != 6 * self.plane() || params != 5 * self.c() {
            bail!("{what}: inputs of {acts} and {params} values do not fit {self:?}");
        }
        Ok(())
    }
}

/// The per-token quantities of one head that the WKV-7 scan uses, derived from the raw
/// projections (RWKV-LM `RWKV_Tmix_x070.forward`): `kk = normalize(k·k_k)`, the state's
/// removal key `-kk` and replacement `kk·a`, the modified key `k·(1 + (a-1)·k_a)` and the decay.
struct Tok<T> {
    kk: Vec<T>,
    norm: T,
    b: Vec<T>,
    kmod: Vec<T>,
    decay: Vec<T>,
    sig: Vec<T>,
}

impl<T: Real> Tok<T> {
    fn new(n: usize) -> Self {
        Tok {
            kk: vec![T::zero(); n],
            norm: T::zero(),
            b: vec![T::zero(); n],
            kmod: vec![T::zero(); n],
            decay: vec![T::zero(); n],
            sig: vec![T::zero(); n],
        }
    }
    /// Derives the token's quantities; `saved` holds `sigmoid(w)` and the decay from the
    /// forward pass (so the backward pass computes no exponentials).
    #[inline(always)]
    fn fill(&mut self, w: &[T], k: &[T], a: &[T], k_k: &[T], k_a: &[T], saved: Option<&[T]>) {
        let n = k.len();
        let mut ss = T::zero();
        for j in 0..n {
            self.kk[j] = k[j] * k_k[j];
            ss += self.kk[j] * self.kk[j];
        }
        // F.normalize: x / max(‖x‖, 1e-12).
        self.norm = ss.sqrt().maxr(T::of(NORMALIZE_EPS));
        for j in 0..n {
            self.kk[j] /= self.norm;
            self.b[j] = self.kk[j] * a[j];
            self.kmod[j] = k[j] * (T::one() + (a[j] - T::one()) * k_a[j]);
        }
        match saved {
            Some(sd) => {
                self.sig.copy_from_slice(&sd[..n]);
                self.decay.copy_from_slice(&sd[n..2 * n]);
            }
            None => {
                for j in 0..n {
                    self.sig[j] = sigm(w[j]);
                    self.decay[j] = (-T::of(W_SCALE) * self.sig[j]).exp();
                }
            }
        }
    }
}

/// One step `S = S·diag(decay) + (S·(-kk)) bᵀ + v kmodᵀ` of a head's state (`S[i][j]`, value
/// index `i`, key index `j`), leaving `sa = S_prev·(-kk)` in `sa`; with `r`, also writes
/// `y = S r`. Row by row, so every inner loop is a contiguous, vectorisable sweep.
#[inline(always)]
fn wkv7_step<T: Real>(
    s: &mut [T],
    tk: &Tok<T>,
    v: &[T],
    sa: &mut [T],
    ry: Option<(&[T], &mut [T])>,
) {
    let n = v.len();
    let (kk, decay, b, kmod) = (&tk.kk[..n], &tk.decay[..n], &tk.b[..n], &tk.kmod[..n]);
    let mut ry = ry;
    for (i, row) in s.chunks_exact_mut(n).enumerate() {
        let row = &mut row[..n];
        let acc = -dot(row, kk);
        sa[i] = acc;
        let vi = v[i];
        for (((x, d), b), k) in row.iter_mut().zip(decay).zip(b).zip(kmod) {
            *x = *x * *d + acc * *b + vi * *k;
        }
        if let Some((r, y)) = ry.as_mut() {
            y[i] = dot(row, r);
        }
    }
}

/// `Σ a·b` with eight partial sums (a single running sum is a serial chain).
#[inline(always)]
fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [T::zero(); 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let mut tail = T::zero();
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail += *x * *y;
    }
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    sum8(acc) + tail
}

/// `y += a·x`.
#[inline(always)]
fn axpy<T: Real>(y: &mut [T], a: T, x: &[T]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * *x;
    }
}

/// `y += a ⊙ b`.
#[inline(always)]
fn mul_acc<T: Real>(y: &mut [T], a: &[T], b: &[T]) {
    for ((y, a), b) in y.iter_mut().zip(a).zip(b) {
        *y += *a * *b;
    }
}

/// The sum of eight partial sums.
#[inline(always)]
fn sum8<T: Real>(x: [T; 8]) -> T {
    ((x[0] + x[4]) + (x[1] + x[5])) + ((x[2] + x[6]) + (x[3] + x[7]))
}

/// The RWKV-7 WKV scan: from `acts [6, B, T, C]` (receptance, decay logits `w`, key, value,
/// in-context learning rate `a`, gate) and `params [5, C]` (`k_k`, `k_a`, `r_k`, `ln_x.weight`,
/// `ln_x.bias`) makes `y [B, T, C]` with `y_t = S_t r_t` per head, from a zero state.
/// The raw inputs go in (not `kk`, `-kk`, `kk·a`, the decay), so the normalisation and the decay
/// activation are part of the op and of its exact backward.
pub struct Wkv7 {
    /// Shapes.
    pub d: Heads,
    saved: Mutex<Option<CpuStorage>>,
}

impl Wkv7 {
    /// The op for these shapes.
    pub fn new(d: Heads) -> Self {
        Wkv7 {
            d,
            saved: Mutex::new(None),
        }
    }

    /// Offsets of head `h` of token `ti` of sequence `bi` in a `[B, T, C]` plane.
    fn at(&self, bi: usize, ti: usize, h: usize) -> usize {
        (bi * self.d.t + ti) * self.d.c() + h * self.d.n
    }

    #[inline(always)]
    fn fwd_task<T: Real>(&self, acts: &[T], p: &[T], task: usize) -> (Vec<T>, Vec<T>) {
        let Heads { b: _, t, h, n } = self.d;
        let (pl, c) = (self.d.plane(), self.d.c());
        let nck = t.div_ceil(WKV_CHUNK);
        let (bi, hi) = (task / h, task % h);
        let hs = hi * n..(hi + 1) * n;
        let (k_k, k_a) = (&p[hs.clone()], &p[c + hi * n..c + (hi + 1) * n]);
        let mut s = vec![T::zero(); n * n];
        // Checkpoints, then sigmoid(w) and the decay of every token (for the backward pass).
        let mut ck = vec![T::zero(); nck * n * n + 2 * t * n];
        let mut y = vec![T::zero(); t * n];
        let mut tk = Tok::new(n);
        let mut sa = vec![T::zero(); n];
        for ti in 0..t {
            if ti % WKV_CHUNK == 0 {
                let q = ti / WKV_CHUNK;
                ck[q * n * n..(q + 1) * n * n].copy_from_slice(&s);
            }
            let o = self.at(bi, ti, hi);
            let g = |slot: usize| &acts[slot * pl + o..slot * pl + o + n];
            tk.fill(g(1), g(2), g(4), k_k, k_a, None);
            let sd = nck * n * n + ti * 2 * n;
            ck[sd..sd + n].copy_from_slice(&tk.sig);
            ck[sd + n..sd + 2 * n].copy_from_slice(&tk.decay);
            let yt = &mut y[ti * n..(ti + 1) * n];
            wkv7_step(&mut s, &tk, g(3), &mut sa, Some((g(0), yt)));
        }
        (y, ck)
    }

    #[inline(always)]
    fn bwd_task<T: Real>(
        &self,
        acts: &[T],
        p: &[T],
        ck: &[T],
        gy: &[T],
        task: usize,
    ) -> (Vec<T>, Vec<T>) {
        let Heads { b: _, t, h, n } = self.d;
        let (pl, c) = (self.d.plane(), self.d.c());
        let nck = t.div_ceil(WKV_CHUNK);
        let nn = n * n;
        let (bi, hi) = (task / h, task % h);
        let (k_k, k_a) = (&p[hi * n..(hi + 1) * n], &p[c + hi * n..c + (hi + 1) * n]);
        // Gradients of this head's r, w, k, v, a rows, [5, T, N].
        let mut d = vec![T::zero(); 5 * t * n];
        let mut dpar = vec![T::zero(); 2 * n];
        let mut ds = vec![T::zero(); nn];
        let mut states = vec![T::zero(); (WKV_CHUNK + 1) * nn];
        let mut toks: Vec<Tok<T>> = (0..WKV_CHUNK).map(|_| Tok::new(n)).collect();
        let mut sas = vec![T::zero(); WKV_CHUNK * n];
        let mut dkk = vec![T::zero(); n];
        let (mut dkmod, mut db) = (vec![T::zero(); n], vec![T::zero(); n]);
        let mut ddecay = vec![T::zero(); n];
        let per = nck * nn + 2 * t * n;
        let ckh = &ck[task * per..(task + 1) * per];
        for q in (0..nck).rev() {
            let (t0, t1) = (q * WKV_CHUNK, ((q + 1) * WKV_CHUNK).min(t));
            // Recompute the chunk's states from its checkpoint.
            states[..nn].copy_from_slice(&ckh[q * nn..(q + 1) * nn]);
            for ti in t0..t1 {
                let li = ti - t0;
                let o = self.at(bi, ti, hi);
                let g = |slot: usize| &acts[slot * pl + o..slot * pl + o + n];
                let sd = nck * nn + ti * 2 * n;
                toks[li].fill(g(1), g(2), g(4), k_k, k_a, Some(&ckh[sd..sd + 2 * n]));
                let (prev, next) = states.split_at_mut((li + 1) * nn);
                next[..nn].copy_from_slice(&prev[li * nn..]);
                wkv7_step(
                    &mut next[..nn],
                    &toks[li],
                    g(3),
                    &mut sas[li * n..(li + 1) * n],
                    None,
                );
            }
            for ti in (t0..t1).rev() {
                let li = ti - t0;
                let o = self.at(bi, ti, hi);
                let g = |slot: usize| &acts[slot * pl + o..slot * pl + o + n];
                let (r, v, a, k) = (g(0), g(3), g(4), g(2));
                let tk = &toks[li];
                let sa = &sas[li * n..(li + 1) * n];
                let sprev = &states[li * nn..(li + 1) * nn];
                let scur = &states[(li + 1) * nn..(li + 2) * nn];
                let dy = &gy[o..o + n];
                // Row i of: y = S r; S = S_prev·diag(decay) + sa bᵀ + v kmodᵀ with
                // sa = S_prev·(-kk); and the state gradient flowing back to S_prev.
                let dr = &mut d[ti * n..(ti + 1) * n];
                dr.iter_mut().for_each(|z| *z = T::zero());
                dkmod.iter_mut().for_each(|z| *z = T::zero());
                db.iter_mut().for_each(|z| *z = T::zero());
                ddecay.iter_mut().for_each(|z| *z = T::zero());
                dkk.iter_mut().for_each(|z| *z = T::zero());
                let mut dvs = [T::zero(); 256];
                let (kmod, bv, kkv, dec) = (&tk.kmod[..n], &tk.b[..n], &tk.kk[..n], &tk.decay[..n]);
                let (dkmod, db, ddecay, dkk) = (
                    &mut dkmod[..n],
                    &mut db[..n],
                    &mut ddecay[..n],
                    &mut dkk[..n],
                );
                let (r, dr) = (&r[..n], &mut dr[..n]);
                for i in 0..n {
                    let row = &mut ds[i * n..(i + 1) * n];
                    let sc = &scur[i * n..(i + 1) * n];
                    let sp = &sprev[i * n..(i + 1) * n];
                    let (dyi, vi, sai) = (dy[i], v[i], sa[i]);
                    // Simple passes over one row (in L1), each one vectorisable.
                    axpy(dr, dyi, sc);
                    axpy(row, dyi, r);
                    dvs[i] = dot(row, kmod);
                    let dsai = dot(row, bv);
                    axpy(dkmod, vi, row);
                    axpy(db, sai, row);
                    mul_acc(ddecay, row, sp);
                    axpy(dkk, -dsai, sp);
                    for ((x, d), k) in row.iter_mut().zip(dec).zip(kkv) {
                        *x = *x * *d - dsai * *k;
                    }
                }
                d[(3 * t + ti) * n..(3 * t + ti + 1) * n].copy_from_slice(&dvs[..n]);
                // Through b = kk·a, kmod = k(1 + (a-1)k_a), kk = normalize(k·k_k)
                // and decay = exp(-e^-0.5·sigmoid(w)).
                let mut dot = T::zero();
                for j in 0..n {
                    dkk[j] += db[j] * a[j];
                    dot += dkk[j] * tk.kk[j];
                }
                let unclamped = tk.norm > T::of(NORMALIZE_EPS);
                for j in 0..n {
                    let da = db[j] * tk.kk[j] + dkmod[j] * k[j] * k_a[j];
                    dpar[n + j] += dkmod[j] * k[j] * (a[j] - T::one());
                    let mut dk = dkmod[j] * (T::one() + (a[j] - T::one()) * k_a[j]);
                    let draw = if unclamped {
                        (dkk[j] - tk.kk[j] * dot) / tk.norm
                    } else {
                        dkk[j] / tk.norm
                    };
                    dk += draw * k_k[j];
                    dpar[j] += draw * k[j];
                    let sg = tk.sig[j];
                    let dw = ddecay[j] * tk.decay[j] * (-T::of(W_SCALE)) * sg * (T::one() - sg);
                    d[(t + ti) * n + j] = dw;
                    d[(2 * t + ti) * n + j] = dk;
                    d[(4 * t + ti) * n + j] = da;
                }
            }
        }
        (d, dpar)
    }

    fn fwd<T: Real>(&self, acts: &[T], p: &[T]) -> (Vec<T>, Vec<T>) {
        let Heads { b, t, h, n } = self.d;
        let pl = self.d.plane();
        let nck = t.div_ceil(WKV_CHUNK);
        let parts: Vec<(Vec<T>, Vec<T>)> = (0..b * h)
            .into_par_iter()
            .map(|task| dispatch!(self.fwd_task(acts, p, task)))
            .collect();
        let mut y = vec![T::zero(); pl];
        let mut ck = Vec::with_capacity(b * h * (nck * n * n + 2 * t * n));
        for (task, (yt, c)) in parts.into_iter().enumerate() {
            let (bi, hi) = (task / h, task % h);
            for ti in 0..t {
                let o = self.at(bi, ti, hi);
                y[o..o + n].copy_from_slice(&yt[ti * n..(ti + 1) * n]);
            }
            ck.extend_from_slice(&c);
        }
        (y, ck)
    }

    fn bwd_t<T: Real>(&self, acts: &[T], p: &[T], ck: &[T], gy: &[T]) -> (Vec<T>, Vec<T>) {
        let Heads { b, t, h, n } = self.d;
        let (pl, c) = (self.d.plane(), self.d.c());
        let parts: Vec<(Vec<T>, Vec<T>)> = (0..b * h)
            .into_par_iter()
            .map(|task| dispatch!(self.bwd_task(acts, p, ck, gy, task)))
            .collect();
        let mut da = vec![T::zero(); 6 * pl];
        let mut dp = vec![T::zero(); 5 * c];
        for (task, (d, dpar)) in parts.into_iter().enumerate() {
            let (bi, hi) = (task / h, task % h);
            for slot in 0..5 {
                for ti in 0..t {
                    let o = slot * pl + self.at(bi, ti, hi);
                    da[o..o + n].copy_from_slice(&d[(slot * t + ti) * n..(slot * t + ti + 1) * n]);
                }
            }
            for j in 0..n {
                dp[hi * n + j] += dpar[j];
                dp[c + hi * n + j] += dpar[n + j];
            }
        }
        (da, dp)
    }
}

impl CustomOp2 for Wkv7 {
    fn name(&self) -> &'static str {
        "wkv7"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        by_dtype!(s1.dtype(), T => {
            let (acts, p) = (slice::<T>(s1, l1)?, slice::<T>(s2, l2)?);
            self.d.check(acts.len(), p.len(), "wkv7")?;
            let (y, ck) = self.fwd(acts, p);
            *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(store(ck));
            Ok((store(y), Shape::from((self.d.b, self.d.t, self.d.c()))))
        })
    }
    fn bwd(
        &self,
        acts: &Tensor,
        params: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let saved = self.saved.lock().unwrap_or_else(|e| e.into_inner());
        let Some(ck) = saved.as_ref() else {
            bail!("wkv7: backward without forward")
        };
        by_dtype!(acts.dtype(), T => {
            slices!(T; a = acts, p = params, gs = g);
            let (da, dp) = self.bwd_t(a, p, ck.as_slice::<T>()?, gs);
            Ok((Some(out(da, acts.shape(), acts)?), Some(out(dp, params.shape(), acts)?)))
        })
    }
}

/// The backward inputs and outputs of one row of [`Wkv7Out`]: the output gradient, and the
/// gradients of `y`, of the row's six activations and of the (shared) parameters.
type Back<'a, T> = Option<(&'a [T], &'a mut [T], &'a mut [T], &'a mut [T])>;

/// The end of RWKV-7 time mixing: `(GroupNorm(y) + (Σ r·kmod·r_k per head)·v) · g`, from the
/// WKV output `y [B, T, C]` and the same `acts` and `params` as [`Wkv7`].
pub struct Wkv7Out {
    /// Shapes.
    pub d: Heads,
    /// GroupNorm epsilon (RWKV-7: `64e-5`).
    pub eps: f64,
}

impl Wkv7Out {
    /// Forward for one row (token) of all heads; with `dout`, also its backward.
    #[allow(clippy::too_many_arguments)]
    fn row<T: Real>(
        &self,
        y: &[T],
        [r, k, v, a, g]: [&[T]; 5],
        p: &[T],
        o: &mut [T],
        back: Back<'_, T>,
    ) {
        let (h, n, c) = (self.d.h, self.d.n, self.d.c());
        let (k_a, r_k, lw, lb) = (
            &p[c..2 * c],
            &p[2 * c..3 * c],
            &p[3 * c..4 * c],
            &p[4 * c..],
        );
        let mut back = back;
        let mut yn = [T::zero(); 256];
        let mut kmod = [T::zero(); 256];
        let mut dn = [T::zero(); 256];
        for hi in 0..h {
            let s = hi * n;
            let (mu, rstd) = moments(&y[s..s + n], self.eps);
            let mut bonus = T::zero();
            for j in 0..n {
                yn[j] = (y[s + j] - mu) * rstd;
                kmod[j] = k[s + j] * (T::one() + (a[s + j] - T::one()) * k_a[s + j]);
                bonus += r[s + j] * kmod[j] * r_k[s + j];
            }
            for j in 0..n {
                let z = yn[j] * lw[s + j] + lb[s + j];
                o[s + j] = (z + bonus * v[s + j]) * g[s + j];
            }
            if let Some((dout, dy, dacts, dp)) = back.as_mut() {
                // dacts is [6, C] for this row: r, w, k, v, a, g; dp is [5, C].
                let mut dbonus = T::zero();
                for j in 0..n {
                    let z = yn[j] * lw[s + j] + lb[s + j];
                    let dz = dout[s + j] * g[s + j];
                    dacts[5 * c + s + j] = dout[s + j] * (z + bonus * v[s + j]);
                    dacts[3 * c + s + j] = dz * bonus;
                    dbonus += dz * v[s + j];
                    dp[3 * c + s + j] += dz * yn[j];
                    dp[4 * c + s + j] += dz;
                    dn[j] = dz * lw[s + j];
                }
                norm_back(&yn[..n], &dn[..n], rstd, &mut dy[s..s + n]);
                for j in 0..n {
                    let q = s + j;
                    dacts[q] = dbonus * kmod[j] * r_k[q];
                    let dkmod = dbonus * r[q] * r_k[q];
                    dp[2 * c + q] += dbonus * r[q] * kmod[j];
                    dacts[2 * c + q] = dkmod * (T::one() + (a[q] - T::one()) * k_a[q]);
                    dacts[4 * c + q] = dkmod * k[q] * k_a[q];
                    dp[c + q] += dkmod * k[q] * (a[q] - T::one());
                }
            }
        }
    }

    fn fwd<T: Real>(&self, y: &[T], acts: &[T], p: &[T]) -> Vec<T> {
        let (pl, c) = (self.d.plane(), self.d.c());
        let mut o = vec![T::zero(); pl];
        o.par_chunks_mut(c).enumerate().for_each(|(row, orow)| {
            let at = |slot: usize| &acts[slot * pl + row * c..slot * pl + (row + 1) * c];
            let ins = [at(0), at(2), at(3), at(4), at(5)];
            self.row(&y[row * c..(row + 1) * c], ins, p, orow, None);
        });
        o
    }

    fn bwd_t<T: Real>(&self, y: &[T], acts: &[T], p: &[T], gout: &[T]) -> (Vec<T>, Vec<T>, Vec<T>) {
        let (pl, c) = (self.d.plane(), self.d.c());
        const ROWS: usize = 32;
        let rows = pl / c;
        let parts: Vec<(Vec<T>, Vec<T>, Vec<T>)> = (0..rows.div_ceil(ROWS))
            .into_par_iter()
            .map(|blk| {
                let (r0, r1) = (blk * ROWS, ((blk + 1) * ROWS).min(rows));
                let mut dy = vec![T::zero(); (r1 - r0) * c];
                let mut dacts = vec![T::zero(); (r1 - r0) * 6 * c];
                let mut dp = vec![T::zero(); 5 * c];
                let mut o = vec![T::zero(); c];
                for row in r0..r1 {
                    let at = |slot: usize| &acts[slot * pl + row * c..slot * pl + (row + 1) * c];
                    let ins = [at(0), at(2), at(3), at(4), at(5)];
                    let li = row - r0;
                    self.row(
                        &y[row * c..(row + 1) * c],
                        ins,
                        p,
                        &mut o,
                        Some((
                            &gout[row * c..(row + 1) * c],
                            &mut dy[li * c..(li + 1) * c],
                            &mut dacts[li * 6 * c..(li + 1) * 6 * c],
                            &mut dp,
                        )),
                    );
                }
                (dy, dacts, dp)
            })
            .collect();
        let mut dy = Vec::with_capacity(pl);
        let mut da = vec![T::zero(); 6 * pl];
        let mut dp = vec![T::zero(); 5 * c];
        for (blk, (y, a, p)) in parts.into_iter().enumerate() {
            dy.extend_from_slice(&y);
            for (li, ar) in a.chunks(6 * c).enumerate() {
                let row = blk * ROWS + li;
                for slot in 0..6 {
                    let o = slot * pl + row * c;
                    da[o..o + c].copy_from_slice(&ar[slot * c..(slot + 1) * c]);
                }
            }
            for (x, z) in dp.iter_mut().zip(p) {
                *x += z;
            }
        }
        (dy, da, dp)
    }
}

impl CustomOp3 for Wkv7Out {
    fn name(&self) -> &'static str {
        "wkv7-out"
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
        if self.d.n > 256 {
            bail!("head size {} above 256 is not supported", self.d.n);
        }
        by_dtype!(s1.dtype(), T => {
            let (y, acts, p) = (slice::<T>(s1, l1)?, slice::<T>(s2, l2)?, slice::<T>(s3, l3)?);
            self.d.check(acts.len(), p.len(), "wkv7-out")?;
            Ok((store(self.fwd(y, acts, p)), l1.shape().clone()))
        })
    }
    fn bwd(
        &self,
        y: &Tensor,
        acts: &Tensor,
        params: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        by_dtype!(y.dtype(), T => {
            slices!(T; ys = y, a = acts, p = params, gs = g);
            let (dy, da, dp) = self.bwd_t(ys, a, p, gs);
            Ok((
                Some(out(dy, y.shape(), y)?),
                Some(out(da, acts.shape(), y)?),
                Some(out(dp, params.shape(), y)?),
            ))
        })
    }
}

// ---------------------------------------------------------------------------------------------
// RWKV-4 WKV.

/// The RWKV-4 WKV: from `kv [2, B, T, C]` (key, value) and `params [2, C]` (`time_decay`,
/// `time_first`) makes `y [B, T, C]`,
/// `y_t = (Σ_{i<t} e^{(t-1-i)w + k_i} v_i + e^{u+k_t} v_t) / (Σ_{i<t} e^{(t-1-i)w + k_i} + e^{u+k_t})`
/// with `w = -exp(time_decay)` and `u = time_first`, per channel from a zero state.
///
/// Both passes keep every exponential at or below 1 by carrying a running maximum exponent, as
/// the official kernel does: forward, the state is `(aa, bb, pp)` with `a = aa·e^pp`; backward,
/// the adjoints of `a` and `b` are carried as `α = Â·e^-r` with `r` the smallest exponent of their
/// terms, so every factor that multiplies them (`e^{k_t - r}`, `e^{pp + w - r}`) is at most 1.
pub struct Wkv4 {
    /// Sequences.
    pub b: usize,
    /// Tokens per sequence.
    pub t: usize,
    /// Channels.
    pub c: usize,
}

/// Forward values of one channel at one token: the state before it (`aa`, `bb`, `pp`), the
/// normaliser's exponent `m`, the scaled denominator `dd` and the output.
#[derive(Clone, Copy)]
struct Fw4<T> {
    aa: T,
    bb: T,
    pp: T,
    m: T,
    dd: T,
    y: T,
}

impl Wkv4 {
    fn chan<T: Real>(&self, kv: &[T], p: &[T], bi: usize, ci: usize, rec: &mut Vec<Fw4<T>>) {
        let (t, c) = (self.t, self.c);
        let pl = self.b * t * c;
        let w = -p[ci].exp();
        let u = p[c + ci];
        let (mut aa, mut bb, mut pp) = (T::zero(), T::zero(), T::of(-1e30));
        rec.clear();
        for ti in 0..t {
            let o = (bi * t + ti) * c + ci;
            let (k, v) = (kv[o], kv[pl + o]);
            let ww = u + k;
            let m = pp.maxr(ww);
            let (e1, e2) = ((pp - m).exp(), (ww - m).exp());
            let dd = e1 * bb + e2;
            let y = (e1 * aa + e2 * v) / dd;
            rec.push(Fw4 {
                aa,
                bb,
                pp,
                m,
                dd,
                y,
            });
            let ww = pp + w;
            let q = ww.maxr(k);
            let (e1, e2) = ((ww - q).exp(), (k - q).exp());
            aa = e1 * aa + e2 * v;
            bb = e1 * bb + e2;
            pp = q;
        }
    }

    fn fwd<T: Real>(&self, kv: &[T], p: &[T]) -> Vec<T> {
        let (t, c) = (self.t, self.c);
        let cols: Vec<Vec<T>> = (0..self.b * c)
            .into_par_iter()
            .map_init(Vec::new, |rec, task| {
                self.chan(kv, p, task / c, task % c, rec);
                rec.iter().map(|f| f.y).collect()
            })
            .collect();
        let mut y = vec![T::zero(); self.b * t * c];
        for (task, col) in cols.into_iter().enumerate() {
            let (bi, ci) = (task / c, task % c);
            for (ti, v) in col.into_iter().enumerate() {
                y[(bi * t + ti) * c + ci] = v;
            }
        }
        y
    }

    fn bwd_t<T: Real>(&self, kv: &[T], p: &[T], gy: &[T]) -> (Vec<T>, Vec<T>) {
        let (t, c) = (self.t, self.c);
        let pl = self.b * t * c;
        // Per task: dk and dv of each token, then d(time_decay), d(time_first).
        let parts: Vec<(Vec<T>, T, T)> = (0..self.b * c)
            .into_par_iter()
            .map_init(Vec::new, |rec, task| {
                let (bi, ci) = (task / c, task % c);
                self.chan(kv, p, bi, ci, rec);
                let w = -p[ci].exp();
                let u = p[c + ci];
                let mut d = vec![T::zero(); 2 * t];
                let (mut dw, mut du) = (T::zero(), T::zero());
                // Adjoints of a_{t+1}, b_{t+1} as (Â, B̂, r); None past the last token.
                let mut next: Option<(T, T, T)> = None;
                for ti in (0..t).rev() {
                    let o = (bi * t + ti) * c + ci;
                    let (k, v, g) = (kv[o], kv[pl + o], gy[o]);
                    let f = rec[ti];
                    // Direct use of k_t, v_t in y_t through e^{u+k_t}.
                    let e = (u + k - f.m).exp() / f.dd;
                    let dyk = g * (v - f.y) * e;
                    du += dyk;
                    let (mut dk, mut dv) = (dyk, g * e);
                    // Through a_{t+1} = e^w a_t + e^k v, b_{t+1} = e^w b_t + e^k.
                    if let Some((ah, bh, r)) = next {
                        let ek = (k - r).exp();
                        dk += ek * (v * ah + bh);
                        dv += ek * ah;
                        let s = (w - r + f.pp).exp();
                        dw += s * (ah * f.aa + bh * f.bb);
                    }
                    // Adjoints at t: α_t = g/D_t + e^w α_{t+1}, β_t = -g·y/D_t + e^w β_{t+1}.
                    let (ga, gb) = (g / f.dd, -g * f.y / f.dd);
                    next = Some(match next {
                        None => (ga, gb, f.m),
                        Some((ah, bh, r)) => {
                            // r_t = min(m_t, r_{t+1} - w): the largest scale of α_t.
                            let cand = r - w;
                            let rt = if f.m < cand { f.m } else { cand };
                            let s1 = (rt - f.m).exp();
                            let s2 = (w - r + rt).exp();
                            (ga * s1 + ah * s2, gb * s1 + bh * s2, rt)
                        }
                    });
                    d[ti] = dk;
                    d[t + ti] = dv;
                }
                // w = -exp(time_decay).
                (d, dw * w, du)
            })
            .collect();
        let mut dkv = vec![T::zero(); 2 * pl];
        let mut dp = vec![T::zero(); 2 * c];
        for (task, (d, dtd, du)) in parts.into_iter().enumerate() {
            let (bi, ci) = (task / c, task % c);
            for ti in 0..t {
                let o = (bi * t + ti) * c + ci;
                dkv[o] = d[ti];
                dkv[pl + o] = d[t + ti];
            }
            dp[ci] += dtd;
            dp[c + ci] += du;
        }
        (dkv, dp)
    }
}

impl CustomOp2 for Wkv4 {
    fn name(&self) -> &'static str {
        "wkv4"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        by_dtype!(s1.dtype(), T => {
            let (kv, p) = (slice::<T>(s1, l1)?, slice::<T>(s2, l2)?);
            if kv.len() != 2 * self.b * self.t * self.c || p.len() != 2 * self.c {
                bail!("wkv4: inputs of {} and {} values do not fit b={} t={} c={}",
                    kv.len(), p.len(), self.b, self.t, self.c);
            }
            Ok((store(self.fwd(kv, p)), Shape::from((self.b, self.t, self.c))))
        })
    }
    fn bwd(
        &self,
        kv: &Tensor,
        params: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        by_dtype!(kv.dtype(), T => {
            slices!(T; k = kv, p = params, gs = g);
            let (dkv, dp) = self.bwd_t(k, p, gs);
            Ok((Some(out(dkv, kv.shape(), kv)?), Some(out(dp, params.shape(), kv)?)))
        })
    }
}
