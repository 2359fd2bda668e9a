//! The `rwkv` binary: the contracts of DESIGN.md and the exit codes.

mod common;
use common::{fixture, tmpdir, tol_ratio, Expected};
use rwkv::checkpoint::Checkpoint;
use std::io::Write;
use std::process::{Command, Output, Stdio};

fn rwkv(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_rwkv"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn ok(args: &[&str], stdin: &[u8]) -> Vec<u8> {
    let o = rwkv(args, stdin);
    assert!(
        o.status.success(),
        "rwkv {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o.stdout
}

/// Runs a command that must fail with exit code 2 and a one-line message; returns it.
fn bad(args: &[&str], stdin: &[u8]) -> String {
    let o = rwkv(args, stdin);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(2), "rwkv {args:?}: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn logits_contract_both_modes_and_state_in() {
    let dir = tmpdir("cli-logits");
    for gen in ["v4", "v7"] {
        let exp = Expected::open(gen);
        let toks = exp.tokens("seq0");
        let k = 10;
        let s = |v: &[u32]| {
            v.iter()
                .map(|t| t.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        let model = fixture(&format!("{gen}/model.pth"));
        let model = model.to_str().unwrap();
        for mode in ["recurrent", "parallel"] {
            let a = dir.join(format!("{gen}-{mode}-a.safetensors"));
            let b = dir.join(format!("{gen}-{mode}-b.safetensors"));
            let (a_s, b_s) = (a.to_str().unwrap(), b.to_str().unwrap());
            ok(
                &[
                    "logits",
                    "--model",
                    model,
                    "--tokens",
                    &s(&toks[..k]),
                    "--mode",
                    mode,
                    "--out",
                    a_s,
                ],
                b"",
            );
            ok(
                &[
                    "logits",
                    "-m",
                    model,
                    "--tokens",
                    &s(&toks[k..]),
                    "--mode",
                    mode,
                    "--state-in",
                    a_s,
                    "--out",
                    b_s,
                ],
                b"",
            );
            let ca = Checkpoint::open(&a).unwrap();
            assert_eq!(ca.get("logits").unwrap().shape, vec![k, 300]);
            assert!(
                tol_ratio(
                    &ca.f32_vec("logits").unwrap(),
                    &exp.f32("seq0.split.logits_a")
                ) <= 1.0
            );
            let cb = Checkpoint::open(&b).unwrap();
            assert!(
                tol_ratio(
                    &cb.f32_vec("logits").unwrap(),
                    &exp.f32("seq0.split.logits_b")
                ) <= 1.0
            );
            let p = if gen == "v4" { 5 } else { 3 };
            for j in 0..2 * p {
                let name = format!("state.{j}");
                let got = cb.f32_vec(&name).unwrap();
                let want = exp.f32(&format!("seq0.split.state_b.{j}"));
                assert!(tol_ratio(&got, &want) <= 1.0, "{gen} {mode} {name}");
                assert_eq!(
                    cb.get(&name).unwrap().shape,
                    exp.ck
                        .get(&format!("seq0.split.state_b.{j}"))
                        .unwrap()
                        .shape
                );
            }
        }
    }
}

#[test]
fn tokenize_and_detokenize_round_trip() {
    let text = "Hello, world! 你好 😀\n";
    let ids = ok(&["tokenize"], text.as_bytes());
    let ids_s = String::from_utf8(ids).unwrap();
    assert!(ids_s.starts_with("[33155,45,40213,34"), "{ids_s}");
    let back = ok(&["detokenize"], ids_s.as_bytes());
    assert_eq!(back, text.as_bytes());
    let ids = ok(&["tokenize", "--tokenizer", "bytes"], b"AB");
    assert_eq!(String::from_utf8(ids).unwrap().trim(), "[65,66]");
    // Raw bytes out, even when they are not valid UTF-8 on their own.
    assert_eq!(ok(&["detokenize"], b"[3319]"), vec![0xf0, 0x9f]);
}

#[test]
fn generate_is_reproducible_with_a_seed_and_streams_text() {
    let m = fixture("v7/model.safetensors");
    let m = m.to_str().unwrap();
    let args = [
        "generate",
        "-m",
        m,
        "--tokenizer",
        "bytes",
        "--prompt",
        "To be",
        "-n",
        "30",
        "--seed",
        "7",
    ];
    let a = ok(&args, b"");
    let b = ok(&args, b"");
    assert_eq!(a, b);
    assert!(!a.is_empty());
    let g1 = ok(
        &[
            "generate",
            "-m",
            m,
            "--tokenizer",
            "bytes",
            "--prompt",
            "x",
            "-n",
            "20",
            "--temperature",
            "0",
        ],
        b"",
    );
    let g2 = ok(
        &[
            "generate",
            "-m",
            m,
            "--tokenizer",
            "bytes",
            "--prompt",
            "x",
            "-n",
            "20",
            "--temperature",
            "0",
            "--seed",
            "99",
        ],
        b"",
    );
    assert_eq!(g1, g2, "greedy output must not depend on the seed");
}

#[test]
fn generate_continues_from_a_saved_state() {
    let dir = tmpdir("cli-state");
    let m = fixture("v4/model.safetensors");
    let m = m.to_str().unwrap();
    let st = dir.join("s.safetensors");
    let st = st.to_str().unwrap();
    ok(
        &[
            "generate",
            "-m",
            m,
            "--tokenizer",
            "bytes",
            "--prompt",
            "abc",
            "-n",
            "0",
            "--state-out",
            st,
        ],
        b"",
    );
    let a = ok(
        &[
            "generate",
            "-m",
            m,
            "--tokenizer",
            "bytes",
            "--state-in",
            st,
            "--prompt",
            "d",
            "-n",
            "10",
            "--temperature",
            "0",
        ],
        b"",
    );
    let b = ok(
        &[
            "generate",
            "-m",
            m,
            "--tokenizer",
            "bytes",
            "--prompt",
            "abcd",
            "-n",
            "10",
            "--temperature",
            "0",
        ],
        b"",
    );
    assert_eq!(a, b);
}

#[test]
fn chat_carries_state_and_handles_commands() {
    let dir = tmpdir("cli-chat");
    let m = fixture("v7/model.pth");
    let m = m.to_str().unwrap();
    let st = dir.join("chat.state");
    let input = format!(
        "Hi there\n/save {0}\nHow are you?\n/reset\nHi there\n/load {0}\nHow are you?\n/bogus\n/quit\n",
        st.display()
    );
    let out = rwkv(
        &[
            "chat",
            "-m",
            m,
            "--tokenizer",
            "bytes",
            "--temperature",
            "0",
            "--max-tokens",
            "12",
        ],
        input.as_bytes(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let replies: Vec<&str> = text.split("Assistant:").skip(1).collect();
    assert_eq!(replies.len(), 4, "{text}");
    // Greedy: the same history gives the same reply; a reset gives the first reply again,
    // and a loaded state reproduces the reply that followed the save.
    assert_eq!(
        replies[0].split('[').next(),
        replies[2].split('[').next(),
        "{text}"
    );
    assert_eq!(
        replies[1].split('[').next(),
        replies[3].split('[').next(),
        "{text}"
    );
    assert!(text.contains("[state reset]") && text.contains("[state loaded from"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown command /bogus"));
}

#[test]
fn info_reports_all_generations() {
    for (dir, gen) in [
        ("v4", "v4"),
        ("v5_2", "v5.2"),
        ("v6_0", "v6.0"),
        ("v7", "v7"),
    ] {
        let p = fixture(&format!("{dir}/model.pth"));
        let out = ok(&["info", p.to_str().unwrap(), "--json"], b"");
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["generation"], gen);
        assert_eq!(v["n_layer"], 2);
        assert_eq!(v["n_embd"], 128);
        assert_eq!(v["vocab_size"], 300);
        assert!(v["params"].as_u64().unwrap() > 500_000);
    }
}

#[test]
fn bad_input_exits_2_with_one_line() {
    let m = fixture("v7/model.safetensors");
    let m = m.to_str().unwrap();
    bad(&["info", "/no/such/file.pth"], b"");
    let e = bad(
        &[
            "logits",
            "-m",
            m,
            "--tokens",
            "1,2,300",
            "--out",
            "/tmp/x.safetensors",
        ],
        b"",
    );
    assert!(e.contains("token id 300"), "{e}");
    let e = bad(&["generate", "-m", m, "--prompt", "hi"], b"");
    assert!(e.contains("tokenizer"), "{e}");
    let e = bad(
        &["generate", "-m", m, "--tokenizer", "bytes", "--top-p", "2"],
        b"",
    );
    assert!(e.contains("top_p") || e.contains("top-p"), "{e}");
    bad(&["detokenize"], b"[1, \"x\"]");
    bad(&["detokenize"], b"[70000]");
    let e = bad(
        &[
            "generate",
            "-m",
            m,
            "--tokenizer",
            "bytes",
            "--threads",
            "0",
        ],
        b"",
    );
    assert!(e.contains("threads"), "{e}");
    let v4 = fixture("v4/model.pth");
    let dir = tmpdir("cli-bad");
    let st = dir.join("v4.safetensors");
    ok(
        &[
            "logits",
            "-m",
            v4.to_str().unwrap(),
            "--tokens",
            "1",
            "--out",
            st.to_str().unwrap(),
        ],
        b"",
    );
    let e = bad(
        &[
            "logits",
            "-m",
            m,
            "--tokens",
            "1",
            "--state-in",
            st.to_str().unwrap(),
            "--out",
            "/tmp/y.safetensors",
        ],
        b"",
    );
    assert!(e.contains("v4"), "{e}");
}

#[test]
fn convert_round_trips_between_formats_and_dtypes() {
    let dir = tmpdir("cli-convert");
    for gen in ["v4", "v5_2", "v6_0", "v7"] {
        let exp = Expected::open(gen);
        let toks = exp.tokens("seq1");
        let toks_s = toks
            .iter()
            .map(|t| t.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let src = fixture(&format!("{gen}/model.pth"));
        let st = dir.join(format!("{gen}.safetensors"));
        let back = dir.join(format!("{gen}-back.pth"));
        let f32p = dir.join(format!("{gen}-f32.pth"));
        ok(
            &["convert", src.to_str().unwrap(), st.to_str().unwrap()],
            b"",
        );
        ok(
            &["convert", st.to_str().unwrap(), back.to_str().unwrap()],
            b"",
        );
        ok(
            &[
                "convert",
                back.to_str().unwrap(),
                f32p.to_str().unwrap(),
                "--dtype",
                "f32",
            ],
            b"",
        );
        let orig = Checkpoint::open(&src).unwrap();
        for p in [&st, &back] {
            let ck = Checkpoint::open(p).unwrap();
            assert_eq!(ck.names(), orig.names(), "{gen}: key order kept");
            for n in orig.names() {
                assert_eq!(ck.bytes(n).unwrap(), orig.bytes(n).unwrap(), "{gen} {n}");
            }
        }
        let ck = Checkpoint::open(&f32p).unwrap();
        assert_eq!(
            ck.get("emb.weight").unwrap().dtype,
            rwkv::tensor::DType::F32
        );
        // Every converted file still computes the reference logits.
        for p in [&st, &back, &f32p] {
            let out = dir.join("l.safetensors");
            ok(
                &[
                    "logits",
                    "-m",
                    p.to_str().unwrap(),
                    "--tokens",
                    &toks_s,
                    "--out",
                    out.to_str().unwrap(),
                ],
                b"",
            );
            let got = Checkpoint::open(&out).unwrap().f32_vec("logits").unwrap();
            assert!(
                tol_ratio(&got, &exp.f32("seq1.logits_full")) <= 1.0,
                "{gen} {}",
                p.display()
            );
        }
        // Where Python is at hand, its zip reader checks the CRCs and pickletools the stream.
        let check = "import zipfile,pickletools,io,sys\nz=zipfile.ZipFile(sys.argv[1])\nassert z.testzip() is None\nn=[x for x in z.namelist() if x.endswith('data.pkl')][0]\npickletools.dis(z.read(n), out=io.StringIO())\n";
        if let Ok(o) = Command::new("python3")
            .arg("-c")
            .arg(check)
            .arg(&back)
            .output()
        {
            assert!(
                o.status.success(),
                "python rejects {}: {}",
                back.display(),
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }
    bad(
        &[
            "convert",
            fixture("v7/model.pth").to_str().unwrap(),
            "/tmp/out.bin.txt",
        ],
        b"",
    );
    let e = bad(&["convert", "/no/such.pth", "/tmp/x.safetensors"], b"");
    assert!(e.contains("/no/such.pth"), "{e}");
}
