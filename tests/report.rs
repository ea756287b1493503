//! report.html: built from a real (tiny) run with SFT, two RL phases, a hard buffer and an
//! evaluation, then opened in headless Chromium: the page runs its script without errors,
//! has the expected plots, and renders to a screenshot.
//!
//! Chromium comes from the Debian package `chromium` (.ci/run installs it). Without it the
//! browser checks are skipped with a message, unless LONGRL_REQUIRE_CHROMIUM=1 (CI), where
//! its absence fails the test.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::{run_recipe, with_tiny};

const RECIPE: &str = r#"
let tiny = "{tiny}";
let policy = model(tiny, #{ init: "random", init_std: 0.08, seed: 3 });
let traces = synthetic(#{ count: 16, lengths: [64], tokenizer: tiny, kinds: ["retrieval"], distractors: 0, seed: 1 });
let warm = sft(policy, traces, #{ lr: 2e-3, epochs: 1, batch_tokens: 600, log_every: 1 });
let short = synthetic(#{ count: 8, lengths: [64], tokenizer: tiny, kinds: ["retrieval"], distractors: 0, seed: 3 });
let long = synthetic(#{ count: 4, lengths: [160], tokenizer: tiny, kinds: ["retrieval"], distractors: 0, seed: 4 });
let parity = reward(#{ script: |response, record| if record.answers[0].len() % 2 == 0 { 1.0 } else { 0.0 } });
let phase = #{ reward: parity, max_output: 4, group: 2, mini_batch: 2, lr: 1e-3, dynamic_sampling: false, seed: 1, prompts_per_step: 2 };
let first = rl_phase(warm, short, phase + #{ max_input: 100, max_steps: 3 });
let hard = hard_buffer(first.output("reports"), long, #{ policy: "zero_accuracy", mix: 1.0 });
let second = rl_phase(first, hard, phase + #{ min_input: 100, max_input: 200, max_steps: 2 });
let held = synthetic(#{ count: 2, lengths: [64, 128], tokenizer: tiny, kinds: ["retrieval"], distractors: 0, seed: 2 });
evaluate(second, held, #{ max_new_tokens: 4, name: "final" });
"#;

fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"].iter().find_map(|name| {
        let out = Command::new(name).arg("--version").output().ok()?;
        out.status.success().then(|| PathBuf::from(name))
    })
}

/// Loads a page in headless Chromium; returns the DOM after its scripts ran and the
/// console messages that report errors.
fn open_in_browser(browser: &Path, page: &Path, screenshot: Option<&Path>) -> (String, Vec<String>) {
    let url = format!("file://{}", page.display());
    let profile = tempfile::tempdir().expect("profile dir");
    let common = |cmd: &mut Command| {
        cmd.args(["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--enable-logging=stderr", "--v=0"])
            .arg(format!("--user-data-dir={}", profile.path().display()));
    };
    let mut dump = Command::new(browser);
    common(&mut dump);
    let out = dump.args(["--dump-dom", &url]).output().expect("chromium runs");
    assert!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let errors = stderr
        .lines()
        .filter(|l| l.contains("CONSOLE") && (l.contains("Uncaught") || l.contains("Error")) || l.contains("Uncaught"))
        .map(str::to_string)
        .collect();
    if let Some(path) = screenshot {
        let mut shot = Command::new(browser);
        common(&mut shot);
        let out = shot
            .args(["--window-size=1280,2400"])
            .arg(format!("--screenshot={}", path.display()))
            .arg(&url)
            .output()
            .expect("chromium runs");
        assert!(out.status.success(), "screenshot failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    (String::from_utf8_lossy(&out.stdout).into_owned(), errors)
}

#[test]
fn the_report_of_a_run_renders_its_plots_in_a_browser() {
    let dir = tempfile::tempdir().expect("tempdir");
    let report = run_recipe(&with_tiny(RECIPE), "report.rhai", dir.path());
    std::fs::write(dir.path().join("report.json"), serde_json::to_string(&report).expect("json")).expect("report.json");

    let page = longrl_engine::commands::report::write_report(dir.path(), &longrl_stdlib::Registry::standard()).expect("report");
    let html = std::fs::read_to_string(&page).expect("report.html");
    // Loss of SFT and of both phases; reward, length and entropy of both phases; accuracy
    // per phase; buffer size and pass rates; accuracy vs length.
    let expected = [
        ("loss", 3),
        ("reward", 2),
        ("length", 2),
        ("entropy", 2),
        ("phase-accuracy", 1),
        ("buffer-size", 1),
        ("difficulty", 1),
        ("accuracy-length", 1),
    ];
    for (kind, count) in expected {
        assert_eq!(html.matches(&format!("data-plot=\"{kind}\"")).count(), count, "{kind} plots");
    }
    let total: usize = expected.iter().map(|(_, c)| c).sum();
    assert!(!html.contains("src=\"http") && !html.contains("href=\"http"), "self-contained: nothing from the network");

    let Some(browser) = chromium() else {
        assert!(std::env::var("LONGRL_REQUIRE_CHROMIUM").is_err(), "LONGRL_REQUIRE_CHROMIUM is set but no chromium is installed");
        eprintln!("SKIPPED the browser checks: no chromium (apt-get install chromium)");
        return;
    };
    // The error detection itself works: a page with a broken script is caught.
    let broken = dir.path().join("broken.html");
    std::fs::write(&broken, "<html><body><script>notAFunction();</script></body></html>").expect("write");
    let (_, errors) = open_in_browser(&browser, &broken, None);
    assert!(!errors.is_empty(), "a script error goes unnoticed");

    let screenshot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("report-screenshot.png");
    let _ = std::fs::remove_file(&screenshot);
    let (dom, errors) = open_in_browser(&browser, &page, Some(&screenshot));
    assert!(errors.is_empty(), "script errors: {errors:?}");
    // The script ran: it counted the plots and built the table of contents.
    assert!(dom.contains(&format!("data-plots=\"{total}\"")), "the page script did not count {total} plots");
    for section in ["Training", "Curriculum", "Evaluation", "Stages"] {
        assert!(dom.contains(&"href=\"#section-".to_string()) && dom.contains(&format!(">{section}</a>")), "no link to {section}");
    }
    assert_eq!(dom.matches("<svg").count(), total, "every plot is in the rendered page");
    let png = std::fs::read(&screenshot).expect("screenshot");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 20_000, "a screenshot with content ({} bytes)", png.len());
    eprintln!("screenshot: {}", screenshot.display());
}
