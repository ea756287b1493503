//! GGUF to a Hugging Face model directory: the Llama tensors dequantized to f32 (or bf16 /
//! f16) safetensors under transformers' names, q/k rows put back in the order of
//! transformers' rotate-half RoPE, `config.json` from the `llama.*` metadata, and the
//! tokenizer files from [`super::vocab`]. The result loads in longrl and in transformers.
//!
//! llama.cpp's converter permutes the rows of `q_proj` and `k_proj` within each head from
//! halves `[x_0 .. x_{d/2}, y_0 .. y_{d/2}]` to interleaved pairs `[x_0, y_0, x_1, y_1, ..]`
//! (its RoPE rotates adjacent pairs); [`unpermute_rows`] undoes that.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use serde_json::json;

use super::vocab::GgufVocab;
use super::{GgufError, GgufErrorKind, GgufFile, TensorInfo};
use crate::fsutil::{StagedDir, write_atomic};
use crate::model::checkpoint::SaveDtype;
use crate::model::config::ModelConfig;

/// How to convert.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConvertOptions {
    /// Precision of the written weights.
    pub dtype: SaveDtype,
}

/// What a conversion wrote.
#[derive(Debug, Clone)]
pub struct ConvertSummary {
    pub out_dir: PathBuf,
    pub architecture: String,
    pub parameters: u64,
    /// How many tensors of each ggml type the file held.
    pub types: BTreeMap<String, usize>,
    pub vocab_size: usize,
    pub tied_embeddings: bool,
}

/// The shape of a Llama model, from `llama.*` metadata.
#[derive(Debug, Clone, PartialEq)]
struct LlamaShape {
    vocab: usize,
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    ffn: usize,
    eps: f64,
    rope_theta: f64,
    context: Option<u64>,
}

impl LlamaShape {
    fn read(gguf: &GgufFile, vocab: usize) -> Result<Self, GgufErrorKind> {
        let uint = |key: &str| -> Result<usize, GgufErrorKind> {
            let full = format!("llama.{key}");
            let value = gguf.get(&full).ok_or_else(|| GgufErrorKind::MissingKey(full.clone()))?;
            value
                .as_u64()
                .filter(|&v| v > 0)
                .map(|v| v as usize)
                .ok_or_else(|| GgufErrorKind::BadValue { key: full, message: format!("is {value:?}, not a positive integer") })
        };
        let optional = |key: &str| gguf.get(&format!("llama.{key}"));
        let hidden = uint("embedding_length")?;
        let heads = uint("attention.head_count")?;
        let kv_heads = if optional("attention.head_count_kv").is_some() { uint("attention.head_count_kv")? } else { heads };
        let head_dim = if optional("attention.key_length").is_some() { uint("attention.key_length")? } else { hidden / heads };
        let shape = Self {
            vocab: if optional("vocab_size").is_some() { uint("vocab_size")? } else { vocab },
            hidden,
            layers: uint("block_count")?,
            heads,
            kv_heads,
            head_dim,
            ffn: uint("feed_forward_length")?,
            eps: optional("attention.layer_norm_rms_epsilon").and_then(|v| v.as_f64()).unwrap_or(1e-5),
            rope_theta: optional("rope.freq_base").and_then(|v| v.as_f64()).unwrap_or(10_000.0),
            context: optional("context_length").and_then(|v| v.as_u64()),
        };
        shape.check(gguf)?;
        Ok(shape)
    }

    /// Refuses what longrl's Llama does not compute: partial rotary, RoPE scaling, odd heads.
    fn check(&self, gguf: &GgufFile) -> Result<(), GgufErrorKind> {
        if let Some(dims) = gguf.get("llama.rope.dimension_count").and_then(|v| v.as_u64())
            && dims as usize != self.head_dim
        {
            return Err(GgufErrorKind::Unsupported(format!(
                "rotary embeddings over {dims} of {} head dimensions are not supported",
                self.head_dim
            )));
        }
        if let Some(kind) = gguf.get("llama.rope.scaling.type").and_then(|v| v.as_str()).filter(|k| *k != "none") {
            return Err(GgufErrorKind::Unsupported(format!("RoPE scaling `{kind}` is not supported yet")));
        }
        if gguf.tensor("rope_freqs.weight").is_some() {
            return Err(GgufErrorKind::Unsupported("Llama 3.1 RoPE frequency factors (rope_freqs.weight) are not supported yet".into()));
        }
        if !self.heads.is_multiple_of(self.kv_heads) || !self.head_dim.is_multiple_of(2) {
            return Err(GgufErrorKind::Unsupported(format!(
                "{} heads over {} key/value heads of dimension {} cannot be laid out",
                self.heads, self.kv_heads, self.head_dim
            )));
        }
        Ok(())
    }

    /// The transformers name, PyTorch shape and q/k permutation (heads) of a GGUF tensor.
    fn target(&self, name: &str) -> Option<(String, Vec<usize>, Option<usize>)> {
        let (q_rows, kv_rows) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        let top = match name {
            "token_embd.weight" => Some(("model.embed_tokens.weight".to_string(), vec![self.vocab, self.hidden], None)),
            "output_norm.weight" => Some(("model.norm.weight".to_string(), vec![self.hidden], None)),
            "output.weight" => Some(("lm_head.weight".to_string(), vec![self.vocab, self.hidden], None)),
            _ => None,
        };
        if top.is_some() {
            return top;
        }
        let rest = name.strip_prefix("blk.")?;
        let (layer, part) = rest.split_once('.')?;
        let layer: usize = layer.parse().ok().filter(|&l| l < self.layers)?;
        let (hf, shape, permute) = match part {
            "attn_norm.weight" => ("input_layernorm.weight", vec![self.hidden], None),
            "attn_q.weight" => ("self_attn.q_proj.weight", vec![q_rows, self.hidden], Some(self.heads)),
            "attn_k.weight" => ("self_attn.k_proj.weight", vec![kv_rows, self.hidden], Some(self.kv_heads)),
            "attn_v.weight" => ("self_attn.v_proj.weight", vec![kv_rows, self.hidden], None),
            "attn_output.weight" => ("self_attn.o_proj.weight", vec![self.hidden, q_rows], None),
            "ffn_norm.weight" => ("post_attention_layernorm.weight", vec![self.hidden], None),
            "ffn_gate.weight" => ("mlp.gate_proj.weight", vec![self.ffn, self.hidden], None),
            "ffn_up.weight" => ("mlp.up_proj.weight", vec![self.ffn, self.hidden], None),
            "ffn_down.weight" => ("mlp.down_proj.weight", vec![self.hidden, self.ffn], None),
            _ => return None,
        };
        Some((format!("model.layers.{layer}.{hf}"), shape, permute))
    }

    /// Every GGUF tensor name a complete model has (output.weight only when untied).
    fn required(&self, tied: bool) -> Vec<String> {
        let mut names = vec!["token_embd.weight".to_string(), "output_norm.weight".to_string()];
        if !tied {
            names.push("output.weight".into());
        }
        for layer in 0..self.layers {
            for part in ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"] {
                names.push(format!("blk.{layer}.{part}.weight"));
            }
        }
        names
    }

    fn config_json(&self, tied: bool, vocab: &GgufVocab, dtype: SaveDtype) -> serde_json::Value {
        let dtype = match dtype {
            SaveDtype::F32 => "float32",
            SaveDtype::Bf16 => "bfloat16",
            SaveDtype::F16 => "float16",
        };
        let mut config = json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "intermediate_size": self.ffn,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": null,
            "attention_bias": false,
            "mlp_bias": false,
            "tie_word_embeddings": tied,
            "initializer_range": 0.02,
            "use_cache": true,
            "torch_dtype": dtype,
        });
        if let Some(context) = self.context {
            config["max_position_embeddings"] = json!(context);
        }
        for (key, id) in [("bos_token_id", vocab.bos), ("eos_token_id", vocab.eos), ("pad_token_id", vocab.pad)] {
            if let Some(id) = id {
                config[key] = json!(id);
            }
        }
        config
    }
}

/// Puts llama.cpp's interleaved q/k rows back in transformers' half-split order: within
/// each of `heads` heads of `d` rows, row `2 i + s` (s = 0, 1) goes to row `s d/2 + i`.
///
/// # Shapes
/// - `values`: `[heads * d, cols]`, row-major.
pub fn unpermute_rows(values: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    let rows = values.len() / cols.max(1);
    let d = rows / heads.max(1);
    let mut out = vec![0.0; values.len()];
    for h in 0..heads {
        for i in 0..d / 2 {
            for s in 0..2 {
                let from = (h * d + 2 * i + s) * cols;
                let to = (h * d + s * (d / 2) + i) * cols;
                out[to..to + cols].copy_from_slice(&values[from..from + cols]);
            }
        }
    }
    out
}

/// Converts the GGUF file `file` into a Hugging Face model directory `out` (created; files
/// in it are replaced). The files are written into a staging directory beside `out` that
/// takes its place at the end, so an interrupted conversion leaves no half a model.
pub fn convert_gguf(file: &Path, out: &Path, options: &ConvertOptions) -> Result<ConvertSummary, GgufError> {
    let mut gguf = GgufFile::open(file)?;
    let fail = |kind| GgufError::new(file, kind);
    let architecture = gguf.get("general.architecture").and_then(|v| v.as_str()).unwrap_or("").to_string();
    if architecture != "llama" {
        return Err(fail(GgufErrorKind::Unsupported(format!(
            "architecture `{architecture}` is not supported (longrl converts llama GGUF files)"
        ))));
    }
    let vocab = GgufVocab::from_metadata(&gguf.metadata).map_err(fail)?;
    let shape = LlamaShape::read(&gguf, vocab.tokens.len()).map_err(fail)?;
    if vocab.tokens.len() > shape.vocab {
        return Err(fail(GgufErrorKind::BadValue {
            key: "tokenizer.ggml.tokens".into(),
            message: format!("has {} tokens for a model vocabulary of {}", vocab.tokens.len(), shape.vocab),
        }));
    }
    let tied = gguf.tensor("output.weight").is_none();
    let output_error = |e: String| GgufError::new(out, GgufErrorKind::Output(e));
    let config = shape.config_json(tied, &vocab, options.dtype);
    // The written config must be one longrl accepts, and the model must fit in memory: both
    // checked before the tensors are planned, so that absurd sizes go no further.
    let parsed: ModelConfig = serde_json::from_value(config.clone()).map_err(|e| output_error(e.to_string()))?;
    parsed.check_memory(crate::model::config::available_memory(), 0).map_err(|e| fail(GgufErrorKind::Unsupported(e)))?;
    parsed.check().map_err(|e| fail(GgufErrorKind::Unsupported(e)))?;
    let plan = plan_tensors(&gguf, &shape, tied).map_err(fail)?;
    let staged = StagedDir::create(out).map_err(|e| output_error(e.to_string()))?;
    let tokenizer = vocab.tokenizer_json().map_err(fail)?;
    // The rebuilt tokenizer must be one the tokenizers library loads (merges of tokens the
    // vocabulary lacks, say, are refused here rather than at the first run).
    let tokenizer_bytes = serde_json::to_vec(&tokenizer).map_err(|e| output_error(e.to_string()))?;
    tokenizers::Tokenizer::from_bytes(&tokenizer_bytes).map_err(|e| {
        fail(GgufErrorKind::BadValue { key: "tokenizer.ggml".into(), message: format!("rebuilds a tokenizer that does not load: {e}") })
    })?;
    let generation = json!({"bos_token_id": vocab.bos, "eos_token_id": vocab.eos, "pad_token_id": vocab.pad});
    let mut summary = ConvertSummary {
        out_dir: out.to_path_buf(),
        architecture,
        parameters: 0,
        types: BTreeMap::new(),
        vocab_size: shape.vocab,
        tied_embeddings: tied,
    };
    let tensors = read_tensors(&mut gguf, &plan, options.dtype, &mut summary)?;
    write_safetensors(&staged.path().join("model.safetensors"), tensors, options.dtype).map_err(output_error)?;
    for (name, value) in [
        ("config.json", config),
        ("tokenizer.json", tokenizer),
        ("tokenizer_config.json", vocab.tokenizer_config(shape.context)),
        ("generation_config.json", generation),
    ] {
        let bytes = serde_json::to_vec_pretty(&value).map_err(|e| output_error(e.to_string()))?;
        write_atomic(&staged.path().join(name), &bytes).map_err(|e| output_error(e.to_string()))?;
    }
    staged.commit().map_err(|e| output_error(e.to_string()))?;
    Ok(summary)
}

/// One tensor to convert: where it is in the GGUF file and what it becomes.
struct Planned {
    info: TensorInfo,
    name: String,
    shape: Vec<usize>,
    permute: Option<usize>,
}

/// Maps every tensor of the file; an unknown tensor, a wrong shape or a missing tensor is
/// an error naming it.
fn plan_tensors(gguf: &GgufFile, shape: &LlamaShape, tied: bool) -> Result<Vec<Planned>, GgufErrorKind> {
    let mut plan = Vec::new();
    for info in &gguf.tensors {
        let (name, hf_shape, permute) = shape
            .target(&info.name)
            .ok_or_else(|| GgufErrorKind::Unsupported(format!("tensor `{}` is not part of a Llama model longrl knows", info.name)))?;
        if info.shape() != hf_shape {
            return Err(GgufErrorKind::Malformed(format!(
                "tensor `{}` has shape {:?}, but the metadata asks for {hf_shape:?}",
                info.name,
                info.shape()
            )));
        }
        plan.push(Planned { info: info.clone(), name, shape: hf_shape, permute });
    }
    if let Some(missing) = shape.required(tied).into_iter().find(|n| gguf.tensor(n).is_none()) {
        return Err(GgufErrorKind::Malformed(format!("tensor `{missing}` is missing")));
    }
    Ok(plan)
}

/// A converted tensor: its transformers name, PyTorch shape and little-endian bytes.
struct Encoded {
    name: String,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

/// Dequantizes each planned tensor and encodes it in the output precision.
fn read_tensors(gguf: &mut GgufFile, plan: &[Planned], dtype: SaveDtype, summary: &mut ConvertSummary) -> Result<Vec<Encoded>, GgufError> {
    let mut out = Vec::with_capacity(plan.len());
    for planned in plan {
        let mut values = gguf.read_f32(&planned.info)?;
        if let Some(heads) = planned.permute {
            values = unpermute_rows(&values, heads, planned.shape[1]);
        }
        check_representable(&planned.info.name, &values, dtype).map_err(|e| GgufError::new(gguf.path(), e))?;
        *summary.types.entry(planned.info.ty.name().to_string()).or_default() += 1;
        summary.parameters += values.len() as u64;
        let bytes = match dtype {
            SaveDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            SaveDtype::Bf16 => values.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(),
            SaveDtype::F16 => values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
        };
        out.push(Encoded { name: planned.name.clone(), shape: planned.shape.clone(), bytes });
    }
    Ok(out)
}

/// Refuses a tensor with a NaN or infinite value, or one past the output precision's range
/// (f16's 65,504): the converted model would load and compute garbage.
fn check_representable(tensor: &str, values: &[f32], dtype: SaveDtype) -> Result<(), GgufErrorKind> {
    if let Some(at) = values.iter().position(|v| !v.is_finite()) {
        return Err(GgufErrorKind::Malformed(format!("tensor `{tensor}` holds {} at element {at}", values[at])));
    }
    let limit = match dtype {
        SaveDtype::F16 => f32::from(half::f16::MAX),
        SaveDtype::F32 | SaveDtype::Bf16 => f32::MAX,
    };
    if let Some(at) = values.iter().position(|v| v.abs() > limit) {
        return Err(GgufErrorKind::Unsupported(format!(
            "tensor `{tensor}` holds {} at element {at}, beyond f16's range: convert with `--dtype bf16` or `f32`",
            values[at]
        )));
    }
    Ok(())
}

/// Writes the tensors as one safetensors file, through a temporary file renamed into place.
fn write_safetensors(path: &Path, tensors: Vec<Encoded>, dtype: SaveDtype) -> Result<(), String> {
    let st_dtype = match dtype {
        SaveDtype::F32 => Dtype::F32,
        SaveDtype::Bf16 => Dtype::BF16,
        SaveDtype::F16 => Dtype::F16,
    };
    let views = tensors
        .iter()
        .map(|t| {
            safetensors::tensor::TensorView::new(st_dtype, t.shape.clone(), &t.bytes)
                .map(|view| (t.name.clone(), view))
                .map_err(|e| e.to_string())
        })
        .collect::<Result<Vec<_>, _>>()?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let temp = tempfile::Builder::new().prefix(".model.").suffix(".tmp").tempfile_in(dir).map_err(|e| e.to_string())?;
    let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(metadata), temp.path()).map_err(|e| e.to_string())?;
    // Temporary files are private (0600); the model gets the usual permissions.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(temp.path(), std::fs::Permissions::from_mode(0o644));
    }
    temp.persist(path).map_err(|e| e.error.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermuting_inverts_llama_cpp_s_interleaving() {
        // One head of 4 rows, 1 column: transformers' rows [x0, x1, y0, y1] are stored by
        // llama.cpp as [x0, y0, x1, y1].
        assert_eq!(unpermute_rows(&[0.0, 2.0, 1.0, 3.0], 1, 1), vec![0.0, 1.0, 2.0, 3.0]);
        // Two heads of 2 rows, 2 columns: pairs stay inside their head.
        let stored = [10.0, 11.0, 20.0, 21.0, 30.0, 31.0, 40.0, 41.0];
        assert_eq!(unpermute_rows(&stored, 2, 2), stored.to_vec());
    }

    #[test]
    fn weights_that_are_not_finite_or_do_not_fit_f16_are_refused_by_name() {
        let nan = check_representable("blk.0.attn_q.weight", &[0.5, f32::NAN], SaveDtype::F32).expect_err("NaN");
        assert!(nan.to_string().contains("tensor `blk.0.attn_q.weight` holds NaN at element 1"), "{nan}");
        let big = [1.0, 70_000.0];
        assert!(check_representable("w", &big, SaveDtype::Bf16).is_ok());
        let f16 = check_representable("w", &big, SaveDtype::F16).expect_err("past f16");
        assert!(f16.to_string().contains("beyond f16's range"), "{f16}");
    }
}
