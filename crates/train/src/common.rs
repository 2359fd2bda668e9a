//! What the training passes and the graph share: how their generic loops are compiled, and how
//! the WKV-7 scans checkpoint their states.

/// Evaluates `$e` compiled for AVX2 and FMA when the CPU has them. The kernels here are generic
/// code left to the compiler's vectoriser, and the baseline x86-64 target only has SSE2.
macro_rules! dispatch {
    ($e:expr) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn fast<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            if rwkv_core::cpu::has_avx2() {
                // SAFETY: AVX2 and FMA were detected at run time.
                unsafe {
                    fast(
                        #[inline(always)]
                        || $e,
                    )
                }
            } else {
                $e
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            $e
        }
    }};
}
pub(crate) use dispatch;

/// Tokens between state checkpoints in the WKV-7 forward pass (as the official CUDA kernel):
/// memory holds `T/16` states per head instead of `T`, and the backward pass recomputes the
/// states inside one chunk at a time.
pub const WKV_CHUNK: usize = 16;
