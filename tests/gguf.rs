//! GGUF import against independent references (tests/fixtures/gguf/make_fixture.py): every
//! supported ggml type against the gguf package's dequantizer, converted tiny Llamas against
//! the logits and greedy tokens transformers computes from the same GGUF files, the rebuilt
//! tokenizer against the tokenizer the vocabulary came from, and clear errors (naming the
//! file) for malformed files.

use std::path::{Path, PathBuf};
use std::process::Command;

use burn::tensor::{Int, Tensor, TensorData};
use longrl_backends::Cpu;
use longrl_stdlib::model::chat::ModelTokenizer;
use longrl_stdlib::model::generate::{SamplingConfig, generate_group};
use longrl_stdlib::model::gguf::{ConvertOptions, GgmlType, GgufFile, convert_gguf};
use longrl_stdlib::model::{SaveDtype, load_model};
use longrl_stdlib::record::ChatMessage;
use safetensors::SafeTensors;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

fn fixture(name: &str) -> PathBuf {
    workspace().join("tests/fixtures/gguf").join(name)
}

fn reference_tensor(path: &Path, name: &str) -> (Vec<usize>, Vec<f64>) {
    let bytes = std::fs::read(path).expect("reference file");
    let tensors = SafeTensors::deserialize(&bytes).expect("valid reference");
    let view = tensors.tensor(name).expect("tensor present");
    let values = match view.dtype() {
        safetensors::Dtype::I64 => view.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as f64).collect(),
        safetensors::Dtype::F32 => {
            view.data().chunks_exact(4).map(|c| f64::from(f32::from_le_bytes(c.try_into().expect("4 bytes")))).collect()
        }
        other => panic!("unexpected dtype {other:?}"),
    };
    (view.shape().to_vec(), values)
}

#[test]
fn every_supported_type_dequantizes_as_the_gguf_package_does() {
    let mut file = GgufFile::open(&fixture("quants.gguf")).expect("opens");
    let names: Vec<String> = file.tensors.iter().map(|t| t.name.clone()).filter(|n| !n.starts_with("ref.")).collect();
    assert_eq!(names.len(), 13, "{names:?}");
    for name in names {
        let info = file.tensor(&name).expect("tensor").clone();
        let reference = file.tensor(&format!("ref.{name}")).expect("reference").clone();
        assert_eq!(info.ty.name(), name);
        assert_eq!(reference.ty, GgmlType::F32);
        assert_eq!(info.shape(), reference.shape());
        let got = file.read_f32(&info).expect("dequantizes");
        let want = file.read_f32(&reference).expect("reads");
        let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        let scale = want.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
        println!("{name}: max |longrl - gguf| = {worst:.2e} (values up to {scale:.2})");
        assert_eq!(worst, 0.0, "{name}: bit for bit");
    }
}

/// Converts a fixture and checks longrl's logits and greedy tokens against transformers'.
fn golden(name: &str, dtype: SaveDtype, tolerance: f32) -> f32 {
    let out = tempfile::tempdir().expect("tempdir");
    let summary = convert_gguf(&fixture(&format!("{name}.gguf")), out.path(), &ConvertOptions { dtype }).expect("converts");
    assert_eq!(summary.tied_embeddings, name.ends_with("-tied"));
    let (_, model) = load_model::<Cpu>(out.path(), &Default::default()).expect("loads");
    let reference = fixture(&format!("reference-{name}.safetensors"));
    let (shape, ids) = reference_tensor(&reference, "input_ids");
    let ids: Vec<u32> = ids.iter().map(|&v| v as u32).collect();
    let tokens = Tensor::<Cpu, 2, Int>::from_data(
        TensorData::new(ids.iter().map(|&t| i64::from(t)).collect::<Vec<_>>(), [shape[0], shape[1]]),
        &Default::default(),
    );
    let logits: Vec<f32> = model.forward(tokens).into_data().convert::<f32>().into_vec().expect("f32 logits");
    let (_, expected) = reference_tensor(&reference, "logits");
    assert_eq!(logits.len(), expected.len());
    let diff = logits.iter().zip(&expected).map(|(a, &b)| (a - b as f32).abs()).fold(0.0f32, f32::max);
    println!("{name} ({dtype:?}): max |logit - transformers| = {diff:.2e}");
    assert!(diff < tolerance, "{name}: logits differ by {diff}");
    let (steps, greedy) = reference_tensor(&reference, "greedy");
    let generated = generate_group(&model, &ids[..shape[1]], 1, &SamplingConfig::greedy(steps[1])).expect("generates");
    if dtype == SaveDtype::F32 {
        assert_eq!(generated[0].tokens, greedy.iter().map(|&v| v as u32).collect::<Vec<_>>(), "{name}: greedy tokens");
    }
    diff
}

#[test]
fn converted_tiny_llamas_match_transformers_logits_and_greedy_tokens() {
    let worst = golden("tiny-llama-tied", SaveDtype::F32, 1e-4).max(golden("tiny-llama-untied", SaveDtype::F32, 1e-4));
    println!("worst logit difference: {worst:.2e}");
    // bf16 weights: the same model, rounded.
    golden("tiny-llama-tied", SaveDtype::Bf16, 0.05);
}

#[test]
fn the_rebuilt_tokenizer_and_chat_template_match_the_originals() {
    let out = tempfile::tempdir().expect("tempdir");
    convert_gguf(&fixture("tiny-llama-tied.gguf"), out.path(), &ConvertOptions::default()).expect("converts");
    let tokenizer = ModelTokenizer::load(out.path()).expect("tokenizer loads");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("reference.json")).expect("read")).expect("json");
    for sample in reference["samples"].as_array().expect("samples") {
        let text = sample["text"].as_str().expect("text");
        let want: Vec<u32> = sample["ids"].as_array().expect("ids").iter().map(|v| v.as_u64().expect("id") as u32).collect();
        assert_eq!(tokenizer.tokenizer.encode(text).expect("encodes"), want, "{text:?}");
        assert_eq!(tokenizer.tokenizer.decode(&want, false).expect("decodes"), text, "round trip of {text:?}");
    }
    let messages: Vec<ChatMessage> = serde_json::from_value(reference["chat"]["messages"].clone()).expect("messages");
    let template = tokenizer.template.as_ref().expect("a chat template");
    let rendered = template.render(&messages, true, &serde_json::Value::Null).expect("renders");
    assert_eq!(rendered, reference["chat"]["rendered"].as_str().expect("rendered"));
    // <|im_end|> (id 2) ends a turn, as the GGUF's eos id says.
    assert_eq!(tokenizer.end_of_turn, Some(2));
    assert!(tokenizer.stop_ids.contains(&2));
}

/// A minimal GGUF file: header, metadata pairs and tensor infos (each already encoded),
/// padding to 32, then `data`.
fn gguf_bytes(version: u32, pairs: &[Vec<u8>], infos: &[Vec<u8>], data: &[u8]) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend(version.to_le_bytes());
    out.extend((infos.len() as u64).to_le_bytes());
    out.extend((pairs.len() as u64).to_le_bytes());
    for part in pairs.iter().chain(infos) {
        out.extend(part);
    }
    out.resize(out.len().div_ceil(32) * 32, 0);
    out.extend(data);
    out
}

fn gguf_string(text: &str) -> Vec<u8> {
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text.as_bytes());
    out
}

fn u32_pair(key: &str, value: u32) -> Vec<u8> {
    let mut out = gguf_string(key);
    out.extend(4u32.to_le_bytes());
    out.extend(value.to_le_bytes());
    out
}

fn tensor_info(name: &str, dims: &[u64], ty: u32, offset: u64) -> Vec<u8> {
    let mut out = gguf_string(name);
    out.extend((dims.len() as u32).to_le_bytes());
    for d in dims {
        out.extend(d.to_le_bytes());
    }
    out.extend(ty.to_le_bytes());
    out.extend(offset.to_le_bytes());
    out
}

/// Writes `bytes` as a .gguf file and returns the error message of opening it.
fn open_error(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("write");
    let err = GgufFile::open(&path).expect_err("malformed");
    let message = err.to_string();
    assert!(message.starts_with(&path.display().to_string()), "the error names the file: {message}");
    message
}

#[test]
fn malformed_files_are_errors_that_name_the_file_and_the_fault() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let pair = u32_pair("general.alignment", 32);
    let f32_info = tensor_info("w", &[4, 2], 0, 0);
    let good = gguf_bytes(3, std::slice::from_ref(&pair), std::slice::from_ref(&f32_info), &[0u8; 32]);
    let path = d.join("good.gguf");
    std::fs::write(&path, &good).expect("write");
    let mut file = GgufFile::open(&path).expect("a hand-built file opens");
    let info = file.tensor("w").expect("tensor").clone();
    assert_eq!((info.shape(), file.read_f32(&info).expect("reads")), (vec![2, 4], vec![0.0; 8]));

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("magic.gguf", b"GGML\x03\0\0\0".to_vec(), "not a GGUF file (magic bytes \"GGML\""),
        ("empty.gguf", Vec::new(), "truncated: the file ends inside the magic bytes"),
        ("v1.gguf", gguf_bytes(1, &[], &[], &[]), "GGUF version 1 is not supported"),
        ("big.gguf", gguf_bytes(3u32.swap_bytes(), &[], &[], &[]), "big-endian GGUF files are not supported"),
        ("header.gguf", good[..20].to_vec(), "truncated: the file ends inside the metadata count"),
        ("data.gguf", good[..good.len() - 1].to_vec(), "truncated: tensor `w` data needs bytes 128..160 of the file, which has 159"),
        ("type.gguf", gguf_bytes(3, &[], &[tensor_info("w", &[4, 2], 99, 0)], &[0u8; 32]), "tensor `w` has unknown ggml type 99"),
        (
            "iq.gguf",
            gguf_bytes(3, &[], &[tensor_info("w", &[256], 16, 0)], &[0u8; 64]),
            "tensor `w` has ggml type IQ2_XXS, which longrl cannot dequantize",
        ),
        ("blocks.gguf", gguf_bytes(3, &[], &[tensor_info("w", &[30], 8, 0)], &[0u8; 64]), "rows of 30 values are not whole Q8_0 blocks"),
        ("rank.gguf", gguf_bytes(3, &[], &[tensor_info("w", &[1, 1, 1, 1, 1], 0, 0)], &[0u8; 32]), "has 5 dimensions"),
        ("align.gguf", gguf_bytes(3, &[u32_pair("general.alignment", 24)], &[], &[]), "`general.alignment` is U32(24), not a power of two"),
        (
            "twice.gguf",
            gguf_bytes(3, &[pair.clone(), u32_pair("general.alignment", 64)], &[], &[]),
            "metadata pair 1: the key `general.alignment` appears twice",
        ),
    ];
    for (name, bytes, expected) in cases {
        let message = open_error(d, name, &bytes);
        assert!(message.contains(expected), "{name}: {message}");
    }
    // Lengths in the file are never trusted: a string claiming a terabyte, an array claiming
    // billions of items.
    let mut huge_key = (1u64 << 40).to_le_bytes().to_vec();
    huge_key.extend(b"key");
    let message = open_error(d, "string.gguf", &gguf_bytes(3, &[huge_key], &[], &[]));
    assert!(message.contains("claims 1099511627776 bytes"), "{message}");
    let mut huge_array = gguf_string("tokenizer.ggml.tokens");
    huge_array.extend(9u32.to_le_bytes());
    huge_array.extend(8u32.to_le_bytes());
    huge_array.extend(u64::MAX.to_le_bytes());
    let message = open_error(d, "array.gguf", &gguf_bytes(3, &[huge_array], &[], &[]));
    assert!(message.contains("claims 18446744073709551615 items"), "{message}");
    // An array the file does hold, but of more items than any model's metadata: each would
    // take a 32-byte value in memory.
    let mut long_array = gguf_string("tokenizer.ggml.token_type");
    long_array.extend(9u32.to_le_bytes());
    long_array.extend(0u32.to_le_bytes());
    long_array.extend(3_000_000u64.to_le_bytes());
    long_array.extend(vec![1u8; 3_000_000]);
    let message = open_error(d, "long.gguf", &gguf_bytes(3, &[long_array], &[], &[]));
    assert!(message.contains("holds 3000000 items, more than the 2097152 longrl reads"), "{message}");
}

#[test]
fn a_forged_layer_count_is_refused_before_any_tensor_is_planned() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut bytes = std::fs::read(fixture("tiny-llama-tied.gguf")).expect("fixture");
    let key = b"llama.block_count";
    let at = bytes.windows(key.len()).position(|w| w == key).expect("the fixture names its layer count") + key.len();
    assert_eq!(bytes[at..at + 4], 4u32.to_le_bytes(), "a u32 value");
    bytes[at + 4..at + 8].copy_from_slice(&4_000_000_000u32.to_le_bytes());
    let path = dir.path().join("forged.gguf");
    std::fs::write(&path, &bytes).expect("write");
    let out = dir.path().join("out");
    let err = convert_gguf(&path, &out, &ConvertOptions::default()).expect_err("four billion layers").to_string();
    assert!(err.starts_with(&path.display().to_string()), "the error names the file: {err}");
    assert!(err.contains("num_hidden_layers is 4000000000") || err.contains("memory available on this machine"), "{err}");
    assert!(!out.exists(), "nothing is written");
}

#[test]
fn files_that_are_not_convertible_llamas_say_why() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A valid GGUF without llama metadata.
    let path = dir.path().join("bare.gguf");
    std::fs::write(&path, gguf_bytes(3, &[], &[tensor_info("w", &[4, 2], 0, 0)], &[0u8; 32])).expect("write");
    let err = convert_gguf(&path, &dir.path().join("out"), &ConvertOptions::default()).expect_err("not a llama");
    assert!(err.to_string().contains("architecture `` is not supported (longrl converts llama GGUF files)"), "{err}");
    // The quant fixture has llama architecture but no tokenizer and no llama tensors.
    let err = convert_gguf(&fixture("quants.gguf"), &dir.path().join("out"), &ConvertOptions::default()).expect_err("not a model");
    assert!(err.to_string().contains("metadata `tokenizer.ggml.model` is missing"), "{err}");
}

fn longrl(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_longrl")).args(args).current_dir(workspace()).env("RUST_LOG", "warn").output().expect("longrl runs")
}

#[test]
fn the_convert_command_writes_a_model_that_generate_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out_dir = dir.path().join("tiny");
    let out = out_dir.to_str().expect("utf-8");
    // What a killed conversion leaves: its staging directory beside the target.
    std::fs::create_dir(dir.path().join(".tiny.k1ll3d.partial")).expect("stale staging");
    let run = longrl(&["convert", "gguf", "tests/fixtures/gguf/tiny-llama-untied.gguf", out]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let beside: Vec<String> =
        std::fs::read_dir(dir.path()).expect("list").map(|e| e.expect("entry").file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(beside, ["tiny"], "the model appears whole, and nothing else is left beside it");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(stdout.contains("converted a llama model") && stdout.contains("1 Q8_0") && stdout.contains("untied"), "{stdout}");
    for file in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        assert!(out_dir.join(file).is_file(), "{file} missing");
    }
    // A second conversion into the same directory needs --force.
    let again = longrl(&["convert", "gguf", "tests/fixtures/gguf/tiny-llama-untied.gguf", out]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("pass --force"));
    let generated = longrl(&["generate", "--model", out, "--chat", "--prompt", "Hi", "--max-new-tokens", "4"]);
    assert!(generated.status.success(), "{}", String::from_utf8_lossy(&generated.stderr));
    // A bad file: exit 1 and a message naming it.
    let broken = dir.path().join("broken.gguf");
    std::fs::write(&broken, b"GGUF\x03\0\0\0").expect("write");
    let failed = longrl(&["convert", "gguf", broken.to_str().expect("utf-8"), dir.path().join("x").to_str().expect("utf-8")]);
    assert_eq!(failed.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(stderr.contains("broken.gguf: truncated: the file ends inside the tensor count"), "{stderr}");
}

#[test]
fn a_gguf_path_in_model_is_converted_into_the_run_directory() {
    use longrl_engine::dataflow::executor::RunOptions;
    use longrl_engine::dataflow::recipe::Params;
    use longrl_engine::{execute, load_plan};
    use longrl_stdlib::{CancelToken, Registry, StageContext};

    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::standard();
    let recipe = format!(r#"model("{}");"#, fixture("tiny-llama-untied.gguf").display());
    let plan = load_plan(&recipe, "gguf.rhai", &registry, &Params::new()).expect("recipe");
    let plan = plan.validate(&registry, &StageContext::for_check(dir.path())).expect("valid");
    let mut options = RunOptions::in_dir(dir.path());
    options.run_dir = Some(dir.path().to_path_buf());
    let report = execute(&plan, &registry, &options, &CancelToken::new()).expect("runs");
    assert!(report.succeeded(), "{report}");
    let (config, _) = load_model::<Cpu>(&dir.path().join("model-0"), &Default::default()).expect("the converted model loads");
    assert_eq!((config.hidden_size, config.tie_word_embeddings), (32, false));

    // A broken GGUF, or random init of one, is a check-time problem naming the file.
    let broken = dir.path().join("broken.gguf");
    std::fs::write(&broken, b"GGUF\x01\0\0\0").expect("write");
    let recipe = format!(r#"model("{}", #{{ init: "random" }});"#, broken.display());
    let plan = load_plan(&recipe, "gguf.rhai", &registry, &Params::new()).expect("recipe");
    let problems = plan.validate(&registry, &StageContext::for_check(dir.path())).expect_err("invalid").to_string();
    assert!(problems.contains("broken.gguf: GGUF version 1 is not supported"), "{problems}");
    assert!(problems.contains("a .gguf model brings its weights"), "{problems}");
}
