//! `rwkv init` writes official-format checkpoints: same keys, order and shapes as the
//! official files of the same dimensions, loadable by every subcommand.

mod common;
use common::{fixture, tmpdir};
use rwkv::checkpoint::{Checkpoint, Generation};
use rwkv::init::{write_init, InitSpec};
use rwkv::model::{Logits, Model};
use rwkv::tensor::DType;

#[test]
fn init_matches_official_key_order_and_shapes() {
    let dir = tmpdir("init");
    for (gen, arch) in [
        ("v4", Generation::V4),
        ("v5_2", Generation::V5_2),
        ("v6_0", Generation::V6_0),
        ("v7", Generation::V7),
    ] {
        // The .pth keeps the trainer's registration order (safetensors files sort their keys).
        let official = Checkpoint::open(fixture(&format!("{gen}/model.pth"))).unwrap();
        let spec = InitSpec {
            arch,
            n_layer: 2,
            n_embd: 128,
            vocab: 300,
            head_size: 64,
            positions: 0,
            seed: 1,
        };
        let p = dir.join(format!("{gen}.safetensors"));
        write_init(&spec, &p, DType::BF16).unwrap();
        let ck = Checkpoint::open(&p).unwrap();
        let ours: Vec<_> = ck
            .names()
            .iter()
            .map(|n| (n.clone(), ck.get(n).unwrap().shape.clone()))
            .collect();
        let theirs: Vec<_> = official
            .names()
            .iter()
            .map(|n| (n.clone(), official.get(n).unwrap().shape.clone()))
            .collect();
        // The fixture's LoRA ranks are not the official rule's for C=128, so LoRA shapes are
        // left out of the shape comparison.
        let names = |v: &[(String, Vec<usize>)]| v.iter().map(|x| x.0.clone()).collect::<Vec<_>>();
        assert_eq!(names(&ours), names(&theirs), "{gen}");
        for ((n, a), (_, b)) in ours.iter().zip(&theirs) {
            let lora = ["w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2"]
                .iter()
                .any(|k| n.ends_with(&format!("att.{k}")));
            if !lora {
                assert_eq!(a, b, "{gen} {n}");
            }
        }
        // It runs, and both modes agree on it.
        let m = Model::load(&p).unwrap();
        let mut s1 = m.new_state();
        let a = m.forward(&[1, 2, 3, 4], &mut s1, Logits::Last).unwrap();
        let mut s2 = m.new_state();
        let mut b = Vec::new();
        for t in [1, 2, 3, 4] {
            b = m.step(t, &mut s2).unwrap();
        }
        assert!(common::tol_ratio(&a, &b) <= 1.0);
        assert!(a.iter().all(|x| x.is_finite()));
    }
}

#[test]
fn init_is_reproducible_and_seeded() {
    let dir = tmpdir("init-seed");
    let spec = |seed| InitSpec {
        arch: Generation::V7,
        n_layer: 1,
        n_embd: 64,
        vocab: 50,
        head_size: 32,
        positions: 0,
        seed,
    };
    let (a, b, c) = (
        dir.join("a.safetensors"),
        dir.join("b.safetensors"),
        dir.join("c.pth"),
    );
    write_init(&spec(5), &a, DType::F32).unwrap();
    write_init(&spec(5), &b, DType::F32).unwrap();
    write_init(&spec(6), &c, DType::F32).unwrap();
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    let (ca, cc) = (Checkpoint::open(&a).unwrap(), Checkpoint::open(&c).unwrap());
    assert_ne!(
        ca.bytes("head.weight").unwrap(),
        cc.bytes("head.weight").unwrap()
    );
    assert!(write_init(
        &InitSpec {
            n_embd: 65,
            ..spec(1)
        },
        &a,
        DType::F32
    )
    .is_err());
}

/// `--fast` keeps every tensor, shape and non-orthogonal value of the official initialisation
/// and replaces each orthogonal matrix by Gaussian values of the same scale.
#[test]
fn fast_init_keeps_the_tensors_and_the_scale() {
    use rwkv::init::init_tensors_with;
    let spec = InitSpec {
        arch: Generation::V7,
        n_layer: 2,
        n_embd: 128,
        vocab: 300,
        head_size: 64,
        positions: 0,
        seed: 1,
    };
    let exact = init_tensors_with(&spec, false).unwrap();
    let fast = init_tensors_with(&spec, true).unwrap();
    assert_eq!(exact.len(), fast.len());
    let rms = |v: &[f32]| (v.iter().map(|x| (x * x) as f64).sum::<f64>() / v.len() as f64).sqrt();
    let mut replaced = 0;
    for ((n, s, a), (n2, s2, b)) in exact.iter().zip(&fast) {
        assert_eq!((n, s), (n2, s2));
        if a != b {
            // An orthogonal matrix (or one drawn after one): same scale within 5 %.
            let (ra, rb) = (rms(a), rms(b));
            assert!((ra - rb).abs() < 0.05 * ra, "{n}: rms {ra} vs {rb}");
            replaced += 1;
        }
    }
    assert!(replaced >= 8, "{replaced} matrices differ");
}
