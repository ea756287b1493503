//! `synthetic` source: generated long-context tasks at chosen token budgets: retrieval and
//! multi-hop chains over facts hidden among distractor facts and filler text (text answers),
//! arithmetic over figures stated in a long report (numeric answers) and multiple choice A-D.
//! The harder kinds (`chain`, `aggregate`, `docqa_choice`, in [`harder`]) chain up to three
//! facts among traps that reuse their names and figures. The same question is rendered at
//! every requested length; gold facts sit at random depths.

mod harder;

use std::path::PathBuf;

use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;
use serde_json::json;

use crate::error::StageError;
use crate::options::{at_most, limits};
use crate::record::{AnswerKind, ChatMessage, Record};
use crate::stage::{CancelToken, PortKind, PortSpec, Stage, StageConfig, StageContext, StageIo};
use crate::tokenizer::Tokenizer;

/// A kind of generated task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// Find one fact: where is the <color> <object> kept?
    Retrieval,
    /// Chain two facts: the object's owner, then where the owner lives.
    Multihop,
    /// Subtract two figures of a company's report (numeric answer).
    Arithmetic,
    /// Retrieval asked as multiple choice A-D.
    Choice,
    /// Chain two or three facts (owner, closest friend, home city) among traps that reuse
    /// the chain's names: the person's other city, the chain one hop off, look-alike objects.
    Chain,
    /// Sum, difference or percentage over a company's yearly figures (numeric answer), among
    /// figures of other years, of costs and of other companies, some with equal numbers.
    Aggregate,
    /// A chain or aggregate question as multiple choice A-D in the DocQA phrasing ("The
    /// correct answer is (A)"); the wrong options are the answers the traps lead to.
    DocqaChoice,
}

/// Options of the `synthetic` source.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SyntheticConfig {
    /// Number of distinct questions.
    pub count: usize,
    /// Input lengths in tokens (document + question); every question is rendered at each.
    pub lengths: Vec<usize>,
    /// tokenizer.json (or a model directory) that measures lengths.
    pub tokenizer: PathBuf,
    /// Kinds of task, cycled over the questions.
    #[serde(default = "default_kinds")]
    pub kinds: Vec<TaskKind>,
    /// Distractor facts of the same form per question (half share the color or the object).
    /// The harder kinds always set their traps and add look-alike chains (1 + distractors / 2)
    /// or other companies' figures (distractors / 3) on top.
    #[serde(default = "default_distractors")]
    pub distractors: usize,
    /// Which (color, object) keys the distractor facts of `retrieval`, `choice` and `multihop`
    /// name: `look_alike` (half share the asked item's color or its object) or `distinct`
    /// (another color and another object each, so one word of the question singles out the fact).
    #[serde(default)]
    pub distractor_keys: DistractorKeys,
    /// Question stream: different seeds give different questions (train vs held-out).
    #[serde(default)]
    pub seed: u64,
    /// Emit a question's lengths together (`question`) or all questions at one length, then
    /// the next length (`length`).
    #[serde(default)]
    pub order: Order,
}

/// Emission order of the (question, length) pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    #[default]
    Question,
    Length,
}

/// How the distractor facts' keys relate to the asked (color, object).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DistractorKeys {
    /// Half share the asked item's color or its object ("the purple bell" beside "the purple lamp").
    #[default]
    LookAlike,
    /// Each names another color and another object than the asked item.
    Distinct,
}

fn default_kinds() -> Vec<TaskKind> {
    vec![TaskKind::Retrieval, TaskKind::Multihop, TaskKind::Arithmetic, TaskKind::Choice]
}

fn default_distractors() -> usize {
    6
}

impl StageConfig for SyntheticConfig {
    const NAME: &'static str = "synthetic";
    const SUMMARY: &'static str = "Generates long-context tasks (retrieval, multi-hop, arithmetic, choice; harder: chain, aggregate, docqa_choice) at given token lengths.";
    const OUTPUTS: &'static [PortSpec] = &[PortSpec::optional("records", PortKind::Records, "the generated tasks")];

    fn validate(&self, ctx: &StageContext) -> Vec<String> {
        let mut problems = Vec::new();
        let full = ctx.input_path(&self.tokenizer);
        let file = if full.is_dir() { full.join("tokenizer.json") } else { full };
        if !file.is_file() {
            problems.push(format!("option `tokenizer`: file {} does not exist", file.display()));
        }
        if self.lengths.is_empty() {
            problems.push("option `lengths` must list at least one length".into());
        }
        if let Some(short) = self.lengths.iter().find(|&&l| l < 16) {
            problems.push(format!("length {short} is too short for a task (at least 16 tokens)"));
        }
        if self.kinds.is_empty() {
            problems.push("option `kinds` must list at least one kind".into());
        }
        problems.extend(self.size_problems());
        problems
    }

    fn build(self, ctx: &StageContext) -> Result<Box<dyn Stage>, StageError> {
        let tokenizer = Tokenizer::load(&ctx.input_path(&self.tokenizer))?;
        Ok(Box::new(Synthetic { config: self, tokenizer }))
    }
}

impl SyntheticConfig {
    /// Counts and lengths within [`limits`]: a typo like a count of 10^18 would otherwise
    /// run until the machine's memory or the user's patience ran out.
    fn size_problems(&self) -> Vec<String> {
        let mut problems: Vec<String> = self.lengths.iter().find_map(|&l| at_most("lengths", l, limits::TOKENS)).into_iter().collect();
        problems.extend(at_most("count", self.count, limits::RECORDS));
        problems.extend(at_most("distractors", self.distractors, limits::DISTRACTORS));
        let tasks = self.count.saturating_mul(self.lengths.len());
        if self.count <= limits::RECORDS && tasks > limits::RECORDS {
            problems.push(format!(
                "count x lengths is {tasks} tasks, above the limit of {} (generate fewer questions or fewer lengths)",
                limits::RECORDS
            ));
        }
        problems
    }

    /// The (question, length) pairs in emission order, generated lazily.
    fn pairs(&self) -> Box<dyn Iterator<Item = (usize, usize)> + '_> {
        match self.order {
            Order::Question => Box::new((0..self.count).flat_map(|q| self.lengths.iter().map(move |&l| (q, l)))),
            Order::Length => Box::new(self.lengths.iter().flat_map(|&l| (0..self.count).map(move |q| (q, l)))),
        }
    }
}

struct Synthetic {
    config: SyntheticConfig,
    tokenizer: Tokenizer,
}

impl Stage for Synthetic {
    fn run(self: Box<Self>, io: &mut StageIo) -> Result<(), StageError> {
        let mut worst_gap = 0usize;
        let cancel = io.cancel_token().clone();
        for (index, length) in self.config.pairs() {
            let kind = self.config.kinds[index % self.config.kinds.len()];
            let task = make_task(&self.config, index, kind);
            let record = render(&task, length, self.config.seed, index, &self.tokenizer, &cancel)?;
            worst_gap = worst_gap.max(length.abs_diff(record.input_tokens.unwrap_or(0)));
            io.send_record("records", record)?;
        }
        io.summary_mut().insert("worst_length_gap_tokens".into(), worst_gap.into());
        Ok(())
    }
}

const COLORS: &[&str] = &[
    "red", "blue", "green", "yellow", "black", "white", "orange", "purple", "silver", "golden", "brown", "gray", "pink", "violet", "amber",
    "teal",
];
const OBJECTS: &[&str] = &[
    "box", "key", "lamp", "book", "ring", "coin", "map", "cup", "bell", "clock", "vase", "knife", "hat", "scarf", "drum", "flute",
    "mirror", "jar", "chest", "kite",
];
const CITIES: &[&str] = &[
    "Oslo", "Lima", "Cairo", "Dakar", "Quito", "Riga", "Tunis", "Hanoi", "Kyiv", "Minsk", "Sofia", "Bern", "Rome", "Paris", "Madrid",
    "Lisbon", "Dublin", "Vienna", "Prague", "Warsaw", "Athens", "Ankara", "Tehran", "Delhi", "Dhaka", "Seoul", "Tokyo", "Manila",
    "Jakarta", "Perth", "Sydney", "Auckland", "Havana", "Bogota", "Caracas", "Santiago", "Toronto", "Denver", "Boston", "Chicago",
];
const NAMES: &[&str] = &[
    "Anna", "Ben", "Clara", "David", "Elena", "Felix", "Grace", "Hugo", "Iris", "Jonas", "Karen", "Leo", "Maria", "Nora", "Oscar", "Paula",
    "Quinn", "Rosa", "Simon", "Tara", "Umar", "Vera", "Walter", "Xenia", "Yusuf", "Zoe", "Adam", "Bella", "Carl", "Dora", "Emil", "Fiona",
    "Gustav", "Hanna", "Igor", "Julia", "Kevin", "Lena", "Marco", "Nina",
];
const COMPANIES: &[&str] = &[
    "Acme", "Borealis", "Cobalt", "Dynamo", "Everest", "Falcon", "Granite", "Horizon", "Ionic", "Juniper", "Keystone", "Lumen", "Meridian",
    "Nimbus", "Orion", "Pinnacle",
];
const TOPICS: &[&str] =
    &["history", "music", "farming", "trains", "weather", "painting", "chess", "rivers", "bridges", "maps", "birds", "ships"];
const PLACES: &[&str] = &["market", "library", "harbor", "station", "garden", "museum", "school", "bakery", "theater", "square"];
const LANDMARKS: &[&str] = &["tower", "old mill", "river", "hill", "castle", "fountain", "lighthouse", "bridge"];
const SEASONS: &[&str] = &["spring", "summer", "autumn", "winter"];
const EVENTS: &[&str] = &["festival", "storm", "meeting", "parade", "concert", "fair", "election", "flood"];
const ADJECTIVES: &[&str] = &["tall", "narrow", "ancient", "famous", "quiet", "crowded", "damaged", "restored"];

/// A task before it is laid out at a length.
#[derive(Debug, Clone)]
struct Task {
    kind: TaskKind,
    question: String,
    answer: String,
    answer_kind: AnswerKind,
    gold: Vec<String>,
    distractors: Vec<String>,
    trace: String,
    /// The task's own instruction: the record then carries a prebuilt prompt with it
    /// (instead of the standard prompt's "Therefore, the answer is").
    instruction: Option<&'static str>,
}

fn rng_for(seed: u64, index: usize, salt: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ salt);
    rng.set_stream(index as u64);
    rng
}

fn pick<'a>(rng: &mut ChaCha8Rng, items: &[&'a str]) -> &'a str {
    items.choose(rng).copied().unwrap_or("")
}

/// Distinct (color, object) keys: the target first, then `count` distractors; look-alike
/// ones share its color (every third from the first), its object (from the second) or nothing.
fn keys(rng: &mut ChaCha8Rng, count: usize, relation: DistractorKeys) -> Vec<(&'static str, &'static str)> {
    let target = (pick(rng, COLORS), pick(rng, OBJECTS));
    let mut out = vec![target];
    let mut guard = 0;
    while out.len() < count + 1 && guard < 10_000 {
        guard += 1;
        let candidate = match (relation, out.len() % 3) {
            (DistractorKeys::LookAlike, 1) => (target.0, pick(rng, OBJECTS)),
            (DistractorKeys::LookAlike, 2) => (pick(rng, COLORS), target.1),
            _ => (pick(rng, COLORS), pick(rng, OBJECTS)),
        };
        let shares_a_word = candidate.0 == target.0 || candidate.1 == target.1;
        if !out.contains(&candidate) && !(relation == DistractorKeys::Distinct && shares_a_word) {
            out.push(candidate);
        }
    }
    out
}

/// Distinct items, the first `count` of a shuffle.
fn distinct<'a>(rng: &mut ChaCha8Rng, items: &[&'a str], count: usize) -> Vec<&'a str> {
    let mut all = items.to_vec();
    all.shuffle(rng);
    all.into_iter().cycle().take(count).collect()
}

fn make_task(config: &SyntheticConfig, index: usize, kind: TaskKind) -> Task {
    let mut rng = rng_for(config.seed, index, 1);
    let (distractors, relation) = (config.distractors, config.distractor_keys);
    match kind {
        TaskKind::Retrieval | TaskKind::Choice => {
            let keys = keys(&mut rng, distractors, relation);
            retrieval_task(&mut rng, kind, keys)
        }
        TaskKind::Multihop => {
            let keys = keys(&mut rng, distractors / 2, relation);
            multihop_task(&mut rng, keys)
        }
        TaskKind::Arithmetic => arithmetic_task(&mut rng, distractors),
        TaskKind::Chain => harder::chain_task(&mut rng, distractors),
        TaskKind::Aggregate => harder::aggregate_task(&mut rng, distractors),
        TaskKind::DocqaChoice => harder::docqa_choice_task(&mut rng, distractors),
    }
}

/// Where a (color, object) is kept: as a text answer, or (`Choice`) as one of four lettered
/// cities.
fn retrieval_task(rng: &mut ChaCha8Rng, kind: TaskKind, keys: Vec<(&str, &str)>) -> Task {
    let cities = distinct(rng, CITIES, keys.len());
    let facts: Vec<String> = keys.iter().zip(&cities).map(|((c, o), city)| format!("The {c} {o} is kept in {city}.")).collect();
    let (color, object) = keys[0];
    let question = format!("Where is the {color} {object} kept?");
    if kind == TaskKind::Retrieval {
        let trace = format!("<think>\nThe text says: {}\n</think>\n\nTherefore, the answer is {}.", facts[0], cities[0]);
        return Task {
            kind,
            question,
            answer: cities[0].into(),
            answer_kind: AnswerKind::Text,
            gold: vec![facts[0].clone()],
            distractors: facts[1..].to_vec(),
            trace,
            instruction: None,
        };
    }
    let mut options: Vec<&str> = cities.iter().take(4).copied().collect();
    while options.len() < 4 {
        options.push(pick(rng, CITIES));
    }
    options.shuffle(rng);
    let letter_index = options.iter().position(|c| *c == cities[0]).unwrap_or(0);
    let letter = ["A", "B", "C", "D"][letter_index];
    let listed = options.iter().zip(["A", "B", "C", "D"]).map(|(c, l)| format!("({l}) {c}")).collect::<Vec<_>>().join(" ");
    let trace =
        format!("<think>\nThe text says: {} That is option ({letter}).\n</think>\n\nTherefore, the answer is ({letter}).", facts[0]);
    Task {
        kind,
        question: format!("{question} {listed}"),
        answer: letter.into(),
        answer_kind: AnswerKind::Choice,
        gold: vec![facts[0].clone()],
        distractors: facts[1..].to_vec(),
        trace,
        instruction: None,
    }
}

/// Two chained facts: who owns the object, and where that person lives.
fn multihop_task(rng: &mut ChaCha8Rng, keys: Vec<(&str, &str)>) -> Task {
    let kind = TaskKind::Multihop;
    let owners = distinct(rng, NAMES, keys.len() * 2);
    let cities = distinct(rng, CITIES, owners.len());
    let belongs: Vec<String> = keys.iter().zip(&owners).map(|((c, o), n)| format!("The {c} {o} belongs to {n}.")).collect();
    let lives: Vec<String> = owners.iter().zip(&cities).map(|(n, city)| format!("{n} lives in {city}.")).collect();
    let (color, object) = keys[0];
    let gold = vec![belongs[0].clone(), lives[0].clone()];
    let mut others: Vec<String> = belongs[1..].to_vec();
    others.extend(lives[1..].iter().cloned());
    let trace = format!("<think>\nThe text says: {} {}\n</think>\n\nTherefore, the answer is {}.", gold[0], gold[1], cities[0]);
    Task {
        kind,
        question: format!("In which city does the owner of the {color} {object} live?"),
        answer: cities[0].into(),
        answer_kind: AnswerKind::Text,
        gold,
        distractors: others,
        trace,
        instruction: None,
    }
}

/// A difference of one company's earnings in two years, among other companies' figures.
fn arithmetic_task(rng: &mut ChaCha8Rng, distractors: usize) -> Task {
    let kind = TaskKind::Arithmetic;
    let companies = distinct(rng, COMPANIES, 1 + distractors / 2);
    let year1 = rng.random_range(2001..2020);
    let year2 = year1 + rng.random_range(1..5);
    let x: u32 = rng.random_range(10..500);
    let y: u32 = x + rng.random_range(1..300);
    let company = companies[0];
    let gold =
        vec![format!("In {year1}, {company} earned {x} million dollars."), format!("In {year2}, {company} earned {y} million dollars.")];
    let mut others = Vec::new();
    for (i, other) in companies.iter().enumerate().skip(1) {
        let amount: u32 = rng.random_range(10..800);
        let year = if i % 2 == 0 { year1 } else { year2 };
        others.push(format!("In {year}, {other} earned {amount} million dollars."));
    }
    // A distractor figure of the same company in another year.
    others.push(format!("In {}, {company} earned {} million dollars.", year2 + 6, rng.random_range(10..800)));
    let difference = y - x;
    let trace = format!(
        "<think>\nThe text says: {} {} So {y} - {x} = {difference}.\n</think>\n\nTherefore, the answer is {difference}.",
        gold[0], gold[1]
    );
    Task {
        kind,
        question: format!("How many million dollars more did {company} earn in {year2} than in {year1}?"),
        answer: difference.to_string(),
        answer_kind: AnswerKind::Number,
        gold,
        distractors: others,
        trace,
        instruction: None,
    }
}

/// One filler sentence: never a fact of the tasks' forms, and never naming a city, a person
/// of the facts' pools' roles (owners) or a company figure, so only facts carry answers.
fn filler(rng: &mut ChaCha8Rng) -> String {
    let name = pick(rng, NAMES);
    match rng.random_range(0..8) {
        0 => format!("{name} spent the afternoon reading about {}.", pick(rng, TOPICS)),
        1 => format!("The {} near the {} was busy that week.", pick(rng, PLACES), pick(rng, LANDMARKS)),
        2 => format!("Reports from the {} mentioned a quiet {}.", pick(rng, PLACES), pick(rng, SEASONS)),
        3 => format!("Nobody expected the {} to last so long.", pick(rng, EVENTS)),
        4 => format!("{name} and {} argued about {} for hours.", pick(rng, NAMES), pick(rng, TOPICS)),
        5 => format!("A small group visited the {} before {}.", pick(rng, PLACES), pick(rng, SEASONS)),
        6 => format!("The {} committee met again without a decision.", pick(rng, TOPICS)),
        _ => format!("Old records describe the {} as {}.", pick(rng, LANDMARKS), pick(rng, ADJECTIVES)),
    }
}

/// Lays a task out at `length` tokens: filler and distractors, gold facts at random depths.
fn render(task: &Task, length: usize, seed: u64, index: usize, tokenizer: &Tokenizer, cancel: &CancelToken) -> Result<Record, StageError> {
    let mut rng = rng_for(seed, index, 2 + length as u64);
    let count = |text: &str| tokenizer.encode(text).map(|ids| ids.len());
    let question_tokens = count(&format!("\n\n{}", task.question))?;
    // Estimate by sentence, then correct with exact counts of the whole input.
    let mut body: Vec<String> = task.distractors.clone();
    let mut estimate: usize =
        question_tokens + task.gold.iter().chain(&task.distractors).map(|s| count(&format!(" {s}"))).sum::<Result<usize, _>>()?;
    while estimate < length {
        cancel.check()?;
        let sentence = filler(&mut rng);
        estimate += count(&format!(" {sentence}"))?;
        body.push(sentence);
    }
    body.shuffle(&mut rng);
    // Gold facts at random positions (their order kept, so chains read naturally).
    let mut slots: Vec<usize> = (0..task.gold.len()).map(|_| rng.random_range(0..=body.len())).collect();
    slots.sort_unstable();
    for (offset, (slot, fact)) in slots.iter().zip(&task.gold).enumerate() {
        body.insert(slot + offset, fact.clone());
    }
    let is_gold = |s: &String| task.gold.contains(s);
    let tolerance = (length / 50).max(8);
    let (mut record, mut tokens) = assemble(task, &body, index, seed, length, tokenizer)?;
    // Remove filler from the end while over budget, add while under.
    let mut guard = 0;
    while tokens > length && guard < 10_000 {
        cancel.check()?;
        guard += 1;
        // Filler sentences run about ten tokens: drop enough of them at once.
        let mut excess = (tokens - length).div_ceil(10).max(1);
        while excess > 0 {
            let Some(pos) = body.iter().rposition(|s| !is_gold(s) && !task.distractors.contains(s)) else { break };
            body.remove(pos);
            excess -= 1;
        }
        let before = tokens;
        (record, tokens) = assemble(task, &body, index, seed, length, tokenizer)?;
        if tokens == before {
            break;
        }
    }
    // Still over: the facts alone exceed the budget; drop distractors, last listed first.
    while tokens > length {
        let Some(pos) = task.distractors.iter().rev().find_map(|d| body.iter().position(|s| s == d)) else { break };
        body.remove(pos);
        (record, tokens) = assemble(task, &body, index, seed, length, tokenizer)?;
    }
    while tokens + tolerance < length && guard < 10_000 {
        cancel.check()?;
        guard += 1;
        let at = rng.random_range(0..=body.len());
        body.insert(at, filler(&mut rng));
        let (candidate, candidate_tokens) = assemble(task, &body, index, seed, length, tokenizer)?;
        if candidate_tokens > length {
            body.remove(at);
            break;
        }
        (record, tokens) = (candidate, candidate_tokens);
    }
    Ok(record)
}

/// Joins sentences into paragraphs and measures the input (document + question).
fn assemble(
    task: &Task,
    body: &[String],
    index: usize,
    seed: u64,
    length: usize,
    tokenizer: &Tokenizer,
) -> Result<(Record, usize), StageError> {
    let mut context = String::new();
    let mut offsets = Vec::new();
    for (i, sentence) in body.iter().enumerate() {
        if i > 0 {
            context.push_str(if i % 8 == 0 { "\n\n" } else { " " });
        }
        if task.gold.contains(sentence) {
            offsets.push(context.len());
        }
        context.push_str(sentence);
    }
    let mut record = Record::new(format!("syn{seed}-{index}@{length}"), task.question.clone());
    record.context = context;
    record.answers = vec![task.answer.clone()];
    record.kind = task.answer_kind;
    record.data_source =
        format!("synthetic-{}", serde_json::to_value(task.kind).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default());
    if let Some(instruction) = task.instruction {
        let content = format!("<text>\n{}\n</text>\n\n{}\n\n{instruction}", record.context, record.question);
        record.prompt = Some(vec![ChatMessage { role: "user".into(), content }]);
    }
    let tokens = tokenizer.encode(&record.input_text())?.len();
    record.input_tokens = Some(tokens);
    let total = record.context.len().max(1) as f64;
    record.length_budget = Some(length);
    record.trace = Some(task.trace.clone());
    record.metadata.insert("question_id".into(), format!("syn{seed}-{index}").into());
    record.metadata.insert("supporting_sentences".into(), json!(task.gold));
    record.metadata.insert("fact_offsets".into(), json!(offsets));
    record.metadata.insert("depths".into(), json!(offsets.iter().map(|&o| o as f64 / total).collect::<Vec<_>>()));
    Ok((record, tokens))
}

/// Generates records directly (used by tests and benchmarks).
pub fn generate(config: &SyntheticConfig, tokenizer: &Tokenizer) -> Result<Vec<Record>, StageError> {
    let mut out = Vec::new();
    for index in 0..config.count {
        let kind = config.kinds[index % config.kinds.len()];
        let task = make_task(config, index, kind);
        for &length in &config.lengths {
            out.push(render(&task, length, config.seed, index, tokenizer, &CancelToken::new())?);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_tokenizer() -> Tokenizer {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/models/tiny");
        Tokenizer::load(&dir).expect("the tiny model's tokenizer")
    }

    fn config(kinds: Vec<TaskKind>, lengths: Vec<usize>, distractors: usize, seed: u64, count: usize) -> SyntheticConfig {
        SyntheticConfig {
            count,
            lengths,
            tokenizer: PathBuf::new(),
            kinds,
            distractors,
            distractor_keys: DistractorKeys::LookAlike,
            seed,
            order: Order::Question,
        }
    }

    /// FNV-1a over the records' JSON: a stable digest across Rust versions.
    fn digest(records: &[Record]) -> u64 {
        let text = serde_json::to_string(records).expect("records serialize");
        text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3))
    }

    #[test]
    fn the_retrieval_era_kinds_render_as_before() {
        // Pins the output of the first four kinds (the quickstart's tasks) bit for bit.
        let tokenizer = tiny_tokenizer();
        let quickstart = config(vec![TaskKind::Retrieval], vec![64, 128, 256, 512], 0, 2, 12);
        let all =
            config(vec![TaskKind::Retrieval, TaskKind::Multihop, TaskKind::Arithmetic, TaskKind::Choice], vec![100, 300, 1200], 6, 7, 8);
        let got = [digest(&generate(&quickstart, &tokenizer).expect("generates")), digest(&generate(&all, &tokenizer).expect("generates"))];
        assert_eq!(got, [6_186_910_761_619_993_361, 12_213_820_711_518_674_989]);
    }

    /// The (color, object) of a "... is kept in" / "... belongs to" sentence: the two words before.
    fn fact_key(sentence: &str) -> Option<[String; 2]> {
        let head = [" is kept in ", " belongs to "].iter().find_map(|verb| sentence.split_once(verb).map(|(head, _)| head))?;
        let mut words = head.rsplit(' ').map(String::from);
        let object = words.next()?;
        Some([words.next()?, object])
    }

    #[test]
    fn distinct_distractors_share_no_word_with_the_asked_item() {
        let tokenizer = tiny_tokenizer();
        for relation in [DistractorKeys::LookAlike, DistractorKeys::Distinct] {
            let mut config = config(vec![TaskKind::Retrieval, TaskKind::Multihop], vec![400], 4, 3, 40);
            config.distractor_keys = relation;
            let mut sharing_one_word = 0;
            for record in generate(&config, &tokenizer).expect("generates") {
                let keys: Vec<[String; 2]> = record.input_text().split('.').filter_map(fact_key).collect();
                assert!(keys.len() >= 3, "{}: the asked fact and its distractors: {keys:?}", record.id);
                let shared = |key: &[String; 2]| key.iter().filter(|w| record.question.contains(&format!(" {w} "))).count();
                assert_eq!(keys.iter().filter(|k| shared(k) == 2).count(), 1, "{}: one fact names the asked item: {keys:?}", record.id);
                sharing_one_word += keys.iter().filter(|k| shared(k) == 1).count();
            }
            // Look-alike keys share a word with the question in every task; distinct ones never.
            assert_eq!(
                sharing_one_word == 0,
                relation == DistractorKeys::Distinct,
                "{relation:?}: {sharing_one_word} facts share one word"
            );
        }
    }
}
