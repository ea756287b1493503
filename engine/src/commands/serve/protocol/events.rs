//! Server-sent events of a streamed response: each choice's tokens go out as the worker
//! draws them, then, once the response is complete, each choice's last chunks with its
//! finish reason, the usage chunk and `[DONE]`. Text is held back only while a stop string
//! may be starting, so the pieces of every choice join to the text of the whole response.

use serde_json::{Value, json};

use super::super::worker::{Generated, NewTokens};
use super::{
    ApiError, Choice, Kind, Planned, Scored, Served, chat_logprobs, completion_logprobs, finish_choice, now, prompt_logprobs_json, usage,
};

/// Tokens a choice may go without a piece of text (special tokens skipped, bytes of one
/// character) before the rest of its text is sent whole at its end: the tokenizer's
/// incremental decoder decodes every token it holds back again, so this bounds the work
/// per token.
const MAX_TOKENS_WITHOUT_TEXT: usize = 64;

/// The tokenizers library's incremental decoder for a `tokenizers::Tokenizer`.
type Decoder<'t> = tokenizers::DecodeStream<
    't,
    tokenizers::models::ModelWrapper,
    tokenizers::normalizers::NormalizerWrapper,
    tokenizers::pre_tokenizers::PreTokenizerWrapper,
    tokenizers::processors::PostProcessorWrapper,
    tokenizers::decoders::DecoderWrapper,
>;

/// What ends a choice before its token limit.
pub(super) struct Stops<'r> {
    tokens: &'r [u32],
    strings: &'r [String],
    /// The longest stop string's length in bytes.
    longest: usize,
}

impl<'r> Stops<'r> {
    pub fn new(tokens: &'r [u32], strings: &'r [String]) -> Self {
        Self { tokens, strings, longest: strings.iter().map(String::len).max().unwrap_or(0) }
    }
}

/// One choice's text as its tokens come: each token's piece from the tokenizer's
/// incremental decoder (the token decoded with the few before it, not the whole prefix
/// again). While the response is under way, a piece goes out at once unless a stop string
/// may be starting in it; a stop token, a stop string, a decoding error or too many tokens
/// without text hold the rest of the choice until its end, where the stop is applied.
pub(super) struct ChoiceText<'t> {
    decoder: Decoder<'t>,
    /// Tokens in a row that added no text.
    quiet: usize,
    /// The pieces can no longer be trusted: the rest of the text goes out whole at the end.
    broken: bool,
    /// The pieces so far, joined.
    text: String,
    /// Bytes of `text` that went out.
    sent: usize,
    /// Tokens whose chunks went out while the response was under way.
    pub streamed: usize,
    /// Nothing more goes out before the end.
    held: bool,
    /// The text reached a stop string: the choice may end now.
    reached_stop: bool,
    /// The decoder took the first token held back (its piece is in `text`).
    decoded_held: bool,
}

impl<'t> ChoiceText<'t> {
    pub fn new(tokenizer: &'t tokenizers::Tokenizer, skip_special: bool) -> Self {
        Self {
            decoder: tokenizer.decode_stream(skip_special),
            quiet: 0,
            broken: false,
            text: String::new(),
            sent: 0,
            streamed: 0,
            held: false,
            reached_stop: false,
            decoded_held: false,
        }
    }

    /// The piece token `id` adds (empty when it adds none), or `None` once pieces broke.
    fn piece(&mut self, id: u32) -> Option<String> {
        if self.broken {
            return None;
        }
        match self.decoder.step(id) {
            Ok(Some(piece)) => {
                self.quiet = 0;
                Some(piece)
            }
            Ok(None) if self.quiet < MAX_TOKENS_WITHOUT_TEXT => {
                self.quiet += 1;
                Some(String::new())
            }
            _ => {
                self.broken = true;
                None
            }
        }
    }

    /// While the response is under way: the text that goes out with token `id` (the next of
    /// the choice), or `None` when the token and the rest of the choice wait for its end.
    pub fn stream(&mut self, id: u32, stops: &Stops) -> Option<String> {
        if self.held || stops.tokens.contains(&id) {
            self.held = true;
            return None;
        }
        let Some(piece) = self.piece(id) else {
            self.held = true;
            return None;
        };
        let longest = stops.longest;
        // A stop string that ends in this piece starts at most `longest` bytes before it.
        let window = floor_char_boundary(&self.text, self.text.len().saturating_sub(longest));
        self.text.push_str(&piece);
        if stops.strings.iter().any(|s| self.text[window..].contains(s.as_str())) {
            self.held = true;
            self.reached_stop = true;
            self.decoded_held = true;
            return None;
        }
        // The last `longest - 1` bytes may be the start of a stop string: they wait.
        let safe = floor_char_boundary(&self.text, self.text.len().saturating_sub(longest.saturating_sub(1))).max(self.sent);
        let out = self.text[self.sent..safe].to_string();
        self.sent = safe;
        self.streamed += 1;
        Some(out)
    }

    /// At the end of the choice, whose text is `text`: the text that goes out with each of
    /// `rest` (its tokens that did not go out yet), then what is left of `text`, for the
    /// last chunk. What went out before and these pieces join to `text`.
    pub fn finish(&mut self, rest: &[u32], text: &str) -> (Vec<String>, String) {
        // How far out the text is (a streamed prefix a decode of the whole disagrees with
        // cannot be taken back: the rest of the text then goes out as it is).
        let mut emitted = if text.starts_with(&self.text[..self.sent]) {
            self.sent
        } else {
            tracing::warn!("a streamed choice's text differs from its whole decoding; its stream is cut short");
            self.broken = true;
            text.len()
        };
        // How far the pieces reached of `text`.
        let mut reached = if text.starts_with(&self.text) {
            self.text.len()
        } else {
            self.broken = true;
            emitted
        };
        let mut pieces = Vec::with_capacity(rest.len());
        for (k, &id) in rest.iter().enumerate() {
            // The token that reached a stop string was decoded already: its piece is in `reached`.
            let decoded = k == 0 && std::mem::take(&mut self.decoded_held);
            if let Some(piece) = if decoded { None } else { self.piece(id) } {
                if text[reached..].starts_with(piece.as_str()) {
                    reached += piece.len();
                } else {
                    self.broken = true;
                }
            }
            pieces.push(text[emitted..reached].to_string());
            emitted = reached;
        }
        (pieces, text[emitted..].to_string())
    }
}

/// The largest character boundary of `s` at or below `at`.
fn floor_char_boundary(s: &str, at: usize) -> usize {
    let mut at = at.min(s.len());
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// A token of a choice as its chunk reports it.
#[derive(Clone, Copy)]
struct ChunkToken<'c> {
    /// The token's index in its choice.
    position: usize,
    /// Rows holding the token (row `row`): the choice's, or the token's own.
    scored: Scored<'c>,
    row: usize,
    /// The character offset of its text (completions' `text_offset`).
    text_at: usize,
}

/// A choice's progress through the stream.
struct ChoiceState<'t> {
    job: usize,
    sample: usize,
    /// The text that goes out.
    text: ChoiceText<'t>,
    /// When chunks wait for the end: the tokens followed as they come, only to see a stop
    /// string (`text` then takes every token at the end).
    watch: Option<ChoiceText<'t>>,
    /// The character offset of the next token's text in completions' `text_offset`.
    text_at: usize,
}

/// The events of one streamed response.
pub struct EventStream<'a> {
    planned: &'a Planned,
    served: &'a Served<'a>,
    /// Chunks go out as tokens come.
    live: bool,
    /// In response order: each job's samples.
    choices: Vec<ChoiceState<'a>>,
    /// The index of each job's first choice.
    first_choice: Vec<usize>,
    /// Samples (job, sample) that reached a stop string, not yet taken.
    ended: Vec<(usize, usize)>,
    created: u64,
}

impl<'a> EventStream<'a> {
    /// The events of `planned`. Unless they are [`EventStream::live`], tokens are only
    /// watched for stop strings (a reply sent whole, or events that wait for the end).
    pub fn new(planned: &'a Planned, served: &'a Served<'a>) -> Self {
        let live = Self::live(planned);
        let tokenizer = served.tokenizer.tokenizer.inner();
        let mut choices = Vec::new();
        let mut first_choice = Vec::with_capacity(planned.jobs.len());
        for (job, gen_job) in planned.jobs.iter().enumerate() {
            first_choice.push(choices.len());
            for sample in 0..gen_job.n {
                let text = || ChoiceText::new(tokenizer, planned.rendering.skip_special);
                choices.push(ChoiceState { job, sample, text: text(), watch: (!live).then(text), text_at: 0 });
            }
        }
        Self { planned, served, live, choices, first_choice, ended: Vec::new(), created: now() }
    }

    /// Whether the worker should report a request's tokens as they are drawn: to stream them,
    /// or to end a sample once its text reaches a stop string.
    pub fn follows_tokens(planned: &Planned) -> bool {
        Self::live(planned) || !planned.rendering.stop_strings.is_empty()
    }

    /// The samples (job, sample) whose text reached a stop string since the last call.
    pub fn take_ended(&mut self) -> Vec<(usize, usize)> {
        std::mem::take(&mut self.ended)
    }

    /// Whether a request's chunks go out as its tokens are drawn: it streams, and did not ask
    /// for each token's alternatives (those are scored once the whole choice is there).
    pub fn live(planned: &Planned) -> bool {
        let alternatives = match planned.kind {
            Kind::Completion { logprobs, .. } => logprobs.unwrap_or(0) > 0,
            Kind::Chat { top_logprobs, .. } => top_logprobs > 0,
        };
        planned.stream && !alternatives
    }

    /// Each choice's first chunk: the assistant's role (chat), the prompt (completions
    /// with `echo`).
    pub fn opening(&mut self) -> String {
        let mut events = String::new();
        for index in 0..self.choices.len() {
            let job = &self.planned.jobs[self.choices[index].job];
            let chunk = match self.planned.kind {
                Kind::Chat { .. } => {
                    let mut first =
                        json!({ "index": index, "delta": { "role": "assistant", "content": "" }, "logprobs": null, "finish_reason": null });
                    if self.planned.rendering.return_token_ids {
                        first["prompt_token_ids"] = json!(job.prompt);
                    }
                    self.chunk(vec![first])
                }
                Kind::Completion { echo: true, .. } => {
                    let prompt = self.served.decode(&job.prompt, self.planned.rendering.skip_special);
                    self.token_chunk(index, &prompt, None)
                }
                Kind::Completion { echo: false, .. } => continue,
            };
            push_event(&mut events, &chunk);
        }
        events
    }

    /// The chunks of tokens drawn since the last call.
    pub fn tokens(&mut self, new: &[NewTokens]) -> String {
        let mut events = String::new();
        for update in new {
            let (Some(&first), Some(job)) = (self.first_choice.get(update.job), self.planned.jobs.get(update.job)) else { continue };
            if update.sample >= job.n {
                continue;
            }
            let index = first + update.sample;
            let stops = Stops::new(&job.sampling.stop_tokens, &self.planned.rendering.stop_strings);
            for (offset, &id) in update.tokens.iter().enumerate() {
                let position = update.from + offset;
                let state = &mut self.choices[index];
                let (job, sample) = (state.job, state.sample);
                let follower = state.watch.as_mut().unwrap_or(&mut state.text);
                if position < follower.streamed {
                    continue;
                }
                if position > follower.streamed {
                    // A gap (not expected): the rest waits for the end.
                    follower.held = true;
                }
                let followed = follower.stream(id, &stops);
                if std::mem::take(&mut follower.reached_stop) {
                    self.ended.push((job, sample));
                }
                let (Some(delta), true) = (followed, self.live) else { continue };
                let scored = Scored { tokens: &update.tokens[offset..=offset], logprobs: &update.logprobs[offset..=offset], top: &[] };
                let token = ChunkToken { position, scored, row: 0, text_at: state.text_at };
                self.advance_text_offset(index, id);
                let chunk = self.token_chunk(index, &delta, Some(token));
                push_event(&mut events, &chunk);
            }
        }
        events
    }

    /// Everything left once the response is complete: each choice's tokens that did not go
    /// out yet and its finish chunk, the usage chunk when asked for, `[DONE]`.
    pub fn finish(&mut self, generated: &Generated) -> String {
        let mut events = String::new();
        let rendering = &self.planned.rendering;
        let mut index = 0;
        let mut completion_tokens = 0;
        for output in &generated.outputs {
            for (completion, top) in output.completions.iter().zip(&output.top) {
                let choice = finish_choice(completion, top, rendering, self.served);
                completion_tokens += choice.tokens.len();
                self.close_choice(index, &choice, output, &mut events);
                index += 1;
            }
        }
        if rendering.include_usage {
            let prompt_tokens: usize = self.planned.jobs.iter().map(|j| j.prompt.len()).sum();
            let mut chunk = self.chunk(Vec::new());
            chunk["usage"] = usage(prompt_tokens, completion_tokens);
            push_event(&mut events, &chunk);
        }
        events.push_str("data: [DONE]\n\n");
        events
    }

    /// The end of a stream that failed after it started.
    pub fn failure(err: &ApiError) -> String {
        let mut events = String::new();
        push_event(&mut events, &err.body());
        events.push_str("data: [DONE]\n\n");
        events
    }

    /// One choice's last chunks: its tokens that did not go out yet, then its finish
    /// reason with whatever text is left.
    fn close_choice(&mut self, index: usize, choice: &Choice, output: &super::GenOutput, events: &mut String) {
        let Some(state) = self.choices.get_mut(index) else { return };
        let from = state.text.streamed.min(choice.tokens.len());
        let (pieces, mut left) = state.text.finish(&choice.tokens[from..], &choice.text);
        let mut chunks = Vec::with_capacity(pieces.len() + 1);
        for (offset, piece) in pieces.iter().enumerate() {
            let position = from + offset;
            let token = ChunkToken { position, scored: choice.scored(), row: position, text_at: self.choices[index].text_at };
            self.advance_text_offset(index, choice.tokens[position]);
            chunks.push(self.token_chunk(index, piece, Some(token)));
        }
        // What is left of the text goes with the last token, else with the finish chunk.
        if let Some(last) = chunks.last_mut() {
            append_text(&mut last["choices"][0], &self.planned.kind, &std::mem::take(&mut left));
        }
        let end = match self.planned.kind {
            Kind::Completion { prompt_logprobs, .. } => {
                let mut end = json!({ "index": index, "text": left, "logprobs": null, "finish_reason": choice.finish, "stop_reason": choice.stop_reason });
                if prompt_logprobs {
                    end["prompt_logprobs"] = prompt_logprobs_json(output, self.served);
                }
                end
            }
            Kind::Chat { .. } => {
                let delta = if left.is_empty() { json!({}) } else { json!({ "content": left }) };
                json!({ "index": index, "delta": delta, "logprobs": null, "finish_reason": choice.finish, "stop_reason": choice.stop_reason })
            }
        };
        chunks.push(self.chunk(vec![end]));
        for chunk in &chunks {
            push_event(events, chunk);
        }
    }

    /// The chunk of choice `index` that adds `delta` to its text, for `token` (none: the
    /// echoed prompt).
    fn token_chunk(&self, index: usize, delta: &str, token: Option<ChunkToken>) -> Value {
        let rendering = &self.planned.rendering;
        let entry = match self.planned.kind {
            Kind::Completion { logprobs, tokens_as_ids, .. } => {
                let mut entry = json!({ "index": index, "text": delta, "logprobs": null, "finish_reason": null });
                if let (Some(top), Some(t)) = (logprobs, &token) {
                    entry["logprobs"] = completion_logprobs(t.scored, t.row..t.row + 1, top, tokens_as_ids, self.served, t.text_at);
                }
                if rendering.return_token_ids {
                    entry["token_ids"] = json!(token.as_ref().map(|t| vec![t.scored.tokens[t.row]]).unwrap_or_default());
                    if token.as_ref().is_none_or(|t| t.position == 0) {
                        entry["prompt_token_ids"] = json!(self.planned.jobs[self.choices[index].job].prompt);
                    }
                }
                entry
            }
            Kind::Chat { logprobs, top_logprobs } => {
                let mut entry = json!({ "index": index, "delta": { "content": delta }, "logprobs": null, "finish_reason": null });
                if let (true, Some(t)) = (logprobs, &token) {
                    entry["logprobs"] = json!({ "content": chat_logprobs(t.scored, t.row..t.row + 1, top_logprobs, self.served) });
                }
                if rendering.return_token_ids {
                    entry["token_ids"] = json!(token.as_ref().map(|t| vec![t.scored.tokens[t.row]]).unwrap_or_default());
                }
                entry
            }
        };
        self.chunk(vec![entry])
    }

    /// Moves choice `index`'s `text_offset` past token `id` (completions' log-probs only).
    fn advance_text_offset(&mut self, index: usize, id: u32) {
        if let Kind::Completion { logprobs: Some(_), .. } = self.planned.kind {
            self.choices[index].text_at += self.served.decode(&[id], false).chars().count();
        }
    }

    /// A chunk of this response holding `choices`.
    fn chunk(&self, choices: Vec<Value>) -> Value {
        let id = &self.planned.rendering.id;
        match self.planned.kind {
            Kind::Completion { .. } => {
                json!({ "id": format!("cmpl-{id}"), "object": "text_completion", "created": self.created, "model": self.served.name, "choices": choices })
            }
            Kind::Chat { .. } => {
                json!({ "id": format!("chatcmpl-{id}"), "object": "chat.completion.chunk", "created": self.created, "model": self.served.name, "choices": choices })
            }
        }
    }
}

/// Adds `text` to a chunk entry's text (completions) or content (chat).
fn append_text(entry: &mut Value, kind: &Kind, text: &str) {
    if text.is_empty() {
        return;
    }
    let slot = match kind {
        Kind::Completion { .. } => &mut entry["text"],
        Kind::Chat { .. } => &mut entry["delta"]["content"],
    };
    let joined = format!("{}{text}", slot.as_str().unwrap_or_default());
    *slot = Value::String(joined);
}

fn push_event(events: &mut String, chunk: &Value) {
    events.push_str("data: ");
    events.push_str(&chunk.to_string());
    events.push_str("\n\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pieces by decoding every prefix again: the reference for the incremental ones.
    fn deltas_by_prefixes(tokens: &[u32], text: &str, tokenizer: &tokenizers::Tokenizer, skip_special: bool) -> Vec<String> {
        let mut out = Vec::new();
        let mut sent = 0usize;
        for k in 0..tokens.len() {
            let prefix = tokenizer.decode(&tokens[..=k], skip_special).expect("decodes");
            let upto = if text.starts_with(&prefix) { prefix.len() } else { sent };
            let delta = if upto > sent && text.is_char_boundary(upto) { text[sent..upto].to_string() } else { String::new() };
            sent += delta.len();
            out.push(delta);
        }
        if let Some(last) = out.last_mut() {
            last.push_str(&text[sent..]);
        }
        out
    }

    /// A choice's pieces when its tokens stream (all while under way, then the end with
    /// `text`), joined with what was left for the finish chunk onto the last piece.
    fn streamed(tokenizer: &tokenizers::Tokenizer, skip: bool, tokens: &[u32], text: &str, stops: &Stops) -> Vec<String> {
        let mut choice = ChoiceText::new(tokenizer, skip);
        let mut pieces: Vec<String> = tokens.iter().map_while(|&id| choice.stream(id, stops)).collect();
        let (rest, left) = choice.finish(&tokens[choice.streamed..], text);
        pieces.extend(rest);
        pieces.push(left);
        pieces
    }

    #[test]
    fn streamed_pieces_are_those_of_decoding_every_prefix_and_join_to_the_text() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let none = Stops::new(&[], &[]);
        for file in ["examples/models/tiny/tokenizer.json", "examples/tokenizers/qwen2.5/tokenizer.json"] {
            let tokenizer = tokenizers::Tokenizer::from_file(root.join(file)).expect("tokenizer");
            let sample = "Zürich – 東京 ✓ is kept in <|im_end|> Oslo, 42% of 7.5 km. 🙂🙂 end";
            let tokens = tokenizer.encode(sample, false).expect("encodes").get_ids().to_vec();
            for skip_special in [false, true] {
                let text = tokenizer.decode(&tokens, skip_special).expect("decodes");
                let reference = deltas_by_prefixes(&tokens, &text, &tokenizer, skip_special);
                // Streamed as drawn, and all at the end (a request asking for alternatives).
                let mut pieces = streamed(&tokenizer, skip_special, &tokens, &text, &none);
                assert_eq!(pieces.pop().as_deref(), Some(""), "{file}: nothing left at the end");
                assert_eq!(pieces, reference, "{file}, skip {skip_special}: streamed");
                let (at_end, left) = ChoiceText::new(&tokenizer, skip_special).finish(&tokens, &text);
                assert_eq!((at_end, left.as_str()), (reference.clone(), ""), "{file}, skip {skip_special}: at the end");
                assert!(reference.iter().filter(|p| !p.is_empty()).count() > tokens.len() / 2, "{file}: token by token");
                // A stop string: text that may start it waits; the pieces join to the text cut there.
                let strings = ["Oslo".to_string(), "never there".to_string()];
                let stops = Stops::new(&[], &strings);
                let cut = &text[..text.find("Oslo").expect("in the text")];
                let pieces = streamed(&tokenizer, skip_special, &tokens, cut, &stops);
                assert_eq!(pieces.concat(), cut, "{file}: cut at a stop string");
                let mut choice = ChoiceText::new(&tokenizer, skip_special);
                let out: String = tokens.iter().map_while(|&id| choice.stream(id, &stops)).collect();
                assert!(!out.contains("Oslo") && cut.starts_with(&out) && out.len() + 12 >= cut.len(), "went out before the stop: {out:?}");
            }
            // A stop token holds the rest; it adds no text.
            let end = tokenizer.token_to_id("<|im_end|>").expect("special token");
            let words = tokenizer.encode("then words", false).expect("encodes").get_ids().to_vec();
            let mut ended = words.clone();
            ended.push(end);
            let text = tokenizer.decode(&words, false).expect("decodes");
            let pieces = streamed(&tokenizer, false, &ended, &text, &Stops::new(&[end], &[]));
            assert_eq!(pieces.len(), ended.len() + 1);
            assert_eq!(pieces.concat(), text);
            // A long run of skipped special tokens, then text: everything arrives, at the end.
            let mut tokens: Vec<u32> = vec![end; 3 * MAX_TOKENS_WITHOUT_TEXT];
            tokens.extend(&words);
            let text = tokenizer.decode(&tokens, true).expect("decodes");
            assert_eq!(streamed(&tokenizer, true, &tokens, &text, &none).concat(), text);
        }
    }
}
