//! `longrl bench model`: throughput of one model shape (prefill, decode with batch 1 and a
//! shared-prompt group, training forward+backward), and peak memory of long prefills.

use std::time::Instant;

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

impl longrl_backends::BackendTask for ModelBench {
    type Output = Result<Vec<Figure>, String>;

    fn run<B: longrl_backends::TrainBackend>(self, device: B::Device) -> Self::Output {
        use longrl_stdlib::model::checkpoint::RandomInit;
        use longrl_stdlib::model::generate::{SamplingConfig, generate_group};
        use longrl_stdlib::model::score::score_batch;
        use longrl_stdlib::model::{CausalLm, ModelConfig};

        let config = ModelConfig::preset(&self.preset, self.vocab)
            .ok_or_else(|| format!("unknown preset `{}` (presets: {})", self.preset, ModelConfig::PRESETS.join(", ")))?;
        let model = CausalLm::<B::InnerBackend>::build(&config, &mut RandomInit::new(1, 0.02), &device).map_err(|e| e.to_string())?;
        let mut figures = vec![Figure { name: "parameters".into(), value: config.num_params() as f64, unit: "", key: "parameters" }];
        let prompt: Vec<u32> = (0..self.prompt_len).map(|i| ((i * 7919 + 13) % self.vocab) as u32).collect();
        let sampling = |n: usize| SamplingConfig { temperature: 1.0, max_new_tokens: n, ..SamplingConfig::default() };
        // Warm-up (allocators, thread pools).
        generate_group(&model, &prompt[..prompt.len().min(16)], 1, &sampling(2)).map_err(|e| e.to_string())?;

        let (_, prefill) = timed(|| generate_group(&model, &prompt, 1, &sampling(1)));
        figures.push(Figure {
            name: format!("prefill {} tokens, batch 1", self.prompt_len),
            value: self.prompt_len as f64 / prefill,
            unit: "tokens/s",
            key: "prefill",
        });
        let (_, one) = timed(|| generate_group(&model, &prompt, 1, &sampling(self.new_tokens)));
        let decode_one = (one - prefill).max(1e-9);
        figures.push(Figure {
            name: "decode, batch 1".into(),
            value: (self.new_tokens - 1) as f64 / decode_one,
            unit: "tokens/s",
            key: "decode_batch1",
        });
        let (_, group) = timed(|| generate_group(&model, &prompt, self.group, &sampling(self.new_tokens)));
        let decode_group = (group - prefill).max(1e-9);
        figures.push(Figure {
            name: format!("decode, group of {} sharing the prompt", self.group),
            value: (self.group * (self.new_tokens - 1)) as f64 / decode_group,
            unit: "tokens/s",
            key: "decode_group",
        });
        figures.push(Figure {
            name: format!("group of {}: prompt + {} tokens each, wall", self.group, self.new_tokens),
            value: group,
            unit: "s",
            key: "group_wall_s",
        });

        let train = CausalLm::<B>::build(&config, &mut RandomInit::new(1, 0.02), &device).map_err(|e| e.to_string())?;
        let half = self.train_seq / 2;
        let pairs: Vec<(Vec<u32>, Vec<u32>)> = (0..self.train_batch)
            .map(|b| {
                let ids: Vec<u32> = (0..self.train_seq).map(|i| ((i * 31 + b * 17 + 5) % self.vocab) as u32).collect();
                (ids[..half].to_vec(), ids[half..].to_vec())
            })
            .collect();
        let step = || -> Result<(), String> {
            let scores = score_batch(&train, &pairs).map_err(|e| e.to_string())?;
            let loss = scores.logprobs.sum().neg();
            let grads = loss.backward();
            let grad = train.embed_tokens.weight.val().grad(&grads);
            drop(grad);
            Ok(())
        };
        step()?;
        let mut times = Vec::new();
        for _ in 0..3 {
            let (result, t) = timed(step);
            result?;
            times.push(t);
        }
        times.sort_by(f64::total_cmp);
        let tokens = (self.train_batch * self.train_seq) as f64;
        figures.push(Figure {
            name: format!("forward+backward, batch {} x {} tokens", self.train_batch, self.train_seq),
            value: tokens / times[1],
            unit: "tokens/s",
            key: "train",
        });
        Ok(figures)
    }
}

/// Runs one prefill of `len` tokens on the tiny preset and returns this process's peak
/// resident memory in MiB (read from /proc/self/status; the caller runs it in a child
/// process so earlier work does not count).
pub fn prefill_peak_memory(len: usize, vocab: usize) -> Result<(f64, f64), String> {
    use longrl_stdlib::model::checkpoint::RandomInit;
    use longrl_stdlib::model::{CausalLm, ForwardArgs, ModelConfig};
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
