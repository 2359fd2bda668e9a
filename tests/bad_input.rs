//! Bad input never panics: each case is a clear error naming the file or tensor.

mod common;
use common::{fixture, load_err, make_zip, rewrite, tmpdir};
use rwkv::checkpoint::Checkpoint;
use rwkv::model::{Model, State};
use rwkv::tensor::DType;

#[test]
fn missing_file() {
    let e = load_err(std::path::Path::new("/nonexistent/model.pth"));
    assert!(e.contains("/nonexistent/model.pth"), "{e}");
}

#[test]
fn truncated_files_at_many_lengths() {
    let dir = tmpdir("trunc");
    for src in [
        "v7/model.pth",
        "v7/model.safetensors",
        "v4/model.pth",
        "v4/model_fp32.safetensors",
    ] {
        let bytes = std::fs::read(fixture(src)).unwrap();
        for frac in [0.0, 0.001, 0.1, 0.5, 0.9, 0.999] {
            let n = (bytes.len() as f64 * frac) as usize;
            let p = dir.join(format!("t{n}"));
            std::fs::write(&p, &bytes[..n]).unwrap();
            let e = load_err(&p);
            assert!(e.contains(&p.display().to_string()), "{e}");
        }
    }
}

#[test]
fn corrupt_bytes_in_header_and_pickle() {
    let dir = tmpdir("corrupt");
    for src in ["v7/model.pth", "v7/model.safetensors"] {
        let bytes = std::fs::read(fixture(src)).unwrap();
        for (i, pos) in [4usize, 9, 20, 40, 100, 200, 300, 1000]
            .into_iter()
            .enumerate()
        {
            let mut b = bytes.clone();
            b[pos] ^= 0x5a;
            let p = dir.join(format!("c{i}"));
            std::fs::write(&p, &b).unwrap();
            // Either a clear error or (if the byte hit weight data) a valid model: never a panic.
            let _ = Model::load(&p);
        }
    }
    let p = dir.join("garbage");
    std::fs::write(&p, b"this is not a checkpoint at all").unwrap();
    load_err(&p);
}

#[test]
fn pickle_that_asks_for_code_is_refused() {
    let dir = tmpdir("evil");
    // protocol 2: GLOBAL os.system, ("echo pwned",), REDUCE, STOP
    let mut pkl = vec![0x80, 2];
    pkl.extend_from_slice(b"cos\nsystem\n");
    pkl.push(b'X');
    pkl.extend_from_slice(&(10u32).to_le_bytes());
    pkl.extend_from_slice(b"echo pwned");
    pkl.extend_from_slice(&[0x85, b'R', b'.']);
    let zip = make_zip(&[("archive/data.pkl", &pkl), ("archive/version", b"3\n")]);
    let p = dir.join("evil.pth");
    std::fs::write(&p, zip).unwrap();
    let e = load_err(&p);
    assert!(e.contains("refusing global os.system"), "{e}");

    // An opcode outside the allow-list (INST, which would also call code).
    let pkl = b"\x80\x02(ios\nsystem\nS'x'\n.".to_vec();
    let p = dir.join("evil2.pth");
    std::fs::write(&p, make_zip(&[("a/data.pkl", &pkl)])).unwrap();
    let e = load_err(&p);
    assert!(e.contains("unsupported pickle opcode"), "{e}");
}

#[test]
fn missing_misshaped_nonfinite_unknown_and_missing_layer() {
    let dir = tmpdir("edit");
    let src = fixture("v7/model.safetensors");

    let p = dir.join("missing.safetensors");
    rewrite(&src, &p, |ts| {
        ts.retain(|t| t.name != "blocks.1.att.key.weight")
    });
    let e = load_err(&p);
    assert!(e.contains("missing tensor blocks.1.att.key.weight"), "{e}");

    let p = dir.join("shape.safetensors");
    rewrite(&src, &p, |ts| {
        let t = ts
            .iter_mut()
            .find(|t| t.name == "blocks.0.ffn.key.weight")
            .unwrap();
        t.shape = vec![256, 256]; // same byte count, wrong shape
    });
    let e = load_err(&p);
    assert!(
        e.contains("blocks.0.ffn.key.weight") && e.contains("shape"),
        "{e}"
    );

    let p = dir.join("nan.safetensors");
    rewrite(&src, &p, |ts| {
        let t = ts
            .iter_mut()
            .find(|t| t.name == "blocks.1.att.output.weight")
            .unwrap();
        let mut d = t.data.to_vec();
        assert_eq!(t.dtype, DType::BF16);
        d[10] = 0xc0; // 0x7fc0: bf16 NaN
        d[11] = 0x7f;
        t.data = d.into();
    });
    let e = load_err(&p);
    assert!(
        e.contains("blocks.1.att.output.weight") && e.contains("non-finite"),
        "{e}"
    );

    let p = dir.join("unknown.safetensors");
    rewrite(&src, &p, |ts| {
        let mut extra = ts[1].clone();
        extra.name = "blocks.0.att.mystery".into();
        ts.push(extra);
    });
    let e = load_err(&p);
    assert!(e.contains("unknown tensor blocks.0.att.mystery"), "{e}");

    let p = dir.join("gap.safetensors");
    let src4 = fixture("v4/model.safetensors");
    rewrite(&src4, &p, |ts| {
        // Rename layer 1 to layer 2: layer 1 is then missing.
        for t in ts.iter_mut() {
            if let Some(rest) = t.name.strip_prefix("blocks.1.") {
                t.name = format!("blocks.2.{rest}");
            }
        }
    });
    let e = load_err(&p);
    assert!(e.contains("layer 1 is missing"), "{e}");

    let p = dir.join("mixed.safetensors");
    let v7 = Checkpoint::open(&src).unwrap();
    rewrite(&src4, &p, |ts| {
        // Replace layer 1 of the v4 model by layer 1 of the v7 model.
        ts.retain(|t| !t.name.starts_with("blocks.1."));
        for n in v7.names().iter().filter(|n| n.starts_with("blocks.1.")) {
            let m = v7.get(n).unwrap();
            ts.push(rwkv::checkpoint::OutTensor {
                name: n.clone(),
                dtype: m.dtype,
                shape: m.shape.clone(),
                data: v7.bytes(n).unwrap().to_vec().into(),
            });
        }
    });
    let e = load_err(&p);
    assert!(e.contains("mixed checkpoint"), "{e}");
}

#[test]
fn token_out_of_range_and_foreign_state() {
    let m7 = Model::load(fixture("v7/model.safetensors")).unwrap();
    let m4 = Model::load(fixture("v4/model.safetensors")).unwrap();
    let mut st = m7.new_state();
    let e = m7.step(300, &mut st).unwrap_err();
    assert!(e.to_string().contains("token id 300"), "{e}");
    assert_eq!(e.exit_code(), 2);
    let e = m7
        .forward(&[1, 2, 99999], &mut st, rwkv::model::Logits::All)
        .unwrap_err();
    assert!(e.to_string().contains("99999"), "{e}");
    // A v4 state given to the v7 model, in memory and from a file.
    let mut s4 = m4.new_state();
    assert!(m7.step(1, &mut s4).is_err());
    let dir = tmpdir("state");
    let p = dir.join("v4.state");
    m4.new_state().save(&p).unwrap();
    let e = State::load(&p, m7.info()).unwrap_err();
    assert!(
        e.to_string().contains("v4") && e.to_string().contains(&p.display().to_string()),
        "{e}"
    );
}

#[test]
fn deep_embed_attention_and_misplaced_deep_embed_are_refused() {
    let dir = tmpdir("deepembed");
    // RWKV-7b's DeepEmbedAttention tensors: refused by name, not guessed at.
    let p = dir.join("v7b.safetensors");
    rewrite(&fixture("v7a/model.pth"), &p, |ts| {
        let mut extra = ts[1].clone();
        extra.name = "blocks.0.ffn.k_emb.weight".into();
        ts.push(extra);
    });
    let e = load_err(&p);
    assert!(
        e.contains("blocks.0.ffn.k_emb.weight") && e.contains("RWKV-7b"),
        "{e}"
    );
    // DeepEmbed tensors on a generation that has none.
    let p = dir.join("v6-de.safetensors");
    let v7a = Checkpoint::open(fixture("v7a/model.pth")).unwrap();
    rewrite(&fixture("v6_0/model.safetensors"), &p, |ts| {
        let m = v7a.get("blocks.0.ffn.s_emb.weight").unwrap();
        ts.push(rwkv::checkpoint::OutTensor {
            name: "blocks.0.ffn.s_emb.weight".into(),
            dtype: m.dtype,
            shape: m.shape.clone(),
            data: v7a
                .bytes("blocks.0.ffn.s_emb.weight")
                .unwrap()
                .to_vec()
                .into(),
        });
    });
    let e = load_err(&p);
    assert!(e.contains("s_emb") && e.contains("v6.0"), "{e}");
    // A DeepEmbed table of the wrong width.
    let p = dir.join("v7a-shape.safetensors");
    rewrite(&fixture("v7a/model.pth"), &p, |ts| {
        let t = ts
            .iter_mut()
            .find(|t| t.name == "blocks.1.ffn.s_emb.weight")
            .unwrap();
        t.shape = vec![600, 512];
    });
    let e = load_err(&p);
    assert!(
        e.contains("blocks.1.ffn.s_emb.weight") && e.contains("shape"),
        "{e}"
    );
}
