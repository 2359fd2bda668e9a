//! AdamW with RWKV-LM's parameter groups, and the learning-rate schedule.

/// Optimizer hyper-parameters (RWKV-LM `train_temp` defaults: betas 0.9/0.99, eps 1e-18).
#[derive(Debug, Clone)]
pub struct AdamConfig {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the root of the second moment.
    pub eps: f64,
    /// Decoupled weight decay, applied to 2-D `.weight` tensors only.
    pub weight_decay: f64,
}

/// One parameter's optimizer state.
pub struct Slot {
    /// Parameter name (decides the group).
    pub name: String,
    /// Number of dimensions of the parameter.
    pub ndim: usize,
    /// First moment.
    pub m: Vec<f32>,
    /// Second moment.
    pub v: Vec<f32>,
}

impl Slot {
    /// A fresh slot.
    pub fn new(name: &str, ndim: usize, len: usize) -> Slot {
        Slot {
            name: name.to_string(),
            ndim,
            m: vec![0.0; len],
            v: vec![0.0; len],
        }
    }

    /// RWKV-LM's groups (`configure_optimizers`): 2-D `.weight` tensors decay; `att.w0` (the
    /// decay base of RWKV-7) learns at twice the rate; everything else plain.
    pub fn group(&self) -> (f64, bool) {
        let lr_mult = if self.name.ends_with("att.w0") {
            2.0
        } else {
            1.0
        };
        let decay = self.ndim >= 2 && self.name.ends_with(".weight");
        (lr_mult, decay)
    }

    /// One AdamW update of `p` with gradient `g · gscale` (`gscale`: the clipping factor) at
    /// step `t` (1-based), as `torch.optim.AdamW`.
    #[allow(clippy::too_many_arguments)]
    pub fn update(
        &mut self,
        p: &mut [f32],
        g: &[f32],
        gscale: f32,
        lr: f64,
        t: u64,
        c: &AdamConfig,
    ) {
        let (mult, decay) = self.group();
        let lr = lr * mult;
        let bc1 = 1.0 - c.beta1.powi(t as i32);
        let bc2 = 1.0 - c.beta2.powi(t as i32);
        let wd = if decay {
            1.0 - lr * c.weight_decay
        } else {
            1.0
        } as f32;
        let (b1, b2) = (c.beta1 as f32, c.beta2 as f32);
        let step = (lr / bc1) as f32;
        let bc2s = bc2.sqrt() as f32;
        let eps = c.eps as f32;
        // Zipped slices (no index checks), so that the loop compiles to vector code (AVX2
        // where present).
        let n = p.len();
        assert!(g.len() == n && self.m.len() == n && self.v.len() == n);
        #[allow(clippy::too_many_arguments)]
        #[inline(always)]
        fn body(
            p: &mut [f32],
            g: &[f32],
            m: &mut [f32],
            v: &mut [f32],
            gscale: f32,
            (b1, b2): (f32, f32),
            (wd, step, bc2s, eps): (f32, f32, f32, f32),
        ) {
            for (((pi, &gi), mi), vi) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                let gi = gi * gscale;
                *mi = b1 * *mi + (1.0 - b1) * gi;
                *vi = b2 * *vi + (1.0 - b2) * gi * gi;
                *pi = *pi * wd - step * *mi / (vi.sqrt() / bc2s + eps);
            }
        }
        crate::common::dispatch!(body(
            p,
            g,
            &mut self.m,
            &mut self.v,
            gscale,
            (b1, b2),
            (wd, step, bc2s, eps)
        ));
    }
}

/// The learning rate at `step` (0-based) of `total`: a linear ramp from 0.01× to 1× of `peak`
/// over `warmup` steps, then a cosine from `peak` down to `final_lr` at the last step.
pub fn lr_at(step: u64, total: u64, warmup: u64, peak: f64, final_lr: f64) -> f64 {
    if step < warmup {
        return peak * (0.01 + 0.99 * step as f64 / warmup as f64);
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let prog = ((step - warmup) as f64 / span).min(1.0);
    final_lr + (peak - final_lr) * 0.5 * (1.0 + (std::f64::consts::PI * prog).cos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_ramps_then_decays() {
        assert!((lr_at(0, 100, 10, 1.0, 0.1) - 0.01).abs() < 1e-12);
        assert!((lr_at(10, 100, 10, 1.0, 0.1) - 1.0).abs() < 1e-12);
        assert!((lr_at(100, 100, 10, 1.0, 0.1) - 0.1).abs() < 1e-12);
        assert!(lr_at(50, 100, 10, 1.0, 0.1) < 1.0);
    }

    #[test]
    fn groups_follow_rwkv_lm() {
        assert_eq!(Slot::new("blocks.0.att.w0", 3, 1).group(), (2.0, false));
        assert_eq!(
            Slot::new("blocks.0.att.key.weight", 2, 1).group(),
            (1.0, true)
        );
        assert_eq!(Slot::new("blocks.0.att.w1", 2, 1).group(), (1.0, false));
        assert_eq!(Slot::new("blocks.0.ln1.weight", 1, 1).group(), (1.0, false));
    }
}
