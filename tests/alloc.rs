//! The per-token path (model step and sampling) allocates nothing once warmed up.
//! A counting global allocator sees every allocation in this test binary.

mod common;
use rwkv::model::Model;
use rwkv::sample::{Sampler, SamplerConfig};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        System.realloc(p, l, n)
    }
}

#[global_allocator]
static A: Counting = Counting;

#[test]
fn step_and_sample_allocate_nothing() {
    let cases = [
        ("v4", None),
        ("v5_2", None),
        ("v6_0", None),
        ("v7", None),
        ("v7", Some("int8")),
        ("v4", Some("q4")),
    ];
    for (gen, quant) in cases {
        let q = quant.map(|q| q.parse().unwrap());
        let model =
            Model::load_as(common::fixture(&format!("{gen}/model.safetensors")), q).unwrap();
        let mut state = model.new_state();
        let mut logits = vec![0.0; model.vocab_size()];
        let mut work = logits.clone();
        let cfg = SamplerConfig {
            presence_penalty: 0.3,
            frequency_penalty: 0.3,
            seed: Some(1),
            ..Default::default()
        };
        let mut sampler = Sampler::new(cfg, model.vocab_size()).unwrap();
        let mut tok = 1;
        // Warm-up: buffers are sized on first use.
        for _ in 0..3 {
            model.step_into(tok, &mut state, &mut logits).unwrap();
            work.copy_from_slice(&logits);
            tok = sampler.sample(&mut work);
            sampler.accept(tok, 1.0);
        }
        let before = ALLOCS.load(Ordering::Relaxed);
        for _ in 0..200 {
            model.step_into(tok, &mut state, &mut logits).unwrap();
            work.copy_from_slice(&logits);
            tok = sampler.sample(&mut work);
            sampler.accept(tok, 1.0);
        }
        let n = ALLOCS.load(Ordering::Relaxed) - before;
        assert_eq!(n, 0, "{gen}: {n} allocations in 200 generated tokens");
        // The step alone, too (the sampler's counts are warm by now).
        let before = ALLOCS.load(Ordering::Relaxed);
        for _ in 0..50 {
            model.step_into(tok, &mut state, &mut logits).unwrap();
        }
        assert_eq!(
            ALLOCS.load(Ordering::Relaxed) - before,
            0,
            "{gen}: step allocated"
        );
    }
}
