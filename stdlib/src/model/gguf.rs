//! GGUF files (llama.cpp's model format, versions 2 and 3, little-endian): the header,
//! the metadata key-value pairs, the tensor infos and the aligned tensor data, read without
//! trusting a single length in the file. [`quant`] dequantizes the ggml tensor types,
//! [`vocab`] rebuilds a Hugging Face tokenizer from the metadata and [`convert`] writes a
//! Hugging Face model directory that longrl and transformers load.
//!
//! Layout (facts of the GGUF specification): magic `GGUF`, u32 version, u64 tensor count,
//! u64 metadata count; each metadata pair is a string key, a u32 value type and the value;
//! each tensor info is a string name, u32 dimension count, u64 dimensions (fastest first),
//! u32 ggml type and u64 offset into the data section, which starts at the next multiple
//! of `general.alignment` (default 32). Strings are a u64 length and UTF-8 bytes.

pub mod convert;
pub mod quant;
pub mod vocab;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

pub use convert::{ConvertOptions, ConvertSummary, convert_gguf};
pub use quant::GgmlType;

/// What is wrong with a GGUF file; the display names the file.
#[derive(Debug, thiserror::Error)]
#[error("{}: {kind}", path.display())]
pub struct GgufError {
    pub path: PathBuf,
    pub kind: GgufErrorKind,
}

/// The ways a GGUF file can be unusable.
#[derive(Debug, thiserror::Error)]
pub enum GgufErrorKind {
    #[error("cannot read: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a GGUF file (magic bytes {0:?}, expected \"GGUF\")")]
    BadMagic(String),
    #[error("GGUF version {0} is not supported (versions 2 and 3 are)")]
    Version(u32),
    #[error("big-endian GGUF files are not supported")]
    BigEndian,
    #[error("truncated: {0}")]
    Truncated(String),
    #[error("malformed: {0}")]
    Malformed(String),
    #[error("tensor `{tensor}` has unknown ggml type {id}")]
    UnknownType { tensor: String, id: u32 },
    #[error("tensor `{tensor}` has ggml type {ty}, which longrl cannot dequantize (it reads {})", GgmlType::supported_names())]
    UnsupportedType { tensor: String, ty: GgmlType },
    #[error("metadata `{0}` is missing")]
    MissingKey(String),
    #[error("metadata `{key}` {message}")]
    BadValue { key: String, message: String },
    #[error("{0}")]
    Unsupported(String),
    #[error("writing the converted model: {0}")]
    Output(String),
}

impl GgufError {
    pub fn new(path: &Path, kind: GgufErrorKind) -> Self {
        Self { path: path.to_path_buf(), kind }
    }
}

impl From<GgufError> for crate::model::ModelError {
    fn from(err: GgufError) -> Self {
        crate::model::ModelError::Checkpoint { path: err.path, message: err.kind.to_string() }
    }
}

impl From<GgufError> for crate::StageError {
    fn from(err: GgufError) -> Self {
        crate::StageError::Failed(err.to_string())
    }
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// An integer value of any width, if it is one and not negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// A signed integer value of any width.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Self::I8(v) => Some(v.into()),
            Self::I16(v) => Some(v.into()),
            Self::I32(v) => Some(v.into()),
            Self::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// A float value (f32 values are widened through their shortest decimal, so 1e-5 stays
    /// 1e-5 rather than 9.99999974e-6).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => v.to_string().parse().ok(),
            Self::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Self::Array(items) => Some(items),
            _ => None,
        }
    }
}

/// Where one tensor lies in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions as GGUF stores them, fastest-varying first (`[in, out]` for a weight
    /// whose PyTorch shape is `[out, in]`).
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Byte offset from the start of the data section.
    pub offset: u64,
    /// Bytes of data.
    pub size: u64,
}

impl TensorInfo {
    /// The shape in PyTorch / safetensors order (slowest first).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// An open GGUF file: its metadata and tensor infos, tensor data read on demand.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    file: File,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    /// Absolute offset of the data section.
    data_start: u64,
}

/// At most this many dimensions per tensor (ggml's limit).
const MAX_DIMS: u32 = 4;

impl GgufFile {
    /// Opens and checks `path`: magic, version, every metadata pair and tensor info, and that
    /// every tensor's data lies inside the file.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let fail = |kind| GgufError::new(path, kind);
        let file = File::open(path).map_err(|e| fail(GgufErrorKind::Io(e)))?;
        let len = file.metadata().map_err(|e| fail(GgufErrorKind::Io(e)))?.len();
        let mut reader = Cursor { inner: BufReader::new(file), pos: 0, len };
        let (version, tensor_count, kv_count) = read_header(&mut reader).map_err(fail)?;
        let mut metadata = BTreeMap::new();
        for index in 0..kv_count {
            let (key, value) = read_pair(&mut reader).map_err(|k| fail(context(k, &format!("metadata pair {index}"))))?;
            if metadata.contains_key(&key) {
                // Which of two values a reader keeps is unspecified: refuse rather than guess.
                return Err(fail(GgufErrorKind::Malformed(format!("metadata pair {index}: the key `{key}` appears twice"))));
            }
            metadata.insert(key, value);
        }
        let alignment = alignment(&metadata).map_err(fail)?;
        let mut tensors = Vec::new();
        for index in 0..tensor_count {
            tensors.push(read_tensor_info(&mut reader).map_err(|k| fail(context(k, &format!("tensor info {index}"))))?);
        }
        let data_start = reader.pos.div_ceil(alignment) * alignment;
        check_tensor_ranges(&tensors, data_start, len, alignment).map_err(fail)?;
        Ok(Self { path: path.to_path_buf(), file: reader.inner.into_inner(), version, metadata, tensors, data_start })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A metadata value by key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// A tensor info by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor.
    pub fn read_raw(&mut self, info: &TensorInfo) -> Result<Vec<u8>, GgufError> {
        let fail = |e: std::io::Error| {
            GgufError::new(&self.path, GgufErrorKind::Truncated(format!("tensor `{}` data cannot be read: {e}", info.name)))
        };
        let mut bytes = vec![0u8; info.size as usize];
        self.file.seek(SeekFrom::Start(self.data_start + info.offset)).map_err(fail)?;
        self.file.read_exact(&mut bytes).map_err(fail)?;
        Ok(bytes)
    }

    /// A tensor's values as f32, in PyTorch order (see [`TensorInfo::shape`]).
    pub fn read_f32(&mut self, info: &TensorInfo) -> Result<Vec<f32>, GgufError> {
        let bytes = self.read_raw(info)?;
        quant::dequantize(info.ty, &bytes, info.elements() as usize)
            .map_err(|message| GgufError::new(&self.path, GgufErrorKind::Malformed(format!("tensor `{}`: {message}", info.name))))
    }
}

fn context(kind: GgufErrorKind, what: &str) -> GgufErrorKind {
    match kind {
        GgufErrorKind::Truncated(m) => GgufErrorKind::Truncated(format!("{what}: {m}")),
        GgufErrorKind::Malformed(m) => GgufErrorKind::Malformed(format!("{what}: {m}")),
        other => other,
    }
}

/// A reader that knows its position and how many bytes remain, so no length read from the
/// file can ask for more memory than the file holds.
struct Cursor {
    inner: BufReader<File>,
    pos: u64,
    len: u64,
}

impl Cursor {
    fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufErrorKind> {
        let mut buf = [0u8; N];
        self.inner.read_exact(&mut buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => GgufErrorKind::Truncated(format!("the file ends inside {what}")),
            _ => GgufErrorKind::Io(e),
        })?;
        self.pos += N as u64;
        Ok(buf)
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufErrorKind> {
        self.bytes::<4>(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufErrorKind> {
        self.bytes::<8>(what).map(u64::from_le_bytes)
    }

    fn string(&mut self, what: &str) -> Result<String, GgufErrorKind> {
        let len = self.u64(what)?;
        if len > self.remaining() {
            return Err(GgufErrorKind::Truncated(format!("{what} claims {len} bytes, but only {} remain", self.remaining())));
        }
        let mut buf = vec![0u8; len as usize];
        self.inner.read_exact(&mut buf).map_err(GgufErrorKind::Io)?;
        self.pos += len;
        String::from_utf8(buf).map_err(|_| GgufErrorKind::Malformed(format!("{what} is not UTF-8")))
    }
}

fn read_header(reader: &mut Cursor) -> Result<(u32, u64, u64), GgufErrorKind> {
    let magic = reader.bytes::<4>("the magic bytes")?;
    if &magic != b"GGUF" {
        return Err(GgufErrorKind::BadMagic(String::from_utf8_lossy(&magic).into_owned()));
    }
    let version = reader.u32("the version")?;
    if matches!(version.swap_bytes(), 2 | 3) {
        return Err(GgufErrorKind::BigEndian);
    }
    if !matches!(version, 2 | 3) {
        return Err(GgufErrorKind::Version(version));
    }
    let tensors = reader.u64("the tensor count")?;
    let pairs = reader.u64("the metadata count")?;
    // Each tensor info and pair takes at least 8 + 4 bytes: a count beyond that is a lie.
    for (count, what) in [(tensors, "tensor"), (pairs, "metadata")] {
        if count > reader.remaining() / 12 {
            return Err(GgufErrorKind::Truncated(format!("the header claims {count} {what} entries, more than the file can hold")));
        }
    }
    Ok((version, tensors, pairs))
}

fn read_pair(reader: &mut Cursor) -> Result<(String, Value), GgufErrorKind> {
    let key = reader.string("a metadata key")?;
    let ty = reader.u32(&format!("the type of `{key}`"))?;
    let value = read_value(reader, ty, &key, 0)?;
    Ok((key, value))
}

/// Most items a metadata array may hold: eight times the largest vocabulary released (its
/// token list is the longest array a model carries), and a bound on the memory a forged
/// count can make the reader take (each item is one [`Value`]).
const MAX_ARRAY_ITEMS: u64 = 1 << 21;

/// Smallest encoded size of a value of each type, to bound array lengths.
fn min_size(ty: u32) -> u64 {
    match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        _ => 12,
    }
}

fn read_value(reader: &mut Cursor, ty: u32, key: &str, depth: usize) -> Result<Value, GgufErrorKind> {
    let what = format!("the value of `{key}`");
    Ok(match ty {
        0 => Value::U8(reader.bytes::<1>(&what)?[0]),
        1 => Value::I8(i8::from_le_bytes(reader.bytes::<1>(&what)?)),
        2 => Value::U16(u16::from_le_bytes(reader.bytes::<2>(&what)?)),
        3 => Value::I16(i16::from_le_bytes(reader.bytes::<2>(&what)?)),
        4 => Value::U32(reader.u32(&what)?),
        5 => Value::I32(i32::from_le_bytes(reader.bytes::<4>(&what)?)),
        6 => Value::F32(f32::from_le_bytes(reader.bytes::<4>(&what)?)),
        7 => match reader.bytes::<1>(&what)?[0] {
            0 => Value::Bool(false),
            1 => Value::Bool(true),
            other => return Err(GgufErrorKind::Malformed(format!("`{key}` is a bool of value {other}"))),
        },
        8 => Value::String(reader.string(&what)?),
        9 if depth < 4 => {
            let item_ty = reader.u32(&what)?;
            let count = reader.u64(&what)?;
            if count > reader.remaining() / min_size(item_ty) {
                return Err(GgufErrorKind::Truncated(format!("`{key}` claims {count} items, more than the file holds")));
            }
            if count > MAX_ARRAY_ITEMS {
                return Err(GgufErrorKind::Malformed(format!("`{key}` holds {count} items, more than the {MAX_ARRAY_ITEMS} longrl reads")));
            }
            let mut items = Vec::with_capacity(count as usize);
            for _ in 0..count {
                items.push(read_value(reader, item_ty, key, depth + 1)?);
            }
            Value::Array(items)
        }
        10 => Value::U64(reader.u64(&what)?),
        11 => Value::I64(i64::from_le_bytes(reader.bytes::<8>(&what)?)),
        12 => Value::F64(f64::from_le_bytes(reader.bytes::<8>(&what)?)),
        9 => return Err(GgufErrorKind::Malformed(format!("`{key}` nests arrays too deeply"))),
        other => return Err(GgufErrorKind::Malformed(format!("`{key}` has unknown value type {other}"))),
    })
}

fn alignment(metadata: &BTreeMap<String, Value>) -> Result<u64, GgufErrorKind> {
    let Some(value) = metadata.get("general.alignment") else { return Ok(32) };
    match value.as_u64() {
        Some(a) if a > 0 && a.is_power_of_two() => Ok(a),
        _ => Err(GgufErrorKind::BadValue { key: "general.alignment".into(), message: format!("is {value:?}, not a power of two") }),
    }
}

fn read_tensor_info(reader: &mut Cursor) -> Result<TensorInfo, GgufErrorKind> {
    let name = reader.string("a tensor name")?;
    let n_dims = reader.u32(&format!("the rank of `{name}`"))?;
    if n_dims == 0 || n_dims > MAX_DIMS {
        return Err(GgufErrorKind::Malformed(format!("tensor `{name}` has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")));
    }
    let mut dims = Vec::new();
    for _ in 0..n_dims {
        dims.push(reader.u64(&format!("the shape of `{name}`"))?);
    }
    let id = reader.u32(&format!("the type of `{name}`"))?;
    let ty = GgmlType::from_id(id).ok_or_else(|| GgufErrorKind::UnknownType { tensor: name.clone(), id })?;
    let offset = reader.u64(&format!("the offset of `{name}`"))?;
    let size = tensor_size(&name, &dims, ty)?;
    Ok(TensorInfo { name, dims, ty, offset, size })
}

/// Bytes of a tensor's data; its row length must be a whole number of blocks.
fn tensor_size(name: &str, dims: &[u64], ty: GgmlType) -> Result<u64, GgufErrorKind> {
    let elements = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
    let elements = elements.ok_or_else(|| GgufErrorKind::Malformed(format!("tensor `{name}` has an overflowing shape {dims:?}")))?;
    let Some((block, bytes)) = ty.block() else {
        return Err(GgufErrorKind::UnsupportedType { tensor: name.into(), ty });
    };
    if !dims[0].is_multiple_of(block) {
        return Err(GgufErrorKind::Malformed(format!("tensor `{name}` rows of {} values are not whole {ty} blocks of {block}", dims[0])));
    }
    (elements / block).checked_mul(bytes).ok_or_else(|| GgufErrorKind::Malformed(format!("tensor `{name}` has an overflowing size")))
}

fn check_tensor_ranges(tensors: &[TensorInfo], data_start: u64, len: u64, alignment: u64) -> Result<(), GgufErrorKind> {
    let mut names = std::collections::HashSet::new();
    for t in tensors {
        if !names.insert(t.name.as_str()) {
            return Err(GgufErrorKind::Malformed(format!("tensor `{}` appears twice", t.name)));
        }
        if t.offset % alignment != 0 {
            return Err(GgufErrorKind::Malformed(format!(
                "tensor `{}` starts at offset {}, not a multiple of {alignment}",
                t.name, t.offset
            )));
        }
        let end = data_start.checked_add(t.offset).and_then(|s| s.checked_add(t.size));
        if end.is_none_or(|end| end > len) {
            return Err(GgufErrorKind::Truncated(format!(
                "tensor `{}` data needs bytes {}..{} of the file, which has {len}",
                t.name,
                data_start.saturating_add(t.offset),
                data_start.saturating_add(t.offset).saturating_add(t.size)
            )));
        }
    }
    Ok(())
}
