//! RWKV-4 (the paper's architecture): per block, time mixing with a per-channel decay
//! (`time_decay`, used as `-exp`) and bonus (`time_first`), three token-shift mixes and four
//! `[C, C]` projections; channel mixing `sigmoid(r W_r) · (relu(k W_k)² W_v)` (F = 4C).

use super::{pow_mix, ramp, Dims, Init, Params, Role};

pub(super) fn blocks(d: &Dims, o: &mut Params) {
    let (l, c, f) = (d.n_layer, d.n_embd, d.ffn_dim);
    for i in 0..l {
        let (b, r01, r10) = o.block_start(i, l, c);
        let p = format!("{b}.att");
        let decay = ramp(c)
            .map(|r| (-5.0 + 8.0 * r.powf(0.7 + 1.3 * r01)) as f32)
            .collect();
        o.push(
            format!("{p}.time_decay"),
            &[c],
            Role::Vector,
            Init::Values(decay),
        );
        let first = (0..c)
            .map(|j| (0.3f64.ln() + (((j + 1) % 3) as f64 - 1.0) * 0.5) as f32)
            .collect();
        o.push(
            format!("{p}.time_first"),
            &[c],
            Role::Vector,
            Init::Values(first),
        );
        o.vec(format!("{p}.time_mix_k"), c, pow_mix(c, r10, 0.0));
        o.vec(format!("{p}.time_mix_v"), c, pow_mix(c, r10, 0.3 * r01));
        o.vec(format!("{p}.time_mix_r"), c, pow_mix(c, 0.5 * r10, 0.0));
        o.linear(format!("{p}.key.weight"), c, c, 0.1, true);
        o.linear(format!("{p}.value.weight"), c, c, 1.0, true);
        o.linear(format!("{p}.receptance.weight"), c, c, 1.0, true);
        o.linear(format!("{p}.output.weight"), c, c, 0.0, true);
        let q = format!("{b}.ffn");
        o.vec(format!("{q}.time_mix_k"), c, pow_mix(c, r10, 0.0));
        o.vec(format!("{q}.time_mix_r"), c, pow_mix(c, r10, 0.0));
        gated_ffn_matrices(o, &q, c, f);
    }
}

/// The matrices of the gated channel mix of v4, v5.2 and v6.0, with generate_init_weight's
/// rule (key orthogonal, receptance and value zero).
pub(super) fn gated_ffn_matrices(o: &mut Params, q: &str, c: usize, f: usize) {
    o.linear(format!("{q}.key.weight"), f, c, 1.0, true);
    o.linear(format!("{q}.receptance.weight"), c, c, 0.0, true);
    o.linear(format!("{q}.value.weight"), c, f, 0.0, true);
}
