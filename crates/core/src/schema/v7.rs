//! RWKV-7 "Goose" (x070): per block, time mixing with six token-shift mixes, the decay (`w`),
//! in-context learning rate (`a`), value-residual (`v`, blocks after the first) and gate (`g`)
//! LoRAs, the key normalisation (`k_k`, `k_a`), the bonus (`r_k`), four `[C, C]` projections
//! and a GroupNorm (`ln_x`); channel mixing `relu(k W_k)² W_v` with one mix (F = 4C).

use super::{ddd, one_minus_pow, ramp, Dims, Init, Params};

/// Value-residual tensors that some exporters also write for block 0, which defines `v_first`
/// and does not use them: accepted and ignored.
pub const BLOCK0_UNUSED: [&str; 3] = ["v0", "v1", "v2"];

/// RWKV-LM's LoRA rank rule: `max(32, round(k·√C / 32)·32)` (Python rounds half to even).
pub(crate) fn lora_rank(k: f64, c: usize) -> usize {
    let x = k * (c as f64).sqrt() / 32.0;
    let r = x.round();
    let r = if (x - x.trunc() - 0.5).abs() < 1e-12 && (r as i64) % 2 != 0 {
        r - 1.0
    } else {
        r
    };
    ((r as usize) * 32).max(32)
}

/// The official trainer's LoRA ranks for width `c` (0.1B, C = 768: w 64, a 64, v 32, g 128).
pub(crate) fn lora_ranks(c: usize) -> Vec<(&'static str, usize)> {
    vec![
        ("w", lora_rank(2.5, c)),
        ("a", lora_rank(2.5, c)),
        ("v", lora_rank(1.7, c)),
        ("g", lora_rank(5.0, c)),
    ]
}

pub(super) fn blocks(d: &Dims, o: &mut Params) {
    let (l, c, n, f) = (d.n_layer, d.n_embd, d.head_size, d.ffn_dim);
    let h = d.n_head();
    let (dw, da, dv, dg) = (d.rank("w"), d.rank("a"), d.rank("v"), d.rank("g"));
    let linear: Vec<f64> = ramp(c).map(|r| r - 0.5).collect();
    // -1 .. 1 within each head, squared with its sign.
    let zigzag: Vec<f64> = (0..c)
        .map(|j| {
            let z = ((j % n) as f64 - (n - 1) as f64 / 2.0) / ((n - 1).max(1) as f64 / 2.0);
            z * z.abs()
        })
        .collect();
    let per_channel =
        |f: &dyn Fn(usize) -> f64| Init::Values((0..c).map(|j| f(j) as f32).collect());
    for i in 0..l {
        let (b, r01, r10) = o.block_start(i, l, c);
        let p = format!("{b}.att");
        for (nm, e) in [
            ("x_r", 0.2),
            ("x_w", 0.9),
            ("x_k", 0.7),
            ("x_v", 0.7),
            ("x_a", 0.9),
            ("x_g", 0.2),
        ] {
            o.vec(format!("{p}.{nm}"), c, one_minus_pow(c, e * r10));
        }
        let www: Vec<f64> = ramp(c)
            .map(|r| -6.0 + 6.0 * r.powf(1.0 + r01.powf(0.3)))
            .collect();
        o.lora(format!("{p}.w1"), c, dw, Init::Zeros);
        o.lora(format!("{p}.w2"), dw, c, Init::Orthogonal(0.1));
        o.vec(
            format!("{p}.w0"),
            c,
            per_channel(&|j| www[j] + 0.5 + zigzag[j] * 2.5),
        );
        o.lora(format!("{p}.a1"), c, da, Init::Zeros);
        o.lora(format!("{p}.a2"), da, c, Init::Orthogonal(0.1));
        o.vec(
            format!("{p}.a0"),
            c,
            per_channel(&|j| -0.19 + zigzag[j] * 0.3 + linear[j] * 0.4),
        );
        if i > 0 {
            o.lora(format!("{p}.v1"), c, dv, Init::Zeros);
            o.lora(format!("{p}.v2"), dv, c, Init::Orthogonal(0.1));
            o.vec(
                format!("{p}.v0"),
                c,
                per_channel(&|j| 0.73 - linear[j] * 0.4),
            );
        }
        o.lora(format!("{p}.g1"), c, dg, Init::Zeros);
        o.lora(format!("{p}.g2"), dg, c, Init::Orthogonal(0.1));
        o.vec(
            format!("{p}.k_k"),
            c,
            per_channel(&|j| 0.71 - linear[j] * 0.1),
        );
        o.vec(format!("{p}.k_a"), c, Init::Const(1.02));
        o.push(
            format!("{p}.r_k"),
            &[h, n],
            super::Role::Vector,
            Init::Const(-0.04),
        );
        // generate_init_weight: receptance/value orthogonal, key ×0.1, output zero.
        o.linear(format!("{p}.receptance.weight"), c, c, 1.0, false);
        o.linear(format!("{p}.key.weight"), c, c, 0.1, false);
        o.linear(format!("{p}.value.weight"), c, c, 1.0, false);
        o.linear(format!("{p}.output.weight"), c, c, 0.0, false);
        let layer_scale = ((1 + i) as f64 / l as f64).powf(0.7) as f32;
        o.norm_with(&format!("{p}.ln_x"), c, Init::Const(layer_scale));
        let q = format!("{b}.ffn");
        o.vec(
            format!("{q}.x_k"),
            c,
            Init::Values(
                ddd(c)
                    .iter()
                    .map(|d| (1.0 - d.powf(r10.powi(4))) as f32)
                    .collect(),
            ),
        );
        o.linear(format!("{q}.key.weight"), f, c, 1.0, false);
        o.linear(format!("{q}.value.weight"), c, f, 0.0, false);
        if d.deep_embed > 0 {
            deep_embed(o, &format!("{q}."), d);
        }
    }
}

/// RWKV-7a's DeepEmbed tensors of one channel mix (prefix `q`), rank R: a per-token table
/// `s_emb [V, R²]` plus a projection `s_emb_x [R², C]` of the embedded input, read as an
/// `R×R` matrix per token, and the maps `s1 [C, R]`, `s2 [R, F]`, `s0 [F]` around it. The
/// official package folds `LN0(emb) s_emb_xᵀ` into the table at load; the model computes it
/// per token instead, so the table stays as stored. (RWKV-LM publishes no initialisation for
/// these: the values below make a new block start as plain RWKV-7, its gate `s0` at one.)
fn deep_embed(o: &mut Params, q: &str, d: &Dims) {
    let (c, f, v, r) = (d.n_embd, d.ffn_dim, d.vocab, d.deep_embed);
    o.push(
        format!("{q}s_emb.weight"),
        &[v, r * r],
        super::Role::Table,
        Init::Zeros,
    );
    o.linear(format!("{q}s_emb_x.weight"), r * r, c, 0.0, false);
    o.lora(format!("{q}s1"), c, r, Init::Zeros);
    o.lora(format!("{q}s2"), r, f, Init::Zeros);
    o.push(format!("{q}s0"), &[f], super::Role::Vector, Init::Ones);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_ranks_match_the_official_rule() {
        // RWKV-7 0.1B (C=768): w 64, a 64, v 32, g 128.
        assert_eq!(lora_rank(2.5, 768), 64);
        assert_eq!(lora_rank(1.7, 768), 32);
        assert_eq!(lora_rank(5.0, 768), 128);
        assert_eq!(lora_rank(2.5, 128), 32);
    }
}
