//! bf16 through the device's default float type, as `xlpipe bench gpu
//! --bf16` sets it on a GPU, here on the CPU backend against transformers'
//! f32 outputs of the tiny XLM-R fixture. Its own test binary: the setting
//! holds for the whole process, and must come before the device's first
//! tensor.

mod common;

use std::path::Path;

use burn::backend::Flex;
use burn::tensor::DType;
use common::{floats, int_tensor, max_abs_diff};
use serde_json::Value;
use xlpipe_ml::model::{load_encoder, Pooling};
use xlpipe_stages::gpu_bench::{cosines, use_bf16};

#[test]
fn an_encoder_computes_in_bf16_once_its_device_defaults_to_it() {
    let device = Default::default();
    use_bf16::<Flex>(&device).unwrap();
    // Once a device has its types, they stay: the setting cannot be undone
    // halfway through a run.
    assert!(use_bf16::<Flex>(&device).is_err());

    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-xlmr");
    let golden: Value =
        serde_json::from_slice(&std::fs::read(dir.join("golden.json")).unwrap()).unwrap();
    let encoder = load_encoder::<Flex>(&dir, Pooling::Mean, &device).unwrap();
    assert_eq!(encoder.embeddings.word.weight.dtype(), DType::BF16);
    let embedded = encoder.embed(
        int_tensor(&golden["input_ids"]),
        int_tensor(&golden["attention_mask"]),
    );
    assert_eq!(embedded.dtype(), DType::BF16);
    let ours: Vec<f32> = embedded.into_data().convert::<f32>().to_vec().unwrap();
    let theirs = floats(&golden["mean"]);
    let dim = ours.len() / 3;
    let (min, _) = cosines(&ours, &theirs, dim);
    eprintln!("bf16 against transformers' f32: min cosine {min:.6}");
    // Close to f32 (bf16 keeps 8 bits of mantissa), and not f32 itself.
    assert!(min > 0.999, "bf16 against transformers' f32: cosine {min}");
    let worst = max_abs_diff(&ours, &theirs);
    assert!(
        worst > 1e-5,
        "bit-for-bit f32 results ({worst}): bf16 did not take effect"
    );
}
