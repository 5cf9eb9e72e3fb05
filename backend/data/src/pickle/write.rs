//! The pickle writer: protocol 3, with numpy arrays in the `_reconstruct` + BUILD form that
//! numpy 1.x and 2.x both load.

use std::path::Path;

use super::Value;
use crate::error::{DataError, Result};
use crate::ndarray::{ArrayData, DType};

fn err<T>(msg: impl Into<String>) -> Result<T> {
    Err(DataError::Pickle(msg.into()))
}

/// Write a pickle file (protocol 3).
pub fn write_pickle(path: &Path, value: &Value) -> Result<()> {
    std::fs::write(path, to_pickle_bytes(value)?).map_err(|e| DataError::io(path, e))
}

/// Serialise a value as a protocol-3 pickle.
pub fn to_pickle_bytes(value: &Value) -> Result<Vec<u8>> {
    let mut out = vec![0x80, 3];
    write_value(&mut out, value)?;
    out.push(b'.');
    Ok(out)
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'X');
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn write_global(out: &mut Vec<u8>, module: &str, name: &str) {
    out.push(b'c');
    out.extend_from_slice(format!("{module}\n{name}\n").as_bytes());
}

fn write_dtype(out: &mut Vec<u8>, dt: &DType) {
    write_global(out, "numpy", "dtype");
    let descr = dt.descr();
    write_str(out, descr.trim_start_matches(['<', '|', '>']));
    out.extend_from_slice(&[0x89, 0x88, 0x87, b'R']);
    let (order, elsize, align, flags) = match dt.kind {
        'U' => ("<", dt.size as i64, 4, 8),
        'S' => ("|", dt.size as i64, 1, 0),
        'O' => ("|", -1, -1, 63),
        _ if dt.size == 1 => ("|", -1, -1, 0),
        _ => ("<", -1, -1, 0),
    };
    let state = Value::Tuple(vec![
        Value::Int(3),
        Value::Str(order.into()),
        Value::None,
        Value::None,
        Value::None,
        Value::Int(elsize),
        Value::Int(align),
        Value::Int(flags),
    ]);
    let _ = write_value(out, &state);
    out.push(b'b');
}

fn write_value(out: &mut Vec<u8>, v: &Value) -> Result<()> {
    match v {
        Value::None => out.push(b'N'),
        Value::Bool(b) => out.push(if *b { 0x88 } else { 0x89 }),
        Value::Int(i) => {
            if let Ok(x) = i32::try_from(*i) {
                out.push(b'J');
                out.extend_from_slice(&x.to_le_bytes());
            } else {
                out.extend_from_slice(&[0x8a, 8]);
                out.extend_from_slice(&i.to_le_bytes());
            }
        }
        Value::Float(f) => {
            out.push(b'G');
            out.extend_from_slice(&f.to_be_bytes());
        }
        Value::Str(s) => write_str(out, s),
        Value::Bytes(b) => {
            out.push(b'B');
            out.extend_from_slice(&(b.len() as u32).to_le_bytes());
            out.extend_from_slice(b);
        }
        Value::List(items) => {
            out.push(b']');
            for chunk in items.chunks(1000) {
                out.push(b'(');
                for x in chunk {
                    write_value(out, x)?;
                }
                out.push(b'e');
            }
        }
        Value::Tuple(items) => {
            out.push(b'(');
            for x in items {
                write_value(out, x)?;
            }
            out.push(b't');
        }
        Value::Dict(items) => {
            out.push(b'}');
            for chunk in items.chunks(1000) {
                out.push(b'(');
                for (k, x) in chunk {
                    write_value(out, k)?;
                    write_value(out, x)?;
                }
                out.push(b'u');
            }
        }
        Value::Dtype(dt) => write_dtype(out, dt),
        Value::Array(a) => {
            write_global(out, "numpy.core.multiarray", "_reconstruct");
            write_global(out, "numpy", "ndarray");
            write_value(out, &Value::Tuple(vec![Value::Int(0)]))?;
            out.extend_from_slice(&[b'C', 1, b'b', 0x87, b'R']);
            out.push(b'(');
            write_value(out, &Value::Int(1))?;
            write_value(
                out,
                &Value::Tuple(a.shape.iter().map(|&d| Value::Int(d as i64)).collect()),
            )?;
            write_dtype(out, &a.dtype);
            out.push(0x89);
            match &a.data {
                ArrayData::Raw(r) => write_value(out, &Value::Bytes(r.clone()))?,
                ArrayData::Objects(o) => write_value(out, &Value::List(o.clone()))?,
            }
            out.extend_from_slice(b"tb");
        }
        Value::Global(m, n) => write_global(out, m, n),
        Value::Object(..) => return err("cannot pickle arbitrary objects"),
    }
    Ok(())
}
