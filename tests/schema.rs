//! The schema of each generation against the official checkpoints of the fixtures: the same
//! names in the same order, the same shapes, and a checkpoint that differs from it in one
//! tensor is refused by the check and by the loader, naming that tensor.

mod common;
use common::{fixture, tmpdir};
use rwkv::checkpoint::{detect::detect, Checkpoint, OutTensor};
use rwkv::model::Model;
use rwkv::schema::{self, Dims};

/// Tensor names and shapes.
type Shapes = Vec<(String, Vec<usize>)>;

const GENERATIONS: [&str; 4] = ["v4", "v5_2", "v6_0", "v7"];

#[test]
fn the_schema_is_the_official_checkpoints_list() {
    for g in GENERATIONS {
        // The .pth keeps the trainer's registration order (safetensors files sort their keys).
        let ck = Checkpoint::open(fixture(&format!("{g}/model.pth"))).unwrap();
        let dims = Dims::of(&detect(&ck).unwrap());
        let params = schema::params(&dims);
        let names: Vec<&str> = params.iter().map(|p| p.name.as_str()).collect();
        let stored: Vec<&str> = ck.names().iter().map(String::as_str).collect();
        assert_eq!(names, stored, "{g}: names or order differ");
        let tensors = ck
            .names()
            .iter()
            .map(|n| (n.as_str(), ck.get(n).unwrap().shape.as_slice()));
        schema::check(&dims, tensors).unwrap_or_else(|e| panic!("{g}: {e}"));
    }
}

#[test]
fn a_checkpoint_that_leaves_the_schema_is_refused_by_name() {
    let ck = Checkpoint::open(fixture("v7/model.safetensors")).unwrap();
    let dims = Dims::of(&detect(&ck).unwrap());
    let shapes: Shapes = ck
        .names()
        .iter()
        .map(|n| (n.clone(), ck.get(n).unwrap().shape.clone()))
        .collect();
    let check = |edit: &dyn Fn(&mut Shapes)| {
        let mut s = shapes.clone();
        edit(&mut s);
        schema::check(&dims, s.iter().map(|(n, sh)| (n.as_str(), sh.as_slice())))
            .unwrap_err()
            .to_string()
    };
    let e = check(&|s| s.retain(|(n, _)| n != "blocks.1.att.k_a"));
    assert!(e.contains("missing tensor blocks.1.att.k_a"), "{e}");
    let e = check(&|s| s.push(("blocks.0.att.extra".into(), vec![3])));
    assert!(e.contains("unknown tensor blocks.0.att.extra"), "{e}");
    let e = check(&|s| {
        let w2 = s.iter_mut().find(|(n, _)| n == "blocks.1.att.w2").unwrap();
        w2.1[0] += 1;
    });
    assert!(e.contains("blocks.1.att.w2"), "{e}");
    // The loader reads shapes from the schema: a mis-shaped tensor in a file is refused.
    let dir = tmpdir("schema");
    let path = dir.join("bad.safetensors");
    let out: Vec<OutTensor> = ck
        .names()
        .iter()
        .map(|n| {
            let mut v = ck.f32_vec(n).unwrap();
            let mut shape = ck.get(n).unwrap().shape.clone();
            if n == "blocks.0.att.x_k" {
                v.pop();
                shape = vec![v.len()];
            }
            OutTensor::f32(n.clone(), shape, &v)
        })
        .collect();
    rwkv::checkpoint::write_safetensors(&path, &out, &Default::default()).unwrap();
    let e = Model::load(&path)
        .err()
        .expect("a mis-shaped tensor")
        .to_string();
    assert!(
        e.contains("blocks.0.att.x_k") && e.contains("expected"),
        "{e}"
    );
}
