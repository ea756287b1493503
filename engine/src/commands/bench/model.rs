//! `longrl bench model`: throughput of one model shape (prefill, decode with batch 1 and a
//! shared-prompt group, training forward+backward) at a training precision, the training
//! step's model FLOP rate (and utilisation against a given peak), and peak memory of long
//! prefills.

use std::time::Instant;

use burn::tensor::DType;
use longrl_stdlib::model::precision::Precision;
use longrl_stdlib::model::{CausalLm, ModelConfig};

/// Throughput of one model shape: prefill, decode (batch 1 and a shared-prompt group) and
/// training forward+backward, on the backend the task is dispatched to.
#[derive(Debug, Clone)]
pub struct ModelBench {
    pub preset: String,
    pub vocab: usize,
    pub prompt_len: usize,
    pub new_tokens: usize,
    pub group: usize,
    pub train_batch: usize,
    pub train_seq: usize,
    /// `bf16-mixed`: inference with bf16 weights, training through a bf16 compute copy of
    /// f32 master weights (as the training stages do); falls back to f32 where the backend
    /// has no bf16 (the figures name the dtype that ran).
    pub precision: Precision,
    /// The device's peak dense FLOP rate at this precision, in TFLOP/s, for the model FLOP
    /// utilisation figure (none: the figure is left out).
    pub peak_tflops: Option<f64>,
}

/// One measured figure.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Figure {
    pub name: String,
    pub value: f64,
    pub unit: &'static str,
    /// Its key in `--json` output (`prefill`, `decode_batch1`, `decode_group`, `train`:
    /// tokens/s, the same keys as `examples/bench/transformers_bench.py --json`).
    pub key: &'static str,
}

/// The figures as one JSON object: each figure's value under its key, beside the shape.
pub fn figures_json(preset: &str, vocab: usize, backend: &str, figures: &[Figure]) -> serde_json::Value {
    let mut object = serde_json::Map::new();
    object.insert("tool".into(), "longrl".into());
    object.insert("preset".into(), preset.into());
    object.insert("vocab".into(), vocab.into());
    object.insert("backend".into(), backend.into());
    for figure in figures {
        object.insert(figure.key.into(), figure.value.into());
    }
    serde_json::Value::Object(object)
}

pub(crate) fn timed<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let started = Instant::now();
    let out = f();
    (out, started.elapsed().as_secs_f64())
}

/// The median wall time of `runs` calls of `f`, or its first error.
fn median_seconds<T, E>(runs: usize, mut f: impl FnMut() -> Result<T, E>) -> Result<f64, E> {
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let (out, seconds) = timed(&mut f);
        out?;
        times.push(seconds);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[runs / 2])
}

/// Model FLOPs of one training token (forward + backward) at sequence length `seq`: 6 per
/// parameter of the matmuls (the embedding lookup is not one, a tied or untied LM head is),
/// plus the attention scores and weighted sum, 12 * layers * heads * head_dim * seq / 2
/// with the causal mask (the usual accounting of the PaLM paper's MFU).
pub fn train_flops_per_token(config: &ModelConfig, seq: usize) -> f64 {
    let embedding = (config.vocab_size * config.hidden_size) as f64;
    let matmul_params = config.num_params() as f64 - if config.tie_word_embeddings { 0.0 } else { embedding };
    let attention_width = (config.num_attention_heads * config.head_dim()) as f64;
    6.0 * matmul_params + 6.0 * config.num_hidden_layers as f64 * attention_width * seq as f64
}

impl longrl_backends::BackendTask for ModelBench {
    type Output = Result<Vec<Figure>, String>;

    fn run<B: longrl_backends::TrainBackend>(self, device: B::Device) -> Self::Output {
        use longrl_stdlib::model::checkpoint::RandomInit;
        let config = ModelConfig::preset(&self.preset, self.vocab)
            .ok_or_else(|| format!("unknown preset `{}` (presets: {})", self.preset, ModelConfig::PRESETS.join(", ")))?;
        let dtype = self.precision.resolve::<B>(&device);
        let mut figures = vec![
            Figure { name: "parameters".into(), value: config.num_params() as f64, unit: "", key: "parameters" },
            Figure {
                name: format!("{} computes in bf16 (1) or f32 (0)", self.precision),
                value: f64::from(u8::from(dtype == DType::BF16)),
                unit: "",
                key: "computes_in_bf16",
            },
        ];
        let model = CausalLm::<B::InnerBackend>::build(&config, &mut RandomInit::new(1, 0.02), &device).map_err(|e| e.to_string())?;
        figures.extend(self.inference(&longrl_stdlib::model::precision::cast_model(model, dtype))?);
        let train = CausalLm::<B>::build(&config, &mut RandomInit::new(1, 0.02), &device).map_err(|e| e.to_string())?;
        figures.extend(self.training(&config, &train, dtype)?);
        Ok(figures)
    }
}

impl ModelBench {
    /// Prefill and decode rates of `model` (its weights in the compute dtype).
    fn inference<B: longrl_backends::CustomGrad>(&self, model: &CausalLm<B>) -> Result<Vec<Figure>, String> {
        use longrl_stdlib::model::generate::{SamplingConfig, generate_group};
        let prompt: Vec<u32> = (0..self.prompt_len).map(|i| ((i * 7919 + 13) % self.vocab) as u32).collect();
        let sampling = |n: usize| SamplingConfig { temperature: 1.0, max_new_tokens: n, ..SamplingConfig::default() };
        let run = |rows: usize, new_tokens: usize| generate_group(model, &prompt, rows, &sampling(new_tokens)).map_err(|e| e.to_string());
        // Warm-up at the timed shapes (allocators, thread pools, a GPU's kernel compilation and
        // autotuning), so that no timing below pays a first use.
        run(self.group, 2)?;
        run(1, 2)?;
        let prefill = median_seconds(3, || run(1, 1))?;
        let (one, one_s) = timed(|| run(1, self.new_tokens));
        let (group, group_s) = timed(|| run(self.group, self.new_tokens));
        let (one, group) = (one.map(|_| one_s)?, group.map(|_| group_s)?);
        let (decode_one, decode_group) = ((one - prefill).max(1e-9), (group - prefill).max(1e-9));
        Ok(vec![
            Figure {
                name: format!("prefill {} tokens, batch 1", self.prompt_len),
                value: self.prompt_len as f64 / prefill,
                unit: "tokens/s",
                key: "prefill",
            },
            Figure {
                name: "decode, batch 1".into(),
                value: (self.new_tokens - 1) as f64 / decode_one,
                unit: "tokens/s",
                key: "decode_batch1",
            },
            Figure {
                name: format!("decode, group of {} sharing the prompt", self.group),
                value: (self.group * (self.new_tokens - 1)) as f64 / decode_group,
                unit: "tokens/s",
                key: "decode_group",
            },
            Figure {
                name: format!("group of {}: prompt + {} tokens each, wall", self.group, self.new_tokens),
                value: group,
                unit: "s",
                key: "group_wall_s",
            },
        ])
    }

    /// Forward+backward rate of `train` (f32 master weights) through a compute copy in
    /// `dtype`, its model FLOP rate, and the utilisation of `peak_tflops`.
    fn training<B: longrl_backends::TrainBackend>(
        &self,
        config: &ModelConfig,
        train: &CausalLm<B>,
        dtype: DType,
    ) -> Result<Vec<Figure>, String> {
        use longrl_stdlib::model::precision::compute_copy;
        use longrl_stdlib::model::score::score_batch;
        let half = self.train_seq / 2;
        let pairs: Vec<(Vec<u32>, Vec<u32>)> = (0..self.train_batch)
            .map(|b| {
                let ids: Vec<u32> = (0..self.train_seq).map(|i| ((i * 31 + b * 17 + 5) % self.vocab) as u32).collect();
                (ids[..half].to_vec(), ids[half..].to_vec())
            })
            .collect();
        let step = || -> Result<(), String> {
            let scores = score_batch(&compute_copy(train, dtype), &pairs).map_err(|e| e.to_string())?;
            let grads = scores.logprobs.sum().neg().backward();
            // Reading a master gradient waits for the backward to finish on the device.
            let grad = train.embed_tokens.weight.val().grad(&grads).ok_or("no gradient reached the master weights")?;
            let _ = grad.sum().into_data();
            Ok(())
        };
        step()?;
        let seconds = median_seconds(3, step)?;
        let tokens = (self.train_batch * self.train_seq) as f64;
        let gflops = tokens * train_flops_per_token(config, self.train_seq) / seconds / 1e9;
        let mut figures = vec![
            Figure {
                name: format!("forward+backward, batch {} x {} tokens", self.train_batch, self.train_seq),
                value: tokens / seconds,
                unit: "tokens/s",
                key: "train",
            },
            Figure { name: "forward+backward model FLOP rate".into(), value: gflops, unit: "GFLOP/s", key: "train_gflops" },
        ];
        if let Some(peak) = self.peak_tflops {
            figures.push(Figure {
                name: format!("model FLOP utilisation of {peak} TFLOP/s"),
                value: gflops / peak / 10.0,
                unit: "%",
                key: "mfu_percent",
            });
        }
        Ok(figures)
    }
}

/// Runs one prefill of `len` tokens on the tiny preset and returns this process's peak
/// resident memory in MiB (read from /proc/self/status; the caller runs it in a child
/// process so earlier work does not count).
pub fn prefill_peak_memory(len: usize, vocab: usize) -> Result<(f64, f64), String> {
    use longrl_stdlib::model::ForwardArgs;
    use longrl_stdlib::model::checkpoint::RandomInit;
    let config = ModelConfig::preset("tiny", vocab).ok_or("no tiny preset")?;
    let device = Default::default();
    let model = CausalLm::<longrl_backends::Cpu>::build(&config, &mut RandomInit::new(1, 0.02), &device).map_err(|e| e.to_string())?;
    let ids: Vec<i64> = (0..len).map(|i| ((i * 7919 + 13) % vocab) as i64).collect();
    let tokens = burn::tensor::Tensor::<longrl_backends::Cpu, 2, burn::tensor::Int>::from_data(
        burn::tensor::TensorData::new(ids, [1, len]),
        &device,
    );
    let mut cache = model.new_cache();
    let started = Instant::now();
    let hidden = model.forward_hidden(tokens, ForwardArgs::contiguous(1, 0, len, &device), &mut cache);
    let [_, s, d] = hidden.dims();
    let last = model.logits(hidden.slice([0..1, s - 1..s, 0..d]));
    let _ = last.into_data();
    let wall = started.elapsed().as_secs_f64();
    Ok((super::peak_rss_mib()?, wall))
}
