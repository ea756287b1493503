//! Llama family (Llama 2/3, SmolLM2): the decoder of [`crate::model::transformer`] without
//! projection bias unless `attention_bias` is set (then on q, k, v and o), usually an untied
//! head, and optionally Llama 3.1's RoPE scaling. Checks what this family's configs may ask for.

use crate::model::config::ModelConfig;

/// Rejects Llama settings longrl does not implement.
pub fn check_config(config: &ModelConfig) -> Result<(), String> {
    if let Some(tp) = config.extra.get("pretraining_tp").and_then(serde_json::Value::as_u64) {
        // pretraining_tp only splits matmuls in transformers; the result is the same.
        tracing::debug!(pretraining_tp = tp, "pretraining_tp does not change the forward pass");
    }
    if config.extra.get("sliding_window").is_some_and(|v| !v.is_null()) {
        return Err("sliding-window attention is not implemented".into());
    }
    Ok(())
}
