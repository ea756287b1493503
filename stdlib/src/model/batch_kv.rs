//! The KV cache of a decode batch that mixes several prompts' groups. Each group is a
//! segment of consecutive batch rows: its prompt's keys and values (prefilled once, batch 1)
//! are the prefix every row of the segment attends to, and its rows' own keys and values
//! live in a buffer preallocated for more tokens and written in place, one column per
//! decode step (geometric growth; a finished row's slot is refilled by the segment's last
//! row). Each row attends only to its own group's prompt: the backend's batched kernel
//! takes every segment (its prefix, its rows' keys read through their strides, its length)
//! in one call; without one, [`attend`] runs once per segment.

use std::ops::Range;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorPrimitive};
use longrl_backends::{CustomGrad, Kernels};

use crate::model::ModelError;
use crate::model::attention::{AttentionKernel, AttentionOptions, SelfAttention, attend};
use crate::model::flash::{AttentionInputs, fused_batch};
use crate::model::precision::to_dtype;
use crate::model::transformer::{CausalLm, KvCache};

/// Own-key capacity of a new segment buffer, in tokens.
const FIRST_CAPACITY: usize = 16;

/// Rows and token count of one group's segment (the same in every layer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Rows still decoding (the segment's first `rows` buffer slots).
    pub rows: usize,
    /// Own tokens stored per row.
    pub len: usize,
    /// Tokens the buffers hold before they grow.
    capacity: usize,
    /// Slots of the buffers (the group's size).
    slots: usize,
    /// Own tokens a row can ever store (its token limit).
    max_len: usize,
}

/// One segment's keys and values in one layer.
#[derive(Debug, Clone)]
pub(crate) struct SegmentKv<B: Backend> {
    /// `[1, kv_heads, prompt, head_dim]` keys and values of the group's prompt.
    prefix: (Tensor<B, 4>, Tensor<B, 4>),
    /// `[slots, kv_heads, capacity, head_dim]` own keys and values; the first `rows` slots
    /// and `len` columns hold the rows' tokens.
    own: (Tensor<B, 4>, Tensor<B, 4>),
}

impl<B: Backend> SegmentKv<B> {
    /// Own-key buffers for `slots` rows of `capacity` tokens, shaped after the prefix.
    fn new(prefix: (Tensor<B, 4>, Tensor<B, 4>), slots: usize, capacity: usize) -> Self {
        let [_, kvh, _, hd] = prefix.0.dims();
        let device = prefix.0.device();
        // In the prefix's dtype (bf16 under mixed precision).
        let dtype = prefix.0.dtype();
        let zeros = || to_dtype(Tensor::zeros([slots, kvh, capacity, hd], &device), dtype);
        Self { own: (zeros(), zeros()), prefix }
    }
}

/// The KV cache of a batch of segments, in batch order.
#[derive(Debug, Clone)]
pub struct BatchKv<B: Backend> {
    /// `[layer][segment]`.
    layers: Vec<Vec<SegmentKv<B>>>,
    segments: Vec<Segment>,
}

/// `tensor[ranges] = value`, in place where the backend can.
fn write<B: Kernels>(tensor: Tensor<B, 4>, ranges: [Range<usize>; 4], value: Tensor<B, 4>) -> Tensor<B, 4> {
    let out = B::slice_assign_in_place(tensor.into_primitive().tensor(), &ranges, value.into_primitive().tensor());
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

impl<B: CustomGrad> BatchKv<B> {
    pub fn new(layers: usize) -> Self {
        Self { layers: (0..layers).map(|_| Vec::new()).collect(), segments: Vec::new() }
    }

    /// The segments, in batch order.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// Rows decoding in all.
    pub fn rows(&self) -> usize {
        self.segments.iter().map(|s| s.rows).sum()
    }

    /// Appends a segment of `rows` rows whose prompt was prefilled into `prompt` (a batch-1
    /// cache of the same model); each row will store at most `max_len` own tokens.
    pub fn push_segment(&mut self, prompt: KvCache<B>, rows: usize, max_len: usize) -> Result<(), ModelError> {
        if prompt.layers.len() != self.layers.len() {
            return Err(ModelError::Invalid(format!(
                "a prompt cache of {} layers for a model of {}",
                prompt.layers.len(),
                self.layers.len()
            )));
        }
        let mut prefixes = Vec::with_capacity(self.layers.len());
        for layer in prompt.layers {
            match layer.own {
                Some((k, v)) if k.dims()[0] == 1 && layer.shared.is_none() => prefixes.push((k, v)),
                _ => return Err(ModelError::Invalid("a group's prompt must be prefilled alone (batch 1, no prefix)".into())),
            }
        }
        let max_len = max_len.max(1);
        let capacity = FIRST_CAPACITY.min(max_len);
        for (layer, prefix) in self.layers.iter_mut().zip(prefixes) {
            layer.push(SegmentKv::new(prefix, rows, capacity));
        }
        self.segments.push(Segment { rows, len: 0, capacity, slots: rows, max_len });
        Ok(())
    }

    /// Drops segment `index` (its group is done).
    pub fn remove_segment(&mut self, index: usize) {
        for layer in &mut self.layers {
            layer.remove(index);
        }
        self.segments.remove(index);
    }

    /// Drops row `slot` of segment `index`: the segment's last row moves into its slot (its
    /// keys and values copied in place), so rows stay in the first slots.
    pub fn remove_row(&mut self, index: usize, slot: usize) {
        let segment = &mut self.segments[index];
        let last = segment.rows - 1;
        if slot != last && segment.len > 0 {
            let len = segment.len;
            for layer in &mut self.layers {
                let kv = &mut layer[index];
                let [_, kvh, _, hd] = kv.own.0.dims();
                let move_last = |t: &mut Tensor<B, 4>| {
                    let from = t.clone().slice([last..last + 1, 0..kvh, 0..len, 0..hd]);
                    replace_with(t, |t| write(t, [slot..slot + 1, 0..kvh, 0..len, 0..hd], from));
                };
                move_last(&mut kv.own.0);
                move_last(&mut kv.own.1);
            }
        }
        segment.rows -= 1;
    }

    /// Makes room in every segment for one more own token per row: a full buffer is
    /// replaced by one of twice the capacity (at most the rows' token limit) holding its
    /// tokens.
    fn reserve_one(&mut self) {
        for (index, segment) in self.segments.iter_mut().enumerate() {
            if segment.len < segment.capacity {
                continue;
            }
            let capacity = (segment.capacity * 2).max(FIRST_CAPACITY).min(segment.max_len.max(segment.len + 1));
            let Segment { rows, len, slots, .. } = *segment;
            for layer in &mut self.layers {
                let grow = |t: &mut Tensor<B, 4>| {
                    let [_, kvh, _, hd] = t.dims();
                    let fresh = to_dtype(Tensor::<B, 4>::zeros([slots, kvh, capacity, hd], &t.device()), t.dtype());
                    let kept = t.clone().slice([0..rows, 0..kvh, 0..len, 0..hd]);
                    *t = write(fresh, [0..rows, 0..kvh, 0..len, 0..hd], kept);
                };
                grow(&mut layer[index].own.0);
                grow(&mut layer[index].own.1);
            }
            segment.capacity = capacity;
        }
    }
}

/// Replaces `*slot` by `f` of its value (moved out, so that `f` owns the only reference).
fn replace_with<B: Backend>(slot: &mut Tensor<B, 4>, f: impl FnOnce(Tensor<B, 4>) -> Tensor<B, 4>) {
    let device = slot.device();
    let taken = std::mem::replace(slot, Tensor::empty([0, 0, 0, 0], &device));
    *slot = f(taken);
}

impl<B: CustomGrad> SelfAttention<B> {
    /// Attends one new token per row to its group's prompt and its own earlier tokens, and
    /// stores the token's key and value in the segment's buffers (in place). Every row reads
    /// only its own group's prompt, once for the group's rows: in one call of the backend's
    /// batched kernel when it has one, else one [`attend`] per segment.
    ///
    /// # Shapes
    /// - x: `[rows, 1, hidden]` (the segments' rows in order); cos, sin: `[rows, 1, 1, head_dim]`
    /// - returns `[rows, 1, hidden]`
    pub(crate) fn forward_segments(
        &self,
        x: Tensor<B, 3>,
        cos: Tensor<B, 4>,
        sin: Tensor<B, 4>,
        layer: &mut [SegmentKv<B>],
        segments: &[Segment],
        options: AttentionOptions,
    ) -> Tensor<B, 3> {
        let (q, k, v) = self.project(x, cos, sin); // [rows, h, 1, hd], [rows, kvh, 1, hd] x2
        let (h, kvh, hd) = (self.heads, self.kv_heads, self.head_dim);
        let mut calls = Vec::with_capacity(segments.len());
        let mut start = 0;
        for (kv, segment) in layer.iter_mut().zip(segments) {
            let (end, len) = (start + segment.rows, segment.len);
            if segment.rows == 0 {
                continue;
            }
            let rows = |t: &Tensor<B, 4>, heads: usize| t.clone().slice([start..end, 0..heads, 0..1, 0..hd]);
            let column = [0..segment.rows, 0..kvh, len..len + 1, 0..hd];
            replace_with(&mut kv.own.0, |own| write(own, column.clone(), rows(&k, kvh)));
            replace_with(&mut kv.own.1, |own| write(own, column, rows(&v, kvh)));
            let seen = |t: &Tensor<B, 4>| t.clone().slice([0..segment.rows, 0..kvh, 0..len + 1, 0..hd]);
            let inputs =
                AttentionInputs { q: rows(&q, h), own_k: seen(&kv.own.0), own_v: seen(&kv.own.1), shared: Some(kv.prefix.clone()) };
            calls.push((inputs, len));
            start = end;
        }
        // Inference only, as in `attend`: the kernel records no gradient.
        let inference = options.kernel == AttentionKernel::Auto && !B::ad_enabled(&q.device());
        let batched = if inference { fused_batch(&calls) } else { None };
        let out = batched.unwrap_or_else(|| {
            let outputs = calls.into_iter().map(|(c, past)| attend(c.q, c.shared, c.own_k, c.own_v, past, None, options));
            Tensor::cat(outputs.collect(), 0)
        }); // [rows, h, 1, hd]
        self.output(out)
    }
}

impl<B: CustomGrad> CausalLm<B> {
    /// One decode step of a batch of segments: one new token per row, attending to its
    /// group's prompt and its own earlier tokens; the cache gains a column.
    ///
    /// # Shapes
    /// - tokens: `[rows, 1]`; positions: `[rows, 1]` (absolute) -> `[rows, 1, hidden]`
    ///   (final, normed)
    pub fn forward_segments(&self, tokens: Tensor<B, 2, Int>, positions: Tensor<B, 2>, cache: &mut BatchKv<B>) -> Tensor<B, 3> {
        cache.reserve_one();
        let mut x = self.embed_tokens.forward(tokens); // [rows, 1, d]
        // The rotation tables in the weights' dtype (bf16 under mixed precision).
        let (cos, sin) = self.rope.tables(positions);
        let (cos, sin) = (to_dtype(cos, x.dtype()), to_dtype(sin, x.dtype()));
        let segments = cache.segments.clone();
        for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
            x = layer.forward_with(x, |attention, normed| {
                attention.forward_segments(normed, cos.clone(), sin.clone(), kv, &segments, self.attention)
            });
        }
        for segment in &mut cache.segments {
            segment.len += 1;
        }
        self.final_norm(x)
    }
}
