//! Hugging Face checkpoints in and out: safetensors (single file or sharded with
//! `model.safetensors.index.json`; f32, f16 and bf16 weights) read by tensor name, written
//! back with the same names and a config.json that transformers and vLLM load. Also the
//! seeded random initializer of new models.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use safetensors::{Dtype, SafeTensors};

use crate::fsutil::{AtomicFile, write_atomic};
use crate::model::ModelError;
use crate::model::config::ModelConfig;
use crate::model::transformer::{CausalLm, WeightSource};

/// Tensors read from the safetensors files of a model directory.
pub struct SafetensorsSource {
    /// Each file's bytes, by file name.
    files: BTreeMap<String, Vec<u8>>,
    /// Which file holds each tensor.
    index: HashMap<String, String>,
    dir: PathBuf,
    used: BTreeSet<String>,
}

impl SafetensorsSource {
    /// Opens `dir/model.safetensors`, or else the shards listed in
    /// `dir/model.safetensors.index.json` (transformers' order: a directory holding both
    /// loads the same weights in either). Every header is checked here.
    pub fn open(dir: &Path) -> Result<Self, ModelError> {
        Self::read(dir, Self::file_names(dir)?)
    }

    /// The weight files of `dir` that [`SafetensorsSource::open`] reads.
    pub fn file_names(dir: &Path) -> Result<Vec<String>, ModelError> {
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let file_names: Vec<String> = if single.is_file() {
            if index_path.is_file() {
                tracing::warn!(
                    dir = %dir.display(),
                    "the model directory holds both model.safetensors and model.safetensors.index.json; loading model.safetensors, as transformers does"
                );
            }
            vec!["model.safetensors".into()]
        } else if index_path.is_file() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| ModelError::io(&index_path, e))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ModelError::checkpoint(&index_path, format!("not valid JSON: {e}")))?;
            let map = json
                .get("weight_map")
                .and_then(serde_json::Value::as_object)
                .ok_or_else(|| ModelError::checkpoint(&index_path, "has no `weight_map` object"))?;
            let mut names = Vec::with_capacity(map.len());
            for (tensor, shard) in map {
                names.push(shard_name(shard).map_err(|why| ModelError::checkpoint(&index_path, format!("tensor `{tensor}`: {why}")))?);
            }
            names.sort();
            names.dedup();
            names
        } else {
            return Err(ModelError::checkpoint(dir, "holds neither model.safetensors nor model.safetensors.index.json"));
        };
        Ok(file_names)
    }

    /// Reads the weight files `file_names` of `dir` and checks their headers.
    fn read(dir: &Path, file_names: Vec<String>) -> Result<Self, ModelError> {
        let mut files = BTreeMap::new();
        let mut index = HashMap::new();
        for name in file_names {
            let path = dir.join(&name);
            if !path.is_file() {
                return Err(ModelError::checkpoint(&path, "is listed in model.safetensors.index.json but is not a file"));
            }
            let bytes = std::fs::read(&path).map_err(|e| ModelError::io(&path, e))?;
            let tensors = SafeTensors::deserialize(&bytes)
                .map_err(|e| ModelError::checkpoint(&path, format!("not a valid safetensors file ({e}); is it truncated?")))?;
            for tensor in tensors.names() {
                index.insert(tensor.to_string(), name.clone());
            }
            files.insert(name, bytes);
        }
        Ok(Self { files, index, dir: dir.to_path_buf(), used: BTreeSet::new() })
    }

    /// Tensors present in the files that the model did not read (e.g. a tied lm_head).
    pub fn unused(&self) -> Vec<String> {
        let mut names: Vec<String> = self.index.keys().filter(|n| !self.used.contains(*n)).cloned().collect();
        names.sort();
        names
    }
}

/// A shard's name from the index's `weight_map`: a plain file name inside the model
/// directory (no folder, no `..`), so that an index cannot point the loader elsewhere.
fn shard_name(value: &serde_json::Value) -> Result<String, String> {
    let name = value.as_str().ok_or_else(|| format!("its shard {value} is not a file name"))?;
    // `file_name` is None for `..` and `.`, and differs from `name` when it holds a `/`.
    let plain = Path::new(name).file_name().is_some_and(|f| f == name);
    if !plain || name.contains('\\') {
        return Err(format!("its shard `{name}` is not a plain file name inside the model directory"));
    }
    Ok(name.to_string())
}

impl WeightSource for SafetensorsSource {
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let file = self
            .index
            .get(name)
            .ok_or_else(|| ModelError::checkpoint(&self.dir, format!("tensor `{name}` is missing (expected shape {shape:?})")))?;
        let path = self.dir.join(file);
        let bytes = self.files.get(file).ok_or_else(|| ModelError::checkpoint(&path, "file was not loaded"))?;
        let tensors = SafeTensors::deserialize(bytes).map_err(|e| ModelError::checkpoint(&path, e.to_string()))?;
        let view = tensors.tensor(name).map_err(|e| ModelError::checkpoint(&path, format!("tensor `{name}`: {e}")))?;
        if view.shape() != shape {
            return Err(ModelError::checkpoint(&path, format!("tensor `{name}` has shape {:?}, expected {shape:?}", view.shape())));
        }
        let values =
            to_f32(view.dtype(), view.data()).map_err(|message| ModelError::checkpoint(&path, format!("tensor `{name}`: {message}")))?;
        if let Some((at, bad)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(ModelError::checkpoint(
                &path,
                format!("tensor `{name}` holds {bad} at index {at}: the weights are damaged (or the training diverged)"),
            ));
        }
        self.used.insert(name.to_string());
        Ok(values)
    }
}

/// Little-endian f32, f16 or bf16 bytes as f32 values.
fn to_f32(dtype: Dtype, data: &[u8]) -> Result<Vec<f32>, String> {
    match dtype {
        Dtype::F32 => Ok(data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()),
        Dtype::F16 => Ok(data.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()),
        Dtype::BF16 => Ok(data.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect()),
        Dtype::F64 => {
            Ok(data.chunks_exact(8).map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32).collect())
        }
        other => Err(format!("dtype {other:?} is not a floating-point weight type (f32, f16, bf16)")),
    }
}

/// Seeded random initial weights, as transformers initializes a new model: normal with
/// std `initializer_range` for matrices and embeddings, ones for norms, zeros for biases.
/// Values are drawn on the host, so every backend starts from the same weights.
pub struct RandomInit {
    rng: rand_chacha::ChaCha8Rng,
    normal: Normal<f32>,
}

impl RandomInit {
    pub fn new(seed: u64, std: f32) -> Self {
        Self {
            rng: rand_chacha::ChaCha8Rng::seed_from_u64(seed),
            normal: Normal::new(0.0, std).unwrap_or(Normal::new(0.0, 0.02).expect("valid")),
        }
    }
}

impl WeightSource for RandomInit {
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let len: usize = shape.iter().product();
        Ok(if name.ends_with("norm.weight") {
            vec![1.0; len]
        } else if name.ends_with(".bias") {
            vec![0.0; len]
        } else {
            (0..len).map(|_| self.normal.sample(&mut self.rng)).collect()
        })
    }
}

/// On-disk precision of saved weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SaveDtype {
    #[default]
    F32,
    Bf16,
    F16,
}

/// Loads a model directory (config.json + safetensors).
pub fn load_model<B: Backend>(dir: &Path, device: &B::Device) -> Result<(ModelConfig, CausalLm<B>), ModelError> {
    let config_path = dir.join("config.json");
    let config = ModelConfig::load(&config_path)?;
    let file_names = SafetensorsSource::file_names(dir)?;
    // The files are held in memory while the weights are built from them, in host memory
    // too on the CPU backend (a GPU backend takes each tensor to the device as it is built).
    let file_bytes = file_names.iter().filter_map(|name| std::fs::metadata(dir.join(name)).ok()).map(|m| m.len()).sum();
    let on_gpu = B::name(device).contains("cubecl");
    let memory = if on_gpu {
        config.check_files_memory(crate::model::config::available_memory(), file_bytes)
    } else {
        config.check_memory(crate::model::config::available_memory(), file_bytes)
    };
    memory.map_err(|message| ModelError::Config { path: config_path, message })?;
    let mut source = SafetensorsSource::read(dir, file_names)?;
    let model = CausalLm::build(&config, &mut source, device)?;
    let unused = source.unused();
    if !unused.is_empty() {
        tracing::debug!(dir = %dir.display(), tensors = ?unused, "checkpoint tensors not used by the model");
    }
    Ok((config, model))
}

/// Writes `model.safetensors` and `config.json` into `dir` (created if needed), each
/// atomically. Tensor names and layouts are those of Hugging Face.
pub fn save_model<B: Backend>(model: &CausalLm<B>, config: &ModelConfig, dir: &Path, dtype: SaveDtype) -> Result<(), ModelError> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let tensors = model.export();
    let encoded: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(name, shape, values)| {
            let bytes = match dtype {
                SaveDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                SaveDtype::Bf16 => values.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(),
                SaveDtype::F16 => values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
            };
            (name, shape, bytes)
        })
        .collect();
    let st_dtype = match dtype {
        SaveDtype::F32 => Dtype::F32,
        SaveDtype::Bf16 => Dtype::BF16,
        SaveDtype::F16 => Dtype::F16,
    };
    let views = encoded
        .iter()
        .map(|(name, shape, bytes)| {
            safetensors::tensor::TensorView::new(st_dtype, shape.clone(), bytes)
                .map(|view| (name.clone(), view))
                .map_err(|e| ModelError::Invalid(format!("tensor `{name}`: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors::serialize(views, Some(metadata)).map_err(|e| ModelError::Invalid(e.to_string()))?;
    let path = dir.join("model.safetensors");
    let mut file = AtomicFile::create(&path, true).map_err(|e| ModelError::Invalid(e.to_string()))?;
    file.write_all(&bytes).map_err(|e| ModelError::io(&path, e))?;
    file.commit().map_err(|e| ModelError::Invalid(e.to_string()))?;

    let mut config = config.clone();
    config.architectures = vec![config.architecture().map_err(ModelError::Invalid)?.hf_class().into()];
    let dtype_name = match dtype {
        SaveDtype::F32 => "float32",
        SaveDtype::Bf16 => "bfloat16",
        SaveDtype::F16 => "float16",
    };
    config.extra.insert("torch_dtype".into(), dtype_name.into());
    if config.extra.contains_key("dtype") {
        config.extra.insert("dtype".into(), dtype_name.into());
    }
    let json = serde_json::to_vec_pretty(&config).map_err(|e| ModelError::Invalid(e.to_string()))?;
    write_atomic(&dir.join("config.json"), &json).map_err(|e| ModelError::Invalid(e.to_string()))?;
    Ok(())
}

/// Copies the tokenizer files of `from` into `to` (those that exist).
pub fn copy_tokenizer_files(from: &Path, to: &Path) -> Result<(), ModelError> {
    for name in ["tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json"] {
        let source = from.join(name);
        if source.is_file() {
            let bytes = std::fs::read(&source).map_err(|e| ModelError::io(&source, e))?;
            write_atomic(&to.join(name), &bytes).map_err(|e| ModelError::Invalid(e.to_string()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    /// Opens `bytes` as a model directory's model.safetensors and reads every tensor it
    /// names: whatever the bytes, an error or values, never a panic.
    fn open_and_read(bytes: &[u8]) {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("model.safetensors"), bytes).expect("write");
        let Ok(mut source) = SafetensorsSource::open(dir.path()) else { return };
        let Ok(tensors) = SafeTensors::deserialize(bytes) else { panic!("open accepted what the reader refuses") };
        let shapes: Vec<(String, Vec<usize>)> = tensors.tensors().into_iter().map(|(name, view)| (name, view.shape().to_vec())).collect();
        for (name, shape) in shapes {
            let _ = source.tensor(&name, &shape);
            let _ = source.tensor(&name, &[shape.iter().product::<usize>().saturating_add(1)]);
        }
        let _ = source.tensor("absent", &[1]);
    }

    /// A header entry: a dtype (some not weights), a shape, and data offsets.
    fn entry() -> impl Strategy<Value = serde_json::Value> {
        let dtype = prop_oneof![Just("F32"), Just("F16"), Just("BF16"), Just("F64"), Just("I64"), Just("U8"), Just("BOOL"), Just("X9")];
        let dim = prop_oneof![0usize..4, Just(usize::MAX), Just(1 << 40)];
        (dtype, proptest::collection::vec(dim, 0..4), 0u64..64, 0u64..64)
            .prop_map(|(dtype, shape, a, b)| serde_json::json!({ "dtype": dtype, "shape": shape, "data_offsets": [a.min(b), a.max(b)] }))
    }

    proptest! {
        #![proptest_config(crate::testing::config(256))]

        #[test]
        fn any_bytes_open_or_fail(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            open_and_read(&bytes);
        }

        #[test]
        fn any_header_opens_or_fails(
            entries in proptest::collection::btree_map("[a-z.]{1,12}", entry(), 0..4),
            data in proptest::collection::vec(any::<u8>(), 0..80),
            declared in prop_oneof![Just(None), any::<u64>().prop_map(Some)],
        ) {
            let header = serde_json::to_vec(&entries).expect("json");
            let length = declared.unwrap_or(header.len() as u64);
            let mut bytes = length.to_le_bytes().to_vec();
            bytes.extend_from_slice(&header);
            bytes.extend_from_slice(&data);
            open_and_read(&bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_cannot_point_outside_the_model_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let index = dir.path().join("model.safetensors.index.json");
        for shard in ["../model.safetensors", "/dev/zero", "..", "sub/model.safetensors", "a\\b"] {
            std::fs::write(&index, serde_json::json!({"weight_map": {"w": shard}}).to_string()).expect("write");
            let err = SafetensorsSource::open(dir.path()).err().expect("refused").to_string();
            assert!(err.contains("not a plain file name inside the model directory") && err.contains("tensor `w`"), "{shard}: {err}");
        }
        std::fs::write(&index, serde_json::json!({"weight_map": {"w": 7}}).to_string()).expect("write");
        let err = SafetensorsSource::open(dir.path()).err().expect("refused").to_string();
        assert!(err.contains("its shard 7 is not a file name"), "{err}");
        std::fs::create_dir(dir.path().join("shard")).expect("mkdir");
        std::fs::write(&index, serde_json::json!({"weight_map": {"w": "shard"}}).to_string()).expect("write");
        let err = SafetensorsSource::open(dir.path()).err().expect("refused").to_string();
        assert!(err.contains("is listed in model.safetensors.index.json but is not a file"), "{err}");
    }

    #[test]
    fn a_single_file_beside_an_index_is_loaded_as_transformers_loads_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A stale index naming a shard that is gone, beside a whole model.safetensors.
        std::fs::write(dir.path().join("model.safetensors.index.json"), r#"{"weight_map": {"w": "model-00001-of-00002.safetensors"}}"#)
            .expect("write");
        let values = [1.5f32, -2.0];
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let view = safetensors::tensor::TensorView::new(Dtype::F32, vec![2], &bytes).expect("view");
        let file = safetensors::serialize([("w".to_string(), view)], None).expect("serialize");
        std::fs::write(dir.path().join("model.safetensors"), file).expect("write");
        let source = SafetensorsSource::open(dir.path()).expect("opens model.safetensors");
        assert_eq!(source.files.keys().collect::<Vec<_>>(), ["model.safetensors"]);
        assert_eq!(source.index.get("w").map(String::as_str), Some("model.safetensors"));
    }
}
