//! What this CPU can do, detected once per process: the instruction sets the kernels choose
//! between at run time. Every kernel asks here, so that one environment variable turns a path
//! off everywhere: `RWKV_NO_SIMD` (portable code only), `RWKV_NO_AVX512` (the AVX2 paths on
//! an AVX-512 machine), `RWKV_NO_BF16` (f32 training products). The checks are `#[inline]`:
//! the kernels ask once per row, and a call into another code-generation unit would cost more
//! than the load of the cached answer.

use std::sync::OnceLock;

fn unset(var: &str) -> bool {
    std::env::var_os(var).is_none()
}

/// Whether AVX2, FMA and F16C are available.
#[inline]
pub fn has_avx2() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            unset("RWKV_NO_SIMD")
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Whether AVX-512 (F, BW, VL) is available on top of AVX2 (`RWKV_NO_AVX512` turns it off, to
/// measure or test the AVX2 paths on the same machine).
#[inline]
pub fn has_avx512() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            has_avx2()
                && unset("RWKV_NO_AVX512")
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Whether AVX-512 with VNNI (integer dot products) is available.
#[inline]
pub fn has_avx512_vnni() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            has_avx512()
                && is_x86_feature_detected!("avx512dq")
                && is_x86_feature_detected!("avx512vnni")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Whether AVX512-BF16 (bfloat16 pair products) is available (`RWKV_NO_BF16` turns it off).
#[inline]
pub fn has_avx512_bf16() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            has_avx512() && unset("RWKV_NO_BF16") && is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Whether the NEON kernels are used: always on aarch64 (NEON is part of every aarch64 CPU)
/// unless `RWKV_NO_SIMD` is set.
#[inline]
pub fn has_neon() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| cfg!(target_arch = "aarch64") && unset("RWKV_NO_SIMD"))
}

/// Whether the integer kernels may use `SDOT` (the `dotprod` extension, Armv8.2 and later).
#[inline]
pub fn has_neon_dotprod() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "aarch64")]
        {
            has_neon() && std::arch::is_aarch64_feature_detected!("dotprod")
        }
        #[cfg(not(target_arch = "aarch64"))]
        {
            false
        }
    })
}

/// Which instruction set the kernels use on this machine.
pub fn simd_level() -> &'static str {
    if has_avx512() {
        "avx512+avx2+fma+f16c"
    } else if has_avx2() {
        "avx2+fma+f16c"
    } else if has_neon_dotprod() {
        "neon+dotprod"
    } else if has_neon() {
        "neon"
    } else {
        "portable"
    }
}
