//! The matrix products of the hand-written passes: which parameters are matrices (from the
//! generation's schema), the forms of the weights the products read ([`Prepared`], remade
//! once per optimizer step), and the products themselves on the calling thread, with
//! transposes expressed as strides instead of copies.

use crate::params::Params;
use rayon::prelude::*;
use rwkv_core::error::{Error, Result};
use rwkv_core::kernels::sgemm::{gemm, gemm_bf16, gemm_bf16_packed, PackedB};
use rwkv_core::schema::{self, Role};
use rwkv_core::tensor::{Layout, Matrix};

/// The matrix parameters of one model and the precision its products run in.
pub struct Products {
    /// The matrices, by parameter index (`None` for the other parameters).
    mats: Vec<Option<Mat>>,
    /// Every parameter's length.
    lens: Vec<usize>,
    /// Matrix products with bfloat16 inputs ([`Products::set_bf16`]).
    bf16: bool,
    /// The matrices and the embedding are not trained ([`Products::set_frozen`]).
    frozen: bool,
    /// By parameter: a matrix or the embedding table (the tensors freezing leaves without
    /// gradient buffers).
    large: Vec<bool>,
    /// By parameter: the low-rank adapter on a linear weight ([`Products::set_adapter`]).
    adapters: Vec<Option<Adapter>>,
}

/// A low-rank adapter (LoRA) on a linear weight `W [n, k]`: the products use
/// `W + scale·B·A` with `A [r, k]` and `B [n, r]` (RWKV-PEFT's `lora_A`, `lora_B`), whose
/// values the [`Prepared`] forms carry; the weight's gradient buffer holds `dA` then `dB`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Adapter {
    /// Rank r.
    pub rank: usize,
    /// `alpha / r`.
    pub scale: f32,
}

impl Products {
    /// The matrices among the parameters, as their schema says (f32 products).
    pub fn new(params: &Params) -> Result<Products> {
        let mut mats: Vec<Option<Mat>> = vec![None; params.names().len()];
        let mut large = vec![false; params.names().len()];
        for p in schema::params(params.schema()) {
            if matches!(p.role, Role::Matrix(_) | Role::Table) {
                large[params.find(&p.name)?] = true;
            }
            if let (Role::Matrix(layout), &[a, b]) = (p.role, p.shape.as_slice()) {
                mats[params.find(&p.name)?] = Some(match layout {
                    Layout::OutIn => Mat {
                        k: b,
                        n: a,
                        linear: true,
                    },
                    Layout::InOut => Mat {
                        k: a,
                        n: b,
                        linear: false,
                    },
                });
            }
        }
        Ok(Products {
            mats,
            lens: params.shapes().iter().map(|s| s.iter().product()).collect(),
            bf16: false,
            frozen: false,
            adapters: vec![None; large.len()],
            large,
        })
    }

    /// Puts a low-rank adapter of `rank` on linear weight `i` (LoRA tuning; with the weights
    /// frozen, the adapters are what the backward pass computes gradients for).
    pub fn set_adapter(&mut self, i: usize, rank: usize, scale: f32) -> Result<()> {
        match self.mats.get(i) {
            Some(Some(m)) if m.linear && rank > 0 => {
                self.adapters[i] = Some(Adapter { rank, scale });
                Ok(())
            }
            _ => Err(Error::Internal(format!(
                "parameter {i} is not a linear weight"
            ))),
        }
    }

    /// The adapter on parameter `i`, if any.
    pub fn adapter(&self, i: usize) -> Option<Adapter> {
        self.adapters.get(i).copied().flatten()
    }

    /// The sizes of adapter `i`'s `A` and `B` (`r·k`, `n·r`).
    fn adapter_sizes(&self, i: usize) -> Option<(usize, usize)> {
        let (ad, m) = (self.adapter(i)?, self.mats[i]?);
        Some((ad.rank * m.k, m.n * ad.rank))
    }

    /// Freezes the weight matrices and the embedding (state tuning): the backward pass then
    /// skips their gradients' products, and [`Products::zero_grads`] gives them no buffers,
    /// so that only the activations' gradients (and the small vectors') are computed.
    pub fn set_frozen(&mut self, on: bool) {
        self.frozen = on;
    }

    /// Whether the matrices and the embedding are frozen.
    pub fn frozen(&self) -> bool {
        self.frozen
    }

    /// Runs the matrix products with their inputs rounded to bfloat16 and f32 sums
    /// (mixed precision, as RWKV-LM trains): twice the rate on CPUs that multiply bfloat16
    /// pairs ([`rwkv_core::cpu::has_avx512_bf16`]), f32 products elsewhere. Everything else
    /// (the WKV scan, the norms, the parameters and their gradients) stays f32.
    pub fn set_bf16(&mut self, on: bool) {
        self.bf16 = on && rwkv_core::cpu::has_avx512_bf16();
    }

    /// Whether the products take bfloat16 inputs.
    pub fn bf16(&self) -> bool {
        self.bf16
    }

    /// Makes the weights' forms the products read ([`Prepared`]), on the pool, after every
    /// change of the weights: in f32 the `[in, out]` transposes of the linear weights (the
    /// forward pass then reads every weight's rows in place instead of gathering its columns
    /// in every product) and copies of the LoRA matrices; in bfloat16 every matrix packed
    /// twice, for the forward product and for the input gradient's.
    pub fn prepare(&self, p: &[&[f32]], out: &mut Prepared) {
        out.fwd.resize_with(p.len(), || Operand::None);
        out.bwd.resize_with(p.len(), || Operand::None);
        let jobs = out.fwd.par_iter_mut().zip(out.bwd.par_iter_mut());
        jobs.enumerate().for_each(|(i, (f, b))| {
            // A weight not held in memory ([`Products::prepare_stored`] made its form).
            if !p[i].is_empty() {
                self.prepare_into(i, p[i], f, b);
            }
        });
    }

    fn prepare_into(&self, i: usize, w: &[f32], f: &mut Operand, b: &mut Operand) {
        let Some(m) = &self.mats[i] else {
            return;
        };
        let (k, n) = (m.k, m.n);
        // The forward product's B is `[k, n]`: a linear weight `[n, k]` read transposed,
        // a LoRA matrix as it is; the input gradient's B is its transpose.
        let (fs, bs) = if m.linear {
            ((1, k), (k, 1))
        } else {
            ((n, 1), (1, n))
        };
        if self.bf16 {
            for (o, kk, nn, st) in [(&mut *f, k, n, fs), (&mut *b, n, k, bs)] {
                match o {
                    Operand::Bf16(pb) if pb.shape() == (kk, nn) => pb.repack(w, st),
                    _ => {
                        if let Some(pb) = PackedB::new(kk, nn, w, st) {
                            *o = Operand::Bf16(pb);
                        }
                    }
                }
            }
            return;
        }
        *b = Operand::None;
        if !matches!(f, Operand::F32(_)) {
            *f = Operand::F32(Vec::new());
        }
        let Operand::F32(o) = f else {
            unreachable!("just set")
        };
        o.resize(w.len(), 0.0);
        if !m.linear {
            o.copy_from_slice(w);
            return;
        }
        // In 16 × 16 blocks, so that both sides stay in the L1 cache.
        for j0 in (0..n).step_by(16) {
            for l0 in (0..k).step_by(16) {
                for j in j0..(j0 + 16).min(n) {
                    for l in l0..(l0 + 16).min(k) {
                        o[l * n + j] = w[j * k + l];
                    }
                }
            }
        }
    }

    /// Whether frozen matrix `i` is read by both products through its prepared forms only
    /// (the stored weights, or bfloat16 packs), so that its f32 values need not exist.
    pub fn holds_forms_only(&self, i: usize, pr: &Prepared) -> bool {
        let forms = matches!(
            (pr.fwd.get(i), pr.bwd.get(i)),
            (Some(Operand::Stored(_)), _) | (Some(Operand::Bf16(_)), Some(Operand::Bf16(_)))
        );
        self.frozen && forms
    }

    /// Makes frozen linear weight `i`'s forms its stored values `w` (`[out, in]`, any weight
    /// format, memory-mapped where the file allows): the forward product runs the inference
    /// kernels on them (int8 and q4 quantize the activations, as at inference), the input
    /// gradient widens them to f32 a block of rows at a time. Memory is the file's.
    pub fn prepare_stored(&self, i: usize, w: Matrix, out: &mut Prepared) -> Result<()> {
        match self.mats.get(i) {
            Some(Some(m)) if m.linear && (w.n_in, w.n_out) == (m.k, m.n) => {}
            _ => {
                return Err(Error::Internal(format!(
                    "parameter {i} is not a [{}, {}] linear weight",
                    w.n_out, w.n_in
                )))
            }
        }
        let n = self.lens.len();
        out.fwd.resize_with(n, || Operand::None);
        out.bwd.resize_with(n, || Operand::None);
        out.fwd[i] = Operand::Stored(w);
        out.bwd[i] = Operand::None;
        Ok(())
    }

    /// Zeroed gradient buffers, one per parameter: empty for the frozen ones, `dA` then `dB`
    /// for a weight with an adapter.
    pub fn zero_grads(&self) -> Vec<Vec<f32>> {
        (0..self.lens.len())
            .map(|i| {
                let len = match self.adapter_sizes(i) {
                    Some((a, b)) => a + b,
                    None if self.large[i] && self.frozen => 0,
                    None => self.lens[i],
                };
                vec![0.0; len]
            })
            .collect()
    }

    /// Checks that the parameters `p`, their prepared forms `pr` and the gradient buffers `g`
    /// are those of this model (so that the passes can index them without further checks).
    pub fn check(&self, p: &[&[f32]], pr: &Prepared, g: &[Vec<f32>]) -> Result<()> {
        if p.len() != self.lens.len() || g.len() != self.lens.len() || pr.fwd.len() != p.len() {
            return Err(Error::Internal("parameter count changed".into()));
        }
        for (i, m) in self.mats.iter().enumerate() {
            let Some(m) = m else { continue };
            let ok = match (&pr.fwd[i], &pr.bwd[i]) {
                (Operand::F32(v), _) => !self.bf16 && v.len() == self.lens[i],
                (Operand::Bf16(f), Operand::Bf16(b)) => {
                    self.bf16 && f.shape() == (m.k, m.n) && b.shape() == (m.n, m.k)
                }
                (Operand::Stored(w), _) => {
                    self.frozen && m.linear && (w.n_in, w.n_out) == (m.k, m.n)
                }
                _ => false,
            };
            if !ok {
                return Err(Error::Internal(format!("parameter {i} is not prepared")));
            }
        }
        for (i, (a, b)) in p.iter().zip(g.iter()).enumerate() {
            let want = match self.adapter_sizes(i) {
                Some((sa, sb)) => {
                    let ok = pr
                        .lora
                        .get(i)
                        .is_some_and(|(va, vb)| va.len() == sa && vb.len() == sb);
                    if !ok {
                        return Err(Error::Internal(format!("adapter {i} has no values")));
                    }
                    sa + sb
                }
                None if self.frozen && self.large[i] => 0,
                None => self.lens[i],
            };
            let held = a.len() == self.lens[i] || (a.is_empty() && self.holds_forms_only(i, pr));
            if !held || b.len() != want {
                return Err(Error::Internal(format!("parameter {i} changed size")));
            }
        }
        Ok(())
    }

    /// `c [m, n] (+)= A·B` in the pass's precision.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        m: usize,
        n: usize,
        k: usize,
        c: &mut [f32],
        acc: bool,
        a: &[f32],
        sa: (usize, usize),
        b: &[f32],
        sb: (usize, usize),
    ) {
        if self.bf16 {
            gemm_bf16(m, n, k, c, acc, a, sa, b, sb);
        } else {
            gemm(m, n, k, c, acc, a, sa, b, sb);
        }
    }

    /// `y [m, n] (+)= x [m, k] · B` for matrix parameter `i` (`B` a linear weight's transpose,
    /// or a LoRA matrix).
    /// With `then`, applies it to `y` afterwards (in bfloat16, to each few rows as they are
    /// finished, while they are in the L1 cache).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn mw(
        &self,
        x: &[f32],
        pr: &Prepared,
        i: usize,
        m: usize,
        y: &mut [f32],
        acc: bool,
        then: Option<fn(&mut [f32])>,
    ) {
        let Some(Mat { k, n, .. }) = self.mats[i] else {
            unreachable!("parameter {i} is not a matrix")
        };
        // An adapter's branch is added before `then`.
        let (then, after) = match self.adapter(i) {
            Some(_) => (None, then),
            None => (then, None),
        };
        match &pr.fwd[i] {
            Operand::F32(b) => {
                gemm(m, n, k, y, acc, x, (k, 1), b, (n, 1));
                if let Some(f) = then {
                    f(&mut y[..m * n]);
                }
            }
            Operand::Bf16(b) => gemm_bf16_packed(m, y, acc, x, (k, 1), b, then),
            Operand::Stored(w) => {
                let y = &mut y[..m * n];
                if acc {
                    let mut t = vec![0f32; m * n];
                    rwkv_core::kernels::matmul(w, &x[..m * k], m, &mut t);
                    y.iter_mut().zip(&t).for_each(|(a, b)| *a += b);
                } else {
                    rwkv_core::kernels::matmul(w, &x[..m * k], m, y);
                }
                if let Some(f) = then {
                    f(y);
                }
            }
            Operand::None => unreachable!("checked by Products::check"),
        }
        if let Some(ad) = self.adapter(i) {
            // y += scale·(x Aᵀ) Bᵀ.
            let (a, b) = &pr.lora[i];
            let r = ad.rank;
            let mut u = vec![0f32; m * r];
            gemm(m, r, k, &mut u, false, x, (k, 1), a, (1, k));
            u.iter_mut().for_each(|z| *z *= ad.scale);
            gemm(m, n, r, y, true, &u, (r, 1), b, (1, r));
            if let Some(f) = after {
                f(&mut y[..m * n]);
            }
        }
    }

    /// `dx [m, k] (+)= dy [m, n] · Bᵀ` for the `B [k, n]` of [`Products::mw`].
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn mw_dx(
        &self,
        dy: &[f32],
        pr: &Prepared,
        p: &[&[f32]],
        i: usize,
        m: usize,
        dx: &mut [f32],
        acc: bool,
    ) {
        let Some(Mat { k, n, linear }) = self.mats[i] else {
            unreachable!("parameter {i} is not a matrix")
        };
        match (&pr.bwd[i], &pr.fwd[i]) {
            (Operand::Bf16(b), _) => gemm_bf16_packed(m, dx, acc, dy, (n, 1), b, None),
            // dx += dy·W over blocks of W's rows, each widened to f32 as it is used.
            (_, Operand::Stored(w)) => {
                const ROWS: usize = 64;
                let mut block = vec![0f32; ROWS.min(n) * k];
                for (bi, o0) in (0..n).step_by(ROWS).enumerate() {
                    let o1 = (o0 + ROWS).min(n);
                    let wb = &mut block[..(o1 - o0) * k];
                    w.data.read_into(o0 * k, wb);
                    let first = bi == 0;
                    gemm(
                        m,
                        k,
                        o1 - o0,
                        dx,
                        acc || !first,
                        &dy[o0..],
                        (n, 1),
                        wb,
                        (k, 1),
                    );
                }
            }
            // A linear weight is `[n, k]` (Bᵀ row-major), a LoRA matrix `[k, n]`.
            _ if linear => gemm(m, k, n, dx, acc, dy, (n, 1), p[i], (k, 1)),
            _ => gemm(m, k, n, dx, acc, dy, (n, 1), p[i], (1, n)),
        }
        if let Some(ad) = self.adapter(i) {
            // dx += scale·(dy B) A.
            let (a, b) = &pr.lora[i];
            let r = ad.rank;
            let mut v = vec![0f32; m * r];
            gemm(m, r, n, &mut v, false, dy, (n, 1), b, (r, 1));
            v.iter_mut().for_each(|z| *z *= ad.scale);
            gemm(m, k, r, dx, true, &v, (r, 1), a, (k, 1));
        }
    }

    /// The gradient of linear weight `i` (`[n, k]`) from the rows `dy [m, n]` of its output's
    /// gradient and `x [m, k]` of its input, added into `g[i]`: `dW += dyᵀ·x`; for a weight
    /// with an adapter, the adapter's instead (`dA += scale·(dy B)ᵀ x`,
    /// `dB += scale·dyᵀ (x Aᵀ)`); nothing for a frozen weight.
    pub(crate) fn lin_dw(
        &self,
        pr: &Prepared,
        i: usize,
        dy: &[f32],
        x: &[f32],
        m: usize,
        g: &mut [Vec<f32>],
    ) {
        let Some(Mat { k, n, .. }) = self.mats[i] else {
            unreachable!("parameter {i} is not a matrix")
        };
        if let Some(ad) = self.adapter(i) {
            let (a, b) = &pr.lora[i];
            let r = ad.rank;
            let (da, db) = g[i].split_at_mut(r * k);
            let mut u = vec![0f32; m * r];
            gemm(m, r, k, &mut u, false, x, (k, 1), a, (1, k));
            u.iter_mut().for_each(|z| *z *= ad.scale);
            gemm(n, r, m, db, true, dy, (1, n), &u, (r, 1));
            let v = &mut u;
            gemm(m, r, n, v, false, dy, (n, 1), b, (r, 1));
            v.iter_mut().for_each(|z| *z *= ad.scale);
            gemm(r, k, m, da, true, v, (1, r), x, (k, 1));
            return;
        }
        if !self.frozen {
            self.gemm(n, k, m, &mut g[i], true, dy, (1, n), x, (k, 1));
        }
    }

    /// `dB [k, n] += xᵀ · dy` (nothing when frozen).
    pub(crate) fn mm_db(
        &self,
        x: &[f32],
        dy: &[f32],
        m: usize,
        k: usize,
        n: usize,
        db: &mut [f32],
    ) {
        if !self.frozen {
            self.gemm(k, n, m, db, true, x, (1, k), dy, (n, 1));
        }
    }
}

/// A matrix parameter: the forward product multiplies by `B [k, n]` (a linear weight, stored
/// `[n, k]`, transposed; a LoRA matrix as stored).
#[derive(Clone, Copy)]
struct Mat {
    k: usize,
    n: usize,
    linear: bool,
}

/// A matrix in the form a product reads.
#[derive(Default)]
pub enum Operand {
    /// Not a matrix (or not needed in this precision).
    #[default]
    None,
    /// f32, row-major `B`.
    F32(Vec<f32>),
    /// Packed bfloat16 pairs.
    Bf16(PackedB),
    /// A frozen linear weight as stored (`[out, in]`; [`Products::prepare_stored`]).
    Stored(Matrix),
}

/// The weights in the forms the products read ([`Products::prepare`]), remade once per
/// optimizer step.
#[derive(Default)]
pub struct Prepared {
    /// By parameter: `B` of the forward product.
    fwd: Vec<Operand>,
    /// By parameter: `Bᵀ`, of the input gradient's product (bfloat16 only).
    bwd: Vec<Operand>,
    /// By parameter: an adapter's `A` and `B` (empty without one).
    lora: Vec<(Vec<f32>, Vec<f32>)>,
}

impl Prepared {
    /// Sets the values of the adapter on parameter `i` (`A [r, k]`, `B [n, r]`), after every
    /// change of them.
    pub fn set_adapter(&mut self, i: usize, a: &[f32], b: &[f32]) {
        if self.lora.len() <= i {
            self.lora.resize_with(i + 1, Default::default);
        }
        let (va, vb) = &mut self.lora[i];
        va.clear();
        va.extend_from_slice(a);
        vb.clear();
        vb.extend_from_slice(b);
    }
}
