//! RWKV-PEFT LoRA files (`P.lora_A` `[r, in]`, `P.lora_B` `[out, r]`, plus trained LayerNorms):
//! folded in at load (`--lora FILE:ALPHA`) they give the official package's logits of the
//! merged weights; `rwkv merge` writes what RWKV-PEFT's own `merge_lora.py` writes
//! (`tests/fixtures/peft/README.md`).

mod common;

use common::{fixture, tol_ratio, Expected};
use rwkv::checkpoint::lora::{merge_lora, parse_spec};
use rwkv::checkpoint::Checkpoint;
use rwkv::model::{Logits, Model};

#[test]
fn a_lora_folded_in_at_load_gives_the_official_logits() {
    let spec = format!("{}:16", fixture("peft/v7-lora.pth").display());
    let model = Model::load_with_lora(fixture("v7/model.pth"), None, Some(&spec)).unwrap();
    let toks = Expected::open("v7").tokens("seq1");
    let want = Checkpoint::open(fixture("peft/v7-lora-expected.pth"))
        .unwrap()
        .f32_vec("logits")
        .unwrap();
    let got = model
        .forward(&toks, &mut model.new_state(), Logits::All)
        .unwrap();
    let r = tol_ratio(&got, &want);
    println!("LoRA at load: {r:.4} of the tolerance");
    assert!(r <= 1.0, "{r} times the tolerance");
    // The test can fail: another alpha, or no LoRA, is far off.
    let other = format!("{}:8", fixture("peft/v7-lora.pth").display());
    let m8 = Model::load_with_lora(fixture("v7/model.pth"), None, Some(&other)).unwrap();
    let got8 = m8.forward(&toks, &mut m8.new_state(), Logits::All).unwrap();
    assert!(tol_ratio(&got8, &want) > 10.0);
}

#[test]
fn merge_writes_what_rwkv_peft_merge_script_writes() {
    let mut ck = Checkpoint::open(fixture("v7/model.pth")).unwrap();
    let lora = Checkpoint::open(fixture("peft/v7-lora.pth")).unwrap();
    assert_eq!(merge_lora(&mut ck, &lora, 16.0, true).unwrap(), 12);
    let theirs = Checkpoint::open(fixture("peft/v7-merged-peft.pth")).unwrap();
    let mut names = ck.names().to_vec();
    names.sort();
    let mut want = theirs.names().to_vec();
    want.sort();
    assert_eq!(names, want);
    let mut worst = 0f32;
    for n in &names {
        let (a, b) = (ck.f32_vec(n).unwrap(), theirs.f32_vec(n).unwrap());
        assert_eq!(
            ck.get(n).unwrap().dtype,
            theirs.get(n).unwrap().dtype,
            "{n}"
        );
        // torch computes in bf16 (the product, the scale and the sum each rounded), we in
        // f32 rounded once: they differ by one or two bf16 units (2^-8 relative) of the
        // tensor's largest values (measured: ours is the nearer to the exact f32 merge).
        let top = b.iter().fold(0f32, |m, y| m.max(y.abs()));
        for (x, y) in a.iter().zip(&b) {
            worst = worst.max((x - y).abs() / top);
        }
    }
    println!("merge: at most {worst:.5} of a tensor's largest value from merge_lora.py's");
    assert!(worst <= 2f32.powi(-7), "{worst}");
}

#[test]
fn bad_lora_files_and_specs_are_refused() {
    let dir = common::tmpdir("lora-bad");
    assert_eq!(parse_spec("a.pth:32").unwrap().1, 32.0);
    assert_eq!(parse_spec("a.pth").unwrap().1, 16.0);
    assert_eq!(parse_spec("C:x.pth").unwrap().0.to_str(), Some("C:x.pth"));
    // A LoRA of another model's shape.
    let v4 = fixture("v4/model.pth");
    let spec = format!("{}:16", fixture("peft/v7-lora.pth").display());
    let e = Model::load_with_lora(&v4, None, Some(&spec))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("v7-lora.pth") && e.contains("not in the model"),
        "{e}"
    );
    // A lora_A without its lora_B.
    let lora = Checkpoint::open(fixture("peft/v7-lora.pth")).unwrap();
    let a = lora.f32_vec("blocks.0.att.key.lora_A").unwrap();
    let only_a = dir.join("only-a.safetensors");
    rwkv::checkpoint::write_safetensors(
        &only_a,
        &[rwkv::checkpoint::OutTensor::f32(
            "blocks.0.att.key.lora_A",
            vec![8, 128],
            &a,
        )],
        &Default::default(),
    )
    .unwrap();
    let mut ck = Checkpoint::open(fixture("v7/model.pth")).unwrap();
    let e = merge_lora(&mut ck, &Checkpoint::open(&only_a).unwrap(), 16.0, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("has no blocks.0.att.key.lora_B"), "{e}");
    // A rank that does not fit the matrix.
    let wrong = dir.join("wrong.safetensors");
    let b = lora.f32_vec("blocks.0.att.key.lora_B").unwrap();
    rwkv::checkpoint::write_safetensors(
        &wrong,
        &[
            rwkv::checkpoint::OutTensor::f32("blocks.0.att.key.lora_A", vec![16, 64], &a),
            rwkv::checkpoint::OutTensor::f32("blocks.0.att.key.lora_B", vec![128, 8], &b),
        ],
        &Default::default(),
    )
    .unwrap();
    let e = merge_lora(&mut ck, &Checkpoint::open(&wrong).unwrap(), 16.0, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("do not adapt blocks.0.att.key.weight"), "{e}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rwkv"))
        .args([
            "generate",
            "--max-tokens",
            "2",
            "--lora",
            "/nonexistent.pth:16",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent.pth"));
}
