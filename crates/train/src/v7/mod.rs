//! RWKV-7 training without a graph: one hand-written forward and backward pass over a shard of
//! windows, with every buffer allocated once and reused from step to step.
//!
//! The candle model ([`super::TrainModel`]) builds an autograd graph of about thirty ops per
//! block; on the small shapes training runs at (a few hundred rows of width 128) each op's
//! fresh buffers, zero-filling and bookkeeping cost more than its arithmetic. This pass does the
//! same computation as `TrainModel::loss` followed by `backward` (the same formulas, the same
//! WKV kernels of [`super::ops`]), in place: the matrix products go straight to `gemm` with
//! strides instead of transposed copies, the element-wise chains are single loops, and the
//! activations the backward pass needs are kept in a [`Work`] that lives as long as the trainer.
//! `tests::matches_the_graph` checks every gradient against the candle model's.

// Index loops over several parallel per-channel arrays read more clearly than zipped iterators.
#![allow(clippy::needless_range_loop)]

mod scan;

use crate::common::dispatch;
use rayon::prelude::*;
use rwkv_core::checkpoint::Generation;
use rwkv_core::error::{Error, Result};
use rwkv_core::kernels::{exp, sigmoid};
use rwkv_core::schema::{self, Dims, Role};
use rwkv_core::tensor::Layout;
use std::collections::HashMap;

const LN_EPS: f32 = rwkv_core::model::consts::LN_EPS as f32;
use rwkv_core::model::consts::GN_EPS;

/// Where one block's parameters are in the parameter list.
struct Block {
    ln1: (usize, usize),
    ln2: (usize, usize),
    /// `x_r, x_w, x_k, x_v, x_a, x_g`.
    mix: [usize; 6],
    wr: usize,
    wk: usize,
    wv: usize,
    wo: usize,
    w0: usize,
    w1: usize,
    w2: usize,
    a0: usize,
    a1: usize,
    a2: usize,
    /// The value-residual gate (blocks after the first).
    v: Option<(usize, usize, usize)>,
    g1: usize,
    g2: usize,
    k_k: usize,
    k_a: usize,
    r_k: usize,
    lnx: (usize, usize),
    fmix: usize,
    fk: usize,
    fv: usize,
}

/// The shapes of an RWKV-7 model and where its parameters are, for the hand-written pass.
pub struct Fused7 {
    c: usize,
    n: usize,
    h: usize,
    vocab: usize,
    ffn: usize,
    /// LoRA ranks of the decay, in-context rate, value gate and output gate.
    ranks: [usize; 4],
    emb: usize,
    ln0: (usize, usize),
    ln_out: (usize, usize),
    head: usize,
    blocks: Vec<Block>,
    lens: Vec<usize>,
    /// The matrices, by parameter index (`None` for the other parameters).
    mats: Vec<Option<Mat>>,
    /// Matrix products with bfloat16 inputs ([`Fused7::set_bf16`]).
    bf16: bool,
}

impl Fused7 {
    /// Finds every tensor of an RWKV-7 model of width `c` and head size `n` among `names` /
    /// `shapes` (the training model's variables, in order) and checks its shape.
    pub fn new(names: &[String], shapes: &[Vec<usize>], n: usize) -> Result<Fused7> {
        let index: HashMap<&str, usize> = names
            .iter()
            .enumerate()
            .map(|(i, s)| (s.as_str(), i))
            .collect();
        let find = |name: &str| -> Result<usize> {
            index
                .get(name)
                .copied()
                .ok_or_else(|| Error::bad(format!("tensor {name} is missing")))
        };
        let emb = find("emb.weight")?;
        let (vocab, c) = match shapes[emb].as_slice() {
            [v, c] => (*v, *c),
            s => return Err(Error::bad(format!("emb.weight has shape {s:?}"))),
        };
        if n == 0 || c % n != 0 || n > 256 || c > 4096 {
            return Err(Error::bad(format!(
                "head size {n} does not divide width {c} (or is above 256, or the width above 4096)"
            )));
        }
        let n_layer = (0..)
            .take_while(|i| index.contains_key(format!("blocks.{i}.ln1.weight").as_str()))
            .count();
        let rank = |name: &str| -> Result<usize> {
            let i = find(name)?;
            match shapes[i].as_slice() {
                [a, r] if *a == c => Ok(*r),
                s => Err(Error::bad(format!(
                    "{name} has shape {s:?}, not [{c}, rank]"
                ))),
            }
        };
        let ranks = [
            rank("blocks.0.att.w1")?,
            rank("blocks.0.att.a1")?,
            if n_layer > 1 {
                rank("blocks.1.att.v1")?
            } else {
                0
            },
            rank("blocks.0.att.g1")?,
        ];
        let ffn = match shapes[find("blocks.0.ffn.key.weight")?].as_slice() {
            [f, cc] if *cc == c => *f,
            s => return Err(Error::bad(format!("ffn.key.weight has shape {s:?}"))),
        };
        let mut blocks = Vec::new();
        for i in 0..n_layer {
            let p = |s: &str| -> Result<usize> {
                let ix = find(&format!("blocks.{i}.{s}"))?;
                Ok(ix)
            };
            let ln = |s: &str| -> Result<(usize, usize)> {
                Ok((p(&format!("{s}.weight"))?, p(&format!("{s}.bias"))?))
            };
            let b = Block {
                ln1: ln("ln1")?,
                ln2: ln("ln2")?,
                mix: [
                    p("att.x_r")?,
                    p("att.x_w")?,
                    p("att.x_k")?,
                    p("att.x_v")?,
                    p("att.x_a")?,
                    p("att.x_g")?,
                ],
                wr: p("att.receptance.weight")?,
                wk: p("att.key.weight")?,
                wv: p("att.value.weight")?,
                wo: p("att.output.weight")?,
                w0: p("att.w0")?,
                w1: p("att.w1")?,
                w2: p("att.w2")?,
                a0: p("att.a0")?,
                a1: p("att.a1")?,
                a2: p("att.a2")?,
                v: if i > 0 {
                    Some((p("att.v0")?, p("att.v1")?, p("att.v2")?))
                } else {
                    None
                },
                g1: p("att.g1")?,
                g2: p("att.g2")?,
                k_k: p("att.k_k")?,
                k_a: p("att.k_a")?,
                r_k: p("att.r_k")?,
                lnx: ln("att.ln_x")?,
                fmix: p("ffn.x_k")?,
                fk: p("ffn.key.weight")?,
                fv: p("ffn.value.weight")?,
            };
            blocks.push(b);
        }
        if n_layer == 0 {
            return Err(Error::bad("the model has no blocks (blocks.0.ln1.weight)"));
        }
        let ln0 = (find("blocks.0.ln0.weight")?, find("blocks.0.ln0.bias")?);
        let ln_out = (find("ln_out.weight")?, find("ln_out.bias")?);
        let head = find("head.weight")?;
        // Every tensor's shape, and which are matrices, as the schema says.
        let [rw, ra, rv, rg] = ranks;
        let dims = Dims {
            generation: Generation::V7,
            n_layer,
            n_embd: c,
            head_size: n,
            ffn_dim: ffn,
            vocab,
            lora: vec![("w", rw), ("a", ra), ("v", rv), ("g", rg)],
        };
        let tensors = names.iter().map(String::as_str);
        schema::check(&dims, tensors.zip(shapes.iter().map(Vec::as_slice)))?;
        let mut mats: Vec<Option<Mat>> = (0..names.len()).map(|_| None).collect();
        for p in schema::params(&dims) {
            if let (Role::Matrix(layout), &[a, b]) = (p.role, p.shape.as_slice()) {
                mats[find(&p.name)?] = Some(match layout {
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
        Ok(Fused7 {
            mats,
            bf16: false,
            c,
            n,
            h: c / n,
            vocab,
            ffn,
            ranks,
            emb,
            ln0,
            ln_out,
            head,
            blocks,
            lens: shapes.iter().map(|s| s.iter().product()).collect(),
        })
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
        let bf16 = self.bf16;
        let jobs = out.fwd.par_iter_mut().zip(out.bwd.par_iter_mut());
        jobs.enumerate().for_each(|(i, (f, b))| {
            let Some(m) = &self.mats[i] else {
                return;
            };
            let w = p[i];
            let (k, n) = (m.k, m.n);
            // The forward product's B is `[k, n]`: a linear weight `[n, k]` read transposed,
            // a LoRA matrix as it is; the input gradient's B is its transpose.
            let (fs, bs) = if m.linear {
                ((1, k), (k, 1))
            } else {
                ((n, 1), (1, n))
            };
            if bf16 {
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
        });
    }

    /// Zeroed gradient buffers, one per parameter.
    pub fn zero_grads(&self) -> Vec<Vec<f32>> {
        self.lens.iter().map(|&l| vec![0.0; l]).collect()
    }

    /// A work area for shards of `bs` windows of `t` tokens.
    pub fn work(&self, bs: usize, t: usize) -> Work {
        let (c, m, f, v) = (self.c, bs * t, self.ffn, self.vocab);
        let z = |k: usize| vec![0f32; k];
        let [rw, ra, rv, rg] = self.ranks;
        let layers = self
            .blocks
            .iter()
            .map(|_| Acts {
                hat1: z(m * c),
                rstd1: z(m),
                xn1: z(m * c),
                acts: z(6 * m * c),
                tw: z(m * rw),
                ha: z(m * ra),
                hv: z(m * rv),
                hg: z(m * rg),
                vpre: z(m * c),
                vgate: z(m * c),
                y: z(m * c),
                prep: scan::Prep::default(),
                gn_hat: z(m * c),
                gn_rstd: z(m * self.h),
                bonus: z(m * self.h),
                o: z(m * c),
                hat2: z(m * c),
                rstd2: z(m),
                xn2: z(m * c),
                hpre: z(m * f),
            })
            .collect();
        let rmax = self.ranks.iter().copied().max().unwrap_or(0);
        Work {
            bs,
            t,
            x0: z(m * c),
            x: z(m * c),
            hat0: z(m * c),
            rstd0: z(m),
            hat_o: z(m * c),
            rstd_o: z(m),
            xo: z(m * c),
            logits: z(m * v),
            layers,
            dx: z(m * c),
            dxn: z(m * c),
            dy: z(m * c),
            dvf: z(m * c),
            dmixed: z(6 * m * c),
            mixed: z(6 * m * c),
            xk2: z(m * c),
            hbuf: z(m * f),
            dacts: z(6 * m * c),
            dh: z(m * f),
            dlo: z(m * rmax),
            dwp: z(5 * c),
            small: z(6 * c),
            scratch: Vec::new(),
            sgrads: scan::Grads::default(),
        }
    }

    /// Runs the forward and backward pass over `bs` windows of `t` tokens: returns the sum of
    /// the rows' cross-entropies and adds `scale ×` its gradient (with RWKV-LM's L2Wrap term
    /// of `l2wrap · scale` per row) into `g`. `p` holds every parameter's values, in order,
    /// and `pr` their forms for the products, from [`Fused7::prepare`].
    #[allow(clippy::too_many_arguments)]
    pub fn accumulate(
        &self,
        p: &[&[f32]],
        pr: &Prepared,
        tokens: &[u32],
        targets: &[u32],
        scale: f32,
        l2wrap: f32,
        w: &mut Work,
        g: &mut [Vec<f32>],
    ) -> Result<f64> {
        let (bs, t) = (w.bs, w.t);
        let m = bs * t;
        if tokens.len() != m || targets.len() != m {
            return Err(Error::bad(format!(
                "{} tokens and {} targets do not make {bs} windows of {t}",
                tokens.len(),
                targets.len()
            )));
        }
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
                _ => false,
            };
            if !ok {
                return Err(Error::Internal(format!("parameter {i} is not prepared")));
            }
        }
        for (i, (a, b)) in p.iter().zip(g.iter()).enumerate() {
            if a.len() != self.lens[i] || b.len() != self.lens[i] {
                return Err(Error::Internal(format!("parameter {i} changed size")));
            }
        }
        let v = self.vocab;
        if let Some(&bad) = tokens.iter().chain(targets).find(|&&x| x as usize >= v) {
            return Err(Error::bad(format!(
                "token id {bad} is outside the vocabulary of {v}"
            )));
        }
        self.forward(p, pr, tokens, w);
        let loss = dispatch!(cross_entropy(
            &mut w.logits,
            targets,
            v,
            scale,
            l2wrap * scale
        ));
        self.backward(p, pr, tokens, w, g);
        Ok(loss)
    }

    fn forward(&self, p: &[&[f32]], pr: &Prepared, tokens: &[u32], w: &mut Work) {
        let (c, t) = (self.c, w.t);
        let m = w.bs * t;
        let mc = m * c;
        for (r, &tok) in tokens.iter().enumerate() {
            let tok = tok as usize;
            w.x0[r * c..(r + 1) * c].copy_from_slice(&p[self.emb][tok * c..(tok + 1) * c]);
        }
        layer_norm(
            &w.x0,
            p[self.ln0.0],
            p[self.ln0.1],
            &mut w.x,
            &mut w.hat0,
            &mut w.rstd0,
        );
        for (li, bk) in self.blocks.iter().enumerate() {
            let (first, rest) = w.layers.split_at_mut(li);
            let a = &mut rest[0];
            let vfirst = first.first().map(|l0| &l0.acts[3 * mc..4 * mc]);
            layer_norm(
                &w.x,
                p[bk.ln1.0],
                p[bk.ln1.1],
                &mut a.xn1,
                &mut a.hat1,
                &mut a.rstd1,
            );
            let mixes = bk.mix.map(|i| p[i]);
            shift_fwd(&a.xn1, t, &mixes, &mut w.mixed);
            let mx = |k: usize| &w.mixed[k * mc..(k + 1) * mc];
            let (ar, rest) = a.acts.split_at_mut(mc);
            let (aw, rest) = rest.split_at_mut(mc);
            let (ak, rest) = rest.split_at_mut(mc);
            let (av, rest) = rest.split_at_mut(mc);
            let (aa, ag) = rest.split_at_mut(mc);
            self.mw(mx(0), pr, bk.wr, m, ar, false, None);
            self.mw(mx(2), pr, bk.wk, m, ak, false, None);
            // Decay logits w0 + tanh(xw W1) W2 (the decay itself is formed inside the WKV).
            self.mw(mx(1), pr, bk.w1, m, &mut a.tw, false, Some(map_tanh));
            bias_rows(aw, p[bk.w0]);
            self.mw(&a.tw, pr, bk.w2, m, aw, true, None);
            // In-context learning rate sigmoid(a0 + xa A1 A2).
            self.mw(mx(4), pr, bk.a1, m, &mut a.ha, false, None);
            bias_rows(aa, p[bk.a0]);
            self.mw(&a.ha, pr, bk.a2, m, aa, true, Some(map_sigmoid));
            // Value, mixed towards the first block's value by sigmoid(v0 + xv V1 V2).
            match (vfirst, bk.v) {
                (Some(vf), Some((v0, v1, v2))) => {
                    self.mw(mx(3), pr, bk.wv, m, &mut a.vpre, false, None);
                    self.mw(mx(3), pr, v1, m, &mut a.hv, false, None);
                    bias_rows(&mut a.vgate, p[v0]);
                    self.mw(&a.hv, pr, v2, m, &mut a.vgate, true, Some(map_sigmoid));
                    dispatch!(v_mix(&a.vpre, vf, &a.vgate, av));
                }
                _ => self.mw(mx(3), pr, bk.wv, m, av, false, None),
            }
            // Output gate sigmoid(xg G1) G2.
            self.mw(mx(5), pr, bk.g1, m, &mut a.hg, false, Some(map_sigmoid));
            self.mw(&a.hg, pr, bk.g2, m, ag, false, None);
            let sh = self.scan_shape(w.bs, t);
            scan::forward(
                sh,
                &a.acts,
                p[bk.k_k],
                p[bk.k_a],
                &mut a.y,
                &mut a.prep,
                &mut w.scratch,
            );
            gn_out(
                self.n,
                &a.y,
                [
                    &a.acts[..mc],
                    &a.prep.kmod,
                    &a.acts[3 * mc..4 * mc],
                    &a.acts[5 * mc..],
                ],
                [p[bk.r_k], p[bk.lnx.0], p[bk.lnx.1]],
                &mut a.o,
                [&mut a.gn_hat, &mut a.gn_rstd, &mut a.bonus],
            );
            self.mw(&a.o, pr, bk.wo, m, &mut w.x, true, None);
            // Channel mixing: relu(xk Wk)² Wv.
            layer_norm(
                &w.x,
                p[bk.ln2.0],
                p[bk.ln2.1],
                &mut a.xn2,
                &mut a.hat2,
                &mut a.rstd2,
            );
            shift_fwd(&a.xn2, t, &[p[bk.fmix]], &mut w.xk2);
            self.mw(&w.xk2, pr, bk.fk, m, &mut a.hpre, false, None);
            dispatch!(relu_sq(&a.hpre, &mut w.hbuf));
            self.mw(&w.hbuf, pr, bk.fv, m, &mut w.x, true, None);
        }
        layer_norm(
            &w.x,
            p[self.ln_out.0],
            p[self.ln_out.1],
            &mut w.xo,
            &mut w.hat_o,
            &mut w.rstd_o,
        );
        self.mw(&w.xo, pr, self.head, m, &mut w.logits, false, None);
    }

    fn scan_shape(&self, b: usize, t: usize) -> scan::Shape {
        scan::Shape {
            b,
            t,
            h: self.h,
            n: self.n,
        }
    }

    fn backward(
        &self,
        p: &[&[f32]],
        pr: &Prepared,
        tokens: &[u32],
        w: &mut Work,
        g: &mut [Vec<f32>],
    ) {
        let (c, t, f, v) = (self.c, w.t, self.ffn, self.vocab);
        let m = w.bs * t;
        let mc = m * c;
        let [rw, ra, rv, rg] = self.ranks;
        // Head and final norm: w.logits holds d(logits).
        self.lin_dw(&w.logits, &w.xo, m, v, c, &mut g[self.head]);
        self.mw_dx(&w.logits, pr, p, self.head, m, &mut w.dxn, false);
        {
            let (gw, gb) = two(g, self.ln_out.0, self.ln_out.1);
            layer_norm_back(
                &w.dxn,
                &w.hat_o,
                &w.rstd_o,
                p[self.ln_out.0],
                &mut w.dx,
                false,
                gw,
                gb,
            );
        }
        w.dvf.iter_mut().for_each(|z| *z = 0.0);
        for (li, bk) in self.blocks.iter().enumerate().rev() {
            let a = &w.layers[li];
            let vfirst = (li > 0).then(|| &w.layers[0].acts[3 * mc..4 * mc]);
            // Channel mixing.
            shift_fwd(&a.xn2, t, &[p[bk.fmix]], &mut w.xk2);
            dispatch!(relu_sq(&a.hpre, &mut w.hbuf));
            self.lin_dw(&w.dx, &w.hbuf, m, c, f, &mut g[bk.fv]);
            self.mw_dx(&w.dx, pr, p, bk.fv, m, &mut w.dh, false);
            dispatch!(relu_sq_back(&a.hpre, &mut w.dh));
            self.lin_dw(&w.dh, &w.xk2, m, f, c, &mut g[bk.fk]);
            self.mw_dx(&w.dh, pr, p, bk.fk, m, &mut w.dmixed[..mc], false);
            shift_back(
                &a.xn2,
                t,
                &[p[bk.fmix]],
                &w.dmixed[..mc],
                &mut w.dxn,
                &mut w.small[..c],
            );
            add(&mut g[bk.fmix], &w.small[..c]);
            {
                let (gw, gb) = two(g, bk.ln2.0, bk.ln2.1);
                layer_norm_back(
                    &w.dxn,
                    &a.hat2,
                    &a.rstd2,
                    p[bk.ln2.0],
                    &mut w.dx,
                    true,
                    gw,
                    gb,
                );
            }
            // Time mixing: output projection, then the WKV ops' own backward passes.
            self.lin_dw(&w.dx, &a.o, m, c, c, &mut g[bk.wo]);
            self.mw_dx(&w.dx, pr, p, bk.wo, m, &mut w.dxn, false);
            w.dwp.iter_mut().for_each(|z| *z = 0.0);
            {
                let (dr, rest) = w.dacts.split_at_mut(mc);
                let (dv, dg) = rest[2 * mc..].split_at_mut(mc);
                let (_, dpar) = w.dwp.split_at_mut(2 * c);
                let (dr_k, dln) = dpar.split_at_mut(c);
                let (dlw, dlb) = dln.split_at_mut(c);
                gn_out_back(
                    self.n,
                    &w.dxn,
                    [&a.gn_hat, &a.gn_rstd, &a.bonus],
                    [
                        &a.acts[..mc],
                        &a.prep.kmod,
                        &a.acts[3 * mc..4 * mc],
                        &a.acts[5 * mc..],
                    ],
                    [p[bk.r_k], p[bk.lnx.0], p[bk.lnx.1]],
                    [&mut w.dy, dr, dv, &mut dg[mc..], w.sgrads.dkmod(mc)],
                    [dr_k, dlw, &mut dlb[..c]],
                );
            }
            let (dk_k, rest) = w.dwp.split_at_mut(c);
            scan::backward(
                self.scan_shape(w.bs, t),
                &a.acts,
                p[bk.k_k],
                p[bk.k_a],
                &a.prep,
                &w.dy,
                &mut w.dacts,
                dk_k,
                &mut rest[..c],
                &mut w.sgrads,
            );
            for (i, ix) in [bk.k_k, bk.k_a, bk.r_k, bk.lnx.0, bk.lnx.1]
                .into_iter()
                .enumerate()
            {
                add(&mut g[ix], &w.dwp[i * c..(i + 1) * c]);
            }
            let mixes = bk.mix.map(|i| p[i]);
            shift_fwd(&a.xn1, t, &mixes, &mut w.mixed);
            let mx = |k: usize| &w.mixed[k * mc..(k + 1) * mc];
            let ac = |k: usize| &a.acts[k * mc..(k + 1) * mc];
            let (dr, rest) = w.dacts.split_at_mut(mc);
            let (dw, rest) = rest.split_at_mut(mc);
            let (dk, rest) = rest.split_at_mut(mc);
            let (dv, rest) = rest.split_at_mut(mc);
            let (da, dg) = rest.split_at_mut(mc);
            let (dm0, rest) = w.dmixed.split_at_mut(mc);
            let (dm1, rest) = rest.split_at_mut(mc);
            let (dm2, rest) = rest.split_at_mut(mc);
            let (dm3, rest) = rest.split_at_mut(mc);
            let (dm4, dm5) = rest.split_at_mut(mc);
            // Receptance and key.
            self.lin_dw(dr, mx(0), m, c, c, &mut g[bk.wr]);
            self.mw_dx(dr, pr, p, bk.wr, m, dm0, false);
            self.lin_dw(dk, mx(2), m, c, c, &mut g[bk.wk]);
            self.mw_dx(dk, pr, p, bk.wk, m, dm2, false);
            // Decay logits: w0 + tanh(xw W1) W2.
            col_sums(dw, &mut g[bk.w0]);
            self.mm_db(&a.tw, dw, m, rw, c, &mut g[bk.w2]);
            self.mw_dx(dw, pr, p, bk.w2, m, &mut w.dlo[..m * rw], false);
            dispatch!(tanh_back(&a.tw, &mut w.dlo[..m * rw]));
            self.mm_db(mx(1), &w.dlo[..m * rw], m, c, rw, &mut g[bk.w1]);
            self.mw_dx(&w.dlo[..m * rw], pr, p, bk.w1, m, dm1, false);
            // In-context learning rate: sigmoid(a0 + xa A1 A2).
            dispatch!(sigmoid_back(ac(4), da));
            col_sums(da, &mut g[bk.a0]);
            self.mm_db(&a.ha, da, m, ra, c, &mut g[bk.a2]);
            self.mw_dx(da, pr, p, bk.a2, m, &mut w.dlo[..m * ra], false);
            self.mm_db(mx(4), &w.dlo[..m * ra], m, c, ra, &mut g[bk.a1]);
            self.mw_dx(&w.dlo[..m * ra], pr, p, bk.a1, m, dm4, false);
            // Value.
            match (vfirst, bk.v) {
                (Some(vf), Some((v0, v1, v2))) => {
                    // v = vpre + (vf - vpre)·gate: dv splits into vpre, v_first and the gate.
                    dispatch!(v_mix_back(&a.vpre, vf, &a.vgate, dv, &mut w.dvf, &mut w.dy));
                    col_sums(&w.dy, &mut g[v0]);
                    self.mm_db(&a.hv, &w.dy, m, rv, c, &mut g[v2]);
                    self.mw_dx(&w.dy, pr, p, v2, m, &mut w.dlo[..m * rv], false);
                    self.mm_db(mx(3), &w.dlo[..m * rv], m, c, rv, &mut g[v1]);
                    self.mw_dx(&w.dlo[..m * rv], pr, p, v1, m, dm3, false);
                    self.lin_dw(dv, mx(3), m, c, c, &mut g[bk.wv]);
                    self.mw_dx(dv, pr, p, bk.wv, m, dm3, true);
                }
                _ => {
                    // The first block's value is also every later block's v_first.
                    add(dv, &w.dvf);
                    self.lin_dw(dv, mx(3), m, c, c, &mut g[bk.wv]);
                    self.mw_dx(dv, pr, p, bk.wv, m, dm3, false);
                }
            }
            // Output gate: sigmoid(xg G1) G2.
            self.mm_db(&a.hg, dg, m, rg, c, &mut g[bk.g2]);
            self.mw_dx(dg, pr, p, bk.g2, m, &mut w.dlo[..m * rg], false);
            dispatch!(sigmoid_back(&a.hg, &mut w.dlo[..m * rg]));
            self.mm_db(mx(5), &w.dlo[..m * rg], m, c, rg, &mut g[bk.g1]);
            self.mw_dx(&w.dlo[..m * rg], pr, p, bk.g1, m, dm5, false);
            // The six token shifts, then ln1.
            shift_back(&a.xn1, t, &mixes, &w.dmixed, &mut w.dxn, &mut w.small);
            for (k, &ix) in bk.mix.iter().enumerate() {
                add(&mut g[ix], &w.small[k * c..(k + 1) * c]);
            }
            let (gw, gb) = two(g, bk.ln1.0, bk.ln1.1);
            layer_norm_back(
                &w.dxn,
                &a.hat1,
                &a.rstd1,
                p[bk.ln1.0],
                &mut w.dx,
                true,
                gw,
                gb,
            );
        }
        {
            let (gw, gb) = two(g, self.ln0.0, self.ln0.1);
            layer_norm_back(
                &w.dx,
                &w.hat0,
                &w.rstd0,
                p[self.ln0.0],
                &mut w.dxn,
                false,
                gw,
                gb,
            );
        }
        let ge = &mut g[self.emb];
        for (r, &tok) in tokens.iter().enumerate() {
            let tok = tok as usize;
            add(&mut ge[tok * c..(tok + 1) * c], &w.dxn[r * c..(r + 1) * c]);
        }
    }
}

/// One block's saved activations.
struct Acts {
    hat1: Vec<f32>,
    rstd1: Vec<f32>,
    xn1: Vec<f32>,
    /// `[6, M, C]`: receptance, decay logits, key, value, in-context rate, gate (the layout of
    /// the WKV ops' `acts`).
    acts: Vec<f32>,
    tw: Vec<f32>,
    ha: Vec<f32>,
    hv: Vec<f32>,
    hg: Vec<f32>,
    vpre: Vec<f32>,
    vgate: Vec<f32>,
    y: Vec<f32>,
    prep: scan::Prep,
    /// The output GroupNorm's normalised `y`, `1/σ` and the bonus `Σ r·kmod·r_k` per head.
    gn_hat: Vec<f32>,
    gn_rstd: Vec<f32>,
    bonus: Vec<f32>,
    o: Vec<f32>,
    hat2: Vec<f32>,
    rstd2: Vec<f32>,
    xn2: Vec<f32>,
    hpre: Vec<f32>,
}

/// Every buffer of one shard's forward and backward pass, allocated once.
pub struct Work {
    bs: usize,
    t: usize,
    x0: Vec<f32>,
    x: Vec<f32>,
    hat0: Vec<f32>,
    rstd0: Vec<f32>,
    hat_o: Vec<f32>,
    rstd_o: Vec<f32>,
    xo: Vec<f32>,
    logits: Vec<f32>,
    layers: Vec<Acts>,
    dx: Vec<f32>,
    dxn: Vec<f32>,
    dy: Vec<f32>,
    dvf: Vec<f32>,
    dmixed: Vec<f32>,
    /// The six token-shifted inputs `[6, M, C]` (r, w, k, v, a, g), the channel mix's shifted
    /// input and its `relu(·)²`, of the block at hand: the backward pass recomputes them
    /// (one cheap sweep each) rather than keeping them for every block, which keeps a
    /// thread's activations in the caches.
    mixed: Vec<f32>,
    xk2: Vec<f32>,
    hbuf: Vec<f32>,
    dacts: Vec<f32>,
    dh: Vec<f32>,
    dlo: Vec<f32>,
    dwp: Vec<f32>,
    small: Vec<f32>,
    scratch: Vec<f32>,
    sgrads: scan::Grads,
}

impl Work {
    /// Windows per shard and tokens per window this work area was made for.
    pub fn shape(&self) -> (usize, usize) {
        (self.bs, self.t)
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
}

/// The weights in the forms the products read ([`Fused7::prepare`]), remade once per
/// optimizer step.
#[derive(Default)]
pub struct Prepared {
    /// By parameter: `B` of the forward product.
    fwd: Vec<Operand>,
    /// By parameter: `Bᵀ`, of the input gradient's product (bfloat16 only).
    bwd: Vec<Operand>,
}

/// Two distinct gradient buffers at once.
fn two(g: &mut [Vec<f32>], i: usize, j: usize) -> (&mut [f32], &mut [f32]) {
    assert_ne!(i, j);
    if i < j {
        let (a, b) = g.split_at_mut(j);
        (&mut a[i], &mut b[0])
    } else {
        let (a, b) = g.split_at_mut(i);
        (&mut b[0], &mut a[j])
    }
}

// ---------------------------------------------------------------------------------------------
// Matrix products on the calling thread, transposes expressed as strides.

use rwkv_core::kernels::sgemm::{gemm, gemm_bf16, gemm_bf16_packed, PackedB};

impl Fused7 {
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
    fn mw(
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
        match &pr.fwd[i] {
            Operand::F32(b) => {
                gemm(m, n, k, y, acc, x, (k, 1), b, (n, 1));
                if let Some(f) = then {
                    f(&mut y[..m * n]);
                }
            }
            Operand::Bf16(b) => gemm_bf16_packed(m, y, acc, x, (k, 1), b, then),
            Operand::None => unreachable!("checked by accumulate"),
        }
    }

    /// `dx [m, k] (+)= dy [m, n] · Bᵀ` for the `B [k, n]` of [`Fused7::mw`].
    #[allow(clippy::too_many_arguments)]
    fn mw_dx(
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
        match &pr.bwd[i] {
            Operand::Bf16(b) => gemm_bf16_packed(m, dx, acc, dy, (n, 1), b, None),
            // A linear weight is `[n, k]` (Bᵀ row-major), a LoRA matrix `[k, n]`.
            _ if linear => gemm(m, k, n, dx, acc, dy, (n, 1), p[i], (k, 1)),
            _ => gemm(m, k, n, dx, acc, dy, (n, 1), p[i], (1, n)),
        }
    }

    /// `dW [n, k] += dyᵀ · x`.
    fn lin_dw(&self, dy: &[f32], x: &[f32], m: usize, n: usize, k: usize, dw: &mut [f32]) {
        self.gemm(n, k, m, dw, true, dy, (1, n), x, (k, 1));
    }

    /// `dB [k, n] += xᵀ · dy`.
    fn mm_db(&self, x: &[f32], dy: &[f32], m: usize, k: usize, n: usize, db: &mut [f32]) {
        self.gemm(k, n, m, db, true, x, (1, k), dy, (n, 1));
    }
}

// ---------------------------------------------------------------------------------------------
// Element-wise kernels (compiled for AVX2/FMA where present through `dispatch!`).

/// `tanh` from one exponential (2 ulp in `exp`; absolute error about 1e-7 near zero).
#[inline(always)]
fn tanh(x: f32) -> f32 {
    let e = exp(2.0 * x.clamp(-15.0, 15.0));
    (e - 1.0) / (e + 1.0)
}

/// `x ← tanh(x)`.
fn map_tanh(x: &mut [f32]) {
    #[inline(always)]
    fn body(x: &mut [f32]) {
        x.iter_mut().for_each(|z| *z = tanh(*z));
    }
    dispatch!(body(x))
}

/// `x ← sigmoid(x)`.
fn map_sigmoid(x: &mut [f32]) {
    #[inline(always)]
    fn body(x: &mut [f32]) {
        x.iter_mut().for_each(|z| *z = sigmoid(*z));
    }
    dispatch!(body(x))
}

/// Every row of `y` set to `b`.
fn bias_rows(y: &mut [f32], b: &[f32]) {
    for row in y.chunks_exact_mut(b.len()) {
        row.copy_from_slice(b);
    }
}

/// `y += x`.
fn add(y: &mut [f32], x: &[f32]) {
    #[inline(always)]
    fn body(y: &mut [f32], x: &[f32]) {
        y.iter_mut().zip(x).for_each(|(a, b)| *a += *b);
    }
    dispatch!(body(y, x))
}

/// `s += Σ rows of x`.
fn col_sums(x: &[f32], s: &mut [f32]) {
    #[inline(always)]
    fn body(x: &[f32], s: &mut [f32]) {
        let c = s.len();
        for row in x.chunks_exact(c) {
            s.iter_mut().zip(row).for_each(|(a, b)| *a += *b);
        }
    }
    dispatch!(body(x, s))
}

#[inline(always)]
fn relu_sq(x: &[f32], y: &mut [f32]) {
    y.iter_mut().zip(x).for_each(|(y, &x)| {
        let r = x.max(0.0);
        *y = r * r
    });
}

#[inline(always)]
fn relu_sq_back(x: &[f32], d: &mut [f32]) {
    d.iter_mut()
        .zip(x)
        .for_each(|(d, &x)| *d *= 2.0 * x.max(0.0));
}

/// `d ← d · (1 - y²)` for `y = tanh(x)`.
#[inline(always)]
fn tanh_back(y: &[f32], d: &mut [f32]) {
    d.iter_mut().zip(y).for_each(|(d, &y)| *d *= 1.0 - y * y);
}

/// `d ← d · y(1 - y)` for `y = sigmoid(x)`.
#[inline(always)]
fn sigmoid_back(y: &[f32], d: &mut [f32]) {
    d.iter_mut().zip(y).for_each(|(d, &y)| *d *= y * (1.0 - y));
}

/// `v = vpre + (vf - vpre)·gate`.
#[inline(always)]
fn v_mix(vpre: &[f32], vf: &[f32], gate: &[f32], v: &mut [f32]) {
    for i in 0..v.len() {
        v[i] = vpre[i] + (vf[i] - vpre[i]) * gate[i];
    }
}

/// The backward pass of [`v_mix`] followed by the gate's sigmoid: `dv` becomes the gradient
/// of `vpre`, `dvf` gains that of `v_first`, `dgate` is set to that of the gate's logits.
#[inline(always)]
fn v_mix_back(
    vpre: &[f32],
    vf: &[f32],
    gate: &[f32],
    dv: &mut [f32],
    dvf: &mut [f32],
    dgate: &mut [f32],
) {
    for i in 0..dv.len() {
        let (d, s) = (dv[i], gate[i]);
        dvf[i] += d * s;
        dgate[i] = d * (vf[i] - vpre[i]) * s * (1.0 - s);
        dv[i] = d * (1.0 - s);
    }
}

/// Layer norm of every row: `out = x̂·w + b`, keeping `x̂` and `1/σ` for the backward pass.
fn layer_norm(x: &[f32], w: &[f32], b: &[f32], out: &mut [f32], hat: &mut [f32], rstd: &mut [f32]) {
    #[inline(always)]
    fn body(x: &[f32], w: &[f32], b: &[f32], out: &mut [f32], hat: &mut [f32], rstd: &mut [f32]) {
        let c = w.len();
        let inv = 1.0 / c as f32;
        for (r, ((xr, or), hr)) in x
            .chunks_exact(c)
            .zip(out.chunks_exact_mut(c))
            .zip(hat.chunks_exact_mut(c))
            .enumerate()
        {
            let mu = sum(xr) * inv;
            let var = sq_dev(xr, mu) * inv;
            let rs = 1.0 / (var + LN_EPS).sqrt();
            rstd[r] = rs;
            for j in 0..c {
                let h = (xr[j] - mu) * rs;
                hr[j] = h;
                or[j] = h * w[j] + b[j];
            }
        }
    }
    dispatch!(body(x, w, b, out, hat, rstd))
}

/// The backward pass of [`layer_norm`]: `dx (+)= ∂/∂x`, `dw += Σ dout·x̂`, `db += Σ dout`.
#[allow(clippy::too_many_arguments)]
fn layer_norm_back(
    dout: &[f32],
    hat: &[f32],
    rstd: &[f32],
    w: &[f32],
    dx: &mut [f32],
    acc: bool,
    dw: &mut [f32],
    db: &mut [f32],
) {
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn body(
        dout: &[f32],
        hat: &[f32],
        rstd: &[f32],
        w: &[f32],
        dx: &mut [f32],
        acc: bool,
        dw: &mut [f32],
        db: &mut [f32],
    ) {
        let c = w.len();
        let inv = 1.0 / c as f32;
        for (r, ((gr, hr), dr)) in dout
            .chunks_exact(c)
            .zip(hat.chunks_exact(c))
            .zip(dx.chunks_exact_mut(c))
            .enumerate()
        {
            // Sixteen partial sums each (one running sum does not vectorise).
            let (s1, s2) = (scan::dot(gr, w), dot3(gr, w, hr));
            for j in 0..c {
                dw[j] += gr[j] * hr[j];
                db[j] += gr[j];
            }
            let (m1, m2, rs) = (s1 * inv, s2 * inv, rstd[r]);
            for j in 0..c {
                let d = (gr[j] * w[j] - m1 - hr[j] * m2) * rs;
                dr[j] = if acc { dr[j] + d } else { d };
            }
        }
    }
    dispatch!(body(dout, hat, rstd, w, dx, acc, dw, db))
}

/// `Σ x` with sixteen partial sums (one running sum is a serial chain that does not vectorise).
#[inline(always)]
fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let ch = x.chunks_exact(16);
    let tail: f32 = ch.remainder().iter().sum();
    for c in ch {
        for l in 0..16 {
            acc[l] += c[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `Σ (x - mu)²` with sixteen partial sums.
#[inline(always)]
fn sq_dev(x: &[f32], mu: f32) -> f32 {
    let mut acc = [0f32; 16];
    let ch = x.chunks_exact(16);
    let tail: f32 = ch.remainder().iter().map(|&v| (v - mu) * (v - mu)).sum();
    for c in ch {
        for l in 0..16 {
            acc[l] += (c[l] - mu) * (c[l] - mu);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `Σ a·b·c` with sixteen partial sums.
#[inline(always)]
fn dot3(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
    let n = a.len().min(b.len()).min(c.len());
    let (a, b, c) = (&a[..n], &b[..n], &c[..n]);
    let mut acc = [0f32; 16];
    let mut tail = 0f32;
    let full = n / 16 * 16;
    for i in full..n {
        tail += a[i] * b[i] * c[i];
    }
    for ((x, y), z) in a
        .chunks_exact(16)
        .zip(b.chunks_exact(16))
        .zip(c.chunks_exact(16))
    {
        for l in 0..16 {
            acc[l] += x[l] * y[l] * z[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The end of RWKV-7 time mixing, per head of size `n`:
/// `o = (GroupNorm(y)·lw + lb + bonus·v)·g` with `bonus = Σ r·kmod·r_k` (`ins`: r, kmod, v,
/// g; `par`: r_k, ln_x weight and bias); keeps x̂, 1/σ and the bonus for the backward pass.
fn gn_out(
    n: usize,
    y: &[f32],
    ins: [&[f32]; 4],
    par: [&[f32]; 3],
    o: &mut [f32],
    keep: [&mut [f32]; 3],
) {
    #[inline(always)]
    fn body(
        n: usize,
        y: &[f32],
        [r, km, v, g]: [&[f32]; 4],
        [r_k, lw, lb]: [&[f32]; 3],
        o: &mut [f32],
        [hat, rstd, bonus]: [&mut [f32]; 3],
    ) {
        let c = r_k.len();
        let inv = 1.0 / n as f32;
        for (gi, base) in (0..y.len()).step_by(n).enumerate() {
            let s = base..base + n;
            let ch = base % c..base % c + n;
            let ys = &y[s.clone()];
            let mu = sum(ys) * inv;
            let hs = &mut hat[s.clone()];
            for j in 0..n {
                hs[j] = ys[j] - mu;
            }
            let var = scan::dot(hs, hs) * inv;
            let rs = 1.0 / (var + GN_EPS as f32).sqrt();
            rstd[gi] = rs;
            let bo = dot3(&r[s.clone()], &km[s.clone()], &r_k[ch.clone()]);
            bonus[gi] = bo;
            let (lw, lb, vs, gs) = (&lw[ch.clone()], &lb[ch], &v[s.clone()], &g[s.clone()]);
            let os = &mut o[s];
            for j in 0..n {
                hs[j] *= rs;
                os[j] = (hs[j] * lw[j] + lb[j] + bo * vs[j]) * gs[j];
            }
        }
    }
    dispatch!(body(n, y, ins, par, o, keep))
}

/// The backward pass of [`gn_out`] from `dout`: sets the gradients of `y, r, v, g, kmod`
/// (`outs`) and adds those of `r_k` and the ln_x weight and bias (`dpar`).
fn gn_out_back(
    n: usize,
    dout: &[f32],
    kept: [&[f32]; 3],
    ins: [&[f32]; 4],
    par: [&[f32]; 3],
    outs: [&mut [f32]; 5],
    dpar: [&mut [f32]; 3],
) {
    #[inline(always)]
    fn body(
        n: usize,
        dout: &[f32],
        [hat, rstd, bonus]: [&[f32]; 3],
        [r, km, v, g]: [&[f32]; 4],
        [r_k, lw, lb]: [&[f32]; 3],
        [dy, dr, dv, dg, dkm]: [&mut [f32]; 5],
        [dr_k, dlw, dlb]: [&mut [f32]; 3],
    ) {
        let c = r_k.len();
        let inv = 1.0 / n as f32;
        let mut dn = [0f32; 256];
        for (gi, base) in (0..dout.len()).step_by(n).enumerate() {
            let s = base..base + n;
            let ch = base % c..base % c + n;
            let (hs, ds, gs, vs) = (
                &hat[s.clone()],
                &dout[s.clone()],
                &g[s.clone()],
                &v[s.clone()],
            );
            let (lw, lb, rk) = (&lw[ch.clone()], &lb[ch.clone()], &r_k[ch.clone()]);
            let (dlw, dlb, drk) = (&mut dlw[ch.clone()], &mut dlb[ch.clone()], &mut dr_k[ch]);
            let bo = bonus[gi];
            let (dgs, dvs) = (&mut dg[s.clone()], &mut dv[s.clone()]);
            let dn = &mut dn[..n];
            let mut acc = [0f32; 16];
            for j in 0..n {
                let z = hs[j] * lw[j];
                let dz = ds[j] * gs[j];
                dgs[j] = ds[j] * (z + lb[j] + bo * vs[j]);
                dvs[j] = dz * bo;
                acc[j % 16] += dz * vs[j];
                dlw[j] += dz * hs[j];
                dlb[j] += dz;
                dn[j] = dz * lw[j];
            }
            let dbo: f32 = acc.iter().sum();
            let m1 = sum(dn) * inv;
            let m2 = scan::dot(dn, hs) * inv;
            let rs = rstd[gi];
            let dys = &mut dy[s.clone()];
            for j in 0..n {
                dys[j] = (dn[j] - m1 - hs[j] * m2) * rs;
            }
            let (rs_, kms) = (&r[s.clone()], &km[s.clone()]);
            let (drs, dkms) = (&mut dr[s.clone()], &mut dkm[s]);
            for j in 0..n {
                drs[j] = dbo * kms[j] * rk[j];
                dkms[j] = dbo * rs_[j] * rk[j];
                drk[j] += dbo * rs_[j] * kms[j];
            }
        }
    }
    dispatch!(body(n, dout, kept, ins, par, outs, dpar))
}

/// Token shift and mix (RWKV-5 to 7): `out_k[r] = x[r] + (x[r-1] - x[r])·mix_k`, with a zero
/// row before the first token of each window of `t` rows.
fn shift_fwd(x: &[f32], t: usize, mixes: &[&[f32]], out: &mut [f32]) {
    #[inline(always)]
    fn body(x: &[f32], t: usize, mixes: &[&[f32]], out: &mut [f32]) {
        let c = mixes[0].len();
        let n = x.len();
        for (k, mix) in mixes.iter().enumerate() {
            let o = &mut out[k * n..(k + 1) * n];
            for r in 0..n / c {
                let cur = &x[r * c..(r + 1) * c];
                let or = &mut o[r * c..(r + 1) * c];
                if r % t == 0 {
                    for j in 0..c {
                        or[j] = cur[j] - cur[j] * mix[j];
                    }
                } else {
                    let prev = &x[(r - 1) * c..r * c];
                    for j in 0..c {
                        or[j] = cur[j] + (prev[j] - cur[j]) * mix[j];
                    }
                }
            }
        }
    }
    dispatch!(body(x, t, mixes, out))
}

/// The backward pass of [`shift_fwd`]: sets `dx`, writes `Σ_r dout_k·(x[r-1] - x[r])` into
/// `dmix [K, C]`. Row by row, so that each row of `dx` is written once from all `K` mixes.
fn shift_back(
    x: &[f32],
    t: usize,
    mixes: &[&[f32]],
    dout: &[f32],
    dx: &mut [f32],
    dmix: &mut [f32],
) {
    #[inline(always)]
    fn body(x: &[f32], t: usize, mixes: &[&[f32]], dout: &[f32], dx: &mut [f32], dmix: &mut [f32]) {
        let c = mixes[0].len();
        let n = x.len();
        let rows = n / c;
        let zero = [0f32; 4096];
        dmix.iter_mut().for_each(|z| *z = 0.0);
        for r in 0..rows {
            let cur = &x[r * c..(r + 1) * c];
            let prev = if r % t == 0 {
                &zero[..c]
            } else {
                &x[(r - 1) * c..r * c]
            };
            let has_next = r + 1 < rows && (r + 1) % t != 0;
            let dr = &mut dx[r * c..(r + 1) * c];
            dr.iter_mut().for_each(|z| *z = 0.0);
            for (k, mix) in mixes.iter().enumerate() {
                let mix = &mix[..c];
                let g = &dout[k * n + r * c..k * n + (r + 1) * c];
                let dm = &mut dmix[k * c..(k + 1) * c];
                for j in 0..c {
                    dr[j] += g[j] * (1.0 - mix[j]);
                    dm[j] += g[j] * (prev[j] - cur[j]);
                }
                if has_next {
                    let gn = &dout[k * n + (r + 1) * c..k * n + (r + 2) * c];
                    for j in 0..c {
                        dr[j] += gn[j] * mix[j];
                    }
                }
            }
        }
    }
    dispatch!(body(x, t, mixes, dout, dx, dmix))
}

/// Cross-entropy of every row of `logits [M, V]` against `targets`; returns the sum over rows
/// (in f64) and overwrites the logits with `scale ×` the gradient, plus RWKV-LM's L2Wrap term
/// `l2 · max` on each row's largest logit.
#[inline(always)]
fn cross_entropy(logits: &mut [f32], targets: &[u32], v: usize, scale: f32, l2: f32) -> f64 {
    let mut total = 0f64;
    for (row, &tg) in logits.chunks_exact_mut(v).zip(targets) {
        // The largest logit with sixteen running maxima (vectorised), then its first place.
        let mut m16 = [f32::NEG_INFINITY; 16];
        let ch = row.chunks_exact(16);
        let mut mx = ch
            .remainder()
            .iter()
            .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        for c in ch {
            for l in 0..16 {
                m16[l] = m16[l].max(c[l]);
            }
        }
        mx = m16.iter().fold(mx, |a, &b| a.max(b));
        let arg = row.iter().position(|&z| z == mx).unwrap_or(0);
        let target = row[tg as usize];
        for z in row.iter_mut() {
            *z = exp(*z - mx);
        }
        let s = sum(row);
        total += (s.ln() + mx - target) as f64;
        let k = scale / s;
        row.iter_mut().for_each(|z| *z *= k);
        row[tg as usize] -= scale;
        row[arg] += l2 * mx;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TrainModel;
    use candle_core::DType;
    use rwkv_core::checkpoint::Generation;
    use rwkv_core::init::{init_tensors, InitSpec, Rng};

    /// The hand-written pass gives the candle graph's loss and every gradient, on a model
    /// whose weights are all random (so that no gradient is trivially zero), with windows
    /// that end inside a WKV chunk and several heads: head sizes 16 and 32 through the vector
    /// scan (where the CPU has it), 32 and 24 through the portable one.
    #[test]
    fn matches_the_graph() {
        for (head, portable) in [(16, false), (32, false), (32, true), (24, true)] {
            super::scan::PORTABLE.with(|p| p.set(portable));
            compare(head);
        }
        super::scan::PORTABLE.with(|p| p.set(false));
    }

    /// With bfloat16 products (where the CPU has them) the pass gives what the f32 pass gives
    /// when every product's inputs are rounded to bfloat16 first (the forms prepared once per
    /// step, the packing and the pairing of the products included). Against the graph in f32
    /// the rounding alone moves this random model's gradients by up to 100 % in its first
    /// block (its products amplify input errors about a thousandfold, as the f32 test shows:
    /// 1e-7 rounding, 1e-4 differences); a mistake in the packing is off by 100 %.
    #[test]
    fn bf16_products_match_rounded_f32_products() {
        if !rwkv_core::cpu::has_avx512_bf16() {
            eprintln!("no AVX512-BF16 here: the products run in f32 (tested above)");
            return;
        }
        let (want_loss, want) = run_pass(32, false, true);
        let (got_loss, got) = run_pass(32, true, false);
        assert!(
            (got_loss - want_loss).abs() < 1e-5 * want_loss.abs(),
            "loss {got_loss} vs {want_loss}"
        );
        let mut worst = (0f64, 0);
        for (i, (w, g)) in want.iter().zip(&got).enumerate() {
            let scale = w.iter().fold(0f32, |a, b| a.max(b.abs())).max(1e-8);
            let err = w.iter().zip(g).fold(0f32, |a, (w, g)| a.max((w - g).abs())) / scale;
            if err as f64 > worst.0 {
                worst = (err as f64, i);
            }
        }
        eprintln!(
            "bf16: loss {got_loss} vs {want_loss}, largest relative gradient error {worst:?}"
        );
        // Rounding ties that the two sums break differently move a few values by one
        // bfloat16 step (amplified as above): up to about 5e-3.
        assert!(worst.0 < 2e-2, "largest relative gradient error {worst:?}");
    }

    /// The hand-written pass on [`model`]'s random weights (f32 products whose inputs are
    /// rounded to bfloat16 with `round`): the mean loss and the gradients.
    fn run_pass(head: usize, bf16: bool, round: bool) -> (f64, Vec<Vec<f32>>) {
        let (names, shapes, vals, _, toks, tgts) = model(head);
        let (bs, t) = (2, 21);
        let mut f = Fused7::new(&names, &shapes, head).unwrap();
        f.set_bf16(bf16);
        let mut work = f.work(bs, t);
        let mut g = f.zero_grads();
        let p: Vec<&[f32]> = vals.iter().map(|v| v.as_slice()).collect();
        let mut pr = Prepared::default();
        f.prepare(&p, &mut pr);
        let scale = 1.0 / (bs * t) as f32;
        rwkv_core::kernels::sgemm::ROUND_BF16.with(|r| r.set(round));
        let sum = f.accumulate(&p, &pr, &toks, &tgts, scale, 1e-4, &mut work, &mut g);
        rwkv_core::kernels::sgemm::ROUND_BF16.with(|r| r.set(false));
        (sum.unwrap() / (bs * t) as f64, g)
    }

    /// A 3-block model of width 96 with random weights everywhere (so that no gradient is
    /// trivially zero), its f64 graph, and 2 windows of 21 tokens with targets.
    #[allow(clippy::type_complexity)]
    fn model(
        head: usize,
    ) -> (
        Vec<String>,
        Vec<Vec<usize>>,
        Vec<Vec<f32>>,
        TrainModel,
        Vec<u32>,
        Vec<u32>,
    ) {
        let spec = InitSpec {
            arch: Generation::V7,
            n_layer: 3,
            n_embd: 96,
            vocab: 50,
            head_size: head,
            seed: 7,
        };
        let mut rng = Rng::new(3);
        let mut ts = init_tensors(&spec).unwrap();
        for (name, _, data) in ts.iter_mut() {
            let s = if name.contains("ln") && name.ends_with("weight") {
                1.0
            } else {
                0.0
            };
            for x in data.iter_mut() {
                *x = s + (rng.normal() * 0.3) as f32;
            }
        }
        let names: Vec<String> = ts.iter().map(|t| t.0.clone()).collect();
        let shapes: Vec<Vec<usize>> = ts.iter().map(|t| t.1.clone()).collect();
        let vals: Vec<Vec<f32>> = ts.iter().map(|t| t.2.clone()).collect();
        let model = TrainModel::from_tensors(ts, DType::F64).unwrap();
        let (bs, t) = (2, 21);
        let toks: Vec<u32> = (0..bs * t).map(|_| (rng.next_u64() % 50) as u32).collect();
        let tgts: Vec<u32> = (0..bs * t).map(|_| (rng.next_u64() % 50) as u32).collect();
        (names, shapes, vals, model, toks, tgts)
    }

    fn compare(head: usize) {
        let (_, _, _, model, toks, tgts) = model(head);
        let (bs, t) = (2, 21);
        let loss = model.loss(&toks, &tgts, bs, t, 1e-4).unwrap();
        let want_loss = loss.to_scalar::<f64>().unwrap();
        let gs = loss.backward().unwrap();
        let (got_loss, g) = run_pass(head, false, false);
        assert!(
            (got_loss - want_loss).abs() < 1e-5 * want_loss.abs(),
            "loss {got_loss} vs {want_loss}"
        );
        let mut worst = (0f64, String::new());
        for ((name, var), got) in model.vars().zip(&g) {
            let want: Vec<f64> = match gs.get(var.as_tensor()) {
                Some(t) => t.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
                None => vec![0.0; got.len()],
            };
            let scale = want.iter().fold(0f64, |a, b| a.max(b.abs())).max(1e-8);
            let err = want
                .iter()
                .zip(got)
                .fold(0f64, |a, (w, g)| a.max((w - *g as f64).abs()))
                / scale;
            if err > worst.0 {
                worst = (err, name.to_string());
            }
        }
        eprintln!("head size {head}: largest relative gradient error {worst:?}");
        assert!(worst.0 < 1e-4, "largest relative gradient error {worst:?}");
    }
}
