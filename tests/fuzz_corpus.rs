//! Every input of the fuzz corpora (`fuzz/corpus/TARGET/`: the seeds and whatever the fuzzers
//! kept, crashes they found among them) through the entry point its fuzz target calls, on
//! stable Rust: a crash found once stays fixed.

use std::path::Path;

#[test]
fn every_corpus_input_runs_without_a_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for &(name, entry) in rwkv::fuzz::TARGETS {
        let dir = root.join(name);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("a corpus entry").path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "{}: an empty corpus", dir.display());
        for f in &files {
            let data = std::fs::read(f).expect("a corpus file");
            let run = std::panic::catch_unwind(|| entry(&data));
            assert!(run.is_ok(), "{name}: {} panics", f.display());
        }
        println!("{name}: {} inputs", files.len());
    }
}

#[test]
fn every_fuzz_target_has_an_entry_point_and_a_corpus() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut targets: Vec<String> = std::fs::read_dir(root.join("fuzz_targets"))
        .expect("fuzz/fuzz_targets")
        .map(|e| {
            let p = e.expect("an entry").path();
            p.file_stem()
                .expect("a name")
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    targets.sort();
    let mut named: Vec<String> = rwkv::fuzz::TARGETS
        .iter()
        .map(|t| t.0.to_string())
        .collect();
    named.sort();
    assert_eq!(targets, named);
}
