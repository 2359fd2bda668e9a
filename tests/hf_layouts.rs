//! Hugging Face model directories: transformers' `RwkvForCausalLM` (RWKV-4) as its own
//! `save_pretrained` writes it, sharded with an index and as `pytorch_model.bin`, against
//! transformers' logits (`tests/fixtures/formats/README.md`); and the bad directories.

mod common;

use common::{fixture, load_err, tol_ratio};
use rwkv::checkpoint::Checkpoint;
use rwkv::model::{Logits, Model};
use std::path::{Path, PathBuf};

fn expected(name: &str) -> Vec<f32> {
    Checkpoint::open(fixture("formats/hf/rwkv4-expected.safetensors"))
        .unwrap()
        .f32_vec(name)
        .unwrap()
}

fn tokens(seq: &str) -> Vec<u32> {
    Checkpoint::open(fixture("formats/hf/rwkv4-expected.safetensors"))
        .unwrap()
        .i64_vec(&format!("{seq}.tokens"))
        .unwrap()
        .into_iter()
        .map(|t| t as u32)
        .collect()
}

/// The logits of every token of `toks` from the zero state, time-parallel and time-sequential.
fn both_modes(model: &Model, toks: &[u32]) -> [(&'static str, Vec<f32>); 2] {
    let par = model
        .forward(toks, &mut model.new_state(), Logits::All)
        .unwrap();
    let mut st = model.new_state();
    let rec: Vec<f32> = toks
        .iter()
        .flat_map(|&t| model.step(t, &mut st).unwrap())
        .collect();
    [("parallel", par), ("recurrent", rec)]
}

#[test]
fn transformers_rwkv4_directories_give_transformers_logits() {
    for dir in ["rwkv4-sharded", "rwkv4-bin"] {
        let model = Model::load(fixture(&format!("formats/hf/{dir}"))).unwrap();
        assert!(model.info().layout.contains("transformers RwkvForCausalLM"));
        for seq in ["seq0", "seq1"] {
            let toks = tokens(seq);
            let want = expected(&format!("{seq}.logits"));
            for (mode, got) in both_modes(&model, &toks) {
                let r = tol_ratio(&got, &want);
                println!("{dir} {seq} {mode}: {r:.3} of the tolerance");
                assert!(r <= 1.0, "{dir} {seq} {mode}: {r} times the tolerance");
            }
        }
    }
}

/// fla-hub's RWKV-7 layout, written by the flash-linear-attention project's own converter
/// from `v7/model.pth`: the official package's logits and states of that file.
#[test]
fn the_fla_hub_rwkv7_layout_is_the_official_model() {
    let model = Model::load(fixture("formats/hf/rwkv7-fla")).unwrap();
    assert!(model.info().layout.contains("fla-hub"));
    let exp = common::Expected::open("v7");
    for seq in ["seq0", "seq1"] {
        let toks = exp.tokens(seq);
        let want = exp.f32(&format!("{seq}.logits_full"));
        let mut st = model.new_state();
        let got = model.forward(&toks, &mut st, Logits::All).unwrap();
        let r = tol_ratio(&got, &want);
        let mut rs = 0f32;
        for j in 0..st.len() {
            rs = rs.max(tol_ratio(
                st.tensor(j),
                &exp.f32(&format!("{seq}.state_full.{j}")),
            ));
        }
        println!("fla {seq}: logits {r:.4}, state {rs:.4} of the tolerance");
        assert!(r <= 1.0 && rs <= 1.0, "{seq}: {r} {rs}");
    }
}

/// RWKV-block's RWKV-7 layout (RWKV-org's "-HF" repositories of that project), written by its
/// own `hf_builder.py` from the v7 fixture cut to the LoRA ranks it derives (32): the official
/// package's logits of that checkpoint, in both modes.
#[test]
fn the_rwkv_block_rwkv7_layout_is_the_official_model() {
    let model = Model::load(fixture("formats/hf/rwkv7-block")).unwrap();
    assert!(
        model.info().layout.contains("RWKV-block"),
        "{}",
        model.info().layout
    );
    let exp = Checkpoint::open(fixture("formats/hf/rwkv7-block-expected.safetensors")).unwrap();
    for seq in ["seq0", "seq1"] {
        let toks: Vec<u32> = exp
            .i64_vec(&format!("{seq}.tokens"))
            .unwrap()
            .iter()
            .map(|&t| t as u32)
            .collect();
        let want = exp.f32_vec(&format!("{seq}.logits")).unwrap();
        for (mode, got) in both_modes(&model, &toks) {
            let r = tol_ratio(&got, &want);
            println!("RWKV-block {seq} {mode}: {r:.4} of the tolerance");
            assert!(r <= 1.0, "{seq} {mode}: {r}");
        }
    }
}

#[test]
fn the_tokenizer_beside_the_weights_is_used() {
    let model = Model::load(fixture("formats/hf/rwkv4-sharded")).unwrap();
    let tok = rwkv::tokenizer::for_model(model.info()).unwrap();
    assert!(tok.name().ends_with("tokenizer.json"), "{}", tok.name());
    let info = Model::load(fixture("formats/hf/rwkv4-bin")).unwrap();
    let e = rwkv::tokenizer::for_model(info.info())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("--tokenizer") || e.contains("name one"), "{e}");
}

/// A copy of a fixture directory to break.
fn copy(dir: &str, tag: &str) -> PathBuf {
    let out = std::env::temp_dir().join(format!("rwkv-hf-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    for e in std::fs::read_dir(fixture(&format!("formats/hf/{dir}"))).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), out.join(e.file_name())).unwrap();
    }
    out
}

fn edit(path: &Path, from: &str, to: &str) {
    let s = std::fs::read_to_string(path).unwrap();
    assert!(s.contains(from));
    std::fs::write(path, s.replacen(from, to, 1)).unwrap();
}

/// The error of the sharded directory with `from` in its `config.json` changed to `to`.
fn config_err(from: &str, to: &str, tag: &str) -> String {
    let d = copy("rwkv4-sharded", tag);
    edit(&d.join("config.json"), from, to);
    load_err(&d)
}

#[test]
fn bad_directories_are_refused_by_name() {
    let d = copy("rwkv4-sharded", "shard");
    std::fs::remove_file(d.join("model-00003-of-00004.safetensors")).unwrap();
    let e = load_err(&d);
    assert!(
        e.contains("names shard model-00003-of-00004.safetensors, which is missing"),
        "{e}"
    );

    let e = config_err("\"hidden_size\": 128", "\"hidden_size\": 256", "config");
    assert!(
        e.contains("config.json: hidden_size is 256 but the tensors make width 128"),
        "{e}"
    );

    let e = config_err("RwkvForCausalLM", "LlamaForCausalLM", "arch");
    assert!(
        e.contains("architecture \"LlamaForCausalLM\" is not a layout rwkv reads"),
        "{e}"
    );

    let d = copy("rwkv4-sharded", "index");
    let idx = d.join("model.safetensors.index.json");
    let s = std::fs::read_to_string(&idx).unwrap();
    let v: serde_json::Value = serde_json::from_str(&s).unwrap();
    let at = v["weight_map"]["head.weight"].as_str().unwrap().to_string();
    let other = if at.contains("00001") {
        "model-00002-of-00004.safetensors"
    } else {
        "model-00001-of-00004.safetensors"
    };
    edit(
        &idx,
        &format!("\"head.weight\": \"{at}\""),
        &format!("\"head.weight\": \"{other}\""),
    );
    let e = load_err(&d);
    assert!(
        e.contains("tensor head.weight, which the index puts there, is missing"),
        "{e}"
    );

    let d = copy("rwkv4-bin", "empty");
    std::fs::remove_file(d.join("pytorch_model.bin")).unwrap();
    let e = load_err(&d);
    assert!(e.contains("no model.safetensors"), "{e}");
    std::fs::remove_file(d.join("config.json")).unwrap();
    let e = load_err(&d);
    assert!(e.contains("config.json"), "{e}");
}

/// `rwkv convert` reads every layout: a GGUF (float and quantized, whose repacked Q8_0/Q4_0
/// blocks are stored as ours) and a Hugging Face directory become official-named files that
/// give the same logits.
#[test]
fn convert_goes_from_every_layout_to_official_files() {
    let dir = common::tmpdir("layout-convert");
    let toks = common::Expected::open("v7").tokens("seq1");
    for (src, out) in [
        ("formats/hf/rwkv7-fla", "fla.pth"),
        ("formats/hf/rwkv4-sharded", "rwkv4.safetensors"),
        ("formats/gguf/v7-bf16.gguf", "bf16.safetensors"),
        ("formats/gguf/v7-q8_0.gguf", "q8_0.safetensors"),
        ("formats/gguf/v7-q4_k_m.gguf", "q4_k_m.safetensors"),
    ] {
        let from = Model::load(fixture(src)).unwrap();
        let out = dir.join(out);
        rwkv::checkpoint::write::convert(&fixture(src), &out, None, None, None).unwrap();
        let ck = Checkpoint::open(&out).unwrap();
        assert_eq!(ck.layout(), "official", "{src}");
        let to = Model::load(&out).unwrap();
        let a = from
            .forward(&toks, &mut from.new_state(), Logits::All)
            .unwrap();
        let b = to.forward(&toks, &mut to.new_state(), Logits::All).unwrap();
        assert_eq!(a, b, "{src}");
    }
}

/// The RWKV-5/6 remote-code layout (`Rwkv6ForCausalLM`, the names llama.cpp's converter reads
/// for it), with a World-format vocabulary beside the weights.
#[test]
fn the_rwkv6_remote_code_layout_is_the_official_model() {
    let m = Model::load(fixture("formats/hf/rwkv6-remote-code")).unwrap();
    assert!(m.info().layout.contains("RWKV-5/6"));
    let official = Model::load(fixture("v6_0/model.pth")).unwrap();
    let toks = common::Expected::open("v6_0").tokens("seq0");
    let a = m.forward(&toks, &mut m.new_state(), Logits::All).unwrap();
    let b = official
        .forward(&toks, &mut official.new_state(), Logits::All)
        .unwrap();
    assert_eq!(a, b);
    let tok = rwkv::tokenizer::for_model(m.info()).unwrap();
    assert_eq!(tok.vocab_size(), 300);
    assert_eq!(tok.encode("\n\n").unwrap(), vec![261]);
}
