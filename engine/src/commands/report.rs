//! `report.html` of a run: one self-contained page (inline SVG drawn with plotters, no
//! network) with the loss and reward curves of every training stage, accuracy per RL phase,
//! accuracy against input length from the evaluations, the hard-sample buffers, and a table
//! of the stages. Built from the run directory alone, so `longrl report` can rebuild it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use longrl_stdlib::fsutil::write_atomic;
use longrl_stdlib::{Chart, Registry, ReportFigure, StageError};
use plotters::prelude::*;
use serde_json::Value;

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone)]
struct MetricLine {
    stage: String,
    step: f64,
    fields: serde_json::Map<String, Value>,
}

impl MetricLine {
    fn get(&self, key: &str) -> Option<f64> {
        self.fields.get(key).and_then(Value::as_f64).filter(|v| v.is_finite())
    }
}

/// A plot: its kind (for tests and styling), caption and SVG.
struct Figure {
    kind: &'static str,
    caption: String,
    svg: String,
}

/// Everything the report reads from a run directory.
struct RunData {
    name: String,
    run_info: Value,
    stages: Vec<Value>,
    metrics: Vec<MetricLine>,
}

fn read_json(path: &Path) -> Result<Option<Value>, StageError> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            serde_json::from_str(&text).map(Some).map_err(|e| StageError::Failed(format!("{}: not valid JSON ({e})", path.display())))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StageError::io(path, e)),
    }
}

fn load(run_dir: &Path) -> Result<RunData, StageError> {
    let metrics_path = run_dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&metrics_path).map_err(|e| StageError::io(&metrics_path, e))?;
    let mut metrics = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(line).map_err(|e| StageError::BadRecord {
            path: metrics_path.clone(),
            line: index + 1,
            message: format!("not a JSON metrics line ({e})"),
        })?;
        let Value::Object(mut fields) = value else {
            return Err(StageError::BadRecord { path: metrics_path.clone(), line: index + 1, message: "not a JSON object".into() });
        };
        let stage = fields.remove("stage").and_then(|s| s.as_str().map(str::to_string)).unwrap_or_default();
        let step = fields.remove("step").and_then(|s| s.as_f64()).unwrap_or(0.0);
        metrics.push(MetricLine { stage, step, fields });
    }
    let report = read_json(&run_dir.join("report.json"))?;
    let stages = report.as_ref().and_then(|r| r["stages"].as_array().cloned()).unwrap_or_default();
    let run_info = read_json(&run_dir.join("run.json"))?.unwrap_or(Value::Null);
    let name = run_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "run".into());
    Ok(RunData { name, run_info, stages, metrics })
}

/// The newest modification time of the stages' checkpoint pointers (`latest.json`,
/// `done.json`): it changes whenever a stage completes a checkpoint or finishes.
pub fn checkpoint_stamp(run_dir: &Path) -> Option<std::time::SystemTime> {
    std::fs::read_dir(run_dir.join("checkpoints"))
        .ok()?
        .flatten()
        .flat_map(|stage| ["latest.json", "done.json"].map(|f| stage.path().join(f)))
        .filter_map(|path| std::fs::metadata(path).and_then(|m| m.modified()).ok())
        .max()
}

/// Writes `report.html` into the run directory (atomically) and returns its path. The
/// stages of `registry` contribute their own figures.
pub fn write_report(run_dir: &Path, registry: &Registry) -> Result<PathBuf, StageError> {
    let html = render(&load(run_dir)?, registry)?;
    let path = run_dir.join("report.html");
    write_atomic(&path, html.as_bytes())?;
    Ok(path)
}

fn plot_error(e: impl std::fmt::Display) -> StageError {
    StageError::Failed(format!("cannot draw a plot: {e}"))
}

const WIDTH: u32 = 560;
const HEIGHT: u32 = 320;

/// The largest magnitude an axis spans: beyond it a span overflows to infinity, and plotters'
/// tick search never ends. Values past it are drawn at its edge.
const AXIS_LIMIT: f64 = 1e30;

/// Bounds of some values (within [`AXIS_LIMIT`]), widened when flat.
fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| !v.is_nan())
        .map(|v| v.clamp(-AXIS_LIMIT, AXIS_LIMIT))
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    // A flat series gets a visible band around its value.
    let pad = if hi - lo < 1e-9 { (hi.abs() * 0.1).max(0.1) } else { (hi - lo) * 0.05 };
    (lo - pad, hi + pad)
}

/// A line chart of named series of (x, y) points.
fn line_chart(
    caption: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[(String, Vec<(f64, f64)>)],
    x_format: &dyn Fn(&f64) -> String,
) -> Result<String, StageError> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let (x0, x1) = range(series.iter().flat_map(|(_, p)| p.iter().map(|(x, _)| *x)));
        let (y0, y1) = range(series.iter().flat_map(|(_, p)| p.iter().map(|(_, y)| *y)));
        let mut chart = ChartBuilder::on(&root)
            .caption(caption, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(plot_error)?;
        let decimals = decimals_for(y1 - y0);
        let y_format = move |v: &f64| format!("{v:.decimals$}");
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .x_labels(8)
            .x_label_formatter(x_format)
            .y_label_formatter(&y_format)
            .light_line_style(RGBColor(238, 238, 238))
            .draw()
            .map_err(plot_error)?;
        for (index, (name, points)) in series.iter().enumerate() {
            let color = Palette99::pick(index).to_rgba();
            // Inside the axes: a point far outside overflows plotters' pixel arithmetic.
            let points: Vec<(f64, f64)> = points.iter().map(|&(x, y)| (x.clamp(x0, x1), y.clamp(y0, y1))).collect();
            chart
                .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))
                .map_err(plot_error)?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
            if points.len() <= 12 {
                chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(plot_error)?;
            }
        }
        if series.len() > 1 || series.first().is_some_and(|(n, _)| !n.is_empty()) {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(200, 200, 200))
                .position(SeriesLabelPosition::LowerRight)
                .draw()
                .map_err(plot_error)?;
        }
        root.present().map_err(plot_error)?;
    }
    Ok(svg)
}

/// A bar chart of named values.
fn bar_chart(caption: &str, y_desc: &str, bars: &[(String, f64)], y_max: Option<f64>) -> Result<String, StageError> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let top = y_max.unwrap_or_else(|| bars.iter().map(|(_, v)| *v).fold(0.0, f64::max) * 1.1).clamp(1e-6, AXIS_LIMIT);
        let labels: Vec<String> = bars.iter().map(|(l, _)| l.clone()).collect();
        // Bar i spans [i - 0.4, i + 0.4] on a continuous axis; ticks at the integers.
        let mut chart = ChartBuilder::on(&root)
            .caption(caption, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(-0.5..bars.len().max(1) as f64 - 0.5, 0.0..top)
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .y_desc(y_desc)
            .disable_x_mesh()
            .x_labels(bars.len().max(1))
            .x_label_formatter(&|v| {
                let i = v.round();
                if (v - i).abs() < 1e-6 && i >= 0.0 { labels.get(i as usize).cloned().unwrap_or_default() } else { String::new() }
            })
            .y_label_formatter(&plain)
            .light_line_style(RGBColor(238, 238, 238))
            .draw()
            .map_err(plot_error)?;
        chart
            .draw_series(bars.iter().enumerate().map(|(i, (_, value))| {
                let color = Palette99::pick(i).to_rgba();
                Rectangle::new([(i as f64 - 0.4, 0.0), (i as f64 + 0.4, value.clamp(0.0, top))], color.filled())
            }))
            .map_err(plot_error)?;
        root.present().map_err(plot_error)?;
    }
    Ok(svg)
}

/// Decimals that tell ticks apart over a span of values (about ten ticks).
fn decimals_for(span: f64) -> usize {
    if span <= 0.0 || !span.is_finite() { 2 } else { (-(span / 10.0).log10()).ceil().clamp(0.0, 8.0) as usize }
}

/// Step numbers: integer ticks only.
fn step(v: &f64) -> String {
    if (v - v.round()).abs() < 1e-9 { format!("{v:.0}") } else { String::new() }
}

fn plain(v: &f64) -> String {
    if v.fract().abs() < 1e-9 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Labels of the stages that logged `key`, in order of first appearance.
fn stages_with(metrics: &[MetricLine], key: &str) -> Vec<String> {
    let mut labels: Vec<String> = Vec::new();
    for line in metrics.iter().filter(|l| l.get(key).is_some()) {
        if !labels.contains(&line.stage) {
            labels.push(line.stage.clone());
        }
    }
    labels
}

fn series_of(metrics: &[MetricLine], stage: &str, key: &str) -> Vec<(f64, f64)> {
    metrics.iter().filter(|l| l.stage == stage).filter_map(|l| l.get(key).map(|v| (l.step, v))).collect()
}

/// The figures each stage contributes (see `StageConfig::report_figures`), drawn; shared
/// bars of one kind are gathered into one chart.
fn stage_figures(data: &RunData, registry: &Registry) -> Result<Vec<(&'static str, Figure)>, StageError> {
    let mut contributed: Vec<ReportFigure> = Vec::new();
    for stage in &data.stages {
        let label = stage["label"].as_str().unwrap_or_default();
        let name = stage["stage"].as_str().unwrap_or_else(|| label.split('#').next().unwrap_or_default());
        let (Some(factory), Some(summary)) = (registry.get(name), stage["summary"].as_object()) else { continue };
        for figure in factory.report_figures(label, summary) {
            match (&figure.chart, contributed.iter_mut().find(|f| f.kind == figure.kind)) {
                (Chart::SharedBar { bar, .. }, Some(ReportFigure { chart: Chart::Bars { bars, .. }, .. })) => bars.push(bar.clone()),
                (Chart::SharedBar { title, y_label, bar, y_max }, None) => contributed.push(ReportFigure {
                    chart: Chart::Bars { title: title.clone(), y_label: y_label.clone(), bars: vec![bar.clone()], y_max: *y_max },
                    ..figure.clone()
                }),
                _ => contributed.push(figure),
            }
        }
    }
    contributed
        .into_iter()
        .map(|figure| {
            let svg = match &figure.chart {
                Chart::Bars { title, y_label, bars, y_max } => bar_chart(title, y_label, bars, *y_max)?,
                Chart::SharedBar { title, y_label, bar, y_max } => bar_chart(title, y_label, std::slice::from_ref(bar), *y_max)?,
            };
            Ok((figure.section, Figure { kind: figure.kind, caption: figure.caption, svg }))
        })
        .collect()
}

fn figures(data: &RunData, registry: &Registry) -> Result<Vec<(String, Vec<Figure>)>, StageError> {
    let metrics = &data.metrics;
    let mut sections = Vec::new();

    // Training curves: loss for every stage that logged one; RL stages add reward,
    // accuracy, response length and entropy.
    let mut training = Vec::new();
    for stage in stages_with(metrics, "loss") {
        let loss = series_of(metrics, &stage, "loss");
        training.push(Figure {
            kind: "loss",
            caption: format!("{stage}: loss per step"),
            svg: line_chart(&format!("{stage}: loss"), "step", "loss", &[(String::new(), loss)], &step)?,
        });
        let reward = series_of(metrics, &stage, "reward_mean");
        if !reward.is_empty() {
            let accuracy = series_of(metrics, &stage, "accuracy");
            training.push(Figure {
                kind: "reward",
                caption: format!("{stage}: mean reward and accuracy of the rollouts per step"),
                svg: line_chart(
                    &format!("{stage}: reward"),
                    "step",
                    "reward / accuracy",
                    &[("reward".into(), reward), ("accuracy".into(), accuracy)],
                    &step,
                )?,
            });
            let length = series_of(metrics, &stage, "response_length");
            training.push(Figure {
                kind: "length",
                caption: format!("{stage}: mean response length (tokens) per step"),
                svg: line_chart(&format!("{stage}: response length"), "step", "tokens", &[(String::new(), length)], &step)?,
            });
            let entropy = series_of(metrics, &stage, "entropy");
            training.push(Figure {
                kind: "entropy",
                caption: format!("{stage}: mean token entropy (nats) per step"),
                svg: line_chart(&format!("{stage}: entropy"), "step", "nats", &[(String::new(), entropy)], &step)?,
            });
        }
    }
    if !training.is_empty() {
        sections.push(("Training".to_string(), training));
    }

    // Figures the stages contribute from their summaries, by section.
    for figure in stage_figures(data, registry)? {
        match sections.iter_mut().find(|(title, _)| title == figure.0) {
            Some((_, figures)) => figures.push(figure.1),
            None => sections.push((figure.0.to_string(), vec![figure.1])),
        }
    }

    // Accuracy against input length, one line per evaluation.
    let mut evals: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for line in metrics.iter().filter(|l| l.fields.contains_key("eval")) {
        let (Some(bucket), Some(pass)) = (line.get("bucket"), line.get("pass_at_1")) else { continue };
        if bucket <= 0.0 {
            continue; // the `all` row
        }
        let name = line.fields["eval"].as_str().unwrap_or(&line.stage).to_string();
        match evals.iter_mut().find(|(n, _)| *n == name) {
            Some((_, points)) => points.push((bucket.log2(), pass)),
            None => evals.push((name, vec![(bucket.log2(), pass)])),
        }
    }
    if !evals.is_empty() {
        for (_, points) in &mut evals {
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        let svg = line_chart("Accuracy vs input length", "input tokens (bucket)", "pass@1", &evals, &|v| {
            if (v - v.round()).abs() < 1e-6 { format!("{:.0}", 2f64.powf(*v)) } else { String::new() }
        })?;
        sections.push((
            "Evaluation".to_string(),
            vec![Figure { kind: "accuracy-length", caption: "pass@1 by input-length bucket for each evaluation".into(), svg }],
        ));
    }
    Ok(sections)
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn render(data: &RunData, registry: &Registry) -> Result<String, StageError> {
    let run_dir_name = escape(&data.name);
    let mut html = String::new();
    let _ = write!(
        html,
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>longrl run {run_dir_name}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; color: #222; }}
nav a {{ margin-right: 12px; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 16px; }}
figure.plot {{ margin: 0; border: 1px solid #ddd; border-radius: 6px; padding: 6px; }}
figcaption {{ font-size: 13px; color: #555; max-width: {WIDTH}px; }}
table {{ border-collapse: collapse; font-size: 13px; }}
td, th {{ border: 1px solid #ddd; padding: 4px 8px; text-align: left; }}
.failed {{ color: #b00; }}
</style></head>
<body>
<h1>Run {run_dir_name}</h1>
<nav id="toc"></nav>
"#
    );
    if !data.run_info.is_null() {
        let _ = writeln!(html, "<p><code>{}</code></p>", escape(&data.run_info.to_string()));
    }
    let sections = figures(data, registry)?;
    for (title, figures) in &sections {
        let _ = writeln!(html, "<h2>{}</h2>\n<div class=\"grid\">", escape(title));
        for figure in figures {
            let _ = writeln!(
                html,
                "<figure class=\"plot\" data-plot=\"{}\">{}<figcaption>{}</figcaption></figure>",
                figure.kind,
                figure.svg,
                escape(&figure.caption)
            );
        }
        html.push_str("</div>\n");
    }
    if !data.stages.is_empty() {
        html.push_str("<h2>Stages</h2>\n<table><tr><th>stage</th><th>line</th><th>status</th><th>wall s</th><th>in</th><th>out</th><th>summary</th></tr>\n");
        for stage in &data.stages {
            let status = stage["status"].as_str().unwrap_or("?");
            let mut summary = stage["summary"].as_object().cloned().unwrap_or_default();
            summary.remove("table");
            summary.remove("rows");
            let _ = writeln!(
                html,
                "<tr class=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{:.1}</td><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
                if status == "failed" { "failed" } else { "" },
                escape(stage["label"].as_str().unwrap_or("?")),
                stage["line"],
                escape(status),
                stage["wall_s"].as_f64().unwrap_or(0.0),
                stage["items_in"],
                stage["items_out"],
                escape(&Value::Object(summary).to_string()),
            );
        }
        html.push_str("</table>\n");
    }
    // The table of contents and a count of the plots, filled in by the browser.
    html.push_str(
        r##"<script>
(function () {
  var toc = document.getElementById("toc");
  document.querySelectorAll("h2").forEach(function (h, i) {
    h.id = "section-" + i;
    var a = document.createElement("a");
    a.href = "#" + h.id;
    a.textContent = h.textContent;
    toc.appendChild(a);
  });
  document.body.dataset.plots = String(document.querySelectorAll("figure.plot svg").length);
})();
</script>
</body></html>
"##,
    );
    Ok(html)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(stage: &str, step: f64, fields: Value) -> MetricLine {
        MetricLine { stage: stage.into(), step, fields: fields.as_object().cloned().expect("object") }
    }

    #[test]
    fn a_run_gets_a_plot_per_curve_and_the_expected_kinds() {
        let metrics = vec![
            line("sft#3", 0.0, serde_json::json!({ "loss": 2.0 })),
            line("sft#3", 1.0, serde_json::json!({ "loss": 1.5 })),
            line(
                "rl_phase#4",
                0.0,
                serde_json::json!({ "loss": 0.1, "reward_mean": 0.2, "accuracy": 0.2, "response_length": 30, "entropy": 0.5 }),
            ),
            line(
                "rl_phase#4",
                1.0,
                serde_json::json!({ "loss": 0.0, "reward_mean": 0.4, "accuracy": 0.4, "response_length": 28, "entropy": 0.4 }),
            ),
            line("evaluate#5", 0.0, serde_json::json!({ "eval": "sft", "bucket": 256, "pass_at_1": 0.7 })),
            line("evaluate#5", 0.0, serde_json::json!({ "eval": "sft", "bucket": 512, "pass_at_1": 0.4 })),
        ];
        let stages = vec![
            serde_json::json!({ "stage": "rl_phase", "label": "rl_phase#4", "line": 3, "status": "ok", "wall_s": 1.0, "items_in": 1, "items_out": 1, "summary": { "accuracy": 0.3 } }),
        ];
        let data = RunData { name: "demo".into(), run_info: Value::Null, stages, metrics };
        let html = render(&data, &Registry::standard()).expect("renders");
        for kind in ["loss", "reward", "length", "entropy", "phase-accuracy", "accuracy-length"] {
            assert!(html.contains(&format!("data-plot=\"{kind}\"")), "no {kind} plot");
        }
        assert_eq!(html.matches("<figure class=\"plot\"").count(), 7, "2 losses, 3 more RL curves, phases, eval");
        assert!(html.contains("<svg") && html.contains("polyline"), "plots are inline SVG");
        assert!(!html.contains("src=\"http") && !html.contains("href=\"http"), "nothing is fetched from the network");
    }

    #[test]
    fn values_near_the_float_limits_are_drawn_at_the_axis_limit_and_end() {
        // A span of 2e308 overflows; plotters' tick search would then never end.
        let metrics = vec![
            line("sft#3", 0.0, serde_json::json!({ "loss": 1e308 })),
            line("sft#3", 1.0, serde_json::json!({ "loss": -1e308 })),
            line("sft#3", 1e308, serde_json::json!({ "loss": 0.5 })),
        ];
        let data = RunData { name: "extreme".into(), run_info: Value::Null, stages: Vec::new(), metrics };
        let html = render(&data, &Registry::standard()).expect("renders");
        assert!(html.contains("data-plot=\"loss\""));
        let (lo, hi) = range([1e308, -1e308, f64::NAN].into_iter());
        assert!((hi - lo).is_finite() && hi >= AXIS_LIMIT && lo <= -AXIS_LIMIT, "{lo} {hi}");
    }
}
