//! Qwen2 family (Qwen2, Qwen2.5, DeepSeek-R1-Distill-Qwen): the decoder of
//! [`crate::model::transformer`] with bias on the q, k and v projections (not on o_proj),
//! tied or untied head. Checks what this family's configs may ask for.

use crate::model::config::ModelConfig;

/// Rejects Qwen2 settings longrl does not implement.
pub fn check_config(config: &ModelConfig) -> Result<(), String> {
    let sliding = config.use_sliding_window.unwrap_or(false);
    let sliding_layers = config
        .extra
        .get("layer_types")
        .and_then(serde_json::Value::as_array)
        .is_some_and(|types| types.iter().any(|t| t.as_str() == Some("sliding_attention")));
    if sliding || sliding_layers {
        return Err("sliding-window attention (use_sliding_window / sliding_attention layers) is not implemented".into());
    }
    Ok(())
}
