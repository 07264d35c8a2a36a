//! The device memory check a GPU worker runs before it loads a model: what the model will hold
//! on the device at the dtype it gets there, refused when the device reports less free. Runs
//! without a GPU: the check is arithmetic on what the device reports.

mod common;

use candle_core::DType;
use securerun_models::budget::estimate_on_device;
use securerun_models::cuda::{sequences_that_fit, CudaError, DeviceInfo};
use securerun_models::load::accelerator_dtype;
use securerun_models::{Limits, ModelSource};

fn device(free_bytes: u64) -> DeviceInfo {
    DeviceInfo {
        ordinal: 0,
        name: "test".into(),
        capability: (9, 0),
        free_bytes,
        total_bytes: 1 << 40,
    }
}

#[test]
fn weights_are_counted_at_the_device_dtype_and_a_model_that_does_not_fit_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    common::write_model(tmp.path(), "llama", DType::F32);
    let source = ModelSource::open(tmp.path(), &Limits::default()).unwrap();
    // f32 weights go to the device as bf16 unless asked otherwise.
    assert_eq!(accelerator_dtype(&source), DType::BF16);
    let elements: u64 = source
        .tensors()
        .map(|(_, t)| t.shape.iter().map(|&d| d as u64).product::<u64>())
        .sum();
    let bf16 = estimate_on_device(&source, DType::BF16, None).unwrap();
    let f32 = estimate_on_device(&source, DType::F32, None).unwrap();
    assert_eq!(bf16.weights, elements * 2);
    assert_eq!(f32.weights, elements * 4);
    // The KV cache scales with the context: 2 (k, v) × layers × kv heads × head dim × positions.
    let short = estimate_on_device(&source, DType::BF16, Some(16)).unwrap();
    assert_eq!(short.kv_cache, 2 * 2 * 2 * 8 * 16 * 2);
    assert_eq!(bf16.kv_cache, short.kv_cache * 128 / 16);

    let fits = |est, held, free| sequences_that_fit(est, held, &device(free), 1, false);
    // One sequence's cache, and room for the copy it makes as it grows.
    let one = bf16.total() + bf16.kv_cache;
    assert_eq!(fits(&bf16, "bf16", one), Ok(1));
    let err = fits(&bf16, "bf16", one - 1).unwrap_err();
    assert!(matches!(err, CudaError::DeviceMemory { .. }), "{err}");
    assert!(
        err.to_string().contains("more than cuda:0 has free"),
        "{err}"
    );
}

/// Quantized weights on the device are counted at their block format, the rest at f32.
#[test]
fn quantized_weights_are_counted_at_their_format() {
    let tmp = tempfile::tempdir().unwrap();
    common::write_model(tmp.path(), "llama", DType::F32);
    let source = ModelSource::open(tmp.path(), &Limits::default()).unwrap();
    let f32 = estimate_on_device(&source, DType::F32, None).unwrap();
    let q8 = securerun_models::budget::estimate_quantized_on_device(
        &source,
        securerun_models::Precision::Q8_0,
        None,
    )
    .unwrap();
    assert!(q8.weights < f32.weights, "{q8:?} vs {f32:?}");
    // KV cache and activations at f32, as candle's quantized llama keeps them.
    assert_eq!(q8.kv_cache, f32.kv_cache);
    let err = sequences_that_fit(&q8, "q8_0", &device(q8.total()), 1, false).unwrap_err();
    assert!(err.to_string().contains("at q8_0"), "{err}");
}

#[test]
fn an_f16_model_stays_f16_on_the_device() {
    let tmp = tempfile::tempdir().unwrap();
    common::write_model(tmp.path(), "llama", DType::F16);
    let source = ModelSource::open(tmp.path(), &Limits::default()).unwrap();
    assert_eq!(accelerator_dtype(&source), DType::F16);
}
