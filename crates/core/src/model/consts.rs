//! The constants of the RWKV formulas, named once for inference and training.
//!
//! They are `f64` so that the training code's f64 gradient checks see the exact decimal values;
//! every f32 use converts them (`as f32` gives the same bits as the f32 literal would).

/// LayerNorm epsilon of every block's norms, `ln0` and `ln_out` (PyTorch's `nn.LayerNorm`
/// default, which RWKV-LM uses).
pub const LN_EPS: f64 = 1e-5;

/// GroupNorm epsilon of the time-mixing output (`ln_x`) of v5.2, v6.0 and v7: RWKV-LM's
/// `1e-5 · head_size_divisor²` with the divisor 8.
pub const GN_EPS: f64 = 64e-5;

/// `F.normalize`'s epsilon: RWKV-7's removal key is `k·k_k / max(‖k·k_k‖, NORMALIZE_EPS)` per
/// head.
pub const NORMALIZE_EPS: f64 = 1e-12;

/// `e^-0.5`: RWKV-7's decay is `exp(-e^-0.5 · sigmoid(w0 + tanh(x W1) W2))`, RWKV-LM's
/// `exp(-exp(-softplus(-w) - 0.5))` written without the softplus. Training uses it exactly.
pub const V7_DECAY_SCALE: f64 = 0.606_530_659_712_633_4;

/// [`V7_DECAY_SCALE`] as the official inference package writes it (rounded to six digits).
/// Inference uses this one so that its logits are the package's.
pub const V7_DECAY_SCALE_OFFICIAL: f64 = 0.606531;
