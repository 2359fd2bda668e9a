//! The `rwkv` command-line tool.

use clap::{Args, Parser, Subcommand, ValueEnum};
use rwkv::checkpoint::write::convert;
use rwkv::checkpoint::{detect::detect, write_safetensors, Checkpoint, OutTensor};
use rwkv::model::{Logits, Model, State};
use rwkv::sample::SamplerConfig;
use rwkv::session::{parse_ids, Session, StopRules};
use rwkv::tensor::{DType, WeightFormat};
use rwkv::tokenizer::{self, Tokenizer};
use rwkv::{Error, Result};
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "rwkv",
    version,
    about = "Run RWKV language models (RWKV-4 to RWKV-7) on the CPU"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Show a checkpoint's generation, dimensions, parameter count and dtype.
    Info {
        /// Checkpoint file (.pth or .safetensors).
        model: PathBuf,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Generate text from a prompt, streaming it to stdout.
    Generate(GenerateArgs),
    /// Talk with a model: one message per line on stdin; /reset, /save FILE, /load FILE, /quit.
    Chat(ChatArgs),
    /// Write the logits of every input token and the final state to a safetensors file.
    Logits(LogitsArgs),
    /// Convert a checkpoint of any readable layout to .pth or .safetensors (the official key
    /// names) or to llama.cpp's GGUF (RWKV-6 and RWKV-7).
    Convert {
        /// Input checkpoint.
        input: PathBuf,
        /// Output file: .safetensors, .pth or .gguf.
        output: PathBuf,
        /// Store float tensors in this dtype (default: as in the input).
        #[arg(long, value_enum)]
        dtype: Option<OutDType>,
        /// Store the weight matrices quantized: int8 or q4 (.safetensors, or .gguf as Q8_0 or
        /// Q4_0).
        #[arg(long)]
        quant: Option<String>,
        /// The vocabulary a .gguf carries: world, bytes or a tokenizer file (default: the
        /// input's own, or the one its vocabulary size implies).
        #[arg(long)]
        tokenizer: Option<String>,
    },
    /// Fold an RWKV-PEFT LoRA file into a checkpoint and write the result (as RWKV-PEFT's
    /// merge script does: W += B·A·ALPHA/rank in f32, stored in the weight's dtype).
    Merge {
        /// Base checkpoint (any readable layout).
        base: PathBuf,
        /// The LoRA file and its alpha: FILE[:ALPHA] (ALPHA default 16).
        lora: String,
        /// Output file: .safetensors, .pth or .gguf.
        output: PathBuf,
        /// The vocabulary a .gguf carries: world, bytes or a tokenizer file.
        #[arg(long)]
        tokenizer: Option<String>,
    },
    /// Create a random-weight checkpoint of any shape, initialised as the official trainer does.
    Init(InitArgs),
    /// Train an RWKV-7 or RWKV-4 model from a text file, time-parallel on the CPU.
    Train(TrainArgs),
    /// Adapt an RWKV-7 to new data with its weights frozen: state tuning (every layer's
    /// initial WKV state, written as a state file and as RWKV-PEFT's time_state) or LoRA
    /// (RWKV-PEFT's lora_A/lora_B file).
    Tune(TuneArgs),
    /// Measure one of the seed's claims about RWKV and draw it: gen-time (time and memory
    /// per token against the position, RWKV-7 against a Transformer), context (loss against
    /// position for models trained at longer contexts), decay (each layer's and head's time
    /// horizon) or recall (associative recall against a Transformer).
    Experiment(ExperimentArgs),
    /// Score a model on a text: loss, perplexity and bits per byte (parallel mode).
    Eval(EvalArgs),
    /// Measure prompt and generation speed, bandwidth use and memory.
    Bench(BenchArgs),
    /// Serve the model over an OpenAI-compatible HTTP API (completions and chat, streaming).
    Serve(rwkv::server::ServeConfig),
    /// Read text on stdin and print its token ids as a JSON array.
    Tokenize {
        /// world, bytes, or a Hugging Face tokenizer.json.
        #[arg(long, default_value = "world")]
        tokenizer: String,
    },
    /// Read a JSON array of token ids on stdin and write their raw bytes to stdout.
    Detokenize {
        /// world, bytes, or a Hugging Face tokenizer.json.
        #[arg(long, default_value = "world")]
        tokenizer: String,
    },
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// Checkpoint file (.pth or .safetensors); default: the built-in tiny-Shakespeare model.
    #[arg(long, short = 'm')]
    model: Option<PathBuf>,
    /// Tokenizer: world, bytes, or a Hugging Face tokenizer.json (default: chosen from the
    /// model's vocabulary size).
    #[arg(long)]
    tokenizer: Option<String>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Weight format at load: f32, f16, bf16, int8 or q4 (default: as stored).
    #[arg(long)]
    quant: Option<String>,
    /// Fold an RWKV-PEFT LoRA file into the weights at load: FILE[:ALPHA] (ALPHA default 16,
    /// as RWKV-PEFT's merge script; the scale is ALPHA / rank).
    #[arg(long)]
    lora: Option<String>,
}

#[derive(Args, Clone)]
struct SamplingArgs {
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this cumulative probability.
    #[arg(long, default_value_t = 0.85)]
    top_p: f32,
    /// Keep only the k most likely tokens (0: no limit).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Subtracted from the logit of every token already generated.
    #[arg(long, default_value_t = 0.0)]
    presence_penalty: f32,
    /// Subtracted from a token's logit once per (decayed) occurrence.
    #[arg(long, default_value_t = 0.0)]
    frequency_penalty: f32,
    /// Per-token decay of the occurrence counts.
    #[arg(long, default_value_t = 0.996)]
    penalty_decay: f32,
    /// Token ids never to generate (comma-separated).
    #[arg(long, default_value = "")]
    ban: String,
    /// Token ids that end generation (comma-separated).
    #[arg(long, default_value = "")]
    stop_token: String,
    /// A string that ends generation (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Random seed for reproducible output.
    #[arg(long)]
    seed: Option<u64>,
}

impl SamplingArgs {
    fn config(&self) -> Result<SamplerConfig> {
        Ok(SamplerConfig {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            penalty_decay: self.penalty_decay,
            banned: parse_ids(&self.ban, "--ban")?,
            seed: self.seed,
        })
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// The prompt.
    #[arg(long, short = 'p', conflicts_with = "prompt_file")]
    prompt: Option<String>,
    /// Read the prompt from a file.
    #[arg(long)]
    prompt_file: Option<PathBuf>,
    /// Most tokens to generate.
    #[arg(long, short = 'n', default_value_t = 200)]
    max_tokens: usize,
    #[command(flatten)]
    s: SamplingArgs,
    /// Start from a state saved earlier (safetensors of `state.{j}`, or an RWKV-PEFT tuned
    /// time_state).
    #[arg(long, alias = "state")]
    state_in: Option<PathBuf>,
    /// Save the final state here.
    #[arg(long)]
    state_out: Option<PathBuf>,
    /// Print timing (prompt and generation tokens/s) to stderr.
    #[arg(long)]
    stats: bool,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// Most tokens per reply.
    #[arg(long, default_value_t = 500)]
    max_tokens: usize,
    /// Text fed before the conversation (e.g. a system prompt); /reset returns here.
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    s: SamplingArgs,
    /// Start from this state (ours, or an RWKV-PEFT tuned time_state); /reset returns to it
    /// (and to the --system prompt after it).
    #[arg(long)]
    state: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Arch {
    V4,
    V5,
    V6,
    V7,
    /// The Transformer baseline (nanoGPT's architecture).
    Gpt,
}

#[derive(Args)]
struct InitArgs {
    /// Architecture.
    #[arg(long, value_enum)]
    arch: Arch,
    /// Number of layers.
    #[arg(long)]
    layers: usize,
    /// Width (n_embd).
    #[arg(long)]
    dim: usize,
    /// Vocabulary size.
    #[arg(long)]
    vocab: usize,
    /// Head size (v5, v6, v7, gpt).
    #[arg(long, default_value_t = 64)]
    head_size: usize,
    /// The Transformer's learned positions, the most tokens it reads (gpt only).
    #[arg(long, default_value_t = 1024)]
    ctx: usize,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stored dtype.
    #[arg(long, value_enum, default_value = "bf16")]
    dtype: OutDType,
    /// Output file (.safetensors or .pth).
    #[arg(long)]
    out: PathBuf,
    /// Gaussian values of the same scale instead of orthogonal matrices: seconds instead of
    /// an hour for a 1.5B shape, for benchmarks (the official initialisation otherwise).
    #[arg(long)]
    fast: bool,
}

#[derive(Args)]
struct BenchArgs {
    /// Checkpoint file.
    #[arg(long, short = 'm')]
    model: PathBuf,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 512)]
    prompt: usize,
    /// Tokens to generate.
    #[arg(long, default_value_t = 256)]
    gen: usize,
    /// Repetitions (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Weight format at load: f32, f16, bf16, int8 or q4 (default: as stored).
    #[arg(long)]
    quant: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum OutDType {
    Bf16,
    F16,
    F32,
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    /// One token at a time (time-sequential).
    Recurrent,
    /// The whole sequence at once (time-parallel).
    Parallel,
}

#[derive(Args)]
struct LogitsArgs {
    /// Checkpoint file.
    #[arg(long, short = 'm')]
    model: PathBuf,
    /// Input token ids, comma-separated.
    #[arg(long)]
    tokens: String,
    /// How to run the sequence.
    #[arg(long, value_enum, default_value = "parallel")]
    mode: Mode,
    /// Start from this state instead of the zero state.
    #[arg(long, alias = "state")]
    state_in: Option<PathBuf>,
    /// Fold an RWKV-PEFT LoRA file into the weights: FILE[:ALPHA] (ALPHA default 16).
    #[arg(long)]
    lora: Option<String>,
    /// Output safetensors file.
    #[arg(long)]
    out: PathBuf,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Weight format at load: f32, f16, bf16, int8 or q4 (default: as stored).
    #[arg(long)]
    quant: Option<String>,
}

fn parse_quant(q: &Option<String>) -> Result<Option<WeightFormat>> {
    q.as_deref().map(str::parse).transpose()
}

fn load_model(m: &ModelArgs) -> Result<(Model, Box<dyn Tokenizer>)> {
    rwkv::kernels::set_threads(m.threads)?;
    let path = match &m.model {
        Some(p) => p.clone(),
        None => rwkv::default_model()?,
    };
    let model = Model::load_with_lora(&path, parse_quant(&m.quant)?, m.lora.as_deref())?;
    let tok = match &m.tokenizer {
        Some(spec) => tokenizer::load(spec)?,
        None => tokenizer::for_model(model.info())
            .map_err(|e| Error::bad(format!("{}: {e}", path.display())))?,
    };
    Ok((model, tok))
}

fn convert_cmd(
    input: &Path,
    output: &Path,
    dtype: Option<DType>,
    quant: &Option<String>,
    tokenizer: Option<&str>,
) -> Result<()> {
    let q = parse_quant(quant)?;
    let vocab = if output.extension().is_some_and(|e| e == "gguf") {
        gguf_vocab(&Checkpoint::open(input)?, output, tokenizer)?
    } else {
        None
    };
    convert(input, output, dtype, q, vocab.as_deref())
}

/// The vocabulary table a `.gguf` output carries when the input has none of its own: that of
/// `--tokenizer`, else the one the model's vocabulary implies.
fn gguf_vocab(
    ck: &Checkpoint,
    output: &Path,
    tokenizer: Option<&str>,
) -> Result<Option<Vec<Vec<u8>>>> {
    if output.extension().is_none_or(|e| e != "gguf") {
        return Ok(None);
    }
    let info = detect(ck)?;
    let tok = match (tokenizer, ck.vocab()) {
        (Some(spec), _) => tokenizer::load(spec)?,
        (None, Some(_)) => return Ok(None),
        (None, None) => tokenizer::for_model(&info)
            .map_err(|e| Error::bad(format!("{}: {e}", ck.path().display())))?,
    };
    Ok(Some(tokenizer::token_table(tok.as_ref(), info.vocab_size)))
}

fn merge(base: &Path, lora: &str, output: &Path, tokenizer: Option<&str>) -> Result<()> {
    let mut ck = Checkpoint::open(base)?;
    let (file, alpha) = rwkv::checkpoint::lora::parse_spec(lora)?;
    let n = rwkv::checkpoint::lora::merge_lora(&mut ck, &Checkpoint::open(&file)?, alpha, true)?;
    let vocab = gguf_vocab(&ck, output, tokenizer)?;
    rwkv::checkpoint::write::convert_checkpoint(&ck, output, None, None, vocab.as_deref())?;
    eprintln!("merged {n} adapted weights into {}", output.display());
    Ok(())
}

fn read_stdin() -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    std::io::stdin()
        .read_to_end(&mut buf)
        .map_err(|e| Error::io("<stdin>", e))?;
    Ok(buf)
}

fn info(path: &Path, json: bool) -> Result<()> {
    let ck = Checkpoint::open(path)?;
    let info = detect(&ck)?;
    if json {
        let s = serde_json::to_string(&info).map_err(|e| Error::Internal(e.to_string()))?;
        println!("{s}");
        return Ok(());
    }
    println!(
        "file        {} ({}, {} bytes)",
        path.display(),
        info.format,
        info.file_bytes
    );
    print!("{info}");
    Ok(())
}

fn generate(a: GenerateArgs) -> Result<()> {
    let (model, tok) = load_model(&a.m)?;
    let prompt = match (&a.prompt, &a.prompt_file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => std::fs::read_to_string(f).map_err(|e| Error::io(f, e))?,
        (None, None) => String::new(),
    };
    let mut sess = Session::new(&model, tok.as_ref(), a.s.config()?)?;
    if let Some(p) = &a.state_in {
        sess.set_state(State::load(p, model.info())?)?;
    }
    let t0 = std::time::Instant::now();
    let n_prompt = sess.feed_text(&prompt)?;
    let prompt_s = t0.elapsed().as_secs_f64();
    let rules = StopRules {
        max_tokens: a.max_tokens,
        stop_tokens: parse_ids(&a.s.stop_token, "--stop-token")?,
        stop_strings: a.s.stop.clone(),
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut io_err = None;
    let g = sess.generate(&rules, |text| {
        match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
            Ok(()) => true,
            Err(e) => {
                io_err = Some(e);
                false
            }
        }
    })?;
    if let Some(e) = io_err {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(Error::io("<stdout>", e));
        }
    }
    let _ = writeln!(out);
    if let Some(p) = &a.state_out {
        sess.state().save(p)?;
    }
    if a.stats {
        eprintln!(
            "prompt: {n_prompt} tokens in {prompt_s:.3} s ({:.1} tokens/s); generated: {} tokens in {:.3} s ({:.1} tokens/s); finish: {}; seed: {}",
            n_prompt as f64 / prompt_s.max(1e-9),
            g.tokens,
            g.seconds,
            g.tokens as f64 / g.seconds.max(1e-9),
            g.finish.as_str(),
            sess.sampler().seed()
        );
    }
    Ok(())
}

fn chat(a: ChatArgs) -> Result<()> {
    let (model, tok) = load_model(&a.m)?;
    let mut sess = Session::new(&model, tok.as_ref(), a.s.config()?)?;
    if let Some(p) = &a.state {
        sess.set_state(State::load(p, model.info())?)?;
    }
    if let Some(sys) = &a.system {
        sess.feed_text(sys)?;
    }
    let rules = StopRules {
        max_tokens: a.max_tokens,
        stop_tokens: parse_ids(&a.s.stop_token, "--stop-token")?,
        stop_strings: a.s.stop.clone(),
    };
    let terminal = std::io::stdin().is_terminal();
    rwkv::chat::run(
        &mut sess,
        rules,
        std::io::stdin().lock(),
        std::io::stdout().lock(),
        terminal,
    )
}

fn logits(a: LogitsArgs) -> Result<()> {
    rwkv::kernels::set_threads(a.threads)?;
    let model = Model::load_with_lora(&a.model, parse_quant(&a.quant)?, a.lora.as_deref())?;
    let tokens = parse_ids(&a.tokens, "--tokens")?;
    if tokens.is_empty() {
        return Err(Error::bad("--tokens: give at least one token id"));
    }
    let mut state = match &a.state_in {
        Some(p) => State::load(p, model.info())?,
        None => model.new_state(),
    };
    let v = model.vocab_size();
    let logits = match a.mode {
        Mode::Parallel => model.forward(&tokens, &mut state, Logits::All)?,
        Mode::Recurrent => {
            let mut all = vec![0.0; tokens.len() * v];
            for (i, &t) in tokens.iter().enumerate() {
                model.step_into(t, &mut state, &mut all[i * v..(i + 1) * v])?;
            }
            all
        }
    };
    let mut tensors = vec![OutTensor::f32("logits", vec![tokens.len(), v], &logits)];
    tensors.extend(state.out_tensors("state."));
    write_safetensors(&a.out, &tensors, &state.metadata())
}

fn out_dtype(d: OutDType) -> DType {
    match d {
        OutDType::Bf16 => DType::BF16,
        OutDType::F16 => DType::F16,
        OutDType::F32 => DType::F32,
    }
}

fn init(a: InitArgs) -> Result<()> {
    let spec = rwkv::init::InitSpec {
        arch: match a.arch {
            Arch::V4 => rwkv::checkpoint::Generation::V4,
            Arch::V5 => rwkv::checkpoint::Generation::V5_2,
            Arch::V6 => rwkv::checkpoint::Generation::V6_0,
            Arch::V7 => rwkv::checkpoint::Generation::V7,
            Arch::Gpt => rwkv::checkpoint::Generation::Gpt,
        },
        n_layer: a.layers,
        n_embd: a.dim,
        vocab: a.vocab,
        head_size: a.head_size,
        positions: a.ctx,
        seed: a.seed,
    };
    rwkv::init::write_init_with(&spec, &a.out, out_dtype(a.dtype), a.fast)?;
    let ck = Checkpoint::open(&a.out)?;
    let info = detect(&ck)?;
    eprintln!(
        "wrote {} ({}, {} layers, width {}, vocab {}, {:.2} M parameters)",
        a.out.display(),
        match info.generation {
            rwkv::checkpoint::Generation::Gpt => "the Transformer baseline".to_string(),
            g => format!("RWKV {g}"),
        },
        info.n_layer,
        info.n_embd,
        info.vocab_size,
        info.params as f64 / 1e6
    );
    Ok(())
}

fn bench(a: BenchArgs) -> Result<()> {
    rwkv::kernels::set_threads(a.threads)?;
    let model = Model::load_as(&a.model, parse_quant(&a.quant)?)?;
    let r = rwkv::bench::run(&model, a.prompt, a.gen, a.runs)?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string(&r).map_err(|e| Error::Internal(e.to_string()))?
        );
        return Ok(());
    }
    let info = model.info();
    println!(
        "model       {} (RWKV {}, {} layers, width {}, vocab {})",
        a.model.display(),
        info.generation,
        info.n_layer,
        info.n_embd,
        info.vocab_size
    );
    print!("{r}");
    Ok(())
}

fn tokenize(spec: &str) -> Result<()> {
    let tok = tokenizer::load(spec)?;
    let bytes = read_stdin()?;
    let text = String::from_utf8(bytes).map_err(|e| {
        Error::bad(format!(
            "<stdin>: not UTF-8 text (byte {})",
            e.utf8_error().valid_up_to()
        ))
    })?;
    let ids = tok.encode(&text)?;
    println!(
        "{}",
        serde_json::to_string(&ids).map_err(|e| Error::Internal(e.to_string()))?
    );
    Ok(())
}

fn detokenize(spec: &str) -> Result<()> {
    let tok = tokenizer::load(spec)?;
    let bytes = read_stdin()?;
    let ids: Vec<u32> = serde_json::from_slice(&bytes)
        .map_err(|e| Error::bad(format!("<stdin>: expected a JSON array of token ids: {e}")))?;
    let out = tok.decode_bytes(&ids)?;
    std::io::stdout()
        .write_all(&out)
        .map_err(|e| Error::io("<stdout>", e))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Info { model, json } => info(&model, json),
        Cmd::Generate(a) => generate(a),
        Cmd::Chat(a) => chat(a),
        Cmd::Logits(a) => logits(a),
        Cmd::Convert {
            input,
            output,
            dtype,
            quant,
            tokenizer,
        } => convert_cmd(
            &input,
            &output,
            dtype.map(out_dtype),
            &quant,
            tokenizer.as_deref(),
        ),
        Cmd::Merge {
            base,
            lora,
            output,
            tokenizer,
        } => merge(&base, &lora, &output, tokenizer.as_deref()),
        Cmd::Init(a) => init(a),
        Cmd::Train(a) => train(a),
        Cmd::Tune(a) => tune(a),
        Cmd::Experiment(a) => experiment(a),
        Cmd::Eval(a) => eval(a),
        Cmd::Bench(a) => bench(a),
        Cmd::Serve(a) => rwkv::server::serve(a),
        Cmd::Tokenize { tokenizer } => tokenize(&tokenizer),
        Cmd::Detokenize { tokenizer } => detokenize(&tokenizer),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

/// `rwkv train` flags; each overrides the key of the same name (`TrainConfig`'s, and `--config`'s
/// file's): the flags that were given serialise to exactly those keys.
#[derive(Args, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
struct TrainArgs {
    /// A TOML file with any of the keys below (flag names without the dashes).
    #[arg(long)]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Training text.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<PathBuf>,
    /// bytes, world or a tokenizer file [default: bytes].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    tokenizer: Option<String>,
    /// Fraction at the end of --data held out for validation [default: 0.1].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    val_fraction: Option<f64>,
    /// A separate validation text (instead of --val-fraction).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    val_data: Option<PathBuf>,
    /// v7, v4 or gpt: the Transformer baseline, nanoGPT's architecture, with nanoGPT's
    /// recipe's lr 1e-3 to 1e-4 and no L2Wrap unless given [default: v7].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    arch: Option<String>,
    /// Blocks [default: 4].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    layers: Option<usize>,
    /// Width [default: 128].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    dim: Option<usize>,
    /// Head size (v7, gpt) [default: 32].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    head_size: Option<usize>,
    /// Tokens per training window [default: 64].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    ctx: Option<usize>,
    /// Windows per micro-batch [default: 12].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    batch: Option<usize>,
    /// Micro-batches per optimizer step (gradient accumulation) [default: 1].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    accum: Option<usize>,
    /// Optimizer steps [default: 2000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    steps: Option<u64>,
    /// Peak learning rate [default: 6e-3].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    lr: Option<f64>,
    /// Learning rate at the last step [default: lr / 100].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    lr_final: Option<f64>,
    /// Warm-up steps [default: 100].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    warmup: Option<u64>,
    /// AdamW weight decay on 2-D weights [default: 0.1].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    weight_decay: Option<f64>,
    /// Largest global gradient norm [default: 1.0].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    grad_clip: Option<f64>,
    /// L2Wrap factor [default: 1e-4].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    l2wrap: Option<f64>,
    /// Random seed [default: 1337].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<u64>,
    /// Run directory: checkpoints, metrics.jsonl, loss.svg [default: runs/latest].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    out: Option<PathBuf>,
    /// Steps between checkpoints [default: 500].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    save_every: Option<u64>,
    /// Steps between validations [default: 500; always at the last step].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    eval_every: Option<u64>,
    /// Steps between metric lines [default: 10].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    log_every: Option<u64>,
    /// Also write model.pth with every checkpoint.
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pth: bool,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    #[serde(skip)]
    resume: bool,
    /// Stop after this step as an interruption would (continue later with --resume).
    #[arg(long)]
    #[serde(skip)]
    stop_at: Option<u64>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    #[serde(skip)]
    threads: Option<usize>,
    /// bf16: RWKV-7's matrix products take bfloat16 inputs and sum in f32, twice as fast on
    /// CPUs with AVX512-BF16 (f32 elsewhere); f32: everything in f32 [default: bf16].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    precision: Option<String>,
}

/// `rwkv experiment` flags.
#[derive(Args)]
struct ExperimentArgs {
    /// The experiment: gen-time, context, decay or recall.
    name: String,
    /// A reduced run of seconds instead of minutes.
    #[arg(long)]
    quick: bool,
    /// Directory for its JSON, plots and models [default: experiments/NAME].
    #[arg(long)]
    out: Option<PathBuf>,
    /// A checkpoint to analyse (decay; repeatable) [default: the built-in model and one the
    /// experiment trains at a longer context].
    #[arg(long)]
    model: Vec<PathBuf>,
    /// The text models are trained and measured on.
    #[arg(long, default_value = "data/tinyshakespeare.txt")]
    data: PathBuf,
    /// gen-time: blocks of both models [default: 6; --quick 2].
    #[arg(long)]
    layers: Option<usize>,
    /// gen-time: width of both models, a multiple of the heads' 64 (32 with --quick)
    /// [default: 384; --quick 64].
    #[arg(long)]
    dim: Option<usize>,
    /// gen-time: tokens each model generates [default: 16384; --quick 512].
    #[arg(long)]
    tokens: Option<usize>,
    /// Threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

fn experiment(a: ExperimentArgs) -> Result<()> {
    rwkv::kernels::set_threads(a.threads)?;
    let cfg = rwkv::train::experiment::ExperimentConfig {
        out: a
            .out
            .unwrap_or_else(|| PathBuf::from("experiments").join(&a.name)),
        name: a.name,
        quick: a.quick,
        models: a.model,
        data: a.data,
        layers: a.layers,
        dim: a.dim,
        tokens: a.tokens,
    };
    print!("{}", rwkv::train::experiment::run(&cfg)?);
    Ok(())
}

fn train(a: TrainArgs) -> Result<()> {
    use rwkv::train::TrainConfig;
    let c = match &a.config {
        Some(p) => TrainConfig::from_toml(p)?,
        None => match &a.arch {
            Some(arch) => TrainConfig::for_arch(arch.parse()?),
            None => TrainConfig::default(),
        },
    };
    let given = serde_json::to_value(&a).map_err(|e| Error::Internal(e.to_string()))?;
    let c = c.with_overrides(given)?;
    rwkv::kernels::set_threads(a.threads)?;
    let s = rwkv::train::train(c, a.resume, a.stop_at)?;
    println!(
        "model {} | validation loss {:.4} | {:.0} tokens/s",
        s.model.display(),
        s.val_loss,
        s.tokens_per_s
    );
    Ok(())
}

/// `rwkv tune` flags; each overrides the key of the same name of `TuneConfig`.
#[derive(Args, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
struct TuneArgs {
    /// The checkpoint to adapt (any RWKV-7 file rwkv reads); default: the built-in model.
    #[arg(long, short = 'm')]
    #[serde(skip)]
    model: Option<PathBuf>,
    /// Tuning data: plain text, or .jsonl lines of {"text": ...} or {"messages": [...]} (the
    /// loss on the assistant's tokens only).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<PathBuf>,
    /// What is learnt: state (every layer's initial WKV state) or lora (low-rank adapters on
    /// the --targets weights) [default: state].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    method: Option<String>,
    /// LoRA rank [default: 16].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    rank: Option<usize>,
    /// LoRA alpha: the scale is alpha / rank; load the result with --lora lora.pth:ALPHA
    /// [default: 16].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    alpha: Option<f64>,
    /// LoRA: the weights of every block that get an adapter, comma-separated
    /// [default: att.receptance,att.key,att.value,att.output,ffn.key,ffn.value].
    #[arg(long, value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    targets: Option<Vec<String>>,
    /// world, bytes or a tokenizer file (default: chosen from the model's vocabulary).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    tokenizer: Option<String>,
    /// Fraction at the end of --data (tokens of a text, lines of a jsonl) held out [default: 0.1].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    val_fraction: Option<f64>,
    /// Separate validation data (instead of --val-fraction).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    val_data: Option<PathBuf>,
    /// Tokens per window (a jsonl example is cut to this) [default: 256].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    ctx: Option<usize>,
    /// Windows per step [default: 4].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    batch: Option<usize>,
    /// Optimizer steps [default: 200].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    steps: Option<u64>,
    /// Peak learning rate [default: 0.1 for state, 1e-3 for lora].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    lr: Option<f64>,
    /// Learning rate at the last step [default: lr / 10].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    lr_final: Option<f64>,
    /// Warm-up steps [default: 10].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    warmup: Option<u64>,
    /// Largest global gradient norm [default: 1.0].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    grad_clip: Option<f64>,
    /// Random seed (data order) [default: 1337].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<u64>,
    /// Run directory: state.safetensors and time_state.pth (or lora.pth), tune.safetensors,
    /// metrics.jsonl, loss.svg [default: runs/tune].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    out: Option<PathBuf>,
    /// Steps between checkpoints [default: 100].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    save_every: Option<u64>,
    /// Steps between validations [default: 50; always at the last step].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    eval_every: Option<u64>,
    /// Steps between metric lines [default: 10].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    log_every: Option<u64>,
    /// bf16 or f32 products over the model's small LoRA matrices (the frozen linear weights
    /// always run as stored) [default: bf16].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    precision: Option<String>,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    #[serde(skip)]
    resume: bool,
    /// Stop after this step as an interruption would (continue later with --resume).
    #[arg(long)]
    #[serde(skip)]
    stop_at: Option<u64>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    #[serde(skip)]
    threads: Option<usize>,
}

fn tune(a: TuneArgs) -> Result<()> {
    use rwkv::train::TuneConfig;
    rwkv::kernels::set_threads(a.threads)?;
    let model = match &a.model {
        Some(p) => p.clone(),
        None => rwkv::default_model()?,
    };
    let mut given = serde_json::to_value(&a).map_err(|e| Error::Internal(e.to_string()))?;
    given["model"] = serde_json::json!(model);
    let c = TuneConfig::default().with_overrides(given)?;
    let tok = match &c.tokenizer {
        Some(spec) => tokenizer::load(spec)?,
        None => {
            let info =
                rwkv::checkpoint::detect::detect(&rwkv::checkpoint::Checkpoint::open(&model)?)?;
            tokenizer::for_model(&info)
                .map_err(|e| Error::bad(format!("{}: {e}", model.display())))?
        }
    };
    let s = rwkv::train::tune(c, tok.as_ref(), a.resume, a.stop_at)?;
    let files: Vec<String> = s.files.iter().map(|f| f.display().to_string()).collect();
    println!(
        "tuned {} | held-out loss {:.4} -> {:.4} | {:.0} tokens/s",
        files.join(" "),
        s.val_before,
        s.val_after,
        s.tokens_per_s
    );
    Ok(())
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// The text to score.
    #[arg(long)]
    data: PathBuf,
    /// Score windows of this many tokens, each from a fresh state (default: one pass with
    /// the state carried through the whole text).
    #[arg(long)]
    ctx: Option<usize>,
    /// Score only this fraction at the end of the text (the split `rwkv train` validates on).
    #[arg(long)]
    val_fraction: Option<f64>,
    /// Score from this initial state (ours, or an RWKV-PEFT tuned time_state) instead of the
    /// zero state.
    #[arg(long)]
    state: Option<PathBuf>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

fn eval(a: EvalArgs) -> Result<()> {
    let (model, tok) = load_model(&a.m)?;
    let initial = a
        .state
        .as_ref()
        .map(|p| State::load(p, model.info()))
        .transpose()?;
    let tty = std::io::stderr().is_terminal();
    let start = std::time::Instant::now();
    let mut progress = |done: usize, total: usize| {
        if tty {
            let pct = 100.0 * done as f64 / total.max(1) as f64;
            let rate = done as f64 / start.elapsed().as_secs_f64().max(1e-9);
            let bar = rwkv::progress::bar(done as u64, total as u64);
            eprint!("\r\x1b[2K{bar} scoring {done}/{total} tokens ({pct:.0}%, {rate:.0} tok/s)");
        }
    };
    let s = rwkv::eval::score_file(
        &model,
        tok.as_ref(),
        a.m.tokenizer.as_deref(),
        &a.data,
        a.ctx,
        a.val_fraction,
        initial.as_ref(),
        &mut progress,
    )?;
    if tty {
        eprintln!();
    }
    if a.json {
        let j = serde_json::to_string(&s).map_err(|e| Error::Internal(e.to_string()))?;
        println!("{j}");
    } else {
        println!(
            "loss {:.4} nats/token | perplexity {:.3} | {:.4} bits/byte | {} tokens",
            s.loss, s.perplexity, s.bits_per_byte, s.tokens
        );
    }
    Ok(())
}
