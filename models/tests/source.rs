//! Model resolution: sharded indexes confined to the model directory, no symlinks, packing into
//! one self-contained file, and clear errors for unsupported or broken models.

mod common;

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::Arc;

use candle_core::DType;
use securerun_models::arch::ArchError;
use securerun_models::fsutil::OpenError;
use securerun_models::source::{Layout, Origin};
use securerun_models::strict_safetensors::{Limits, SafetensorsFile};
use securerun_models::{
    GenerationParams, LoadError, LoadOptions, ModelSource, Prompt, SourceError, TextModel,
};
use serde_json::json;

fn open(p: &Path) -> Result<ModelSource, SourceError> {
    ModelSource::open(p, &Limits::default())
}

fn generate(p: &Path) -> Vec<u32> {
    let opts = LoadOptions::default();
    let source = Arc::new(open(p).unwrap());
    let mut model = TextModel::load(&source, &opts).unwrap();
    let params = GenerationParams {
        max_tokens: 6,
        ignore_eos: true,
        ..Default::default()
    };
    model
        .generate(&Prompt::Text("shards".into()), &params, &mut |_| {
            ControlFlow::Continue(())
        })
        .unwrap()
        .token_ids
}

struct View<'a>(safetensors::Dtype, Vec<usize>, &'a [u8]);
impl safetensors::View for View<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.0
    }
    fn shape(&self) -> &[usize] {
        &self.1
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        self.2.into()
    }
    fn data_len(&self) -> usize {
        self.2.len()
    }
}

/// Splits `dir/model.safetensors` into two shards plus an index, and returns the index map.
fn shard(dir: &Path) -> serde_json::Map<String, serde_json::Value> {
    let single = dir.join("model.safetensors");
    let file = SafetensorsFile::open(&single, &Limits::default()).unwrap();
    let mut map = serde_json::Map::new();
    let mut parts: [Vec<(String, View)>; 2] = [Vec::new(), Vec::new()];
    for (i, t) in file.header().tensors.iter().enumerate() {
        let shard = i % 2;
        parts[shard].push((
            t.name.clone(),
            View(
                safetensors::Dtype::F32,
                t.shape.clone(),
                file.tensor_bytes(t),
            ),
        ));
        map.insert(
            t.name.clone(),
            json!(format!("model-0000{}-of-00002.safetensors", shard + 1)),
        );
    }
    for (i, part) in parts.into_iter().enumerate() {
        let name = dir.join(format!("model-0000{}-of-00002.safetensors", i + 1));
        safetensors::serialize_to_file(part, None::<HashMap<String, String>>, &name).unwrap();
    }
    drop(file);
    std::fs::remove_file(&single).unwrap();
    write_index(dir, &map);
    map
}

fn write_index(dir: &Path, map: &serde_json::Map<String, serde_json::Value>) {
    let index = json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

#[test]
fn sharded_model_loads_and_matches_single_file() {
    let tmp = tempfile::tempdir().unwrap();
    common::write_model(tmp.path(), "llama", DType::F32);
    let expected = generate(tmp.path());
    shard(tmp.path());
    let source = open(tmp.path()).unwrap();
    assert_eq!(source.layout(), Layout::Sharded);
    assert_eq!(source.weight_files().len(), 2);
    assert_eq!(generate(tmp.path()), expected);
}

#[test]
fn shard_names_are_confined() {
    let tmp = tempfile::tempdir().unwrap();
    common::write_model(tmp.path(), "llama", DType::F32);
    let good = shard(tmp.path());
    let first = good.keys().next().unwrap().clone();
    for (name, why) in [
        ("../model-00001-of-00002.safetensors", "'..'"),
        ("/etc/passwd", "absolute"),
        ("sub/model.safetensors", "directly in the model directory"),
        ("model.bin", ".safetensors"),
    ] {
        let mut map = good.clone();
        map.insert(first.clone(), json!(name));
        write_index(tmp.path(), &map);
        let err = open(tmp.path()).unwrap_err();
        assert!(
            matches!(err, SourceError::ShardName { .. }),
            "{name}: {err}"
        );
        assert!(err.to_string().contains(why), "{name}: {err}");
    }
}

#[test]
fn every_indexed_tensor_exactly_once() {
    let tmp = tempfile::tempdir().unwrap();
    common::write_model(tmp.path(), "llama", DType::F32);
    let good = shard(tmp.path());
    let (first, shard1) = good
        .iter()
        .next()
        .map(|(k, v)| (k.clone(), v.clone()))
        .unwrap();

    // Indexed in the wrong shard.
    let mut map = good.clone();
    let other = if shard1 == json!("model-00001-of-00002.safetensors") {
        "model-00002-of-00002.safetensors"
    } else {
        "model-00001-of-00002.safetensors"
    };
    map.insert(first.clone(), json!(other));
    write_index(tmp.path(), &map);
    assert!(matches!(
        open(tmp.path()),
        Err(SourceError::TensorNotIndexed { .. })
    ));

    // Present in a shard but missing from the index.
    let mut map = good.clone();
    map.remove(&first);
    write_index(tmp.path(), &map);
    assert!(matches!(
        open(tmp.path()),
        Err(SourceError::TensorNotIndexed { .. })
    ));

    // Indexed but absent.
    let mut map = good.clone();
    map.insert("ghost.weight".into(), shard1.clone());
    write_index(tmp.path(), &map);
    assert!(matches!(
        open(tmp.path()),
        Err(SourceError::IndexedTensorMissing { .. })
    ));

    // Listed twice in the index.
    let text = format!("{{\"weight_map\": {{\"{first}\": {shard1}, \"{first}\": {shard1}}}}}");
    std::fs::write(tmp.path().join("model.safetensors.index.json"), text).unwrap();
    assert!(matches!(
        open(tmp.path()),
        Err(SourceError::DuplicateIndexEntry { .. })
    ));
}

#[test]
fn symlinks_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let real = tmp.path().join("real");
    common::write_model(&real, "llama", DType::F32);
    let dir = tmp.path().join("linked");
    std::fs::create_dir(&dir).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(real.join(f), dir.join(f)).unwrap();
    }
    std::os::unix::fs::symlink(
        real.join("model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    let err = open(&dir).unwrap_err();
    assert!(matches!(err, SourceError::Safetensors(_)), "{err}");
    assert!(err.to_string().contains("symbolic link"), "{err}");

    // A symlinked config is refused too, not silently skipped.
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    std::fs::copy(
        real.join("model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    std::fs::remove_file(dir.join("config.json")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", dir.join("config.json")).unwrap();
    assert!(matches!(
        open(&dir),
        Err(SourceError::Open(OpenError::Symlink { .. }))
    ));
}

#[test]
fn files_others_could_modify_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    common::write_model(&dir, "llama", DType::F32);
    let chmod = |name: &str, mode: u32| {
        std::fs::set_permissions(dir.join(name), std::fs::Permissions::from_mode(mode)).unwrap()
    };
    assert!(open(&dir).is_ok());
    chmod("model.safetensors", 0o666);
    let err = open(&dir).unwrap_err();
    assert!(
        err.to_string()
            .contains("writable by group or others (mode 0666)"),
        "{err}"
    );
    chmod("model.safetensors", 0o644);
    chmod("tokenizer.json", 0o620);
    assert!(matches!(
        open(&dir),
        Err(SourceError::Open(OpenError::SharedWritable {
            mode: 0o620,
            ..
        }))
    ));
    chmod("tokenizer.json", 0o600);
    assert!(open(&dir).is_ok());
}

#[test]
fn ambiguous_or_missing_weights() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(matches!(
        open(tmp.path()),
        Err(SourceError::NoWeights { .. })
    ));
    common::write_model(tmp.path(), "llama", DType::F32);
    std::fs::write(tmp.path().join("model.safetensors.index.json"), "{}").unwrap();
    assert!(matches!(
        open(tmp.path()),
        Err(SourceError::AmbiguousWeights { .. })
    ));
    assert!(matches!(
        open(&tmp.path().join("nope")),
        Err(SourceError::NotFound { .. })
    ));
}

#[test]
fn pack_embeds_everything_and_runs_the_same() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    common::write_model(&dir, "llama", DType::F32);
    let expected = generate(&dir);
    let out = tmp.path().join("packed").join("model.safetensors");
    std::fs::create_dir(out.parent().unwrap()).unwrap();
    let source = open(&dir).unwrap();
    let summary = securerun_models::pack::pack(&source, &out, false, &Limits::default()).unwrap();
    assert_eq!(
        summary.embedded,
        [
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    // Refuses to overwrite without force.
    assert!(securerun_models::pack::pack(&source, &out, false, &Limits::default()).is_err());

    let packed = open(&out).unwrap();
    assert_eq!(packed.layout(), Layout::SingleFile);
    assert!(packed
        .aux_files()
        .values()
        .all(|a| a.origin == Origin::Embedded));
    assert_eq!(generate(&out), expected);

    // Files dropped beside a packed file are ignored: the pack is complete by construction.
    std::fs::write(out.parent().unwrap().join("modules.json"), "[]").unwrap();
    let packed = open(&out).unwrap();
    assert!(!packed.aux_files().contains_key("modules.json"));

    // A header limit smaller than the packed header is refused with a specific error.
    let tiny = Limits {
        max_header_len: 1024,
        ..Limits::default()
    };
    let err = securerun_models::pack::pack(&source, &out, true, &tiny).unwrap_err();
    assert!(err.to_string().contains("header"), "{err}");
    assert!(
        out.exists(),
        "a failed pack must not remove the existing output"
    );
}

#[test]
fn single_file_falls_back_to_files_beside_it() {
    let tmp = tempfile::tempdir().unwrap();
    common::write_model(tmp.path(), "llama", DType::F32);
    let source = open(&tmp.path().join("model.safetensors")).unwrap();
    assert!(matches!(
        source.aux_files()["config.json"].origin,
        Origin::File(_)
    ));
}

#[test]
fn unsupported_architecture_lists_supported_ones() {
    let tmp = tempfile::tempdir().unwrap();
    common::write_model(tmp.path(), "llama", DType::F32);
    let mut cfg = common::config("llama");
    cfg["model_type"] = json!("gpt2");
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    let source = Arc::new(open(tmp.path()).unwrap());
    let err = TextModel::load(&source, &LoadOptions::default())
        .err()
        .unwrap();
    let msg = err.to_string();
    assert!(matches!(
        err,
        LoadError::Arch(ArchError::Unsupported { .. })
    ));
    for name in [
        "llama", "qwen2", "qwen3", "mistral", "phi3", "gemma2", "bert",
    ] {
        assert!(msg.contains(name), "{msg}");
    }
}

#[test]
fn missing_or_misshapen_tensors_are_errors_not_panics() {
    let tmp = tempfile::tempdir().unwrap();
    common::write_model(tmp.path(), "llama", DType::F32);
    // A config that expects a bigger model than the weights hold.
    let mut cfg = common::config("llama");
    cfg["num_hidden_layers"] = json!(3);
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    let source = Arc::new(open(tmp.path()).unwrap());
    let err = TextModel::load(&source, &LoadOptions::default())
        .err()
        .unwrap();
    assert!(
        matches!(err, LoadError::Arch(ArchError::Weights { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("model.layers.2"), "{err}");

    cfg["num_hidden_layers"] = json!(2);
    cfg["intermediate_size"] = json!(48);
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    let source = Arc::new(open(tmp.path()).unwrap());
    let err = TextModel::load(&source, &LoadOptions::default())
        .err()
        .unwrap();
    assert!(err.to_string().contains("shape"), "{err}");
}

#[test]
fn hostile_config_sizes_are_refused_before_allocation() {
    let tmp = tempfile::tempdir().unwrap();
    common::write_model(tmp.path(), "llama", DType::F32);
    for (field, value) in [
        ("max_position_embeddings", json!(1_000_000_000_000u64)),
        ("num_attention_heads", json!(0)),
        ("hidden_size", json!(-4)),
        ("vocab_size", json!(1.5)),
    ] {
        let mut cfg = common::config("llama");
        cfg[field] = value.clone();
        std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
        let source = Arc::new(open(tmp.path()).unwrap());
        let err = TextModel::load(&source, &LoadOptions::default())
            .err()
            .unwrap();
        assert!(
            matches!(err, LoadError::Arch(ArchError::Config { .. })),
            "{field}: {err}"
        );
        assert!(err.to_string().contains(field), "{err}");
    }
}
