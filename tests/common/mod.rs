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

/// The one-line, exit-code-2 message of a model file or directory that must not load.
pub fn load_err(path: &std::path::Path) -> String {
    match rwkv::model::Model::load(path) {
        Ok(_) => panic!("{} loaded but should not", path.display()),
        Err(e) => {
            let s = e.to_string();
            assert_eq!(e.exit_code(), 2, "{s}");
            assert!(!s.contains('\n'), "multi-line message: {s}");
            s
        }
    }
}

/// Maximum absolute difference.
pub fn max_abs(got: &[f32], want: &[f32]) -> f32 {
    got.iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs())
        .fold(0.0, f32::max)
}

/// Builds an uncompressed zip archive (the layout `torch.save` writes) from `(name, bytes)`.
pub fn make_zip(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, data) in entries {
        let off = out.len() as u32;
        out.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        out.extend_from_slice(&[20, 0, 0, 0, 0, 0, 0, 0, 0, 0]); // version, flags, method, time, date
        out.extend_from_slice(&0u32.to_le_bytes()); // crc (not checked)
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(&(name.len() as u16).to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(data);
        central.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        central.extend_from_slice(&[20, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        central.extend_from_slice(&0u32.to_le_bytes());
        central.extend_from_slice(&(data.len() as u32).to_le_bytes());
        central.extend_from_slice(&(data.len() as u32).to_le_bytes());
        central.extend_from_slice(&(name.len() as u16).to_le_bytes());
        central.extend_from_slice(&[0; 12]); // extra, comment, disk, attrs
        central.extend_from_slice(&off.to_le_bytes());
        central.extend_from_slice(name.as_bytes());
    }
    let cd_off = out.len() as u32;
    out.extend_from_slice(&central);
    out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(central.len() as u32).to_le_bytes());
    out.extend_from_slice(&cd_off.to_le_bytes());
    out.extend_from_slice(&[0, 0]);
    out
}

/// A fresh temporary directory for one test, removed with everything in it when the value is
/// dropped (also when the test fails), so that repeated runs do not fill the disk.
pub struct TmpDir(PathBuf);

impl std::ops::Deref for TmpDir {
    type Target = PathBuf;
    fn deref(&self) -> &PathBuf {
        &self.0
    }
}

impl AsRef<std::path::Path> for TmpDir {
    fn as_ref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh temporary directory for one test (see [`TmpDir`]).
pub fn tmpdir(tag: &str) -> TmpDir {
    let d = std::env::temp_dir().join(format!("rwkv-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    TmpDir(d)
}

/// Rewrites a checkpoint as safetensors after `edit` changed its tensor list.
pub fn rewrite(
    src: &std::path::Path,
    dst: &std::path::Path,
    edit: impl FnOnce(&mut Vec<rwkv::checkpoint::OutTensor<'static>>),
) {
    let ck = Checkpoint::open(src).unwrap();
    let mut ts: Vec<rwkv::checkpoint::OutTensor<'static>> = ck
        .names()
        .iter()
        .map(|n| {
            let m = ck.get(n).unwrap();
            rwkv::checkpoint::OutTensor {
                name: n.clone(),
                dtype: m.dtype,
                shape: m.shape.clone(),
                data: ck.bytes(n).unwrap().to_vec().into(),
            }
        })
        .collect();
    edit(&mut ts);
    rwkv::checkpoint::write_safetensors(dst, &ts, &Default::default()).unwrap();
}

/// Runs the `rwkv` binary on two threads.
#[allow(dead_code)]
pub fn rwkv_run(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_rwkv"))
        .args(args)
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .unwrap()
}

/// Runs `rwkv` and returns its stdout, failing the test if it fails.
#[allow(dead_code)]
pub fn rwkv_ok(args: &[&str]) -> String {
    let o = rwkv_run(args);
    assert!(
        o.status.success(),
        "rwkv {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs a command that must fail with exit code 2 and no panic; returns the last line of
/// stderr.
#[allow(dead_code)]
pub fn rwkv_bad(args: &[&str]) -> String {
    let o = rwkv_run(args);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(2), "rwkv {args:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    err.trim_end().lines().last().unwrap_or("").to_string()
}
