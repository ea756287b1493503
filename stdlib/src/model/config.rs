//! Model configuration: the Hugging Face `config.json` of a Qwen2 or Llama family model,
//! read with serde under its own field names, checked for values longrl does not implement.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::model::ModelError;

/// Which decoder architecture a config describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Qwen2, Qwen2.5, DeepSeek-R1-Distill-Qwen: q/k/v projections with bias.
    Qwen2,
    /// Llama 2/3, SmolLM2: no projection bias unless `attention_bias`.
    Llama,
}

impl Architecture {
    /// The `architectures` entry transformers expects.
    pub fn hf_class(self) -> &'static str {
        match self {
            Self::Qwen2 => "Qwen2ForCausalLM",
            Self::Llama => "LlamaForCausalLM",
        }
    }
}

/// How rotary position frequencies are scaled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor`.
    Linear { factor: f32 },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 { factor: f32, low_freq_factor: f32, high_freq_factor: f32, original_max_position_embeddings: f32 },
}

/// A token id field that may be one id or a list of ids.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            Self::One(id) => vec![*id],
            Self::Many(ids) => ids.clone(),
        }
    }
}

/// The fields of `config.json` that shape the model. Other fields are kept in `extra` and
/// written back unchanged on save.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub model_type: String,
    #[serde(default)]
    pub architectures: Vec<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// Older configs put the RoPE base here; newer ones in `rope_parameters`.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<Value>,
    #[serde(default)]
    pub rope_parameters: Option<Value>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub mlp_bias: Option<bool>,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    #[serde(default)]
    pub bos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub pad_token_id: Option<TokenIds>,
    /// Every other field, kept so a saved config.json loses nothing.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

fn default_eps() -> f64 {
    1e-6
}

/// The largest value of each dimension, in the order [`ModelConfig::check_sizes`] checks them.
const SIZE_LIMITS: [(&str, usize); 7] = [
    ("vocab_size", 1 << 22),
    ("hidden_size", 1 << 17),
    ("intermediate_size", 1 << 20),
    ("num_hidden_layers", 1024),
    ("num_attention_heads", 1024),
    ("num_key_value_heads", 1024),
    ("head_dim", 4096),
];

/// Bytes of memory available to new allocations (Linux `MemAvailable`); `None` elsewhere.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

/// A byte count for people: `1.5 GiB`.
fn human_bytes(bytes: f64) -> String {
    let units = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut value = bytes;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{value:.0} {}", units[0]) } else { format!("{value:.1} {}", units[unit]) }
}

fn default_act() -> String {
    "silu".into()
}

fn default_max_pos() -> usize {
    32_768
}

impl ModelConfig {
    /// Reads and checks `config.json`, and that the weights it implies fit in the memory
    /// this machine has available.
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        let config: Self =
            serde_json::from_str(text).map_err(|e| ModelError::Config { path: path.to_path_buf(), message: e.to_string() })?;
        let invalid = |message| ModelError::Config { path: path.to_path_buf(), message };
        // Memory first: its figure says more than a size limit would.
        config.check_memory(available_memory(), 0).map_err(invalid)?;
        config.check().map_err(invalid)?;
        Ok(config)
    }

    /// An error when the model's f32 weights, with `file_bytes` of weight files held while
    /// loading them, need more than `available` bytes (the figures are in the message);
    /// `None` skips the check (memory unknown).
    pub fn check_memory(&self, available: Option<u64>, file_bytes: u64) -> Result<(), String> {
        let Some(available) = available else { return Ok(()) };
        let params = self.param_count();
        let weights = params * 4.0;
        if weights + file_bytes as f64 > available as f64 {
            let files = if file_bytes > 0 {
                format!(" and {} of weight files read while loading", human_bytes(file_bytes as f64))
            } else {
                " alone".to_string()
            };
            return Err(format!(
                "the model has {params:.3e} parameters: {} as f32 weights{files}, more than the {} of memory available on this machine",
                human_bytes(weights),
                human_bytes(available as f64)
            ));
        }
        Ok(())
    }

    /// An error when `file_bytes` of weight files need more than `available` bytes (loading
    /// onto a GPU holds the files, not the weights, in host memory).
    pub fn check_files_memory(&self, available: Option<u64>, file_bytes: u64) -> Result<(), String> {
        match available {
            Some(available) if file_bytes > available => Err(format!(
                "the model's weight files take {}, more than the {} of memory available on this machine to read them",
                human_bytes(file_bytes as f64),
                human_bytes(available as f64)
            )),
            _ => Ok(()),
        }
    }

    /// Which architecture this is; an unsupported `model_type` is an error.
    pub fn architecture(&self) -> Result<Architecture, String> {
        match self.model_type.as_str() {
            "qwen2" => Ok(Architecture::Qwen2),
            "llama" => Ok(Architecture::Llama),
            other => Err(format!("model_type `{other}` is not supported (longrl runs qwen2 and llama models)")),
        }
    }

    /// Rejects values the implementation would silently get wrong.
    pub fn check(&self) -> Result<(), String> {
        let arch = self.architecture()?;
        match arch {
            Architecture::Qwen2 => crate::model::qwen2::check_config(self)?,
            Architecture::Llama => crate::model::llama::check_config(self)?,
        }
        if self.hidden_act != "silu" {
            return Err(format!("hidden_act `{}` is not supported (only silu)", self.hidden_act));
        }
        if self.num_attention_heads == 0 || self.num_hidden_layers == 0 || self.hidden_size == 0 {
            return Err("num_attention_heads, num_hidden_layers and hidden_size must be positive".into());
        }
        if self.vocab_size == 0 || self.intermediate_size == 0 {
            return Err("vocab_size and intermediate_size must be positive".into());
        }
        self.check_sizes()?;
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(format!("rms_norm_eps must be a positive number, got {}", self.rms_norm_eps));
        }
        let kv = self.kv_heads();
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            return Err(format!("num_attention_heads ({}) must be a multiple of num_key_value_heads ({kv})", self.num_attention_heads));
        }
        if self.head_dim() == 0 || !self.head_dim().is_multiple_of(2) {
            return Err(format!("head_dim ({}) must be positive and even for rotary embeddings", self.head_dim()));
        }
        if self.mlp_bias == Some(true) {
            return Err("mlp_bias = true is not supported".into());
        }
        self.rope()?;
        Ok(())
    }

    /// Each dimension within [`SIZE_LIMITS`] (far above any released model), so that the
    /// figures derived from them cannot overflow.
    fn check_sizes(&self) -> Result<(), String> {
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.kv_heads()),
            ("head_dim", self.head_dim()),
        ];
        for ((name, value), (_, max)) in sizes.iter().zip(SIZE_LIMITS) {
            if *value > max {
                return Err(format!("{name} is {value}, above the largest longrl accepts ({max})"));
            }
        }
        Ok(())
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Whether q/k/v projections carry a bias.
    pub fn qkv_bias(&self) -> bool {
        match self.architecture() {
            Ok(Architecture::Qwen2) => true,
            _ => self.attention_bias.unwrap_or(false),
        }
    }

    /// Whether o_proj carries a bias (Llama's `attention_bias` covers it; Qwen2 never).
    pub fn o_bias(&self) -> bool {
        matches!(self.architecture(), Ok(Architecture::Llama)) && self.attention_bias.unwrap_or(false)
    }

    /// The RoPE base and scaling, from `rope_parameters` (transformers 5) or
    /// `rope_theta` + `rope_scaling` (earlier).
    pub fn rope(&self) -> Result<(f64, RopeScaling), String> {
        let params = self.rope_parameters.as_ref().or(self.rope_scaling.as_ref()).filter(|v| !v.is_null());
        let theta = params.and_then(|p| p.get("rope_theta")).and_then(Value::as_f64).or(self.rope_theta).unwrap_or(10_000.0);
        // The frequencies are computed in f32: a base past its range would make them 0.
        if !(theta > 1.0 && (theta as f32).is_finite()) {
            return Err(format!("rope_theta must be a number above 1 and within f32's range, got {theta}"));
        }
        let Some(params) = params else { return Ok((theta, RopeScaling::None)) };
        let kind = params.get("rope_type").or_else(|| params.get("type")).and_then(Value::as_str).unwrap_or("default");
        let number = |key: &str| -> Result<f32, String> {
            params
                .get(key)
                .and_then(Value::as_f64)
                .map(|v| v as f32)
                .filter(|v| v.is_finite() && *v > 0.0)
                .ok_or_else(|| format!("rope scaling `{kind}` needs `{key}`, a positive number within f32's range"))
        };
        let scaling = match kind {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear { factor: number("factor")? },
            "llama3" => RopeScaling::Llama3 {
                factor: number("factor")?,
                low_freq_factor: number("low_freq_factor")?,
                high_freq_factor: number("high_freq_factor")?,
                original_max_position_embeddings: number("original_max_position_embeddings")?,
            },
            other => return Err(format!("rope scaling type `{other}` is not implemented (supported: default, linear, llama3)")),
        };
        Ok((theta, scaling))
    }

    /// End-of-sequence ids from the config.
    pub fn eos_ids(&self) -> Vec<u32> {
        self.eos_token_id.as_ref().map(TokenIds::to_vec).unwrap_or_default()
    }

    /// Number of parameters the config implies.
    pub fn num_params(&self) -> usize {
        self.param_count() as usize
    }

    /// Number of parameters the config implies, in floating point (never overflows, for
    /// configs of any size).
    pub fn param_count(&self) -> f64 {
        let (d, i, v) = (self.hidden_size as f64, self.intermediate_size as f64, self.vocab_size as f64);
        let (h, kv, hd) = (self.num_attention_heads as f64, self.kv_heads() as f64, self.head_dim() as f64);
        let attn = d * h * hd + 2.0 * d * kv * hd + h * hd * d + if self.qkv_bias() { h * hd + 2.0 * kv * hd } else { 0.0 };
        let layer = attn + 3.0 * d * i + 2.0 * d;
        let head = if self.tie_word_embeddings { 0.0 } else { v * d };
        v * d + self.num_hidden_layers as f64 * layer + d + head
    }

    /// A named built-in shape: `tiny` (the embedded default, a few million parameters),
    /// `smollm2-135m` (SmolLM2-135M's shape), `qwen2-0.5b` (Qwen2-0.5B's shape).
    pub fn preset(name: &str, vocab_size: usize) -> Option<Self> {
        let config = match name {
            "tiny" => Self::tiny(Architecture::Qwen2, vocab_size, 256, 4, 4, 2, 768),
            "smollm2-135m" => {
                let mut c = Self::tiny(Architecture::Llama, vocab_size, 576, 30, 9, 3, 1536);
                c.rope_theta = Some(100_000.0);
                c.rms_norm_eps = 1e-5;
                c
            }
            "qwen2-0.5b" => {
                let mut c = Self::tiny(Architecture::Qwen2, vocab_size, 896, 24, 14, 2, 4864);
                c.rope_theta = Some(1_000_000.0);
                c
            }
            _ => return None,
        };
        Some(config)
    }

    /// Names accepted by [`ModelConfig::preset`].
    pub const PRESETS: [&'static str; 3] = ["tiny", "smollm2-135m", "qwen2-0.5b"];

    /// A small config of the given architecture (for the embedded default and tests).
    #[allow(clippy::too_many_arguments)]
    pub fn tiny(
        arch: Architecture,
        vocab_size: usize,
        hidden: usize,
        layers: usize,
        heads: usize,
        kv_heads: usize,
        intermediate: usize,
    ) -> Self {
        Self {
            model_type: match arch {
                Architecture::Qwen2 => "qwen2".into(),
                Architecture::Llama => "llama".into(),
            },
            architectures: vec![arch.hf_class().into()],
            vocab_size,
            hidden_size: hidden,
            intermediate_size: intermediate,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: Some(kv_heads),
            head_dim: None,
            rms_norm_eps: 1e-6,
            rope_theta: Some(10_000.0),
            rope_scaling: None,
            rope_parameters: None,
            tie_word_embeddings: true,
            attention_bias: None,
            mlp_bias: None,
            hidden_act: "silu".into(),
            max_position_embeddings: 131_072,
            use_sliding_window: Some(false),
            bos_token_id: None,
            eos_token_id: None,
            pad_token_id: None,
            extra: serde_json::Map::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: Value) -> ModelConfig {
        serde_json::from_value(json).expect("config parses")
    }

    fn base() -> Value {
        serde_json::json!({
            "model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1
        })
    }

    #[test]
    fn rope_parameters_of_both_generations_are_read() {
        let mut old = base();
        old["rope_theta"] = 500000.0.into();
        assert_eq!(parse(old).rope(), Ok((500000.0, RopeScaling::None)));
        let mut new = base();
        new["rope_parameters"] = serde_json::json!({"rope_theta": 1e6, "rope_type": "default"});
        assert_eq!(parse(new).rope(), Ok((1e6, RopeScaling::None)));
    }

    #[test]
    fn unsupported_values_are_errors_not_ignored() {
        let mut yarn = base();
        yarn["rope_scaling"] = serde_json::json!({"type": "yarn", "factor": 4.0});
        assert!(parse(yarn).check().expect_err("yarn").contains("`yarn` is not implemented"));
        let mut gelu = base();
        gelu["hidden_act"] = "gelu".into();
        assert!(parse(gelu).check().expect_err("gelu").contains("hidden_act"));
        let mut mistral = base();
        mistral["model_type"] = "mistral".into();
        assert!(parse(mistral).check().expect_err("mistral").contains("not supported"));
        let mut odd = base();
        odd["num_key_value_heads"] = 3.into();
        assert!(parse(odd).check().expect_err("gqa").contains("multiple"));
    }

    #[test]
    fn a_model_too_big_for_memory_names_the_figures() {
        let mut huge = base();
        huge["num_hidden_layers"] = 1000.into();
        huge["hidden_size"] = 65536.into();
        huge["intermediate_size"] = 131072.into();
        huge["num_attention_heads"] = 512.into();
        huge["num_key_value_heads"] = 512.into();
        let config = parse(huge);
        assert!(config.check().is_ok());
        let err = config.check_memory(Some(16 << 30), 0).expect_err("too big");
        assert!(
            err.contains("e13 parameters") && err.contains("TiB as f32 weights alone") && err.contains("16.0 GiB of memory available"),
            "{err}"
        );
        assert!(config.check_memory(None, 0).is_ok());
        // The weight files count while they are read: 0.5B parameters take 2 GiB as f32.
        let mut half_billion = base();
        half_billion["num_hidden_layers"] = 24.into();
        half_billion["hidden_size"] = 896.into();
        half_billion["intermediate_size"] = 4864.into();
        half_billion["vocab_size"] = 151_936.into();
        let config = parse(half_billion);
        let f32_bytes = (config.param_count() * 4.0) as u64;
        assert!(config.check_memory(Some(2 * f32_bytes), f32_bytes / 2).is_ok(), "bf16 files fit");
        let err = config.check_memory(Some(2 * f32_bytes), 2 * f32_bytes).expect_err("f32 files and weights do not");
        assert!(err.contains("of weight files read while loading"), "{err}");
        assert!(config.check_files_memory(Some(2 * f32_bytes), 2 * f32_bytes).is_ok(), "onto a GPU, only the files");
        assert!(config.check_files_memory(Some(f32_bytes), 2 * f32_bytes).is_err());
        let mut absurd = base();
        absurd["num_hidden_layers"] = 100_000.into();
        assert!(parse(absurd).check().expect_err("layers").contains("num_hidden_layers is 100000"));
    }

    #[test]
    fn a_negative_or_nan_norm_epsilon_is_refused() {
        for eps in [serde_json::json!(-1e-6), serde_json::json!(0.0)] {
            let mut config = base();
            config["rms_norm_eps"] = eps;
            assert!(parse(config).check().expect_err("eps").contains("rms_norm_eps"));
        }
    }

    #[test]
    fn a_zero_head_dim_or_a_rope_base_not_above_one_is_refused() {
        let mut zero = base();
        zero["head_dim"] = 0.into();
        assert!(parse(zero).check().expect_err("head_dim 0").contains("head_dim (0) must be positive"));
        // 1e39 is finite in f64 but infinite in f32, where the frequencies are computed.
        for theta in [serde_json::json!(0.0), serde_json::json!(-10000.0), serde_json::json!(1.0), serde_json::json!(1e39)] {
            let mut config = base();
            config["rope_theta"] = theta;
            assert!(parse(config).check().expect_err("theta").contains("rope_theta must be a number above 1"));
        }
        let mut scaled = base();
        scaled["rope_scaling"] = serde_json::json!({"rope_type": "linear", "factor": -2.0});
        assert!(parse(scaled).check().expect_err("factor").contains("`factor`, a positive number"));
        let mut huge = base();
        huge["rope_scaling"] = serde_json::json!({"rope_type": "linear", "factor": 1e39});
        assert!(parse(huge).check().expect_err("factor").contains("`factor`, a positive number within f32's range"));
    }

    #[test]
    fn unknown_fields_survive_a_round_trip() {
        let mut json = base();
        json["transformers_version"] = "5.24.0".into();
        let config = parse(json);
        let back = serde_json::to_value(&config).expect("serializes");
        assert_eq!(back["transformers_version"], "5.24.0");
    }
}
