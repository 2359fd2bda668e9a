//! RWKV-5.2 "Eagle" and RWKV-6.0 "Finch": per block, time mixing over heads with a per-channel
//! decay and bonus (`time_faaaa`), five `[C, C]` projections (with the SiLU gate) and a
//! GroupNorm (`ln_x`); v6.0 makes the token-shift mixes (`time_maa_*` and their LoRA) and the
//! decay (`time_decay_w1/w2`) depend on the input. Channel mixing as RWKV-4's, with
//! F = ⌊3.5·C / 32⌋·32.

use super::v4::gated_ffn_matrices;
use super::{pow_mix, pow_values, ramp, Dims, Init, Params, Role};
use crate::checkpoint::Generation;
use crate::tensor::Layout;

/// The channel-mix size of RWKV-LM's v5/v6 trainer: `int(3.5·C / 32)·32`.
pub(crate) fn ffn_dim(c: usize) -> usize {
    (c * 7 / 2) / 32 * 32
}

/// v6.0's LoRA ranks as RWKV-LM sets them (the mixes' `maa` and the decay's).
pub(crate) fn lora_ranks(c: usize) -> Vec<(&'static str, usize)> {
    let (dm, dd) = if c == 4096 { (64, 128) } else { (32, 64) };
    vec![("maa", dm), ("decay", dd)]
}

pub(super) fn blocks(d: &Dims, o: &mut Params) {
    let v6 = d.generation == Generation::V6_0;
    let (l, c, n, f) = (d.n_layer, d.n_embd, d.head_size, d.ffn_dim);
    let h = d.n_head();
    let (dm, dd) = (d.rank("maa"), d.rank("decay"));
    // v6 mixes weight the other side of the shift: `1 - (ddd^e + add)`, in f32.
    let one_minus = |v: Vec<f32>| Init::Values(v.into_iter().map(|x| 1.0 - x).collect());
    for i in 0..l {
        let (b, r01, r10) = o.block_start(i, l, c);
        let p = format!("{b}.att");
        let decay: Vec<f32> = ramp(c)
            .map(|r| (-6.0 + 5.0 * r.powf(0.7 + 1.3 * r01)) as f32)
            .collect();
        let first: Vec<f32> = ramp(c)
            .enumerate()
            .map(|(j, r)| {
                let zigzag = (((j + 1) % 3) as f64 - 1.0) * 0.1;
                (r01 * (1.0 - r) + zigzag) as f32
            })
            .collect();
        if v6 {
            for (nm, e, add) in [
                ("x", r10, 0.0),
                ("w", r10, 0.0),
                ("k", r10, 0.0),
                ("v", r10, 0.3 * r01),
                ("r", 0.5 * r10, 0.0),
                ("g", 0.5 * r10, 0.0),
            ] {
                o.vec(
                    format!("{p}.time_maa_{nm}"),
                    c,
                    one_minus(pow_values(c, e, add)),
                );
            }
            let lora = Role::Matrix(Layout::InOut);
            o.push(
                format!("{p}.time_maa_w1"),
                &[c, 5 * dm],
                lora,
                Init::Uniform(1e-4),
            );
            o.push(
                format!("{p}.time_maa_w2"),
                &[5, dm, c],
                Role::Stacked,
                Init::Uniform(1e-4),
            );
            o.vec(format!("{p}.time_decay"), c, Init::Values(decay));
            o.push(
                format!("{p}.time_decay_w1"),
                &[c, dd],
                lora,
                Init::Uniform(1e-4),
            );
            o.push(
                format!("{p}.time_decay_w2"),
                &[dd, c],
                lora,
                Init::Uniform(1e-4),
            );
        } else {
            for (nm, e, add) in [
                ("k", r10, 0.0),
                ("v", r10, 0.3 * r01),
                ("r", 0.5 * r10, 0.0),
                ("g", 0.5 * r10, 0.0),
            ] {
                o.vec(format!("{p}.time_mix_{nm}"), c, pow_mix(c, e, add));
            }
            o.push(
                format!("{p}.time_decay"),
                &[h, n],
                Role::Vector,
                Init::Values(decay),
            );
        }
        o.push(
            format!("{p}.time_faaaa"),
            &[h, n],
            Role::Vector,
            Init::Values(first),
        );
        o.linear(format!("{p}.receptance.weight"), c, c, 1.0, true);
        o.linear(format!("{p}.key.weight"), c, c, 0.1, true);
        o.linear(format!("{p}.value.weight"), c, c, 1.0, true);
        o.linear(format!("{p}.output.weight"), c, c, 0.0, true);
        o.linear(format!("{p}.gate.weight"), c, c, 0.1, true);
        o.norm(&format!("{p}.ln_x"), c);
        let q = format!("{b}.ffn");
        if v6 {
            o.vec(
                format!("{q}.time_maa_k"),
                c,
                one_minus(pow_values(c, r10, 0.0)),
            );
            o.vec(
                format!("{q}.time_maa_r"),
                c,
                one_minus(pow_values(c, r10, 0.0)),
            );
        } else {
            o.vec(format!("{q}.time_mix_k"), c, pow_mix(c, r10, 0.0));
            o.vec(format!("{q}.time_mix_r"), c, pow_mix(c, r10, 0.0));
        }
        gated_ffn_matrices(o, &q, c, f);
    }
}
