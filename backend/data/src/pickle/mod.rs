//! A minimal Python pickle reader (protocols 0-5 opcodes that plain data uses) and writer
//! (protocol 3). Supports dict, list, tuple, set, str, bytes, int, float, bool, None, numpy
//! arrays (`_reconstruct` + BUILD, protocol-5 `_frombuffer`, object arrays, str arrays),
//! numpy dtypes and scalars. Other objects come back as [`Value::Object`].

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;

use crate::error::{DataError, Result};
use crate::ndarray::{ArrayData, DType, NdArray};

/// A Python value from a pickle.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// None.
    None,
    /// bool.
    Bool(bool),
    /// int (must fit in i64).
    Int(i64),
    /// float.
    Float(f64),
    /// str.
    Str(String),
    /// bytes (and Python 2 str).
    Bytes(Vec<u8>),
    /// list (sets come back as lists too).
    List(Vec<Value>),
    /// tuple.
    Tuple(Vec<Value>),
    /// dict, in insertion order.
    Dict(Vec<(Value, Value)>),
    /// numpy.ndarray.
    Array(NdArray),
    /// numpy.dtype.
    Dtype(DType),
    /// A global reference (class or function) such as `numpy.ndarray`.
    Global(String, String),
    /// Any other object: the callable, its arguments and the BUILD state.
    Object(Box<Value>, Box<Value>, Option<Box<Value>>),
}

impl Value {
    /// The str (or latin-1 decoded bytes).
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            Value::Bytes(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }

    /// A number as f64 (int, float, bool, or a one-element array).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Int(i) => Some(*i as f64),
            Value::Float(f) => Some(*f),
            Value::Bool(b) => Some(*b as u8 as f64),
            Value::Array(a) if a.len() == 1 => a.to_f64().ok().map(|v| v[0]),
            _ => None,
        }
    }

    /// Look a string key up in a dict.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Dict(items) => items
                .iter()
                .rev()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    /// Elements of a list/tuple/array as f64.
    pub fn to_f64_vec(&self) -> Result<Vec<f64>> {
        match self {
            Value::Array(a) => a.to_f64(),
            Value::List(v) | Value::Tuple(v) => v
                .iter()
                .map(|x| {
                    x.as_f64()
                        .ok_or_else(|| DataError::Pickle(format!("not a number: {x:?}")))
                })
                .collect(),
            other => Err(DataError::Pickle(format!(
                "expected a number list, got {other:?}"
            ))),
        }
    }

    /// Elements of a list/tuple/array as strings.
    pub fn to_string_vec(&self) -> Result<Vec<String>> {
        match self {
            Value::Array(a) => a.to_strings(),
            Value::List(v) | Value::Tuple(v) => v
                .iter()
                .map(|x| {
                    x.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| DataError::Pickle(format!("not a str: {x:?}")))
                })
                .collect(),
            other => Err(DataError::Pickle(format!(
                "expected a str list, got {other:?}"
            ))),
        }
    }
}

type Slot = Rc<RefCell<Value>>;

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Slot>,
    marks: Vec<usize>,
    memo: HashMap<u64, Slot>,
}

fn err<T>(msg: impl Into<String>) -> Result<T> {
    Err(DataError::Pickle(msg.into()))
}

fn take(slot: Slot) -> Value {
    Rc::try_unwrap(slot)
        .map(RefCell::into_inner)
        .unwrap_or_else(|rc| rc.borrow().clone())
}

fn is_numpy(module: &str, names: &[&str], name: &str) -> bool {
    module.starts_with("numpy") && names.contains(&name)
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        let s = self
            .data
            .get(self.pos..self.pos + n)
            .ok_or_else(|| DataError::Pickle("truncated".into()))?;
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.bytes(1)?[0])
    }
    fn u32(&mut self) -> Result<usize> {
        let b = self.bytes(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }
    fn u64(&mut self) -> Result<usize> {
        let b = self.bytes(8)?;
        Ok(u64::from_le_bytes(b.try_into().unwrap_or_default()) as usize)
    }
    fn line(&mut self) -> Result<&'a str> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| DataError::Pickle("missing newline".into()))?;
        self.pos += n + 1;
        std::str::from_utf8(&rest[..n]).map_err(|_| DataError::Pickle("non-text line".into()))
    }
    fn push(&mut self, v: Value) {
        self.stack.push(Rc::new(RefCell::new(v)));
    }
    fn pop(&mut self) -> Result<Slot> {
        self.stack
            .pop()
            .ok_or_else(|| DataError::Pickle("stack underflow".into()))
    }
    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| DataError::Pickle("no mark".into()))?;
        if m > self.stack.len() {
            return err("mark beyond stack");
        }
        Ok(self.stack.drain(m..).map(take).collect())
    }
    fn top(&self) -> Result<&Slot> {
        self.stack
            .last()
            .ok_or_else(|| DataError::Pickle("empty stack".into()))
    }
    fn memo_put(&mut self, key: u64) -> Result<()> {
        let top = self.top()?.clone();
        self.memo.insert(key, top);
        Ok(())
    }
    fn memo_get(&mut self, key: u64) -> Result<()> {
        let v = self
            .memo
            .get(&key)
            .cloned()
            .ok_or_else(|| DataError::Pickle(format!("memo {key} missing")))?;
        self.stack.push(v);
        Ok(())
    }
    fn extend_top(&mut self, items: Vec<Value>) -> Result<()> {
        let top = self.top()?.clone();
        let mut t = top.borrow_mut();
        match &mut *t {
            Value::List(l) => l.extend(items),
            other => return err(format!("append to {other:?}")),
        }
        Ok(())
    }
    fn set_items(&mut self, items: Vec<Value>) -> Result<()> {
        let top = self.top()?.clone();
        let mut t = top.borrow_mut();
        let Value::Dict(d) = &mut *t else {
            return err("setitem on a non-dict");
        };
        // Python dicts have unique keys; a repeated key (possible in hand-made streams) is
        // kept, and lookups take the last one, as Python would.
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            d.push((k, v));
        }
        Ok(())
    }

    fn run(mut self) -> Result<Value> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?;
                }
                0x95 => {
                    self.u64()?;
                }
                b'.' => return Ok(take(self.pop()?)),
                b'N' => self.push(Value::None),
                0x88 => self.push(Value::Bool(true)),
                0x89 => self.push(Value::Bool(false)),
                b'J' => {
                    let b = self.bytes(4)?;
                    self.push(Value::Int(
                        i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64
                    ));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(v as i64));
                }
                b'M' => {
                    let b = self.bytes(2)?;
                    self.push(Value::Int(u16::from_le_bytes([b[0], b[1]]) as i64));
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a {
                        self.u8()? as usize
                    } else {
                        self.u32()?
                    };
                    let b = self.bytes(n)?;
                    if n > 8 {
                        return err("integer wider than 64 bits");
                    }
                    let mut buf = if b.last().is_some_and(|&x| x & 0x80 != 0) {
                        [0xffu8; 8]
                    } else {
                        [0u8; 8]
                    };
                    buf[..n].copy_from_slice(b);
                    self.push(Value::Int(i64::from_le_bytes(buf)));
                }
                b'I' | b'L' => {
                    let l = self.line()?.trim_end_matches('L');
                    let v = match l {
                        "01" => Value::Bool(true),
                        "00" => Value::Bool(false),
                        s => Value::Int(
                            s.parse()
                                .map_err(|_| DataError::Pickle(format!("bad int {s}")))?,
                        ),
                    };
                    self.push(v);
                }
                b'G' => {
                    let b = self.bytes(8)?;
                    self.push(Value::Float(f64::from_be_bytes(
                        b.try_into().unwrap_or_default(),
                    )));
                }
                b'F' => {
                    let l = self.line()?;
                    self.push(Value::Float(
                        l.trim()
                            .parse()
                            .map_err(|_| DataError::Pickle("bad float".into()))?,
                    ));
                }
                b'X' | 0x8c | 0x8d => {
                    let n = match op {
                        b'X' => self.u32()?,
                        0x8c => self.u8()? as usize,
                        _ => self.u64()?,
                    };
                    let s = String::from_utf8(self.bytes(n)?.to_vec())
                        .map_err(|_| DataError::Pickle("bad utf-8".into()))?;
                    self.push(Value::Str(s));
                }
                b'V' => {
                    let l = self.line()?.to_string();
                    self.push(Value::Str(l));
                }
                b'B' | b'C' | 0x8e | 0x96 | b'T' | b'U' => {
                    let n = match op {
                        b'B' | b'T' => self.u32()?,
                        b'C' | b'U' => self.u8()? as usize,
                        _ => self.u64()?,
                    };
                    let b = self.bytes(n)?.to_vec();
                    self.push(Value::Bytes(b));
                }
                0x97 | 0x98 => return err("out-of-band pickle buffers are not supported"),
                b']' | b'l' | 0x8f => {
                    let items = if op == b'l' {
                        self.pop_mark()?
                    } else {
                        Vec::new()
                    };
                    self.push(Value::List(items));
                }
                b'}' => self.push(Value::Dict(Vec::new())),
                b'd' => {
                    let items = self.pop_mark()?;
                    self.push(Value::Dict(Vec::new()));
                    self.set_items(items)?;
                }
                b')' => self.push(Value::Tuple(Vec::new())),
                b't' | 0x91 => {
                    let items = self.pop_mark()?;
                    self.push(if op == b't' {
                        Value::Tuple(items)
                    } else {
                        Value::List(items)
                    });
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return err("stack underflow");
                    }
                    let at = self.stack.len() - n;
                    let items = self.stack.drain(at..).map(take).collect();
                    self.push(Value::Tuple(items));
                }
                b'(' => self.marks.push(self.stack.len()),
                b'a' => {
                    let v = take(self.pop()?);
                    self.extend_top(vec![v])?;
                }
                b'e' | 0x90 => {
                    let items = self.pop_mark()?;
                    self.extend_top(items)?;
                }
                b's' => {
                    let v = take(self.pop()?);
                    let k = take(self.pop()?);
                    self.set_items(vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?;
                }
                b'p' => {
                    let k = self
                        .line()?
                        .parse()
                        .map_err(|_| DataError::Pickle("bad memo key".into()))?;
                    self.memo_put(k)?;
                }
                b'q' => {
                    let k = self.u8()? as u64;
                    self.memo_put(k)?;
                }
                b'r' => {
                    let k = self.u32()? as u64;
                    self.memo_put(k)?;
                }
                0x94 => {
                    let k = self.memo.len() as u64;
                    self.memo_put(k)?;
                }
                b'g' => {
                    let k = self
                        .line()?
                        .parse()
                        .map_err(|_| DataError::Pickle("bad memo key".into()))?;
                    self.memo_get(k)?;
                }
                b'h' => {
                    let k = self.u8()? as u64;
                    self.memo_get(k)?;
                }
                b'j' => {
                    let k = self.u32()? as u64;
                    self.memo_get(k)?;
                }
                b'c' => {
                    let module = self.line()?.to_string();
                    let name = self.line()?.to_string();
                    self.push(Value::Global(module, name));
                }
                0x93 => {
                    let name = take(self.pop()?);
                    let module = take(self.pop()?);
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => self.push(Value::Global(m, n)),
                        _ => return err("STACK_GLOBAL needs two str"),
                    }
                }
                b'R' | 0x81 => {
                    let args = take(self.pop()?);
                    let func = take(self.pop()?);
                    let v = reduce(func, args)?;
                    self.push(v);
                }
                0x92 => {
                    let _kwargs = self.pop()?;
                    let args = take(self.pop()?);
                    let cls = take(self.pop()?);
                    self.push(Value::Object(Box::new(cls), Box::new(args), None));
                }
                b'b' => {
                    let state = take(self.pop()?);
                    let top = self.top()?.clone();
                    let current = std::mem::replace(&mut *top.borrow_mut(), Value::None);
                    *top.borrow_mut() = build(current, state)?;
                }
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let t = self.top()?.clone();
                    self.stack.push(t);
                }
                other => {
                    return err(format!(
                        "unsupported opcode 0x{other:02x} at {}",
                        self.pos - 1
                    ))
                }
            }
        }
    }
}

fn tuple_items(v: Value) -> Vec<Value> {
    match v {
        Value::Tuple(t) | Value::List(t) => t,
        other => vec![other],
    }
}

fn shape_of(v: &Value) -> Result<Vec<usize>> {
    v.to_f64_vec()
        .map(|s| s.into_iter().map(|d| d as usize).collect())
}

fn reduce(func: Value, args: Value) -> Result<Value> {
    let Value::Global(module, name) = &func else {
        return Ok(Value::Object(Box::new(func), Box::new(args), None));
    };
    let (module, name) = (module.as_str(), name.as_str());
    let mut a = tuple_items(args.clone());
    Ok(match (module, name) {
        (m, "dtype") if m.starts_with("numpy") => match a.first().and_then(Value::as_str) {
            Some(d) => Value::Dtype(DType::parse(d)?),
            None => return err("dtype without a type string"),
        },
        (m, n) if is_numpy(m, &["_frombuffer"], n) && a.len() >= 4 => {
            let fortran = a[3].as_str() == Some("F");
            let shape = shape_of(&a[2])?;
            let Value::Dtype(dt) = a[1] else {
                return err("_frombuffer without dtype");
            };
            let Value::Bytes(buf) = &a[0] else {
                return err("_frombuffer without bytes");
            };
            Value::Array(NdArray::from_raw(dt, shape, fortran, buf)?)
        }
        (m, "scalar") if m.starts_with("numpy") && a.len() >= 2 => {
            let Value::Dtype(dt) = a[0] else {
                return err("scalar without dtype");
            };
            let raw = match a.swap_remove(1) {
                Value::Bytes(b) => b,
                Value::Str(s) => s.chars().map(|c| c as u32 as u8).collect(),
                _ => return err("scalar without data"),
            };
            let x = NdArray::from_raw(dt, vec![1], false, &raw)?;
            match dt.kind {
                'f' => Value::Float(x.to_f64()?[0]),
                'b' => Value::Bool(x.to_f64()?[0] != 0.0),
                'U' | 'S' => Value::Str(x.to_strings()?.remove(0)),
                _ => Value::Int(x.to_f64()?[0] as i64),
            }
        }
        ("_codecs", "encode") => match a.first() {
            Some(Value::Str(s)) => Value::Bytes(s.chars().map(|c| c as u32 as u8).collect()),
            _ => return err("_codecs.encode without str"),
        },
        ("builtins" | "__builtin__", "bytearray" | "bytes") => match a.into_iter().next() {
            Some(Value::Bytes(b)) => Value::Bytes(b),
            _ => Value::Bytes(Vec::new()),
        },
        ("builtins" | "__builtin__", "set" | "frozenset" | "list" | "tuple") => {
            match a.into_iter().next() {
                Some(Value::List(l)) | Some(Value::Tuple(l)) => Value::List(l),
                _ => Value::List(Vec::new()),
            }
        }
        ("collections", "OrderedDict") => Value::Dict(Vec::new()),
        _ => Value::Object(Box::new(func), Box::new(args), None),
    })
}

fn build(current: Value, state: Value) -> Result<Value> {
    match current {
        Value::Dtype(mut dt) => {
            let s = tuple_items(state);
            if let Some(o) = s.get(1).and_then(Value::as_str) {
                dt.big_endian = o == ">";
            }
            if let Some(e) = s.get(5).and_then(Value::as_f64) {
                if e > 0.0 && matches!(dt.kind, 'U' | 'S') {
                    dt.size = e as usize;
                }
            }
            Ok(Value::Dtype(dt))
        }
        Value::Object(func, args, None) if matches!(&*func, Value::Global(m, n) if is_numpy(m, &["_reconstruct"], n)) =>
        {
            let mut s = tuple_items(state);
            if s.len() == 5 {
                s.remove(0);
            }
            if s.len() != 4 {
                return err("ndarray state must have 4 or 5 items");
            }
            let shape = shape_of(&s[0])?;
            let Value::Dtype(dt) = s[1] else {
                return err("ndarray state without dtype");
            };
            let fortran = s[2].as_f64().unwrap_or(0.0) != 0.0;
            match s.swap_remove(3) {
                Value::Bytes(b) => Ok(Value::Array(NdArray::from_raw(dt, shape, fortran, &b)?)),
                Value::Str(t) => {
                    let b: Vec<u8> = t.chars().map(|c| c as u32 as u8).collect();
                    Ok(Value::Array(NdArray::from_raw(dt, shape, fortran, &b)?))
                }
                Value::List(items) => Ok(Value::Array(NdArray {
                    dtype: dt,
                    shape,
                    data: ArrayData::Objects(items),
                })),
                _ => {
                    let _ = args;
                    err("ndarray state with unsupported data")
                }
            }
        }
        Value::Dict(mut d) => {
            if let Value::Dict(extra) = state {
                d.extend(extra);
            }
            Ok(Value::Dict(d))
        }
        Value::Object(f, a, _) => Ok(Value::Object(f, a, Some(Box::new(state)))),
        other => Ok(other),
    }
}

/// Parse pickle bytes.
pub fn from_pickle_bytes(data: &[u8]) -> Result<Value> {
    Reader {
        data,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
    }
    .run()
}

/// Read a pickle file.
pub fn read_pickle(path: &Path) -> Result<Value> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    from_pickle_bytes(&bytes).map_err(|e| DataError::Pickle(format!("{}: {e}", path.display())))
}

mod write;
pub use write::{to_pickle_bytes, write_pickle};

#[cfg(test)]
mod tests;
