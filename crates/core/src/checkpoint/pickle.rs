//! A restricted pickle reader for PyTorch state dicts.
//!
//! It interprets only the opcodes that `torch.save` emits for a dict of tensors and resolves
//! only a fixed allow-list of globals (`collections.OrderedDict`, the tensor rebuild functions
//! and the typed storage classes). Nothing is ever executed: any other global, or any opcode
//! outside the list, is an error. This is what makes loading an untrusted `.pth` safe.

use crate::error::{Error, Result};
use crate::tensor::DType;

/// A tensor as described by the pickle: where its bytes live and how they are laid out.
#[derive(Debug, Clone)]
pub struct PickledTensor {
    /// Storage element type.
    pub dtype: DType,
    /// Storage key: the file `data/<key>` in the archive.
    pub key: String,
    /// Offset into the storage, in elements.
    pub offset: usize,
    /// Shape.
    pub shape: Vec<usize>,
    /// Strides, in elements.
    pub stride: Vec<usize>,
}

#[derive(Debug, Clone)]
enum V {
    Mark,
    None,
    Bool,
    Int(i64),
    Float,
    Str(String),
    Tuple(Vec<V>),
    List(Vec<V>),
    Dict(Vec<(V, V)>),
    Global(Global),
    Storage(DType, String),
    Tensor(PickledTensor),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    Storage(DType),
}

fn resolve_global(module: &str, name: &str) -> Option<Global> {
    Some(match (module, name) {
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
        ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
        ("torch", "FloatStorage") => Global::Storage(DType::F32),
        ("torch", "HalfStorage") => Global::Storage(DType::F16),
        ("torch", "BFloat16Storage") => Global::Storage(DType::BF16),
        ("torch", "DoubleStorage") => Global::Storage(DType::F64),
        ("torch", "LongStorage") => Global::Storage(DType::I64),
        ("torch", "IntStorage") => Global::Storage(DType::I32),
        ("torch", "ByteStorage") => Global::Storage(DType::U8),
        ("torch", "CharStorage") => Global::Storage(DType::I8),
        _ => return None,
    })
}

struct Reader<'a> {
    b: &'a [u8],
    p: usize,
    what: &'a str,
}

impl<'a> Reader<'a> {
    fn err(&self, m: impl std::fmt::Display) -> Error {
        Error::bad(format!("{}: pickle at byte {}: {m}", self.what, self.p))
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let s = self
            .b
            .get(self.p..self.p.saturating_add(n))
            .ok_or_else(|| self.err("unexpected end of data (truncated file?)"))?;
        self.p += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn line(&mut self) -> Result<&'a str> {
        let rest = &self.b[self.p.min(self.b.len())..];
        let n = rest
            .iter()
            .position(|&c| c == b'\n')
            .ok_or_else(|| self.err("unterminated line"))?;
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| self.err("non-UTF-8 name"))?;
        self.p += n + 1;
        Ok(s)
    }
}

fn as_usize(v: &V, r: &Reader, what: &str) -> Result<usize> {
    match v {
        V::Int(i) if *i >= 0 => Ok(*i as usize),
        _ => Err(r.err(format!("expected a non-negative integer for {what}"))),
    }
}

fn as_usizes(v: &V, r: &Reader, what: &str) -> Result<Vec<usize>> {
    match v {
        V::Tuple(xs) | V::List(xs) => xs.iter().map(|x| as_usize(x, r, what)).collect(),
        _ => Err(r.err(format!("expected a tuple for {what}"))),
    }
}

fn call(g: Global, args: Vec<V>, r: &Reader) -> Result<V> {
    match g {
        Global::OrderedDict => Ok(V::Dict(Vec::new())),
        Global::RebuildTensorV2 => {
            if args.len() < 4 {
                return Err(r.err("_rebuild_tensor_v2 with too few arguments"));
            }
            let (dtype, key) = match &args[0] {
                V::Storage(k, key) => (*k, key.clone()),
                _ => return Err(r.err("_rebuild_tensor_v2 without a storage")),
            };
            Ok(V::Tensor(PickledTensor {
                dtype,
                key,
                offset: as_usize(&args[1], r, "storage offset")?,
                shape: as_usizes(&args[2], r, "shape")?,
                stride: as_usizes(&args[3], r, "stride")?,
            }))
        }
        Global::RebuildParameter => match args.into_iter().next() {
            Some(t @ V::Tensor(_)) => Ok(t),
            _ => Err(r.err("_rebuild_parameter without a tensor")),
        },
        Global::Storage(_) => Err(r.err("a storage class cannot be called")),
    }
}

/// Parses a state-dict pickle into `(name, tensor)` pairs in file order. `what` names the file.
pub fn read_state_dict(b: &[u8], what: &str) -> Result<Vec<(String, PickledTensor)>> {
    let mut r = Reader { b, p: 0, what };
    let mut stack: Vec<V> = Vec::new();
    let mut memo: std::collections::HashMap<u32, V> = std::collections::HashMap::new();
    // Pops everything down to the topmost mark.
    fn pop_mark(stack: &mut Vec<V>, r: &Reader) -> Result<Vec<V>> {
        let m = stack
            .iter()
            .rposition(|v| matches!(v, V::Mark))
            .ok_or_else(|| r.err("MARK missing"))?;
        let items = stack.split_off(m + 1);
        stack.pop();
        Ok(items)
    }
    macro_rules! pop {
        () => {
            stack.pop().ok_or_else(|| r.err("stack underflow"))?
        };
    }
    loop {
        let op = r.u8()?;
        match op {
            0x80 => {
                r.u8()?; // PROTO
            }
            0x95 => {
                r.take(8)?; // FRAME
            }
            b'.' => break,
            b'(' => stack.push(V::Mark),
            b'N' => stack.push(V::None),
            0x88 => stack.push(V::Bool),
            0x89 => stack.push(V::Bool),
            b'}' => stack.push(V::Dict(Vec::new())),
            b']' => stack.push(V::List(Vec::new())),
            b')' => stack.push(V::Tuple(Vec::new())),
            b'K' => {
                let v = r.u8()? as i64;
                stack.push(V::Int(v))
            }
            b'M' => {
                let v = r.u16()? as i64;
                stack.push(V::Int(v))
            }
            b'J' => {
                let v = r.u32()? as i32 as i64;
                stack.push(V::Int(v))
            }
            0x8a => {
                // LONG1: little-endian two's complement of n bytes.
                let n = r.u8()? as usize;
                let s = r.take(n)?;
                if n > 8 {
                    return Err(r.err("integer too large"));
                }
                let mut v: i64 = 0;
                for (i, &c) in s.iter().enumerate() {
                    v |= (c as i64) << (8 * i);
                }
                if n > 0 && n < 8 && s[n - 1] & 0x80 != 0 {
                    v -= 1i64 << (8 * n);
                }
                stack.push(V::Int(v))
            }
            b'G' => {
                r.take(8)?;
                stack.push(V::Float)
            }
            b'X' | 0x8c => {
                let n = if op == b'X' {
                    r.u32()? as usize
                } else {
                    r.u8()? as usize
                };
                let s = r.take(n)?;
                let s = std::str::from_utf8(s).map_err(|_| r.err("invalid UTF-8 string"))?;
                stack.push(V::Str(s.to_owned()))
            }
            b'c' => {
                let module = r.line()?;
                let name = r.line()?;
                let g = resolve_global(module, name).ok_or_else(|| {
                    r.err(format!(
                        "refusing global {module}.{name}: only tensors may be loaded"
                    ))
                })?;
                stack.push(V::Global(g))
            }
            0x93 => {
                // STACK_GLOBAL
                let name = pop!();
                let module = pop!();
                match (module, name) {
                    (V::Str(m), V::Str(n)) => {
                        let g = resolve_global(&m, &n).ok_or_else(|| {
                            r.err(format!(
                                "refusing global {m}.{n}: only tensors may be loaded"
                            ))
                        })?;
                        stack.push(V::Global(g))
                    }
                    _ => return Err(r.err("STACK_GLOBAL needs two strings")),
                }
            }
            b'q' => {
                let i = r.u8()? as u32;
                let v = stack
                    .last()
                    .ok_or_else(|| r.err("stack underflow"))?
                    .clone();
                memo.insert(i, v);
            }
            b'r' => {
                let i = r.u32()?;
                let v = stack
                    .last()
                    .ok_or_else(|| r.err("stack underflow"))?
                    .clone();
                memo.insert(i, v);
            }
            0x94 => {
                let i = memo.len() as u32;
                let v = stack
                    .last()
                    .ok_or_else(|| r.err("stack underflow"))?
                    .clone();
                memo.insert(i, v);
            }
            b'h' | b'j' => {
                let i = if op == b'h' { r.u8()? as u32 } else { r.u32()? };
                let v = memo
                    .get(&i)
                    .ok_or_else(|| r.err(format!("memo {i} missing")))?
                    .clone();
                stack.push(v)
            }
            b't' => {
                let items = pop_mark(&mut stack, &r)?;
                stack.push(V::Tuple(items))
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if stack.len() < n {
                    return Err(r.err("stack underflow"));
                }
                let items = stack.split_off(stack.len() - n);
                stack.push(V::Tuple(items))
            }
            b'Q' => {
                let pid = pop!();
                let items = match pid {
                    V::Tuple(items) => items,
                    _ => return Err(r.err("persistent id is not a tuple")),
                };
                match items.as_slice() {
                    [V::Str(tag), V::Global(Global::Storage(kind)), V::Str(key), ..]
                        if tag == "storage" =>
                    {
                        stack.push(V::Storage(*kind, key.clone()))
                    }
                    _ => return Err(r.err("unsupported persistent id (expected a torch storage)")),
                }
            }
            b'R' => {
                let args = pop!();
                let f = pop!();
                let args = match args {
                    V::Tuple(a) => a,
                    _ => return Err(r.err("REDUCE arguments are not a tuple")),
                };
                match f {
                    V::Global(g) => {
                        let v = call(g, args, &r)?;
                        stack.push(v)
                    }
                    _ => return Err(r.err("REDUCE of a non-callable")),
                }
            }
            b'b' => {
                // BUILD: only accepted as a no-op on dicts (OrderedDict state of a parameter).
                let _state = pop!();
            }
            b's' => {
                let v = pop!();
                let k = pop!();
                match stack.last_mut() {
                    Some(V::Dict(d)) => d.push((k, v)),
                    _ => return Err(r.err("SETITEM on a non-dict")),
                }
            }
            b'u' => {
                let items = pop_mark(&mut stack, &r)?;
                if items.len() % 2 != 0 {
                    return Err(r.err("SETITEMS with an odd number of items"));
                }
                match stack.last_mut() {
                    Some(V::Dict(d)) => {
                        let mut it = items.into_iter();
                        while let (Some(k), Some(v)) = (it.next(), it.next()) {
                            d.push((k, v));
                        }
                    }
                    _ => return Err(r.err("SETITEMS on a non-dict")),
                }
            }
            b'a' => {
                let v = pop!();
                match stack.last_mut() {
                    Some(V::List(l)) => l.push(v),
                    _ => return Err(r.err("APPEND on a non-list")),
                }
            }
            b'e' => {
                let items = pop_mark(&mut stack, &r)?;
                match stack.last_mut() {
                    Some(V::List(l)) => l.extend(items),
                    _ => return Err(r.err("APPENDS on a non-list")),
                }
            }
            _ => {
                r.p -= 1;
                return Err(r.err(format!(
                    "unsupported pickle opcode 0x{op:02x}: not a plain tensor state dict"
                )));
            }
        }
        if stack.len() > 1_000_000 {
            return Err(r.err("pickle stack too deep"));
        }
    }
    let top = stack.pop().ok_or_else(|| r.err("empty pickle"))?;
    let dict = match top {
        V::Dict(d) => d,
        _ => return Err(r.err("the pickle is not a dict of tensors")),
    };
    let mut out = Vec::with_capacity(dict.len());
    for (k, v) in dict {
        let name = match k {
            V::Str(s) => s,
            _ => return Err(r.err("a state dict key is not a string")),
        };
        match v {
            V::Tensor(t) => out.push((name, t)),
            // Non-tensor entries (e.g. a step counter) carry no weights; skip them.
            V::Int(_) | V::Float | V::Bool | V::None | V::Str(_) => {}
            _ => return Err(r.err(format!("entry {name} is not a tensor"))),
        }
    }
    Ok(out)
}
