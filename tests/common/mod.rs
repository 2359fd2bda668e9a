//! Helpers shared by the integration tests.
#![allow(dead_code)]

use rwkv::checkpoint::Checkpoint;
use std::path::PathBuf;

/// Path of a file under tests/fixtures.
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures")).join(rel)
}

/// The reference outputs of one generation.
pub struct Expected {
    pub ck: Checkpoint,
}

impl Expected {
    pub fn open(gen_dir: &str) -> Self {
        Expected {
            ck: Checkpoint::open(fixture(&format!("{gen_dir}/expected.safetensors"))).unwrap(),
        }
    }
    pub fn f32(&self, name: &str) -> Vec<f32> {
        self.ck
            .f32_vec(name)
            .unwrap_or_else(|e| panic!("{name}: {e}"))
    }
    pub fn tokens(&self, seq: &str) -> Vec<u32> {
        self.ck
            .i64_vec(&format!("{seq}.tokens"))
            .unwrap()
            .into_iter()
            .map(|t| t as u32)
            .collect()
    }
    pub fn has(&self, name: &str) -> bool {
        self.ck.has(name)
    }
}

/// Largest `|got - want| / (atol + rtol * |want|)` over the pair: <= 1 means within the
/// fixtures' tolerance (atol 1e-3, rtol 1e-4).
pub fn tol_ratio(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    got.iter()
        .zip(want)
        .map(|(g, w)| {
            let r = (g - w).abs() / (1e-3 + 1e-4 * w.abs());
            if r.is_nan() {
                f32::INFINITY
            } else {
                r
            }
        })
        .fold(0.0, f32::max)
}

/// Maximum absolute difference.
pub fn max_abs(got: &[f32], want: &[f32]) -> f32 {
    got.iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs())
        .fold(0.0, f32::max)
}
