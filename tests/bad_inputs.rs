//! The bad-input corpus, run against the built binary: every case of
//! `tests/bad_inputs/cases.json` (malformed or extreme recipes, data files, model configs,
//! checkpoints, command lines, and judges misbehaving on loopback) must end with its exit
//! code, a message naming the place (file and line, recipe line and column, the checkpoint
//! file, the flag), no panic, no colour codes, and within its time bound.
//! `tests/bad_inputs/README.md` says how a case is written.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::Deserialize;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

fn corpus() -> PathBuf {
    workspace().join("tests/bad_inputs")
}

/// One case of the corpus.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    /// `category/what`.
    name: String,
    /// The command line after `longrl`; placeholders are replaced (see [`Placeholders`]).
    args: Vec<String>,
    /// Files copied into the case's directory: destination name -> path in the corpus.
    #[serde(default)]
    files: BTreeMap<String, String>,
    /// Steps that prepare the case's directory after the files are copied.
    #[serde(default)]
    setup: Vec<Setup>,
    /// The expected exit status.
    exit: i32,
    /// Where the problem is, as the output must name it.
    place: String,
    /// Other text the output must hold.
    #[serde(default)]
    says: Vec<String>,
    /// Text that must appear exactly once in stderr (an OS error printed once).
    #[serde(default)]
    once: Vec<String>,
    /// Files the command must leave behind, relative to the case's directory.
    #[serde(default)]
    leaves: Vec<String>,
    /// A misbehaving judge to start on loopback; its URL replaces `{judge}`.
    #[serde(default)]
    judge: Option<JudgeKind>,
    /// A signal sent after a delay: `["TERM", 2000]`.
    #[serde(default)]
    signal: Option<(String, u64)>,
    /// Close stdout after its first line (`longrl graph big.rhai | head -1`).
    #[serde(default)]
    first_line_only: bool,
    /// Close stdout before the program writes anything (`longrl stages | true`).
    #[serde(default)]
    stdout_closed: bool,
    /// Nothing may be written to stderr (a closed pipe ends the program quietly).
    #[serde(default)]
    silent_stderr: bool,
    /// The most seconds the case may take.
    #[serde(default = "default_timeout")]
    timeout_s: u64,
}

fn default_timeout() -> u64 {
    20
}

/// A preparation step.
#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum Setup {
    /// Copies the finished base run (see [`base_run`]) to `to` as an attempt killed after its
    /// last checkpoint would leave it: without the report an ended attempt writes (a run whose
    /// report says every stage ended is not resumed; `tests/resume.rs` checks that refusal).
    CopyBaseRun {
        to: String,
    },
    /// Copies a file or directory (placeholders in `from` are replaced).
    Copy {
        from: String,
        to: String,
    },
    Remove {
        path: String,
    },
    /// Keeps the first `fraction` of a file's bytes.
    Truncate {
        path: String,
        fraction: f64,
    },
    FlipLastByte {
        path: String,
    },
    Write {
        path: String,
        text: String,
    },
    /// Sets the value at a JSON pointer of a JSON file.
    JsonSet {
        path: String,
        pointer: String,
        value: serde_json::Value,
    },
    /// Removes a key of a JSON file's top-level object.
    JsonRemove {
        path: String,
        key: String,
    },
    /// Writes NaN into the first value of the first tensor of a safetensors file.
    NanWeight {
        path: String,
    },
    /// Replaces an optimizer file's moments with other bytes behind a valid header.
    ForgeOptimizer {
        path: String,
    },
    /// A recipe of `stages` chained filters after a jsonl source.
    ChainRecipe {
        path: String,
        stages: usize,
    },
    /// A JSON Lines file of one record whose document has `bytes` bytes.
    LongLine {
        path: String,
        bytes: usize,
    },
    /// A JSON Lines file of one record whose question is nested `depth` lists deep.
    NestedLine {
        path: String,
        depth: usize,
    },
}

/// How a loopback judge misbehaves.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
enum JudgeKind {
    /// Accepts the connection, reads the request, never replies.
    Silent,
    /// Accepts and closes the connection at once.
    Hangs,
    /// Nothing listens on the port.
    Refused,
    /// 200 with a body that is not JSON.
    Garbage,
    /// 500 every time.
    Error500,
    /// 401: a final refusal.
    Unauthorized,
    /// 200 JSON without `choices`.
    NoChoices,
    /// 200 with a reply whose verdict is neither YES nor NO.
    NoVerdict,
    /// 200 with a 3 MB reply.
    Huge,
}

/// What a run of the binary produced.
struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

#[test]
fn every_bad_input_of_the_corpus_gets_a_clear_answer() {
    let text = std::fs::read_to_string(corpus().join("cases.json")).expect("cases.json");
    let cases: Vec<Case> = serde_json::from_str(&text).expect("cases.json holds cases");
    let started = Instant::now();
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                while let Some(case) = cases.get(next.fetch_add(1, Ordering::Relaxed)) {
                    if let Err(problem) = run_case(case) {
                        failures.lock().expect("failures").push(format!("{}: {problem}", case.name));
                    }
                }
            });
        }
    });
    let failures = failures.into_inner().expect("failures");
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n\n"));
    let categories: std::collections::BTreeSet<&str> = cases.iter().filter_map(|c| c.name.split('/').next()).collect();
    eprintln!("{} cases in {} categories ({categories:?}) in {:.1} s", cases.len(), categories.len(), started.elapsed().as_secs_f64());
    assert!(cases.len() >= 60 && categories.len() >= 6, "the corpus must stay broad");
}

/// Prepares and runs one case, then checks what it produced.
fn run_case(case: &Case) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let judge = case.judge.map(start_judge);
    let places = Placeholders { dir: dir.path().to_path_buf(), judge: judge.clone() };
    for (dest, source) in &case.files {
        copy_file(&corpus().join(source), &dir.path().join(dest), &places)?;
    }
    for step in &case.setup {
        apply(step, dir.path(), &places).map_err(|e| format!("setup {step:?}: {e}"))?;
    }
    let args: Vec<String> = case.args.iter().map(|a| places.fill(a)).collect();
    let outcome = run_binary(&args, dir.path(), case)?;
    check(case, &outcome, dir.path())
}

/// Every assertion of a case; all problems together.
fn check(case: &Case, outcome: &Outcome, dir: &Path) -> Result<(), String> {
    let mut problems = Vec::new();
    let both = format!("{}\n{}", outcome.stdout, outcome.stderr);
    if outcome.code != Some(case.exit) {
        problems.push(format!("exit status {:?}, expected {}", outcome.code, case.exit));
    }
    if !both.contains(&case.place) {
        problems.push(format!("the output does not name the place `{}`", case.place));
    }
    for text in &case.says {
        if !both.contains(text.as_str()) {
            problems.push(format!("the output does not say `{text}`"));
        }
    }
    for text in &case.once {
        let count = outcome.stderr.matches(text.as_str()).count();
        if count != 1 {
            problems.push(format!("`{text}` appears {count} times in stderr, expected once"));
        }
    }
    for marker in ["panicked", "RUST_BACKTRACE", "stack overflow", "core dumped"] {
        if both.contains(marker) {
            problems.push(format!("the output holds `{marker}`"));
        }
    }
    if case.silent_stderr && !outcome.stderr.trim().is_empty() {
        problems.push("stderr is not empty".into());
    }
    if outcome.stderr.contains('\u{1b}') {
        problems.push("stderr holds colour codes, though it is not a terminal".into());
    }
    if outcome.elapsed > Duration::from_secs(case.timeout_s) {
        problems.push(format!("took {:.1} s, more than {} s", outcome.elapsed.as_secs_f64(), case.timeout_s));
    }
    for file in &case.leaves {
        if !dir.join(file).exists() {
            problems.push(format!("left no {file}"));
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    Err(format!("{}\n--- stdout:\n{}\n--- stderr:\n{}", problems.join("; "), tail(&outcome.stdout), tail(&outcome.stderr)))
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(12)..].join("\n")
}

/// Runs the binary in `dir`, with a kill at twice the case's bound, the signal and the
/// closed stdout the case asks for.
fn run_binary(args: &[String], dir: &Path, case: &Case) -> Result<Outcome, String> {
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_longrl"))
        .args(args)
        .current_dir(dir)
        .env("RUST_LOG", "warn")
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start longrl: {e}"))?;
    let stderr = drain(child.stderr.take());
    let stdout = match child.stdout.take() {
        Some(out) if case.stdout_closed => {
            drop(out);
            std::thread::spawn(String::new)
        }
        Some(out) if case.first_line_only => {
            let mut line = String::new();
            let _ = BufReader::new(out).read_line(&mut line);
            // The reader is gone: the next write hits a closed pipe.
            std::thread::spawn(move || line)
        }
        other => drain(other),
    };
    if let Some((name, after_ms)) = &case.signal {
        std::thread::sleep(Duration::from_millis(*after_ms));
        let sent = Command::new("kill").args([format!("-{name}"), child.id().to_string()]).status();
        if !sent.is_ok_and(|s| s.success()) {
            return Err(format!("cannot send SIG{name}"));
        }
    }
    let code = wait(&mut child, Duration::from_secs(case.timeout_s * 2));
    Ok(Outcome { code, stdout: stdout.join().unwrap_or_default(), stderr: stderr.join().unwrap_or_default(), elapsed: started.elapsed() })
}

/// The exit code, or `None` when the limit passed (the child is killed) or a signal ended it.
fn wait(child: &mut Child, limit: Duration) -> Option<i32> {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.code(),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut pipe) = pipe {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            text = String::from_utf8_lossy(&bytes).into_owned();
        }
        text
    })
}

/// Replaces `{workspace}`, `{dir}` (the case's directory) and `{judge}` (the judge's URL).
struct Placeholders {
    dir: PathBuf,
    judge: Option<String>,
}

impl Placeholders {
    fn fill(&self, text: &str) -> String {
        let mut text = text.replace("{workspace}", &workspace().display().to_string()).replace("{dir}", &self.dir.display().to_string());
        if let Some(url) = &self.judge {
            text = text.replace("{judge}", url);
        }
        text
    }
}

/// Copies a corpus file; UTF-8 text gets its placeholders filled, other bytes are copied as
/// they are.
fn copy_file(from: &Path, to: &Path, places: &Placeholders) -> Result<(), String> {
    let bytes = std::fs::read(from).map_err(|e| format!("{}: {e}", from.display()))?;
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
    }
    let bytes = match std::str::from_utf8(&bytes) {
        Ok(text) => places.fill(text).into_bytes(),
        Err(_) => bytes,
    };
    std::fs::write(to, bytes).map_err(|e| format!("{}: {e}", to.display()))
}

fn apply(step: &Setup, dir: &Path, places: &Placeholders) -> Result<(), String> {
    let at = |path: &str| dir.join(path);
    let io = |e: std::io::Error| e.to_string();
    match step {
        Setup::CopyBaseRun { to } => {
            copy_tree(base_run()?, &at(to))?;
            ["report.json", "report.html"].iter().try_for_each(|name| std::fs::remove_file(at(to).join(name)).map_err(io))
        }
        Setup::Copy { from, to } => {
            let from = PathBuf::from(places.fill(from));
            if from.is_dir() { copy_tree(&from, &at(to)) } else { std::fs::copy(&from, at(to)).map(|_| ()).map_err(io) }
        }
        Setup::Remove { path } => std::fs::remove_file(at(path)).map_err(io),
        Setup::Truncate { path, fraction } => {
            let bytes = std::fs::read(at(path)).map_err(io)?;
            std::fs::write(at(path), &bytes[..(bytes.len() as f64 * fraction) as usize]).map_err(io)
        }
        Setup::FlipLastByte { path } => {
            let mut bytes = std::fs::read(at(path)).map_err(io)?;
            if let Some(last) = bytes.last_mut() {
                *last ^= 0x5a;
            }
            std::fs::write(at(path), bytes).map_err(io)
        }
        Setup::Write { path, text } => std::fs::write(at(path), places.fill(text)).map_err(io),
        Setup::JsonSet { path, pointer, value } => edit_json(&at(path), |json| {
            let slot = json.pointer_mut(pointer).ok_or_else(|| format!("no {pointer}"))?;
            *slot = value.clone();
            Ok(())
        }),
        Setup::JsonRemove { path, key } => {
            edit_json(&at(path), |json| json.as_object_mut().and_then(|o| o.remove(key)).map(|_| ()).ok_or_else(|| format!("no key {key}")))
        }
        Setup::NanWeight { path } => nan_weight(&at(path)),
        Setup::ForgeOptimizer { path } => forge_optimizer(&at(path)),
        Setup::ChainRecipe { path, stages } => {
            let data = workspace().join("examples/data/docqa_sample.jsonl");
            let mut text = format!("let a = jsonl(\"{}\");\n", data.display());
            for _ in 0..*stages {
                text.push_str("a = a.filter(#{});\n");
            }
            text.push_str("a.write_jsonl(\"out.jsonl\");\n");
            std::fs::write(at(path), text).map_err(io)
        }
        Setup::LongLine { path, bytes } => {
            let record =
                serde_json::json!({ "id": "long", "question": "Which?", "context": "filler ".repeat(bytes / 7), "answers": ["x"] });
            std::fs::write(at(path), format!("{record}\n")).map_err(io)
        }
        Setup::NestedLine { path, depth } => {
            std::fs::write(at(path), format!("{{\"question\": {}{}}}\n", "[".repeat(*depth), "]".repeat(*depth))).map_err(io)
        }
    }
}

fn edit_json(path: &Path, change: impl FnOnce(&mut serde_json::Value) -> Result<(), String>) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let mut json: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    change(&mut json)?;
    std::fs::write(path, json.to_string()).map_err(|e| e.to_string())
}

/// NaN into the first f32 of the first tensor (by name) of a safetensors file.
fn nan_weight(path: &Path) -> Result<(), String> {
    let mut bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let header_len = u64::from_le_bytes(bytes[..8].try_into().map_err(|_| "short file")?) as usize;
    let header: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&bytes[8..8 + header_len]).map_err(|e| e.to_string())?;
    let first = header.iter().find(|(name, _)| *name != "__metadata__").ok_or("no tensor")?;
    let offset = first.1["data_offsets"][0].as_u64().ok_or("no offsets")? as usize + 8 + header_len;
    bytes[offset..offset + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(path, bytes).map_err(|e| e.to_string())
}

/// Keeps the header layout of an optimizer file with a short foreign payload and its true
/// length and checksum, so only the decoder can tell.
fn forge_optimizer(path: &Path) -> Result<(), String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let mut payload = bytes[32..].to_vec();
    payload.truncate(1000);
    payload.extend_from_slice(&[0xff; 50]);
    let checksum = payload.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    let mut out = bytes[..16].to_vec();
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&checksum.to_le_bytes());
    out.extend_from_slice(&payload);
    std::fs::write(path, out).map_err(|e| e.to_string())
}

fn copy_tree(from: &Path, to: &Path) -> Result<(), String> {
    std::fs::create_dir_all(to).map_err(|e| e.to_string())?;
    for entry in std::fs::read_dir(from).map_err(|e| format!("{}: {e}", from.display()))? {
        let entry = entry.map_err(|e| e.to_string())?;
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// A finished run of `checkpoints/base.rhai` (SFT with checkpoints), made once for every
/// checkpoint case. Its directory is `base` in a directory kept for the whole test.
fn base_run() -> Result<&'static Path, String> {
    static RUN: OnceLock<Result<(tempfile::TempDir, PathBuf), String>> = OnceLock::new();
    let made = RUN.get_or_init(|| {
        let root = tempfile::tempdir().map_err(|e| e.to_string())?;
        let places = Placeholders { dir: root.path().to_path_buf(), judge: None };
        copy_file(&corpus().join("checkpoints/base.rhai"), &root.path().join("base.rhai"), &places)?;
        let out = Command::new(env!("CARGO_BIN_EXE_longrl"))
            .args(["run", "base.rhai", "--name", "base"])
            .current_dir(root.path())
            .env("RUST_LOG", "warn")
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!("the base run failed: {}", String::from_utf8_lossy(&out.stderr)));
        }
        let run = root.path().join("runs/base");
        Ok((root, run))
    });
    made.as_ref().map(|(_, run)| run.as_path()).map_err(Clone::clone)
}

/// Starts a judge that misbehaves as `kind` on 127.0.0.1; returns its base URL. Its threads
/// live until the test process ends.
fn start_judge(kind: JudgeKind) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    if kind == JudgeKind::Refused {
        drop(listener);
        return format!("http://127.0.0.1:{port}/v1");
    }
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || answer(stream, kind));
        }
    });
    format!("http://127.0.0.1:{port}/v1")
}

/// One connection of a misbehaving judge.
fn answer(mut stream: TcpStream, kind: JudgeKind) {
    if kind == JudgeKind::Hangs {
        return;
    }
    read_request(&mut stream);
    let chat = |content: &str| serde_json::json!({ "choices": [{ "message": { "role": "assistant", "content": content } }] }).to_string();
    let (status, body) = match kind {
        JudgeKind::Silent => {
            std::thread::sleep(Duration::from_secs(120));
            return;
        }
        JudgeKind::Garbage => ("200 OK", "<html>this is not the API</html>".to_string()),
        JudgeKind::Error500 => ("500 Internal Server Error", "overloaded".to_string()),
        JudgeKind::Unauthorized => ("401 Unauthorized", "{\"error\": \"bad key\"}".to_string()),
        JudgeKind::NoChoices => ("200 OK", "{\"object\": \"chat.completion\"}".to_string()),
        JudgeKind::NoVerdict => ("200 OK", chat("They might be the same. [[MAYBE]]")),
        JudgeKind::Huge => ("200 OK", chat(&"YES ".repeat(800_000))),
        JudgeKind::Hangs | JudgeKind::Refused => return,
    };
    let head =
        format!("HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body.as_bytes());
}

/// Reads a request's head and its body (by Content-Length).
fn read_request(stream: &mut TcpStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(stream);
    let mut length = 0usize;
    let mut line = String::new();
    while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
        if line.trim().is_empty() {
            break;
        }
        if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = value.trim().parse().unwrap_or(0);
        }
        line.clear();
    }
    let mut body = vec![0; length];
    let _ = reader.read_exact(&mut body);
}
