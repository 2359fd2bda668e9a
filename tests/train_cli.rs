//! `rwkv train` and `rwkv eval` end to end on a tiny model: checkpoints that the inference
//! engine loads with the training model's logits, exact resumption, the config file, the run
//! directory's files and the errors on bad input.

mod common;
use candle_core::DType;
use common::{tmpdir, tol_ratio};
use rwkv::checkpoint::Checkpoint;
use rwkv::model::{Logits, Model};
use rwkv::train::TrainModel;
use std::path::{Path, PathBuf};

use common::{rwkv_bad as bad, rwkv_ok as ok};

/// The first 24 kB of tiny Shakespeare.
fn corpus(dir: &Path) -> PathBuf {
    let text = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/data/tinyshakespeare.txt"
    ))
    .unwrap();
    let p = dir.join("corpus.txt");
    std::fs::write(&p, &text[..24_000]).unwrap();
    p
}

const TINY: &[&str] = &[
    "--layers",
    "2",
    "--dim",
    "32",
    "--head-size",
    "16",
    "--ctx",
    "16",
    "--batch",
    "4",
    "--warmup",
    "2",
    "--lr",
    "3e-3",
    "--log-every",
    "1",
    "--eval-every",
    "3",
];

/// TINY with some flags' values replaced and others appended.
fn tiny_with<'a>(over: &[(&'a str, &'a str)]) -> Vec<&'a str> {
    let mut a: Vec<&str> = TINY.to_vec();
    for &(k, v) in over {
        match a.iter().position(|&x| x == k) {
            Some(i) => a[i + 1] = v,
            None => a.extend_from_slice(&[k, v]),
        }
    }
    a
}

fn train(data: &Path, out: &Path, extra: &[&str]) -> String {
    let mut a = vec![
        "train",
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    a.extend_from_slice(TINY);
    a.extend_from_slice(extra);
    ok(&a)
}

#[test]
fn trained_checkpoint_runs_in_the_engine_with_the_training_logits() {
    for arch in ["v7", "v4"] {
        trained_checkpoint_matches(arch);
    }
}

fn trained_checkpoint_matches(arch: &str) {
    let d = tmpdir(&format!("train-engine-{arch}"));
    let data = corpus(&d);
    let out = d.join("run");
    train(&data, &out, &["--steps", "4", "--arch", arch]);
    let path = out.join("model.safetensors");
    let ck = Checkpoint::open(&path).unwrap();
    let tm = TrainModel::from_checkpoint(&ck, DType::F32).unwrap();
    let tokens: Vec<u32> = b"ROMEO: What light".iter().map(|&b| b as u32).collect();
    let want = tm.logits_vec(&tokens).unwrap();
    let model = Model::load(&path).unwrap();
    for parallel in [true, false] {
        let mut st = model.new_state();
        let got: Vec<f32> = if parallel {
            model.forward(&tokens, &mut st, Logits::All).unwrap()
        } else {
            tokens
                .iter()
                .flat_map(|&t| model.step(t, &mut st).unwrap())
                .collect()
        };
        let r = tol_ratio(&got, &want);
        assert!(r <= 1.0, "{arch} parallel={parallel}: {r}x the tolerance");
    }
    // `rwkv generate` loads it too.
    let text = ok(&[
        "generate",
        "--model",
        path.to_str().unwrap(),
        "--prompt",
        "ROMEO:",
        "--max-tokens",
        "8",
        "--seed",
        "1",
    ]);
    assert!(!text.is_empty());
}

/// The Transformer baseline trains through the same command, reports the engine's
/// validation loss (what `rwkv eval --ctx` gives), resumes exactly, generates past its
/// positions and refuses a window its positions do not hold.
#[test]
fn the_transformer_baseline_trains_evaluates_and_resumes() {
    let d = tmpdir("train-gpt");
    let data = corpus(&d);
    let (a, b) = (d.join("straight"), d.join("interrupted"));
    let gpt = ["--arch", "gpt", "--steps", "6", "--save-every", "2"];
    let summary = train(&data, &a, &gpt);
    let val: f64 = summary
        .split("validation loss ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{summary}"));
    let model = a.join("model.safetensors");
    let m = model.to_str().unwrap();
    let info = ok(&["info", m]);
    assert!(
        info.contains("Transformer baseline") && info.contains("context     16"),
        "{info}"
    );
    let eval = ok(&[
        "eval",
        "--model",
        m,
        "--data",
        data.to_str().unwrap(),
        "--val-fraction",
        "0.1",
        "--ctx",
        "16",
    ]);
    let got: f64 = eval
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap();
    assert!((got - val).abs() < 1e-4, "eval {got} vs training's {val}");
    // The recipe's settings for the Transformer: nanoGPT's lr and no L2Wrap, unless given.
    let cfg = std::fs::read_to_string(a.join("config.toml")).unwrap();
    assert!(
        cfg.contains("arch = \"gpt\"") && cfg.contains("l2wrap = 0.0"),
        "{cfg}"
    );
    let mut stop = gpt.to_vec();
    stop.extend(["--stop-at", "3"]);
    train(&data, &b, &stop);
    let mut resume = gpt.to_vec();
    resume.push("--resume");
    train(&data, &b, &resume);
    assert!(
        std::fs::read(&model).unwrap() == std::fs::read(b.join("model.safetensors")).unwrap(),
        "resumed Transformer differs from the uninterrupted run"
    );
    let text = ok(&[
        "generate",
        "--model",
        m,
        "--prompt",
        "ROMEO:",
        "--max-tokens",
        "40",
        "--seed",
        "1",
    ]);
    assert!(!text.is_empty());
    let e = bad(&[
        "eval",
        "--model",
        m,
        "--data",
        data.to_str().unwrap(),
        "--ctx",
        "32",
    ]);
    assert!(e.contains("context of 16 positions"), "{e}");
    let e = bad(&[
        "train",
        "--data",
        data.to_str().unwrap(),
        "--out",
        d.join("x").to_str().unwrap(),
        "--arch",
        "gpt",
        "--dim",
        "32",
        "--head-size",
        "12",
    ]);
    assert!(e.contains("head-size 12"), "{e}");
}

#[test]
fn run_directory_has_metrics_plot_and_config() {
    let d = tmpdir("train-files");
    let data = corpus(&d);
    let out = d.join("run");
    let summary = train(&data, &out, &["--steps", "5", "--pth"]);
    assert!(summary.contains("validation loss"), "{summary}");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5);
    for (i, m) in lines.iter().enumerate() {
        assert_eq!(m["step"], i as u64 + 1);
        for k in ["train_loss", "lr", "tokens_per_s"] {
            assert!(m[k].as_f64().unwrap().is_finite(), "{k} in {m}");
        }
    }
    assert!(lines[2]["val_loss"].is_number(), "validation at step 3");
    assert!(
        lines[4]["val_loss"].is_number(),
        "validation at the last step"
    );
    assert!(lines[0].get("val_loss").is_none());
    let svg = std::fs::read_to_string(out.join("loss.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("polyline"));
    assert!(out.join("config.toml").is_file());
    assert!(out.join("model.pth").is_file());
    Model::load(out.join("model.pth")).unwrap();
    // The token cache beside the data is reused.
    assert!(d.join("corpus.txt.bytes.tokens").is_file());
}

#[test]
fn resumed_run_ends_with_the_same_weights() {
    let d = tmpdir("train-resume");
    let data = corpus(&d);
    let (a, b) = (d.join("straight"), d.join("interrupted"));
    train(&data, &a, &["--steps", "6", "--save-every", "2"]);
    train(
        &data,
        &b,
        &["--steps", "6", "--save-every", "2", "--stop-at", "3"],
    );
    let mid = Checkpoint::open(b.join("state.safetensors")).unwrap();
    assert_eq!(mid.metadata()["step"], "3");
    train(
        &data,
        &b,
        &["--steps", "6", "--save-every", "2", "--resume"],
    );
    let (wa, wb) = (
        std::fs::read(a.join("model.safetensors")).unwrap(),
        std::fs::read(b.join("model.safetensors")).unwrap(),
    );
    assert!(
        wa == wb,
        "resumed weights differ from the uninterrupted run"
    );
    // Resuming a finished run trains nothing and still reports its validation loss.
    let again = train(
        &data,
        &b,
        &["--steps", "6", "--save-every", "2", "--resume"],
    );
    assert!(!again.contains("NaN"), "{again}");
    assert_eq!(std::fs::read(b.join("model.safetensors")).unwrap(), wb);
    let ma = std::fs::read_to_string(a.join("metrics.jsonl")).unwrap();
    let mb = std::fs::read_to_string(b.join("metrics.jsonl")).unwrap();
    let loss = |s: &str| -> Vec<String> {
        s.lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                format!("{} {}", v["step"], v["train_loss"])
            })
            .collect()
    };
    assert_eq!(loss(&ma), loss(&mb));
}

#[test]
fn config_file_equals_flags() {
    let d = tmpdir("train-config");
    let data = corpus(&d);
    let flags = d.join("flags");
    train(&data, &flags, &["--steps", "3"]);
    let cfg = d.join("run.toml");
    std::fs::write(
        &cfg,
        format!(
            "data = {:?}\nout = {:?}\nlayers = 2\ndim = 32\nhead-size = 16\nctx = 16\nbatch = 4\n\
             warmup = 2\nlr = 3e-3\nlog-every = 1\neval-every = 3\nsteps = 3\n",
            data.to_str().unwrap(),
            d.join("file").to_str().unwrap()
        ),
    )
    .unwrap();
    ok(&["train", "--config", cfg.to_str().unwrap()]);
    assert_eq!(
        std::fs::read(flags.join("model.safetensors")).unwrap(),
        std::fs::read(d.join("file").join("model.safetensors")).unwrap()
    );
    std::fs::write(&cfg, "layerz = 3\n").unwrap();
    let e = bad(&["train", "--config", cfg.to_str().unwrap()]);
    assert!(e.contains("run.toml") && e.contains("layerz"), "{e}");
}

#[test]
fn eval_scores_windows_and_whole_text() {
    let d = tmpdir("eval");
    let data = corpus(&d);
    let out = d.join("run");
    train(&data, &out, &["--steps", "3"]);
    let m = out.join("model.safetensors");
    let js = |extra: &[&str]| -> serde_json::Value {
        let mut a = vec![
            "eval",
            "--model",
            m.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--json",
        ];
        a.extend_from_slice(extra);
        serde_json::from_str(ok(&a).trim()).unwrap()
    };
    let w = js(&["--ctx", "16", "--val-fraction", "0.1"]);
    let loss = w["loss"].as_f64().unwrap();
    assert!((w["perplexity"].as_f64().unwrap() - loss.exp()).abs() < 1e-6);
    // Bytes: one token per byte, so bits per byte = loss / ln 2.
    assert!((w["bits_per_byte"].as_f64().unwrap() - loss / std::f64::consts::LN_2).abs() < 1e-6);
    assert_eq!(w["tokens"], 2399);
    // The trainer's final validation (same split, same windows) agrees.
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    let val = last["val_loss"].as_f64().unwrap();
    assert!((val - loss).abs() < 1e-4, "trainer {val} vs eval {loss}");
    let whole = js(&[]);
    assert_eq!(whole["tokens"], 23_999);
    assert!(whole["loss"].as_f64().unwrap().is_finite());
}

#[test]
fn bad_training_input_gives_one_clear_error() {
    let d = tmpdir("train-bad");
    let empty = d.join("empty.txt");
    std::fs::write(&empty, b"").unwrap();
    let out = d.join("run");
    let o = out.to_str().unwrap();
    let e = bad(&["train", "--data", empty.to_str().unwrap(), "--out", o]);
    assert!(e.contains("empty.txt") && e.contains("empty"), "{e}");
    let short = d.join("short.txt");
    std::fs::write(&short, b"To be, or not to be: that is the question.").unwrap();
    let e = bad(&["train", "--data", short.to_str().unwrap(), "--out", o]);
    assert!(e.contains("short.txt") && e.contains("ctx"), "{e}");
    let binary = d.join("binary.bin");
    std::fs::write(&binary, [0xffu8, 0xfe, 0x00, 0x80].repeat(200)).unwrap();
    let e = bad(&[
        "train",
        "--data",
        binary.to_str().unwrap(),
        "--tokenizer",
        "world",
        "--out",
        o,
    ]);
    assert!(e.contains("not UTF-8"), "{e}");
    let e = bad(&["train", "--data", "/nonexistent/text.txt", "--out", o]);
    assert!(e.contains("/nonexistent/text.txt"), "{e}");
    let data = corpus(&d);
    let dp = data.to_str().unwrap();
    // An --out below a regular file cannot be created.
    let file = d.join("file");
    std::fs::write(&file, b"x").unwrap();
    let under = file.join("run");
    let e = bad(&["train", "--data", dp, "--out", under.to_str().unwrap()]);
    assert!(e.contains("file/run"), "{e}");
    let e = bad(&[
        "train",
        "--data",
        dp,
        "--dim",
        "30",
        "--head-size",
        "16",
        "--out",
        o,
    ]);
    assert!(e.contains("dim 30"), "{e}");
    let e = bad(&["train", "--data", dp, "--arch", "v5", "--out", o]);
    assert!(e.contains("v5"), "{e}");
    let e = bad(&["train", "--data", dp, "--resume", "--out", o]);
    assert!(e.contains("state.safetensors"), "{e}");
    // Resuming with another shape.
    train(&data, &out, &["--steps", "2"]);
    let mut a = vec!["train", "--data", dp, "--out", o, "--resume"];
    a.extend(tiny_with(&[("--dim", "48")]));
    let e = bad(&a);
    assert!(e.contains("dim 32, not 48"), "{e}");
    // A diverging run stops, names the step and keeps the last good checkpoint.
    let nan_out = d.join("nan");
    let mut a = vec!["train", "--data", dp, "--out", nan_out.to_str().unwrap()];
    a.extend(tiny_with(&[
        ("--lr", "1e30"),
        ("--warmup", "0"),
        ("--grad-clip", "1e30"),
        ("--steps", "50"),
        ("--save-every", "1"),
    ]));
    let e = bad(&a);
    assert!(e.contains("step ") && e.contains("loss is"), "{e}");
    let st = Checkpoint::open(nan_out.join("state.safetensors")).unwrap();
    let step: u64 = st.metadata()["step"].parse().unwrap();
    assert!(e.contains(&format!("(step {step})")), "{e}");
}

/// Romeo's first speeches of the corpus as `{"text"}` jsonl lines, and as one text.
fn speeches(dir: &Path) -> (PathBuf, PathBuf) {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/data/tinyshakespeare.txt"
    ))
    .unwrap();
    let romeo: Vec<&str> = text
        .split("\n\n")
        .filter(|b| b.starts_with("ROMEO:\n"))
        .take(40)
        .collect();
    let jsonl = dir.join("romeo.jsonl");
    let lines: String = romeo
        .iter()
        .map(|b| serde_json::json!({ "text": format!("{b}\n\n") }).to_string() + "\n")
        .collect();
    std::fs::write(&jsonl, lines).unwrap();
    let txt = dir.join("romeo.txt");
    std::fs::write(&txt, romeo.join("\n\n")).unwrap();
    (jsonl, txt)
}

const TUNE: &[&str] = &[
    "--ctx",
    "64",
    "--batch",
    "2",
    "--warmup",
    "1",
    "--log-every",
    "1",
    "--eval-every",
    "2",
];

fn tune(data: &Path, out: &Path, extra: &[&str]) -> String {
    let mut a = vec![
        "tune",
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    a.extend_from_slice(TUNE);
    a.extend_from_slice(extra);
    ok(&a)
}

/// The "held-out loss A -> B" of `rwkv tune`'s summary line.
fn tune_losses(stdout: &str) -> (f64, f64) {
    let s = stdout.split("held-out loss ").nth(1).unwrap();
    let mut it = s.split(" -> ");
    let a = it.next().unwrap().trim().parse().unwrap();
    let b = it
        .next()
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    (a, b)
}

/// `rwkv eval`'s loss on the held-out tenth of `txt` in windows of 64 (as `rwkv tune`
/// validates a text), with `extra` flags.
fn held_out_eval(txt: &Path, extra: &[&str]) -> f64 {
    let mut a = vec![
        "eval",
        "--data",
        txt.to_str().unwrap(),
        "--ctx",
        "64",
        "--val-fraction",
        "0.1",
    ];
    a.extend_from_slice(extra);
    let e = ok(&a);
    e.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// State tuning of the built-in model lowers the held-out loss of a character's speeches; the
/// tuned state (ours and RWKV-PEFT's file) loads in the engine, and on a text the run's
/// held-out loss is what `rwkv eval --state` reports.
#[test]
fn tuned_states_lower_the_loss_and_load_everywhere() {
    let d = tmpdir("tune");
    let (jsonl, txt) = speeches(&d);
    let out = d.join("run");
    let (before, after) = tune_losses(&tune(&jsonl, &out, &["--steps", "8"]));
    assert!(after < before - 0.005, "{before} -> {after}");
    let model = Model::load(rwkv::default_model().unwrap()).unwrap();
    let ours = rwkv::model::State::load(out.join("state.safetensors"), model.info()).unwrap();
    let peft = rwkv::model::State::load(out.join("time_state.pth"), model.info()).unwrap();
    for j in 0..ours.len() {
        assert_eq!(ours.tensor(j), peft.tensor(j), "state tensor {j}");
    }
    let toks: Vec<u32> = b"ROMEO:\nI".iter().map(|&b| b as u32).collect();
    let zero = model
        .forward(&toks, &mut model.new_state(), Logits::All)
        .unwrap();
    let tuned = model
        .forward(&toks, &mut ours.clone(), Logits::All)
        .unwrap();
    assert!(
        tol_ratio(&tuned, &zero) > 10.0,
        "the state changes the logits"
    );
    // On a text the held-out loss is `rwkv eval --ctx --val-fraction --state`'s.
    let out2 = d.join("run-text");
    let (_, after) = tune_losses(&tune(&txt, &out2, &["--steps", "4"]));
    let state = out2.join("state.safetensors");
    let eval_loss = held_out_eval(&txt, &["--state", state.to_str().unwrap()]);
    assert!(
        (eval_loss - after).abs() < 1e-4,
        "eval {eval_loss} vs tune {after}"
    );
}

/// LoRA tuning of the built-in model lowers the held-out loss; the adapters (RWKV-PEFT's
/// layout) load with `--lora FILE:ALPHA`, and on a text the run's held-out loss is what
/// `rwkv eval --lora` reports.
#[test]
fn tuned_loras_lower_the_loss_and_load_with_lora() {
    let d = tmpdir("tune-lora");
    let (jsonl, txt) = speeches(&d);
    let out = d.join("run");
    let lora = ["--method", "lora", "--rank", "4", "--alpha", "8"];
    let mut a = lora.to_vec();
    a.extend_from_slice(&["--steps", "8", "--lr", "3e-3"]);
    let (before, after) = tune_losses(&tune(&jsonl, &out, &a));
    assert!(after < before - 0.005, "{before} -> {after}");
    let ck = Checkpoint::open(out.join("lora.pth")).unwrap();
    assert_eq!(
        ck.get("blocks.3.ffn.value.lora_B").unwrap().shape,
        vec![128, 4]
    );
    assert_eq!(
        ck.get("blocks.0.att.key.lora_A").unwrap().shape,
        vec![4, 128]
    );
    let out2 = d.join("run-text");
    let mut a = lora.to_vec();
    a.extend_from_slice(&["--steps", "4"]);
    let (_, after) = tune_losses(&tune(&txt, &out2, &a));
    let spec = format!("{}:8", out2.join("lora.pth").display());
    let eval_loss = held_out_eval(&txt, &["--lora", &spec]);
    assert!(
        (eval_loss - after).abs() < 1e-4,
        "eval {eval_loss} vs tune {after}"
    );
}

/// A quantized model (`rwkv convert --quant int8|q4`) tunes with its weights as stored: the
/// forward products on the integer kernels, the input gradient through the dequantized rows;
/// its tuned LoRA loads with `--lora` on the same quantized file.
#[test]
fn quantized_models_tune_as_stored() {
    let d = tmpdir("tune-quant");
    let (jsonl, txt) = speeches(&d);
    let builtin = rwkv::default_model().unwrap();
    for q in ["int8", "q4"] {
        let qm = d.join(format!("{q}.safetensors"));
        ok(&[
            "convert",
            builtin.to_str().unwrap(),
            qm.to_str().unwrap(),
            "--quant",
            q,
        ]);
        let m = qm.to_str().unwrap();
        let (before, after) = tune_losses(&tune(
            &jsonl,
            &d.join(format!("s-{q}")),
            &["--model", m, "--steps", "8"],
        ));
        assert!(after < before - 0.005, "{q} state: {before} -> {after}");
        let out = d.join(format!("l-{q}"));
        let lora = [
            "--model", m, "--method", "lora", "--rank", "4", "--alpha", "8", "--steps", "4",
        ];
        let (_, after) = tune_losses(&tune(&txt, &out, &lora));
        let spec = format!("{}:8", out.join("lora.pth").display());
        let eval_loss = held_out_eval(&txt, &["--model", m, "--lora", &spec]);
        assert!(
            (eval_loss - after).abs() < 1e-4,
            "{q}: eval {eval_loss} vs tune {after}"
        );
    }
}

/// A tuning run stopped and resumed ends exactly where an uninterrupted one does (state and
/// LoRA).
#[test]
fn tune_resumes_exactly() {
    let d = tmpdir("tune-resume");
    let (jsonl, _) = speeches(&d);
    for (method, name) in [
        ("state", "time_state"),
        ("lora", "blocks.2.att.value.lora_B"),
    ] {
        let (a, b) = (d.join(format!("a-{method}")), d.join(format!("b-{method}")));
        let m = ["--method", method, "--steps", "4"];
        tune(&jsonl, &a, &m);
        tune(&jsonl, &b, &[&m[..], &["--stop-at", "2"]].concat());
        tune(&jsonl, &b, &[&m[..], &["--resume"]].concat());
        let read = |p: &Path| {
            Checkpoint::open(p.join("tune.safetensors"))
                .unwrap()
                .f32_vec(name)
                .unwrap()
        };
        assert_eq!(read(&a), read(&b), "{method}");
        assert!(read(&a).iter().any(|&x| x != 0.0), "{method}: trained");
    }
}

#[test]
fn bad_tuning_input_gives_one_clear_error() {
    let d = tmpdir("tune-bad");
    let o = d.join("run");
    let o = o.to_str().unwrap();
    let bad_json = d.join("bad.jsonl");
    std::fs::write(&bad_json, "{\"text\": \"ok\"}\n{\"text\": oops}\n").unwrap();
    let e = bad(&["tune", "--data", bad_json.to_str().unwrap(), "--out", o]);
    assert!(
        e.contains("bad.jsonl:2") && e.contains("not valid JSON"),
        "{e}"
    );
    let prompts = d.join("prompts.jsonl");
    let line = r#"{"messages": [{"role": "user", "content": "Hi"}]}"#;
    std::fs::write(&prompts, format!("{line}\n{line}\n")).unwrap();
    let e = bad(&["tune", "--data", prompts.to_str().unwrap(), "--out", o]);
    assert!(e.contains("no usable examples"), "{e}");
    let (jsonl, _) = speeches(&d);
    let j = jsonl.to_str().unwrap();
    let v6 = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/v6_0/model.pth");
    let e = bad(&[
        "tune",
        "--model",
        v6,
        "--tokenizer",
        "bytes",
        "--data",
        j,
        "--out",
        o,
    ]);
    assert!(e.contains("RWKV-7") && e.contains("v6.0"), "{e}");
    let e = bad(&["tune", "--data", j, "--method", "prefix", "--out", o]);
    assert!(e.contains("prefix"), "{e}");
    let e = bad(&[
        "tune",
        "--data",
        j,
        "--method",
        "lora",
        "--targets",
        "att.key,att.query",
        "--out",
        o,
    ]);
    assert!(
        e.contains("att.query") && e.contains("names no tensor"),
        "{e}"
    );
    let e = bad(&["tune", "--data", j, "--out", o, "--resume"]);
    assert!(e.contains("tune.safetensors"), "{e}");
}
